-- Links mailed to users: the same table and meaning as
-- migrations/sqlite/0005_email_links.sql.
CREATE TABLE email_links (
    id                    uuid PRIMARY KEY,
    token_hash            bytea NOT NULL UNIQUE,
    tenant_id             uuid NOT NULL REFERENCES tenants(id),
    user_id               uuid NOT NULL REFERENCES users(id),
    purpose               text NOT NULL,
    password_fingerprint  bytea NOT NULL,
    created_at            bigint NOT NULL,
    expires_at            bigint NOT NULL,
    used_at               bigint
);
CREATE INDEX email_links_user ON email_links (tenant_id, user_id, purpose);
CREATE INDEX email_links_expires_at ON email_links (expires_at);
