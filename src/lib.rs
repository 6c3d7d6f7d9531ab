//! # gateway
//!
//! A reverse-proxy auth gateway. Clients talk to it instead of to backends;
//! it serves `/auth` itself and forwards every other request to the upstream
//! a route names, after authenticating and authorising it, with identity
//! headers no client can forge.
//!
//! ## Layout
//! - [`cli`]: the command line, parsed once into a typed command.
//! - [`config`]: `gateway.toml` → a validated [`config::Config`] (every error
//!   at once); [`config::proxy`] holds the reloadable routes and headers.
//! - [`app`]: builds everything (database, migrations, keys, listeners) and
//!   runs it: worker threads for the public listener, the admin listener and
//!   the background tasks on the main runtime.
//! - [`server`]: the public listener (thread per core, TLS, HTTP/1.1 + h2,
//!   limits, graceful shutdown), [`server::reload`], and the plain-HTTP
//!   listener that redirects to TLS ([`server::redirect`]).
//! - [`http1`]: the gateway's own HTTP/1.1: body framing and heads, the
//!   client connection's loop ([`http1::server`]) and upgraded connections
//!   ([`http1::upgrade`]). HTTP/2 is hyper's.
//! - [`proxy`]: the request phases: [`proxy::path`] normalisation,
//!   [`proxy::router`], [`proxy::headers`] hygiene, [`proxy::identity`]
//!   (verified-token cache), [`proxy::policy`], [`proxy::ratelimit`],
//!   [`proxy::upstream`] (a
//!   connection pool per worker, spoken to with [`http1`], or with hyper's
//!   HTTP/2 client for gRPC upstreams; its reloadable TLS in
//!   [`proxy::upstream::tls`]),
//!   [`proxy::tunnel`] (WebSockets), [`proxy::forward_auth`] (the same
//!   checks as a decision for a proxy in front), [`proxy::assertion`]
//!   (signed identity for backends, per token and audience),
//!   [`proxy::health`] (active health checks of upstreams).
//! - [`api`]: the `/auth/*` and JWKS endpoints (axum).
//! - [`auth`]: passwords, keys, tokens, refresh rotation, the revocation state
//!   and its poller/listener, the TOTP second factor ([`auth::totp`]), the
//!   signed deliveries of mailed links (password resets, email
//!   verification and changes, sign-in links) to the operator's mailer
//!   ([`auth::webhook`]), kept until it takes them ([`auth::outbox`]),
//!   and the flows in [`auth::service`].
//! - [`db`]: the store for SQLite and PostgreSQL, one function per query,
//!   grouped by table; [`db::retention`] prunes what has ended.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on their own listener.
//! - [`observability`]: tracing and the metrics recorder; [`body`]: the
//!   shared response body type.
//!
//! ## A request's path
//! A worker accepts the connection ([`server::serve_public`]); its HTTP/1.1
//! loop ([`http1::server::serve`]) reads each head and hands the request to
//! [`proxy::Proxy::serve`], which normalises the path once, then:
//!
//! - `/auth/*` or the JWKS → [`api::router`] on the main runtime: e.g.
//!   [`auth::service::AuthService::login`] (per-IP limit, lockout slot
//!   reserved in the database, Argon2id on the blocking pool, session and
//!   hashed refresh token stored, JWT signed by the newest key);
//! - anything else → route, strip, the address rules (`allow_ips`, rate
//!   limit by address),
//!   [`auth::Authenticator::verify_bearer`] through the token cache (EdDSA
//!   by `kid`, claims, then the in-memory revocation state: no database
//!   I/O), policy, rate limit by user or tenant, inject, forward, respond;
//! - `/auth/forward-auth`, when `forward_auth.enabled` → the same route,
//!   limit, token and policy checks on the request a trusted proxy in front
//!   describes, answered with the identity fields instead of forwarded.
//!
//! Revocations reach every process through the database: polled every
//! `auth.revocation_poll`, and pushed by `LISTEN/NOTIFY` on PostgreSQL.

pub mod admin;
pub mod api;
pub mod app;
pub mod auth;
pub mod body;
pub mod cli;
pub mod config;
pub mod db;
pub mod http1;
pub mod observability;
pub mod proxy;
pub mod server;
#[cfg(test)]
mod testrand;
