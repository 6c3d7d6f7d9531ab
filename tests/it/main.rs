//! Integration tests for `gateway`.
//!
//! Every test starts its own `App` (fresh temp dir, SQLite file, signing key,
//! ephemeral ports) through `helpers::spawn_app`, talks to it over real HTTP
//! and drives the CLI in-process (or, where stated, through the real binary).
//!
//! The store and auth-flow suites run on both backends (`helpers::both_backends!`
//! generates a `sqlite` and a `postgres` module of each); `replicas` is
//! PostgreSQL-only. The PostgreSQL tests create a database of their own on the
//! server named by `GATEWAY_TEST_POSTGRES_URL` (e.g.
//! `postgres://postgres@127.0.0.1:5432/test`), and are skipped, passing with a
//! notice on stderr, when it is unset.

mod helpers;
mod upstream;

mod admin_api;
mod audit_and_cli;
mod auth_basics;
mod auth_flow;
mod email_change;
mod email_revert;
mod email_verification;
mod forward_auth;
mod http1_conformance;
mod jwt_assertion;
mod lockout;
mod login_link;
mod mailer_outbox;
mod mfa;
mod notices;
mod password_reset;
mod process;
mod proxy_health;
mod proxy_http2;
mod proxy_identity;
mod proxy_pool;
mod proxy_reload;
mod proxy_routing;
mod proxy_transport;
mod rate_limits;
mod refresh_flow;
mod replicas;
mod retention;
mod session_lifetime;
mod tenant_admin;
mod token_attacks;
mod user_admin;
mod user_deletion;
