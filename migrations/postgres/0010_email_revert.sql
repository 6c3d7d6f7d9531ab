-- The same column and meaning as migrations/sqlite/0010_email_revert.sql.
ALTER TABLE email_links ADD COLUMN seq integer;
CREATE INDEX email_links_new_email ON email_links (tenant_id, new_email);
