-- The same column and meaning as migrations/sqlite/0007_user_deletion.sql.
ALTER TABLE users ADD COLUMN deleted_at bigint;
