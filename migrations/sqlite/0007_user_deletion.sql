-- When an operator deleted the user (`gateway user delete`). The row stays,
-- as a tombstone with nothing that identifies the person (email replaced,
-- password, roles, scopes and second factor erased, disabled), so that its
-- revoked sessions go on refusing its tokens and its audit events keep a
-- user id to point at.
ALTER TABLE users ADD COLUMN deleted_at INTEGER;
