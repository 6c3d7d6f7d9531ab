//! Route policies: tenants (one of), roles (any of), scopes (all of).

use super::error::ProxyError;
use super::tenants::TenantDirectory;
use crate::auth::Principal;
use crate::config::RouteConfig;

/// Decides whether `who` may use `route`.
pub fn authorize(route: &RouteConfig, who: &Principal, tenants: &TenantDirectory) -> Result<(), ProxyError> {
    if !route.tenants.is_empty() && !tenants.is_one_of(who.tenant_id, &route.tenants) {
        return Err(ProxyError::Forbidden);
    }
    if !route.roles.is_empty() && !route.roles.iter().any(|r| who.roles.contains(r)) {
        return Err(ProxyError::Forbidden);
    }
    if !route.scopes.iter().all(|s| who.scopes.contains(s)) {
        return Err(ProxyError::InsufficientScope);
    }
    Ok(())
}
