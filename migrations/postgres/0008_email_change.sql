-- The same column and meaning as migrations/sqlite/0008_email_change.sql.
ALTER TABLE email_links ADD COLUMN new_email text;
