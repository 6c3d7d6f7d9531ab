-- Sign-in links (`purpose = 'login'` in email_links). A session opened
-- with one records it, so that its refreshed tokens keep saying how the
-- login was made (`amr`: `email` rather than `pwd`) and `GET
-- /auth/sessions` shows it.
ALTER TABLE sessions ADD COLUMN via_link INTEGER NOT NULL DEFAULT 0;
-- A sign-in link asked for with a PKCE `code_challenge` (RFC 7636, S256:
-- the base64url SHA-256 of a verifier the asking app keeps) opens a
-- session only for a request that presents that verifier.
ALTER TABLE email_links ADD COLUMN code_challenge TEXT;
