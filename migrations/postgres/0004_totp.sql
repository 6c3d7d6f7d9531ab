-- A second factor per user (TOTP): the same columns and meaning as
-- migrations/sqlite/0004_totp.sql.
ALTER TABLE users ADD COLUMN totp_secret text;
ALTER TABLE users ADD COLUMN totp_pending text;
ALTER TABLE users ADD COLUMN totp_last_step bigint;
ALTER TABLE users ADD COLUMN totp_failures bigint NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN totp_recovery text;
ALTER TABLE sessions ADD COLUMN mfa boolean NOT NULL DEFAULT false;
