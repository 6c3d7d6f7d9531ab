-- Tenants can be disabled (`gateway tenant disable`): the same columns and
-- meaning as migrations/sqlite/0002_tenant_disable.sql, and a notification
-- like the one for a disabled user, so that every replica refuses the
-- tenant's tokens within milliseconds.
ALTER TABLE tenants ADD COLUMN disabled boolean NOT NULL DEFAULT false;
ALTER TABLE tenants ADD COLUMN updated_at bigint NOT NULL DEFAULT 0;
UPDATE tenants SET updated_at = created_at;
CREATE INDEX tenants_disabled_updated ON tenants (updated_at) WHERE disabled;

CREATE FUNCTION gateway_notify_tenant_disabled() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('gateway_revocations', json_build_object(
        'kind', 'tenant', 'id', NEW.id, 'at', extract(epoch FROM clock_timestamp()))::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER tenants_disabled AFTER UPDATE OF disabled ON tenants
    FOR EACH ROW WHEN (NOT OLD.disabled AND NEW.disabled)
    EXECUTE FUNCTION gateway_notify_tenant_disabled();
