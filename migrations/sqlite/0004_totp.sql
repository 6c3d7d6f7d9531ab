-- A second factor per user (TOTP, RFC 6238): `totp_secret` (base32) once the
-- user confirmed it with a code, `totp_pending` while one is being set up,
-- `totp_last_step`, the time step of the last code accepted, so that a code
-- is accepted once, and `totp_failures`, the wrong codes since the last right
-- one (past a limit the factor is locked until an operator resets it).
ALTER TABLE users ADD COLUMN totp_secret TEXT;
ALTER TABLE users ADD COLUMN totp_pending TEXT;
ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
ALTER TABLE users ADD COLUMN totp_failures INTEGER NOT NULL DEFAULT 0;
-- The SHA-256 hashes (hex, space-separated) of the recovery codes not yet used.
ALTER TABLE users ADD COLUMN totp_recovery TEXT;
-- Whether a session's login passed the second factor: its tokens, refreshed
-- ones included, say so (`amr`), and routes with `mfa = true` demand it.
ALTER TABLE sessions ADD COLUMN mfa INTEGER NOT NULL DEFAULT 0;
