//! Integration tests for `gateway`.
//!
//! Every test starts its own `App` (fresh temp dir, SQLite file, signing key,
//! ephemeral ports) through `helpers::spawn_app`, talks to it over real HTTP
//! and drives the CLI in-process (or, where stated, through the real binary).

mod helpers;
mod upstream;

mod audit_and_cli;
mod auth_basics;
mod auth_flow;
mod lockout;
mod proxy_identity;
mod proxy_reload;
mod proxy_routing;
mod proxy_transport;
mod refresh_flow;
mod token_attacks;
