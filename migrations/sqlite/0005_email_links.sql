-- Links mailed to users (or handed over by an operator): one row per link,
-- of one `purpose`, 'password_reset' or 'email_verification'; a link of one
-- kind never serves the other. Only the SHA-256 of the token is stored.
-- `password_fingerprint` is the SHA-256 of what the link is bound to: for a
-- reset, the user's password hash when the link was made (a link made
-- before the password changed, by the user, an operator or another link,
-- no longer sets it); for a verification, the email it proves. `used_at` is
-- set when the link is spent, or when a newer link of the same user and
-- kind, or a disable, voids it.
CREATE TABLE email_links (
    id                    BLOB PRIMARY KEY NOT NULL,
    token_hash            BLOB NOT NULL UNIQUE,
    tenant_id             BLOB NOT NULL REFERENCES tenants(id),
    user_id               BLOB NOT NULL REFERENCES users(id),
    purpose               TEXT NOT NULL,
    password_fingerprint  BLOB NOT NULL,
    created_at            INTEGER NOT NULL,
    expires_at            INTEGER NOT NULL,
    used_at               INTEGER
);
CREATE INDEX email_links_user ON email_links (tenant_id, user_id, purpose);
CREATE INDEX email_links_expires_at ON email_links (expires_at);
