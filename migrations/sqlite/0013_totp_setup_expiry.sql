-- When the TOTP secret being set up (`totp_pending`) was made: a setup
-- is confirmed within `auth::service::MFA_SETUP_TTL` or not at all, and
-- older ones are cleared hourly (the secret was shown once, to a screen
-- that may have been seen). NULL for setups from before this column:
-- those count as expired.
ALTER TABLE users ADD COLUMN totp_pending_at INTEGER;
