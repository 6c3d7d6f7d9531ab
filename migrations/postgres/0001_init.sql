-- Initial schema (PostgreSQL): the same tables and meaning as
-- migrations/sqlite/0001_init.sql, with native uuid, boolean, bytea and jsonb.
-- Timestamps are unix seconds (BIGINT) in both sets, so every query is shared
-- and compares integers.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    slug        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  bigint NOT NULL
);

CREATE TABLE users (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants(id),
    email          text NOT NULL,
    password_hash  text NOT NULL,
    roles          text NOT NULL DEFAULT '',
    scopes         text NOT NULL DEFAULT '',
    disabled       boolean NOT NULL DEFAULT false,
    created_at     bigint NOT NULL,
    updated_at     bigint NOT NULL,
    UNIQUE (tenant_id, email)
);
CREATE INDEX users_disabled_updated ON users (updated_at) WHERE disabled;

CREATE TABLE login_attempts (
    tenant        text NOT NULL,
    email         text NOT NULL,
    failures      bigint NOT NULL,
    locked_until  bigint,
    updated_at    bigint NOT NULL,
    PRIMARY KEY (tenant, email)
);

CREATE TABLE sessions (
    id             uuid PRIMARY KEY,
    tenant_id      uuid NOT NULL REFERENCES tenants(id),
    user_id        uuid NOT NULL REFERENCES users(id),
    created_at     bigint NOT NULL,
    last_used_at   bigint NOT NULL,
    ip             text,
    user_agent     text,
    revoked_at     bigint,
    revoke_reason  text
);
CREATE INDEX sessions_user ON sessions (tenant_id, user_id);
CREATE INDEX sessions_revoked_at ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE,
    session_id  uuid NOT NULL REFERENCES sessions(id),
    tenant_id   uuid NOT NULL REFERENCES tenants(id),
    parent_id   uuid REFERENCES refresh_tokens(id),
    created_at  bigint NOT NULL,
    expires_at  bigint NOT NULL,
    spent_at    bigint
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE audit_events (
    id          bigserial PRIMARY KEY,
    at          bigint NOT NULL,
    event       text NOT NULL,
    tenant_id   uuid,
    user_id     uuid,
    email       text,
    ip          text,
    user_agent  text,
    detail      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_events_tenant_at ON audit_events (tenant_id, at);

INSERT INTO tenants (id, slug, name, created_at)
VALUES (gen_random_uuid(), 'default', 'Default tenant', extract(epoch FROM now())::bigint);

-- Revocation push: every replica LISTENs on `gateway_revocations`. The
-- triggers fire for whoever writes (a replica, the CLI, an operator's SQL),
-- and NOTIFY is delivered at commit. The payload carries the kind, the id
-- and the creation time (epoch seconds with microseconds) for the lag metric.
CREATE FUNCTION gateway_notify_session_revoked() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('gateway_revocations', json_build_object(
        'kind', 'session', 'id', NEW.id, 'at', extract(epoch FROM clock_timestamp()))::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER sessions_revoked AFTER UPDATE OF revoked_at ON sessions
    FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
    EXECUTE FUNCTION gateway_notify_session_revoked();

CREATE FUNCTION gateway_notify_user_disabled() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('gateway_revocations', json_build_object(
        'kind', 'user', 'id', NEW.id, 'at', extract(epoch FROM clock_timestamp()))::text);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER users_disabled AFTER UPDATE OF disabled ON users
    FOR EACH ROW WHEN (NOT OLD.disabled AND NEW.disabled)
    EXECUTE FUNCTION gateway_notify_user_disabled();
