-- The same table and meaning as migrations/sqlite/0012_outbox.sql.
CREATE TABLE outbox (
    id               uuid PRIMARY KEY,
    kind             text NOT NULL,
    body             text NOT NULL,
    created_at       bigint NOT NULL,
    next_attempt_at  bigint NOT NULL,
    attempts         bigint NOT NULL DEFAULT 0,
    expires_at       bigint NOT NULL
);
CREATE INDEX outbox_next_attempt_at ON outbox (next_attempt_at);
