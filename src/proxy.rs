//! The reverse proxy: every request that is not for the gateway's own API.
//! (Filled in below.)
pub mod error;
pub mod headers;
pub mod identity;
pub mod path;
pub mod policy;
pub mod router;
pub mod tenants;
