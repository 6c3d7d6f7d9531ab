-- When the user proved the email (NULL: not yet; see
-- auth.email_verification). Users from before are taken as verified:
-- operators created them, or registration asked for no proof.
ALTER TABLE users ADD COLUMN email_verified_at INTEGER;
UPDATE users SET email_verified_at = created_at;
