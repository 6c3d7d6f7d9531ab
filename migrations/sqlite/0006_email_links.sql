-- Links mailed to users become of two kinds: password resets (as before)
-- and email verifications. The table is renamed for what it holds, and each
-- row says which kind it is; a link of one kind never serves the other.
-- For a verification link, `password_fingerprint` holds the SHA-256 of the
-- email it proves (the column keeps its name: it is what the link is bound
-- to).
ALTER TABLE password_resets RENAME TO email_links;
ALTER TABLE email_links ADD COLUMN purpose TEXT NOT NULL DEFAULT 'password_reset';
DROP INDEX password_resets_user;
DROP INDEX password_resets_expires_at;
CREATE INDEX email_links_user ON email_links (tenant_id, user_id, purpose);
CREATE INDEX email_links_expires_at ON email_links (expires_at);
-- When the user proved the email (NULL: not yet). Users from before are
-- taken as verified: operators created them, or registration asked nothing.
ALTER TABLE users ADD COLUMN email_verified_at INTEGER;
UPDATE users SET email_verified_at = created_at;
