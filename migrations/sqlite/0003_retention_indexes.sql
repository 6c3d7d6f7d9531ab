-- Indexes for pruning (`database.session_retention`,
-- `database.audit_retention`): spent refresh tokens are found by their
-- expiry, the chain link of the token after a pruned one is cleared by its
-- parent_id, and old audit events are found by their time.
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_parent ON refresh_tokens (parent_id);
CREATE INDEX audit_events_at ON audit_events (at);
