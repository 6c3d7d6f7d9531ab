//! # gateway
//!
//! A reverse-proxy auth gateway. Clients talk to it instead of to backends;
//! it serves `/auth` itself and (in a later change) forwards authenticated
//! traffic with identity headers no client can forge.
//!
//! ## Layout
//! - [`cli`]: the command line, parsed once into a typed command.
//! - [`config`]: `gateway.toml` → a validated [`config::Config`] (every error at once).
//! - [`app`]: builds everything (database, migrations, keys, listeners) and runs it.
//! - [`db`]: the store, one function per query, grouped by table.
//! - [`auth`]: passwords, keys, tokens, refresh rotation, revocation state,
//!   and the flows in [`auth::service`].
//! - [`api`]: the `/auth/*` and JWKS HTTP endpoints (axum).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener.
//! - [`observability`]: tracing and the metrics recorder.
//!
//! ## A request's path
//! `POST /auth/login` → [`api::router`] (metrics, no-store, 16 KiB body limit)
//! → [`auth::service::AuthService::login`]: per-IP limit, lockout slot
//! reserved in the database, Argon2id verify on the blocking pool, session and
//! first refresh token stored (hashed), access JWT signed by the newest key.
//!
//! A request with a bearer token → [`api::extract::Authenticated`] →
//! [`auth::Authenticator::verify_bearer`]: EdDSA signature by the key the
//! `kid` names, claims, then the in-memory revocation state. No database I/O.

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod db;
pub mod observability;
pub mod proxy;
pub mod server;
