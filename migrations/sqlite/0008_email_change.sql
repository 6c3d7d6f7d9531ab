-- Email change links (purpose 'email_change', see `POST /auth/email/change`):
-- the address the link moves its user to, which it was mailed to. NULL for
-- the other kinds. Such a link's `password_fingerprint` binds it to the
-- user's email and password hash when it was made: a change of either (a
-- reset after a compromise) kills it.
ALTER TABLE email_links ADD COLUMN new_email TEXT;
