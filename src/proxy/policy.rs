//! Route policies: tenants (one of), roles (any of), scopes (all of), and
//! a login with a second factor (`mfa`), checked last: a step-up login
//! helps only someone the rest of the policy admits.

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
    if route.mfa && !who.amr.mfa {
        return Err(ProxyError::InsufficientAuthentication);
    }
    Ok(())
}
