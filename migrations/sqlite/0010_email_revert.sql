-- Revert links (purpose 'email_revert', see `POST /auth/email/revert`): made
-- in the transaction that confirms an email change, mailed to the address
-- the change left (in the `email.changed` notice), whose `new_email` they
-- hold. `seq` numbers a user's revert links in the order of the changes
-- (1, 2, ...; NULL for the other kinds): a revert voids the user's revert
-- links of later changes and keeps those of earlier ones, so the order must
-- be the database's, not a clock's.
ALTER TABLE email_links ADD COLUMN seq INTEGER;
-- Registration and email changes look up whether an address is where a live
-- revert link would move its user back.
CREATE INDEX email_links_new_email ON email_links (tenant_id, new_email);
