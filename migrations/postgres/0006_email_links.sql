-- Links of two kinds, and users' verified emails: the same change and
-- meaning as migrations/sqlite/0006_email_links.sql.
ALTER TABLE password_resets RENAME TO email_links;
ALTER TABLE email_links ADD COLUMN purpose text NOT NULL DEFAULT 'password_reset';
DROP INDEX password_resets_user;
DROP INDEX password_resets_expires_at;
CREATE INDEX email_links_user ON email_links (tenant_id, user_id, purpose);
CREATE INDEX email_links_expires_at ON email_links (expires_at);
ALTER TABLE users ADD COLUMN email_verified_at bigint;
UPDATE users SET email_verified_at = created_at;
