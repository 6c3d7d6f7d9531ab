//! Tenant ids → slugs, in memory, for route policies that name tenants.
//!
//! Tokens carry the tenant id; routes name tenant slugs. The map is small
//! (one entry per tenant) and refreshed from the database alongside the
//! revocation poll, so a tenant created with the CLI is known within a poll
//! interval, and a policy check never touches the database.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use uuid::Uuid;

use crate::db::{Store, StoreResult};

#[derive(Clone, Default)]
pub struct TenantDirectory {
    slugs: Arc<ArcSwap<HashMap<Uuid, Box<str>>>>,
}

impl TenantDirectory {
    pub async fn refresh(&self, store: &Store) -> StoreResult<()> {
        let map = store.list_tenants().await?.into_iter().map(|t| (t.id, t.slug.into_boxed_str())).collect();
        self.slugs.store(Arc::new(map));
        Ok(())
    }

    /// Whether tenant `id` has one of `slugs`.
    pub fn is_one_of(&self, id: Uuid, slugs: &[String]) -> bool {
        self.slugs.load().get(&id).is_some_and(|slug| slugs.iter().any(|s| **s == **slug))
    }
}
