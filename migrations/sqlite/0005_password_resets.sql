-- Password reset links (`POST /auth/password/forgot`, `gateway user
-- reset-token`): one row per link. Only the SHA-256 of the token is stored.
-- `password_fingerprint` is the SHA-256 of the user's password hash when the
-- link was made: a link made before the password changed (by the user, an
-- operator or another link) no longer sets it. `used_at` is set when the link
-- is spent, or when a newer link of the same user replaces it.
CREATE TABLE password_resets (
    id                    BLOB PRIMARY KEY NOT NULL,
    token_hash            BLOB NOT NULL UNIQUE,
    tenant_id             BLOB NOT NULL REFERENCES tenants(id),
    user_id               BLOB NOT NULL REFERENCES users(id),
    password_fingerprint  BLOB NOT NULL,
    created_at            INTEGER NOT NULL,
    expires_at            INTEGER NOT NULL,
    used_at               INTEGER
);
CREATE INDEX password_resets_user ON password_resets (tenant_id, user_id);
CREATE INDEX password_resets_expires_at ON password_resets (expires_at);
