-- The same indexes and reasons as migrations/sqlite/0009_audit_lookup_indexes.sql.
-- A plain CREATE INDEX holds audit writes while it builds, and on a very
-- large log it may outlast database.statement_timeout: raise that for the
-- migration (`gateway migrate`) if it is cancelled.
CREATE INDEX audit_events_user ON audit_events (tenant_id, user_id);
CREATE INDEX audit_events_email ON audit_events (email);
