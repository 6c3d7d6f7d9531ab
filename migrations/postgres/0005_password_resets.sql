-- Password reset links: the same table and meaning as
-- migrations/sqlite/0005_password_resets.sql.
CREATE TABLE password_resets (
    id                    uuid PRIMARY KEY,
    token_hash            bytea NOT NULL UNIQUE,
    tenant_id             uuid NOT NULL REFERENCES tenants(id),
    user_id               uuid NOT NULL REFERENCES users(id),
    password_fingerprint  bytea NOT NULL,
    created_at            bigint NOT NULL,
    expires_at            bigint NOT NULL,
    used_at               bigint
);
CREATE INDEX password_resets_user ON password_resets (tenant_id, user_id);
CREATE INDEX password_resets_expires_at ON password_resets (expires_at);
