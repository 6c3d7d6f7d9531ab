-- The same column and meaning as migrations/sqlite/0011_login_links.sql.
ALTER TABLE sessions ADD COLUMN via_link boolean NOT NULL DEFAULT false;
ALTER TABLE email_links ADD COLUMN code_challenge text;
