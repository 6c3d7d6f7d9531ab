-- The same column and meaning as migrations/sqlite/0013_totp_setup_expiry.sql.
ALTER TABLE users ADD COLUMN totp_pending_at bigint;
