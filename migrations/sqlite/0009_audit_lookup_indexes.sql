-- Indexes for finding a person's audit events: `user delete --forget` and
-- `user forget` erase the events of a user (by tenant and user id) and
-- those recorded with its addresses (by email), and `audit list --email`
-- selects by email. Without them each scans the whole log, inside the
-- delete's transaction.
CREATE INDEX audit_events_user ON audit_events (tenant_id, user_id);
CREATE INDEX audit_events_email ON audit_events (email);
