-- Tenants can be disabled (`gateway tenant disable`): their users cannot log
-- in or refresh, and their sessions are revoked. `updated_at` stamps the
-- disable for the revocation poll, as `users.updated_at` does for a user's.
ALTER TABLE tenants ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tenants ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
UPDATE tenants SET updated_at = created_at;
-- The condition is written as the poll's query writes it, or SQLite ignores the index.
CREATE INDEX tenants_disabled_updated ON tenants (updated_at) WHERE disabled;
