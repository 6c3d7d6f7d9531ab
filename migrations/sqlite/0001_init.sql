-- Initial schema (SQLite). Timestamps are unix seconds (INTEGER); ids are
-- UUIDs as 16-byte BLOBs. The PostgreSQL set has the same numbering and
-- meaning. Every table holding tenant data carries tenant_id and every query
-- filters by it.

CREATE TABLE tenants (
    id          BLOB PRIMARY KEY NOT NULL,
    slug        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id             BLOB PRIMARY KEY NOT NULL,
    tenant_id      BLOB NOT NULL REFERENCES tenants(id),
    email          TEXT NOT NULL,              -- trimmed and lower-cased
    password_hash  TEXT NOT NULL,              -- PHC string (argon2id)
    roles          TEXT NOT NULL DEFAULT '',   -- space-separated
    scopes         TEXT NOT NULL DEFAULT '',   -- space-separated
    disabled       INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (tenant_id, email)
);
-- The condition is written as the poll's query writes it, or SQLite ignores the index.
CREATE INDEX users_disabled_updated ON users (updated_at) WHERE disabled;

-- Consecutive login failures per (tenant slug, email) as typed at login, kept
-- apart from users so that unknown emails lock out exactly like known ones
-- (the lockout must not reveal which accounts exist).
CREATE TABLE login_attempts (
    tenant        TEXT NOT NULL,
    email         TEXT NOT NULL,
    failures      INTEGER NOT NULL,
    locked_until  INTEGER,
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (tenant, email)
);

-- One row per login: the refresh-token family.
CREATE TABLE sessions (
    id             BLOB PRIMARY KEY NOT NULL,
    tenant_id      BLOB NOT NULL REFERENCES tenants(id),
    user_id        BLOB NOT NULL REFERENCES users(id),
    created_at     INTEGER NOT NULL,
    last_used_at   INTEGER NOT NULL,
    ip             TEXT,
    user_agent     TEXT,
    revoked_at     INTEGER,
    revoke_reason  TEXT
);
CREATE INDEX sessions_user ON sessions (tenant_id, user_id);
CREATE INDEX sessions_revoked_at ON sessions (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE refresh_tokens (
    id          BLOB PRIMARY KEY NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,      -- SHA-256 of the token; the token itself is never stored
    session_id  BLOB NOT NULL REFERENCES sessions(id),
    tenant_id   BLOB NOT NULL REFERENCES tenants(id),
    parent_id   BLOB REFERENCES refresh_tokens(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    spent_at    INTEGER
);
CREATE INDEX refresh_tokens_session ON refresh_tokens (session_id);

CREATE TABLE audit_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    event       TEXT NOT NULL,
    tenant_id   BLOB,
    user_id     BLOB,
    email       TEXT,
    ip          TEXT,
    user_agent  TEXT,
    detail      TEXT NOT NULL DEFAULT '{}'   -- JSON object
);
CREATE INDEX audit_events_tenant_at ON audit_events (tenant_id, at);

INSERT INTO tenants (id, slug, name, created_at)
VALUES (randomblob(16), 'default', 'Default tenant', CAST(strftime('%s', 'now') AS INTEGER));
