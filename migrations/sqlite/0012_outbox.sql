-- Deliveries to the operator's mailer (mailed links and security notices)
-- not yet accepted by it, kept so that a mailer that is down, or a
-- gateway that stops, loses none: a row is written before the first
-- attempt and deleted once the mailer answers 2xx, or once `expires_at`
-- passes (a link's expiry, a day for a notice). `id` is the delivery's
-- `webhook-id` on every attempt; `body` is the event, sealed with the
-- secrets key for this id (it may hold a link's token, which the
-- database otherwise keeps only hashed). `next_attempt_at` is when a
-- gateway may take it next: a gateway that takes it moves it forward
-- first (a lease), so that another one does not send it at once.
CREATE TABLE outbox (
    id               BLOB PRIMARY KEY NOT NULL,
    kind             TEXT NOT NULL,
    body             TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    expires_at       INTEGER NOT NULL
);
CREATE INDEX outbox_next_attempt_at ON outbox (next_attempt_at);
