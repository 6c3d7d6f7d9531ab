-- Indexes for pruning (`database.session_retention`): spent refresh tokens
-- are found by their expiry, and the chain link of the token after a pruned
-- one is cleared by its parent_id.
CREATE INDEX refresh_tokens_expires_at ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_parent ON refresh_tokens (parent_id);
