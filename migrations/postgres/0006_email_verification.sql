-- The same column and meaning as migrations/sqlite/0006_email_verification.sql.
ALTER TABLE users ADD COLUMN email_verified_at bigint;
UPDATE users SET email_verified_at = created_at;
