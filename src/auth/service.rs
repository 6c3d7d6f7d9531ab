//! The auth flows, independent of HTTP: the API handlers and the CLI both
//! call these. Each flow writes its audit event and metric here, so no entry
//! point can forget them.

mod email_change;
mod links;
mod login_link;
mod notices;
mod reset;
mod verify;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use uuid::Uuid;

use super::outbox::Outbox;
use super::password::{PasswordHasher, Verdict};
use super::ratelimit::IpRateLimiter;
use super::seal::SealingKeys;
use super::token::{self, AccessClaims, Amr};
use super::{refresh, AuthError, Authenticator, Principal};
use crate::auth::totp;
use crate::config::{AuthConfig, MAX_PASSWORD_BYTES};
use crate::db::audit::NewAuditEvent;
use crate::db::email_links::{LinkPurpose, PendingLink, Unredeemed};
use crate::db::login_attempts::Attempt;
use crate::db::sessions::within_lifetime;
use crate::db::sessions::{ClientInfo, RefreshHash, Rotation, Session};
use crate::db::tenants::Tenant;
use crate::db::users::{Access, NewUser, User};
use crate::db::{secs, unix_now, Store, StoreError};
use notices::Notice;

/// Where a request came from, for audit events and session listings.
#[derive(Debug, Clone)]
pub struct ClientContext {
    pub ip: IpAddr,
    pub user_agent: Option<String>,
}

/// Wrong one-time codes since the last right one after which a user's
/// second factor takes none until an operator resets it.
pub const MAX_OTP_FAILURES: i64 = 10;

/// How long a TOTP setup may wait for its confirming code (seconds): the
/// secret was shown once, maybe on a screen others saw; later, the user
/// starts again (and setups older than this are cleared hourly).
pub const MFA_SETUP_TTL: i64 = 600;

/// The answer to a login or refresh.
#[derive(Serialize)]
pub struct TokenPair {
    pub access_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
    pub refresh_token: String,
    pub refresh_expires_in: u64,
}

impl std::fmt::Debug for TokenPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenPair").field("expires_in", &self.expires_in).finish_non_exhaustive()
    }
}

/// `GET /auth/me`.
#[derive(Debug, Serialize)]
pub struct Me {
    pub user_id: Uuid,
    pub tenant_id: Uuid,
    pub tenant: String,
    pub email: String,
    pub roles: Vec<String>,
    pub scopes: Vec<String>,
    pub session_id: Uuid,
    /// Whether logins need a TOTP code.
    pub mfa: bool,
    /// Whether the email is proved (or counts as such).
    pub email_verified: bool,
}

/// `POST /auth/mfa/totp`: the secret to give an authenticator app.
#[derive(Serialize)]
pub struct TotpSetup {
    /// Base32, for typing in.
    pub secret: String,
    /// `otpauth://totp/...`, for a QR code.
    pub otpauth_uri: String,
}

/// `POST /auth/mfa/totp/confirm`: single-use codes for a lost device,
/// shown this once.
#[derive(Serialize)]
pub struct RecoveryCodes {
    pub recovery_codes: Vec<String>,
}

impl std::fmt::Debug for RecoveryCodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecoveryCodes").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TotpSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TotpSetup").finish_non_exhaustive()
    }
}

/// One entry of `GET /auth/sessions`.
#[derive(Debug, Serialize)]
pub struct SessionView {
    pub id: Uuid,
    pub created_at: String,
    pub last_used_at: String,
    /// When the session ends unless refreshed (or at the end of its lifetime).
    pub expires_at: String,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// How its login authenticated (`["pwd"]`, `["email"]`, with `otp` and
    /// `mfa` after a second factor): a sign-in the user does not remember
    /// making stands out.
    pub amr: &'static [&'static str],
    pub current: bool,
}

/// Everything the flows need; cheap to clone.
#[derive(Clone)]
pub struct AuthService {
    pub store: Store,
    pub hasher: PasswordHasher,
    pub authenticator: Authenticator,
    pub config: AuthConfig,
    pub accounts: Accounts,
    limiter: IpRateLimiter,
    /// Where mailed links are delivered (`None`: only the CLI makes links).
    mailer: Option<Arc<Outbox>>,
    /// Bounds the link work left for after the answers.
    link_tasks: Arc<tokio::sync::Semaphore>,
    /// The same for security notices, apart: a flood of link requests
    /// cannot crowd out the notice of a change.
    notice_tasks: Arc<tokio::sync::Semaphore>,
    /// Notices sent a minute back, by user and kind: one a minute each.
    notices_sent: moka::sync::Cache<(Uuid, &'static str), ()>,
    /// Seals the TOTP secrets the database keeps.
    sealer: Arc<SealingKeys>,
}

pub use email_change::ChangeRequested;
pub use links::{EmailLink, LINK_MIN_INTERVAL, MAX_LINK_TASKS};

/// The tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";

impl AuthService {
    pub fn new(
        store: Store,
        hasher: PasswordHasher,
        authenticator: Authenticator,
        config: AuthConfig,
        sealer: Arc<SealingKeys>,
    ) -> Self {
        let limiter = IpRateLimiter::new(config.rate_limit_per_minute);
        let accounts = Accounts {
            store: store.clone(),
            hasher: hasher.clone(),
            password_min_length: config.password_min_length,
            session_lifetime: config.session_lifetime,
            reset_token_ttl: config.reset_token_ttl,
            verification_token_ttl: config.email_verification.token_ttl,
            login_token_ttl: config.login_link.token_ttl,
            by: None,
        };
        let link_tasks = Arc::new(tokio::sync::Semaphore::new(MAX_LINK_TASKS));
        let notice_tasks = Arc::new(tokio::sync::Semaphore::new(MAX_LINK_TASKS));
        let notices_sent = moka::sync::Cache::builder()
            .max_capacity(100_000)
            .time_to_live(Duration::from_secs(LINK_MIN_INTERVAL.unsigned_abs()))
            .build();
        Self {
            store,
            hasher,
            authenticator,
            config,
            accounts,
            limiter,
            mailer: None,
            link_tasks,
            notice_tasks,
            notices_sent,
            sealer,
        }
    }

    /// The TOTP secret `stored` (as the database holds it) of `user`.
    fn open_secret(&self, user: Uuid, stored: &str) -> Result<String, AuthError> {
        self.sealer.open(stored, user.as_bytes()).map_err(|e| {
            tracing::error!(user_id = %user, error = %e, "a TOTP secret does not open");
            AuthError::Unexpected(e.into())
        })
    }

    fn rate_limit(&self, ip: IpAddr) -> Result<(), AuthError> {
        self.limiter.check(ip).map_err(|retry_after| AuthError::RateLimited { retry_after })
    }

    async fn audit(&self, event: NewAuditEvent<'_>) {
        self.accounts.audit(event).await;
    }

    /// Tells the owner that failed attempts locked the account's logins
    /// (the `account.locked` notice), `via` the flow of the attempt that
    /// started the lock.
    pub(super) fn lock_started(&self, tenant_id: Uuid, user_id: Uuid, via: &str, client: &ClientContext) {
        let until = unix_now() + secs(self.config.lockout_duration);
        self.notify(tenant_id, user_id, Notice::Locked { until, via: via.to_owned() }, client);
    }

    /// Takes one slot of the (tenant, email) lockout counter before any
    /// hashing; `Ok(true)` when a failure of this attempt starts the lock.
    async fn reserve_attempt(&self, slug: &str, email: &str) -> Result<bool, AuthError> {
        let now = unix_now();
        let lock_until = now + secs(self.config.lockout_duration);
        match self.store.reserve_login_attempt(slug, email, self.config.lockout_threshold, lock_until, now).await? {
            Attempt::Locked { until } => {
                metrics::counter!("gateway_logins_total", "result" => "locked").increment(1);
                Err(AuthError::TooManyAttempts { retry_after: u64::try_from(until - now).unwrap_or(1).max(1) })
            }
            Attempt::Allowed { locks, .. } => Ok(locks),
        }
    }

    /// Email and password, and the TOTP code (`otp`) of a user who has a
    /// second factor: without one, once the password is right, the answer is
    /// [`AuthError::MfaRequired`]; a wrong or spent code fails like a wrong
    /// password (and counts towards the lockout the same way).
    pub async fn login(
        &self,
        email: &str,
        password: &SecretString,
        tenant: Option<&str>,
        otp: Option<&str>,
        client: &ClientContext,
    ) -> Result<TokenPair, AuthError> {
        self.rate_limit(client.ip)?;
        let email = normalize_email(email);
        if email.is_empty() || email.len() > 254 || email.chars().any(char::is_control) {
            return Err(AuthError::InvalidRequest("email must be 1 to 254 printable characters".into()));
        }
        check_password_size(password).map_err(AuthError::InvalidRequest)?;
        let slug = tenant_slug(tenant)?;
        let ip = client.ip.to_string();
        let ua = client.user_agent.as_deref();

        let locks = self.reserve_attempt(&slug, &email).await?;

        let tenant = self.store.tenant_by_slug(&slug).await?;
        let user = match &tenant {
            Some(t) => self.store.user_by_email(t.id, &email).await?,
            None => None,
        };
        let verdict = self.hasher.verify(password, user.as_ref().map(|u| u.password_hash.as_str())).await?;
        let failure = match (&user, &verdict) {
            (Some(user), Verdict::Right { rehash })
                if !user.disabled && tenant.as_ref().is_some_and(|t| !t.disabled) =>
            'right: {
                if self.config.email_verification.required && user.email_verified_at.is_none() {
                    break 'right "email_not_verified";
                }
                if let Some(reason) = self.second_factor(user, otp, client).await? {
                    break 'right reason;
                }
                self.store.clear_login_attempts(&slug, &email).await?;
                // The hash the password was verified against, or its upgrade
                // if that is stored; a password set meanwhile is kept, and
                // then the session below is not opened.
                let mut verified = user.password_hash.as_str();
                if let Some(hash) = rehash {
                    if self.store.replace_password_hash(user.tenant_id, user.id, verified, hash).await? {
                        verified = hash;
                    }
                }
                let pair = match self.open_session(user, verified, None, client).await? {
                    Ok(pair) => pair,
                    Err(reason) => return Err(self.changed_during_login(user, &email, client, reason).await),
                };
                metrics::counter!("gateway_logins_total", "result" => "success").increment(1);
                self.audit(NewAuditEvent {
                    event: "login_succeeded",
                    tenant_id: Some(user.tenant_id),
                    user_id: Some(user.id),
                    email: Some(&email),
                    ip: Some(&ip),
                    user_agent: ua,
                    detail: None,
                })
                .await;
                return Ok(pair);
            }
            _ if tenant.is_none() => "unknown_tenant",
            _ if tenant.as_ref().is_some_and(|t| t.disabled) => "tenant_disabled",
            (None, _) => "unknown_user",
            (Some(u), _) if u.disabled => "user_disabled",
            _ => "wrong_password",
        };
        metrics::counter!("gateway_logins_total", "result" => "failure").increment(1);
        let base = NewAuditEvent {
            event: "login_failed",
            tenant_id: tenant.as_ref().map(|t| t.id),
            user_id: user.as_ref().map(|u| u.id),
            email: Some(&email),
            ip: Some(&ip),
            user_agent: ua,
            detail: Some(serde_json::json!({ "reason": failure, "tenant": slug })),
        };
        self.audit(base.clone()).await;
        if locks {
            self.audit(NewAuditEvent {
                event: "locked_out",
                detail: Some(serde_json::json!({ "tenant": slug })),
                ..base
            })
            .await;
            if let Some(user) = user.as_ref().filter(|u| !u.disabled) {
                self.lock_started(user.tenant_id, user.id, "login", client);
            }
        }
        // An unproved address's right password is answered as a wrong one:
        // otherwise registering an address with a password of one's own and
        // logging in with it would tell whether the address had an account
        // (a new one says "not verified", a taken one "wrong password"). A
        // fresh link goes to the address instead (one a minute), for the
        // registrant who lost the first.
        if let (Some(user), "email_not_verified") = (&user, failure) {
            if let Some(webhook) = self.mailer.clone() {
                let (slug, email) = (slug.clone(), user.email.clone());
                self.spawn_link(&links::VERIFICATION, webhook, (slug, email), None, "login", client);
            }
        }
        // The attempt that starts the lock is not told the password was right.
        Err(match failure {
            "mfa_required" if !locks => AuthError::MfaRequired,
            _ => AuthError::InvalidCredentials,
        })
    }

    /// The second factor of a login whose password was right: `None` when
    /// the user has none or `otp` is a code of theirs not used before (its
    /// step is spent here), else why not (`mfa_required`, `wrong_otp`,
    /// `otp_reused`, `mfa_locked`).
    ///
    /// Wrong and spent codes are counted per user, and a right one clears
    /// the count; at [`MAX_OTP_FAILURES`] the factor is locked and no code
    /// is taken until an operator's `user mfa-reset`. The lockout by
    /// (tenant, email) alone starts afresh after every lock period, which
    /// would let someone who has the password guess codes for ever.
    async fn second_factor(
        &self,
        user: &User,
        otp: Option<&str>,
        client: &ClientContext,
    ) -> Result<Option<&'static str>, AuthError> {
        // As stored (sealed): what the updates below compare.
        let Some(secret) = user.totp_secret.as_deref() else { return Ok(None) };
        if user.totp_failures >= MAX_OTP_FAILURES {
            return Ok(Some("mfa_locked"));
        }
        let Some(code) = otp else { return Ok(Some("mfa_required")) };
        let reason = match totp::matching_step(&self.open_secret(user.id, secret)?, code, unix_now()) {
            None if totp::is_recovery_code(code) => {
                if self.spend_recovery_code(user, secret, code, client).await? {
                    return Ok(None);
                }
                "wrong_recovery_code"
            }
            Some(step) => {
                let spend = |stored: String| async move {
                    self.store.spend_totp_step(user.tenant_id, user.id, &stored, step, MAX_OTP_FAILURES).await
                };
                if spend(secret.to_owned()).await? {
                    return Ok(None);
                }
                // The same secret under a new text (a reseal since the user
                // was read) is no reuse: spent against the text it has now.
                if let Some(resealed) = self.resealed(user, secret).await? {
                    if spend(resealed).await? {
                        return Ok(None);
                    }
                }
                "otp_reused"
            }
            None => "wrong_otp",
        };
        if self.store.count_totp_failure(user.tenant_id, user.id, secret).await? == Some(MAX_OTP_FAILURES) {
            tracing::warn!(user_id = %user.id, "too many wrong one-time codes: the second factor is locked");
            self.audit_user("mfa_locked", user, client, serde_json::json!({ "failures": MAX_OTP_FAILURES })).await;
        }
        Ok(Some(reason))
    }

    /// Records `event` about `user`, done from `client` during a login.
    async fn audit_user(&self, event: &str, user: &User, client: &ClientContext, detail: serde_json::Value) {
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event,
            tenant_id: Some(user.tenant_id),
            user_id: Some(user.id),
            email: Some(&user.email),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(detail),
        })
        .await;
    }

    /// Opens a session for `user`, whose password was just verified against
    /// `verified` (a hash), or who presented the sign-in `link` (spent by
    /// the session's opening, in its transaction), and mints its tokens;
    /// when the user's row or its tenant changed since they were read (see
    /// [`Store::create_session`]), the refusal's audit reason:
    /// `tenant_disabled`, `user_changed`, or `link_spent_meanwhile`. A
    /// change of roles or scopes alone is retried once with the row as it
    /// now is (not a change of address: a link was mailed to the old one,
    /// and a password login then fails like any other caught by a change).
    async fn open_session(
        &self,
        user: &User,
        verified: &str,
        link: Option<&PendingLink>,
        client: &ClientContext,
    ) -> Result<Result<TokenPair, &'static str>, AuthError> {
        let ip = client.ip.to_string();
        let mut user = std::borrow::Cow::Borrowed(user);
        for _ in 0..2 {
            let (refresh_token, hash) =
                refresh::generate().map_err(|e| AuthError::Unexpected(anyhow::anyhow!("{e}")))?;
            let now = unix_now();
            let ends_at = self.config.session_lifetime.map(|lifetime| now.saturating_add(secs(lifetime)));
            let expires_at = self.refresh_expiry(now, ends_at);
            // The user's second factor, if any, was checked before this.
            let amr = Amr { link: link.is_some(), mfa: user.totp_secret.is_some() };
            let info = ClientInfo { ip: Some(&ip), user_agent: client.user_agent.as_deref(), amr };
            let refresh = RefreshHash { hash: &hash, expires_at };
            let opened = match link {
                None => {
                    self.store.create_session(&user, verified, info, refresh, now).await?.ok_or(Unredeemed::UserChanged)
                }
                Some(link) => self.store.create_session_with_link(&user, link, info, refresh, now).await?,
            };
            match opened {
                Ok(session_id) => return self.token_pair(&user, session_id, refresh_token, now, ends_at, amr).map(Ok),
                Err(Unredeemed::LinkGone) => return Ok(Err(Unredeemed::LinkGone.reason())),
                Err(Unredeemed::UserChanged) => {}
            }
            if self.store.tenant_by_id(user.tenant_id).await?.is_none_or(|t| t.disabled) {
                return Ok(Err("tenant_disabled"));
            }
            match self.store.user_by_id(user.tenant_id, user.id).await? {
                // A second factor added meanwhile was not asked for; one
                // resealed meanwhile (the same secret) was.
                Some(now)
                    if !now.disabled
                        && now.password_hash == verified
                        // The address a sign-in link was mailed to.
                        && now.email == user.email
                        && match (&now.totp_secret, &user.totp_secret) {
                            (None, None) => true,
                            (Some(a), Some(b)) => a == b || self.same_secret(user.id, a, b),
                            _ => false,
                        } =>
                {
                    user = std::borrow::Cow::Owned(now);
                }
                _ => return Ok(Err("user_changed")),
            }
        }
        Ok(Err("user_changed"))
    }

    /// The refusal of a login whose password was right but whose user was
    /// disabled or had its password reset (audited as `user_changed`), or
    /// whose tenant was disabled (`tenant_disabled`), while the login ran:
    /// the same answer as any other failed login.
    async fn changed_during_login(&self, user: &User, email: &str, client: &ClientContext, reason: &str) -> AuthError {
        metrics::counter!("gateway_logins_total", "result" => "failure").increment(1);
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event: "login_failed",
            tenant_id: Some(user.tenant_id),
            user_id: Some(user.id),
            email: Some(email),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(serde_json::json!({ "reason": reason })),
        })
        .await;
        AuthError::InvalidCredentials
    }

    /// When a refresh token minted at `now` expires: after
    /// `refresh_token_ttl`, or at the session's end if that comes first.
    fn refresh_expiry(&self, now: i64, ends_at: Option<i64>) -> i64 {
        let expiry = now.saturating_add(secs(self.config.refresh_token_ttl));
        ends_at.map_or(expiry, |end| end.min(expiry))
    }

    /// The tokens of a session that ends at `ends_at` (under
    /// `auth.session_lifetime`): neither outlives it. `amr`: how the
    /// session's login authenticated.
    fn token_pair(
        &self,
        user: &User,
        session_id: Uuid,
        refresh_token: String,
        now: i64,
        ends_at: Option<i64>,
        amr: Amr,
    ) -> Result<TokenPair, AuthError> {
        let access_expiry = now.saturating_add(secs(self.config.access_token_ttl));
        let exp = ends_at.map_or(access_expiry, |end| end.min(access_expiry));
        let claims = AccessClaims {
            iss: self.config.issuer.clone(),
            aud: self.config.audience.clone(),
            sub: user.id,
            tid: user.tenant_id,
            sid: session_id,
            jti: Uuid::new_v4(),
            iat: now,
            exp,
            nbf: None,
            roles: user.roles.clone(),
            scope: user.scopes.join(" "),
            amr: amr.values().iter().map(|m| (*m).to_owned()).collect(),
        };
        let access_token = token::sign(&self.authenticator.keys(), &claims)
            .map_err(|e| AuthError::Unexpected(anyhow::anyhow!("signing failed: {e}")))?;
        Ok(TokenPair {
            access_token,
            token_type: "Bearer",
            expires_in: u64::try_from(exp - now).unwrap_or(0),
            refresh_token,
            refresh_expires_in: u64::try_from(self.refresh_expiry(now, ends_at) - now).unwrap_or(0),
        })
    }

    pub async fn refresh(&self, presented: &str, client: &ClientContext) -> Result<TokenPair, AuthError> {
        self.rate_limit(client.ip)?;
        if presented.is_empty() || presented.len() > 256 {
            metrics::counter!("gateway_refreshes_total", "result" => "invalid").increment(1);
            return Err(AuthError::InvalidGrant);
        }
        let (next, next_hash) = refresh::generate().map_err(|e| AuthError::Unexpected(anyhow::anyhow!("{e}")))?;
        let now = unix_now();
        // The store cuts it to the session's end.
        let expires_at = self.refresh_expiry(now, None);
        let lifetime = self.config.session_lifetime.map(secs);
        let successor = RefreshHash { hash: &next_hash, expires_at };
        let rotation = self.store.rotate_refresh_token(&refresh::hash(presented), successor, lifetime, now).await?;
        let ip = client.ip.to_string();
        let ua = client.user_agent.as_deref();
        match rotation {
            Rotation::Rotated { tenant_id, user_id, session_id, ends_at, amr } => {
                let user = self.store.user_by_id(tenant_id, user_id).await?;
                let Some(user) = user.filter(|u| !u.disabled) else {
                    return Err(AuthError::InvalidGrant);
                };
                let pair = self.token_pair(&user, session_id, next, now, ends_at, amr)?;
                metrics::counter!("gateway_refreshes_total", "result" => "success").increment(1);
                self.audit(NewAuditEvent {
                    event: "refresh_rotated",
                    tenant_id: Some(tenant_id),
                    user_id: Some(user_id),
                    email: Some(&user.email),
                    ip: Some(&ip),
                    user_agent: ua,
                    detail: Some(serde_json::json!({ "session_id": session_id })),
                })
                .await;
                Ok(pair)
            }
            Rotation::Reused { tenant_id, user_id, session_id } => {
                self.authenticator.revocations().revoke_session(session_id);
                metrics::counter!("gateway_refreshes_total", "result" => "reuse").increment(1);
                tracing::warn!(%session_id, %user_id, "refresh token reuse detected; session revoked");
                self.audit(NewAuditEvent {
                    event: "refresh_reuse_detected",
                    tenant_id: Some(tenant_id),
                    user_id: Some(user_id),
                    email: None,
                    ip: Some(&ip),
                    user_agent: ua,
                    detail: Some(serde_json::json!({ "session_id": session_id })),
                })
                .await;
                Err(AuthError::InvalidGrant)
            }
            Rotation::Invalid => {
                metrics::counter!("gateway_refreshes_total", "result" => "invalid").increment(1);
                Err(AuthError::InvalidGrant)
            }
        }
    }

    pub async fn logout(&self, who: &Principal, client: &ClientContext) -> Result<(), AuthError> {
        let now = unix_now();
        self.store.revoke_session(who.tenant_id, who.user_id, who.session_id, "logout", now).await?;
        self.authenticator.revocations().revoke_session(who.session_id);
        self.audit_principal("logout", who, client, None).await;
        Ok(())
    }

    pub async fn logout_all(&self, who: &Principal, client: &ClientContext) -> Result<(), AuthError> {
        let revoked =
            self.store.revoke_user_sessions(who.tenant_id, who.user_id, None, "logout_all", unix_now()).await?;
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        self.authenticator.revocations().revoke_session(who.session_id);
        // Signing out everywhere is what a user who fears an intruder does:
        // an email change asked for (maybe by the intruder) goes too, and so
        // do sign-in links (one may have been read by someone else). After
        // the revocation, which must not wait on it; a failure is logged.
        for purpose in [LinkPurpose::EmailChange, LinkPurpose::Login] {
            if let Err(e) = self.store.void_email_links(who.tenant_id, who.user_id, purpose).await {
                tracing::warn!(error = %e, "a sign-out everywhere could not drop the pending links");
            }
        }
        self.audit_principal("logout_all", who, client, Some(serde_json::json!({ "sessions": revoked.len() }))).await;
        Ok(())
    }

    pub async fn me(&self, who: &Principal) -> Result<Me, AuthError> {
        let tenant = self.store.tenant_by_id(who.tenant_id).await?.ok_or(AuthError::NotFound)?;
        let user = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        Ok(Me {
            user_id: user.id,
            tenant_id: tenant.id,
            tenant: tenant.slug,
            email: user.email,
            roles: user.roles,
            scopes: user.scopes,
            session_id: who.session_id,
            mfa: user.totp_secret.is_some(),
            email_verified: user.email_verified_at.is_some(),
        })
    }

    /// Checks the caller's password (and, with `code`, a current code of
    /// their second factor) for a change to the second factor or the
    /// email, as a login would: rate-limited, counted towards the lockout, audited as
    /// `{op}_failed` with the reason. Returns the user as read.
    async fn check_identity(
        &self,
        who: &Principal,
        password: &SecretString,
        code: Option<&str>,
        op: &str,
        client: &ClientContext,
    ) -> Result<User, AuthError> {
        self.rate_limit(client.ip)?;
        check_password_size(password).map_err(AuthError::InvalidRequest)?;
        let user = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        let tenant = self.store.tenant_by_id(who.tenant_id).await?.ok_or(AuthError::NotFound)?;
        let locks = self.reserve_attempt(&tenant.slug, &user.email).await?;
        let failure = match self.hasher.verify(password, Some(&user.password_hash)).await? {
            Verdict::Wrong => Some("wrong_password"),
            Verdict::Right { .. } if code.is_some() => self.second_factor(&user, code, client).await?,
            Verdict::Right { .. } => None,
        };
        if let Some(reason) = failure {
            let detail = serde_json::json!({ "reason": reason });
            self.audit_principal(&format!("{op}_failed"), who, client, Some(detail)).await;
            if locks {
                let detail = serde_json::json!({ "tenant": tenant.slug, "via": op });
                self.audit_principal("locked_out", who, client, Some(detail)).await;
                self.lock_started(who.tenant_id, who.user_id, op, client);
            }
            return Err(AuthError::InvalidCredentials);
        }
        self.store.clear_login_attempts(&tenant.slug, &user.email).await?;
        Ok(user)
    }

    /// Spends `code` if it is one of the user's unused recovery codes; the
    /// use is audited with how many are left. The stored list is swapped
    /// whole, so a login that lost the swap to another code's reads it
    /// again once (and finds its code still there, or used meanwhile).
    async fn spend_recovery_code(
        &self,
        user: &User,
        secret: &str,
        code: &str,
        client: &ClientContext,
    ) -> Result<bool, AuthError> {
        let mut secret = std::borrow::Cow::Borrowed(secret);
        for _ in 0..2 {
            let Some(stored) = self.store.totp_recovery(user.tenant_id, user.id).await? else { return Ok(false) };
            let Some(rest) = totp::without_recovery_code(&stored, user.id.as_bytes(), code) else { return Ok(false) };
            let hashes = [stored.as_str(), rest.as_str()];
            if self.store.spend_recovery_code(user.tenant_id, user.id, &secret, hashes, MAX_OTP_FAILURES).await? {
                let left = rest.split_whitespace().count();
                self.audit_user("mfa_recovery_code_used", user, client, serde_json::json!({ "left": left })).await;
                return Ok(true);
            }
            // A reseal since the user was read: the next try compares the
            // text the same secret has now.
            if let Some(resealed) = self.resealed(user, &secret).await? {
                secret = std::borrow::Cow::Owned(resealed);
            }
        }
        Ok(false)
    }

    /// The stored text of `user`'s secret now, if a reseal (a rotation of
    /// the secrets keys, or a start sealing) rewrote `stored`, the text
    /// read with the user, as another text of the same secret; `None` when
    /// it is unchanged, gone or another secret.
    async fn resealed(&self, user: &User, stored: &str) -> Result<Option<String>, AuthError> {
        let now = self.store.user_by_id(user.tenant_id, user.id).await?;
        let Some(current) = now.and_then(|u| u.totp_secret).filter(|current| current != stored) else {
            return Ok(None);
        };
        Ok(self.same_secret(user.id, stored, &current).then_some(current))
    }

    /// Whether two stored texts hold the same secret (compared in constant
    /// time); a text that does not open holds none.
    fn same_secret(&self, user: Uuid, a: &str, b: &str) -> bool {
        match (self.sealer.open(a, user.as_bytes()), self.sealer.open(b, user.as_bytes())) {
            (Ok(a), Ok(b)) => bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes())),
            _ => false,
        }
    }

    /// Starts setting up a TOTP second factor, given the password (so that
    /// a stolen access token cannot put a factor of the thief's on the
    /// account): a new secret, kept aside until
    /// [`AuthService::totp_confirm`] gets a code made with it, within
    /// [`MFA_SETUP_TTL`] (one set up before and never confirmed is
    /// replaced). `MfaEnabled` when the user
    /// already has one.
    pub async fn totp_setup(
        &self,
        who: &Principal,
        password: &SecretString,
        client: &ClientContext,
    ) -> Result<TotpSetup, AuthError> {
        let user = self.check_identity(who, password, None, "mfa_setup", client).await?;
        if user.totp_secret.is_some() {
            return Err(AuthError::MfaEnabled);
        }
        let secret = totp::generate_secret().map_err(|e| AuthError::Unexpected(anyhow::anyhow!("{e}")))?;
        let stored = match self.config.seal_totp_secrets {
            true => self.sealer.seal(&secret, who.user_id.as_bytes()).map_err(|e| AuthError::Unexpected(e.into()))?,
            false => secret.clone(),
        };
        if !self.store.set_totp_pending(who.tenant_id, who.user_id, &stored, unix_now()).await? {
            return Err(AuthError::MfaEnabled);
        }
        self.audit_principal("mfa_setup_started", who, client, None).await;
        let otpauth_uri = totp::otpauth_uri(&self.config.issuer, &user.email, &secret);
        Ok(TotpSetup { secret, otpauth_uri })
    }

    /// Confirms the TOTP secret being set up with a `code` made from it: from
    /// then on logins need a code, and every other session of the user (one
    /// opened with the password alone) is revoked. Returns the recovery
    /// codes, shown this once.
    pub async fn totp_confirm(
        &self,
        who: &Principal,
        code: &str,
        client: &ClientContext,
    ) -> Result<RecoveryCodes, AuthError> {
        self.rate_limit(client.ip)?;
        let since = unix_now() - MFA_SETUP_TTL;
        let pending = self.store.totp_pending(who.tenant_id, who.user_id, since).await?.ok_or_else(|| {
            AuthError::InvalidRequest(
                "no second factor is being set up, or its setup is over 10 minutes old: POST /auth/mfa/totp".into(),
            )
        })?;
        let step = totp::matching_step(&self.open_secret(who.user_id, &pending)?, code, unix_now())
            .ok_or(AuthError::InvalidCode)?;
        let (recovery_codes, hashes) = totp::generate_recovery_codes(who.user_id.as_bytes())
            .map_err(|e| AuthError::Unexpected(anyhow::anyhow!("{e}")))?;
        let revoked = self
            .store
            .confirm_totp(who.tenant_id, who.user_id, &pending, step, &hashes, who.session_id)
            .await?
            // Replaced or confirmed meanwhile: the code was for another secret.
            .ok_or(AuthError::InvalidCode)?;
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        let detail = serde_json::json!({ "sessions_revoked": revoked.len() });
        self.audit_principal("mfa_enabled", who, client, Some(detail)).await;
        self.notify(who.tenant_id, who.user_id, Notice::MfaEnabled, client);
        Ok(RecoveryCodes { recovery_codes })
    }

    /// Removes the user's second factor, given the password and a current
    /// code: both are checked as at login (a wrong one counts towards the
    /// lockout), so a stolen access token alone cannot remove it.
    pub async fn totp_disable(
        &self,
        who: &Principal,
        password: &SecretString,
        code: &str,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        let user = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        if user.totp_secret.is_none() {
            return Err(AuthError::InvalidRequest("there is no second factor to remove".into()));
        }
        let user = self.check_identity(who, password, Some(code), "mfa_disable", client).await?;
        let Some(secret) = user.totp_secret.as_deref() else { return Err(AuthError::InvalidCredentials) };
        if !self.store.clear_totp(who.tenant_id, who.user_id, secret).await? {
            return Err(AuthError::InvalidCredentials);
        }
        self.audit_principal("mfa_disabled", who, client, None).await;
        self.notify(who.tenant_id, who.user_id, Notice::MfaDisabled, client);
        Ok(())
    }

    /// Ten new recovery codes for a user with a second factor, given the
    /// password and a current code (or a recovery code), checked as at
    /// login: the codes given before stop working (a sheet that may have
    /// been seen, or one running out).
    pub async fn regenerate_recovery_codes(
        &self,
        who: &Principal,
        password: &SecretString,
        code: &str,
        client: &ClientContext,
    ) -> Result<RecoveryCodes, AuthError> {
        let user = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        if user.totp_secret.is_none() {
            return Err(AuthError::InvalidRequest("there is no second factor: set one up first".into()));
        }
        let user = self.check_identity(who, password, Some(code), "mfa_recovery_codes", client).await?;
        let Some(secret) = user.totp_secret.as_deref() else { return Err(AuthError::InvalidCredentials) };
        let (recovery_codes, hashes) = totp::generate_recovery_codes(who.user_id.as_bytes())
            .map_err(|e| AuthError::Unexpected(anyhow::anyhow!("{e}")))?;
        // Removed or replaced meanwhile: the code was for another secret.
        if !self.store.replace_recovery_codes(who.tenant_id, who.user_id, secret, &hashes).await? {
            return Err(AuthError::InvalidCredentials);
        }
        let detail = serde_json::json!({ "recovery_codes": recovery_codes.len() });
        self.audit_principal("mfa_recovery_codes_regenerated", who, client, Some(detail)).await;
        self.notify(who.tenant_id, who.user_id, Notice::RecoveryCodesRegenerated, client);
        Ok(RecoveryCodes { recovery_codes })
    }

    pub async fn sessions(&self, who: &Principal) -> Result<Vec<SessionView>, AuthError> {
        let now = unix_now();
        let sessions = self.store.active_sessions(who.tenant_id, who.user_id, now).await?;
        let sessions = within_lifetime(sessions, self.config.session_lifetime.map(secs), now);
        Ok(sessions
            .into_iter()
            .map(|s| SessionView {
                id: s.id,
                created_at: rfc3339(s.created_at),
                last_used_at: rfc3339(s.last_used_at),
                expires_at: rfc3339(s.expires_at),
                amr: s.amr().values(),
                ip: s.ip,
                user_agent: s.user_agent,
                current: s.id == who.session_id,
            })
            .collect())
    }

    /// Revokes one of the caller's own sessions; anyone else's is `NotFound`.
    pub async fn revoke_own_session(&self, who: &Principal, id: &str, client: &ClientContext) -> Result<(), AuthError> {
        let id = Uuid::parse_str(id).map_err(|_| AuthError::NotFound)?;
        if !self.store.revoke_session(who.tenant_id, who.user_id, id, "session_revoked", unix_now()).await? {
            return Err(AuthError::NotFound);
        }
        self.authenticator.revocations().revoke_session(id);
        self.audit_principal("session_revoked", who, client, Some(serde_json::json!({ "session_id": id }))).await;
        Ok(())
    }

    pub async fn register(
        &self,
        email: &str,
        password: &SecretString,
        tenant: Option<&str>,
        client: &ClientContext,
    ) -> Result<(Uuid, bool), AuthError> {
        if !self.config.registration {
            return Err(AuthError::NotFound);
        }
        self.rate_limit(client.ip)?;
        let slug = tenant_slug(tenant)?;
        let tenant = self
            .store
            .tenant_by_slug(&slug)
            .await?
            .ok_or_else(|| AuthError::InvalidRequest(format!("unknown tenant {slug:?}")))?;
        if tenant.disabled {
            return Err(AuthError::TenantDisabled);
        }
        let ip = client.ip.to_string();
        let verified = !self.verification_required();
        // With verification required, a taken address is answered as a new
        // one would be (and its owner is told): the answer tells nobody
        // whose address has an account. Without, the account would be
        // usable at once, so the registrant learns it either way: 409.
        let hide = !verified;
        let email = normalize_email(email);
        // An address a revert link would move its user back to is kept for
        // that user (taken, as far as anyone else can tell).
        if self.store.address_reserved(tenant.id, &email, None).await? {
            if !hide {
                return Err(AuthError::EmailTaken);
            }
            // As long as a registration takes: the same checks, a hash.
            validate_email(&email).map_err(AuthError::InvalidRequest)?;
            self.accounts.check_password_strength(password)?;
            self.hasher.hash(password).await?;
            return Ok(self.registration_taken(&tenant, &email, None, client).await);
        }
        let created = self.accounts.create_user(
            tenant.id,
            &email,
            password,
            &[],
            &[],
            Some(&ip),
            client.user_agent.as_deref(),
            verified,
        );
        let user = match created.await {
            Ok(user) => user,
            Err(AuthError::EmailTaken) if hide => {
                let owner = self.store.user_by_email(tenant.id, &email).await?;
                return Ok(self.registration_taken(&tenant, &email, owner.as_ref(), client).await);
            }
            Err(e) => return Err(e),
        };
        if !verified {
            self.send_first_verification(&user.email, &tenant.slug, client);
        }
        Ok((user.id, verified))
    }

    /// The answer to a registration of a taken address when it must not
    /// say so: a made-up id, unverified, as for a new account (whose id
    /// nothing else reveals). The attempt is audited
    /// (`registration_refused`), and the address's owner, if a user has it
    /// (not one a revert link keeps), told (`registration.attempted`): it
    /// may be the owner, who forgot, or someone else.
    async fn registration_taken(
        &self,
        tenant: &Tenant,
        email: &str,
        owner: Option<&User>,
        client: &ClientContext,
    ) -> (Uuid, bool) {
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event: "registration_refused",
            tenant_id: Some(tenant.id),
            user_id: owner.map(|u| u.id),
            email: Some(email),
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(serde_json::json!({ "reason": "email_taken", "tenant": tenant.slug })),
        })
        .await;
        if let Some(owner) = owner {
            self.notify(owner.tenant_id, owner.id, Notice::RegistrationAttempted, client);
        }
        (Uuid::new_v4(), false)
    }

    pub async fn change_password(
        &self,
        who: &Principal,
        current: &SecretString,
        new: &SecretString,
        client: &ClientContext,
    ) -> Result<(), AuthError> {
        self.rate_limit(client.ip)?;
        check_password_size(current).map_err(AuthError::InvalidRequest)?;
        self.accounts.check_password_strength(new)?;
        let user = self.store.user_by_id(who.tenant_id, who.user_id).await?.ok_or(AuthError::NotFound)?;
        let tenant = self.store.tenant_by_id(who.tenant_id).await?.ok_or(AuthError::NotFound)?;
        // Guessing the current password with a stolen access token counts
        // against the same lockout as guessing at login.
        let locks = self.reserve_attempt(&tenant.slug, &user.email).await?;
        match self.hasher.verify(current, Some(&user.password_hash)).await? {
            Verdict::Right { .. } => self.store.clear_login_attempts(&tenant.slug, &user.email).await?,
            Verdict::Wrong => {
                let detail = serde_json::json!({ "reason": "wrong_password" });
                self.audit_principal("password_change_failed", who, client, Some(detail)).await;
                if locks {
                    let detail = serde_json::json!({ "tenant": tenant.slug, "via": "password_change" });
                    self.audit_principal("locked_out", who, client, Some(detail)).await;
                    self.lock_started(who.tenant_id, who.user_id, "password_change", client);
                }
                return Err(AuthError::InvalidCredentials);
            }
        }
        let hash = self.hasher.hash(new).await?;
        // Only over the password just verified: one set meanwhile (a reset
        // after a compromise) is not overwritten.
        if !self.store.replace_password_hash(who.tenant_id, who.user_id, &user.password_hash, &hash).await? {
            let detail = serde_json::json!({ "reason": "changed_meanwhile" });
            self.audit_principal("password_change_failed", who, client, Some(detail)).await;
            return Err(AuthError::InvalidCredentials);
        }
        let revoked = self
            .store
            .revoke_user_sessions(who.tenant_id, who.user_id, Some(who.session_id), "password_changed", unix_now())
            .await?;
        for id in &revoked {
            self.authenticator.revocations().revoke_session(*id);
        }
        self.audit_principal(
            "password_changed",
            who,
            client,
            Some(serde_json::json!({ "sessions_revoked": revoked.len() })),
        )
        .await;
        self.notify(who.tenant_id, who.user_id, Notice::PasswordChanged { via: "password_change" }, client);
        Ok(())
    }

    async fn audit_principal(
        &self,
        event: &str,
        who: &Principal,
        client: &ClientContext,
        detail: Option<serde_json::Value>,
    ) {
        let ip = client.ip.to_string();
        self.audit(NewAuditEvent {
            event,
            tenant_id: Some(who.tenant_id),
            user_id: Some(who.user_id),
            email: None,
            ip: Some(&ip),
            user_agent: client.user_agent.as_deref(),
            detail: Some(detail.unwrap_or_else(|| serde_json::json!({ "session_id": who.session_id }))),
        })
        .await;
    }
}

/// The tenant a request names (`default` when none), checked against the
/// slug syntax before it goes near the database.
fn tenant_slug(tenant: Option<&str>) -> Result<String, AuthError> {
    let slug = tenant.unwrap_or(DEFAULT_TENANT).trim().to_ascii_lowercase();
    if is_slug(&slug) {
        Ok(slug)
    } else {
        Err(AuthError::InvalidRequest("tenant must be 1-64 lower-case letters, digits or '-'".into()))
    }
}

/// Tenant slugs: 1–64 of `a-z 0-9 -`.
pub fn is_slug(slug: &str) -> bool {
    !slug.is_empty()
        && slug.len() <= 64
        && slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Emails are compared trimmed and case-insensitively.
pub fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

fn validate_email(email: &str) -> Result<(), String> {
    let ok = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty())
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!("{email:?} is not an email address"))
    }
}

/// Role and scope names: 1–64 of `A-Z a-z 0-9 _ - . : /`, so they survive
/// being joined with spaces or commas into headers and claims.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is not a valid role or scope name (1-64 of A-Z a-z 0-9 _ - . : /)"))
    }
}

/// Refuses empty and over-long passwords before any hashing.
fn check_password_size(password: &SecretString) -> Result<(), String> {
    let len = password.expose_secret().len();
    if len == 0 {
        return Err("password must not be empty".into());
    }
    if len > MAX_PASSWORD_BYTES {
        return Err(format!("password must be at most {MAX_PASSWORD_BYTES} bytes"));
    }
    Ok(())
}

/// Role and scope names as [`validate_name`] wants them.
fn validate_names(roles: &[String], scopes: &[String]) -> Result<(), AuthError> {
    for name in roles.iter().chain(scopes) {
        validate_name(name).map_err(AuthError::InvalidRequest)?;
    }
    Ok(())
}

/// The user an operator acts on: by email (the CLI, whose operator names
/// an address) or by id (the admin API, whose paths name ids, since a user
/// may move to another address, and another user take the old one, between
/// two calls, or within one).
#[derive(Clone, Copy, Debug)]
pub enum UserKey<'a> {
    Email(&'a str),
    Id(Uuid),
}

/// Account administration shared by the API (register, password change) and
/// the CLI, which has no key ring and serves no tokens.
#[derive(Clone)]
pub struct Accounts {
    pub store: Store,
    pub hasher: PasswordHasher,
    pub password_min_length: usize,
    /// `auth.session_lifetime`: sessions past it are not listed as open.
    pub session_lifetime: Option<Duration>,
    /// `auth.password_reset.token_ttl`: how long a reset link works.
    pub reset_token_ttl: Duration,
    /// `auth.email_verification.token_ttl`: how long a verification link
    /// works.
    pub verification_token_ttl: Duration,
    /// `auth.login_link.token_ttl`: how long a sign-in link works.
    pub login_token_ttl: Duration,
    /// Who acts, when not the CLI: recorded as `"by"` in the detail of
    /// every event these rules audit (`admin_api`, or `admin_api:<name>`
    /// for a tenant token).
    pub by: Option<Arc<str>>,
}

impl Accounts {
    /// The user `key` names in the tenant; a deleted user is not found.
    pub async fn find_user(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<User, AuthError> {
        let user = match key {
            UserKey::Email(email) => self.store.user_by_email(tenant_id, &normalize_email(email)).await?,
            UserKey::Id(id) => self.store.user_by_id(tenant_id, id).await?.filter(|u| !u.is_deleted()),
        };
        user.ok_or(AuthError::NotFound)
    }

    async fn audit(&self, mut event: NewAuditEvent<'_>) {
        if let Some(by) = &self.by {
            let detail = event.detail.get_or_insert_with(|| serde_json::json!({}));
            if let Some(fields) = detail.as_object_mut() {
                fields.insert("by".to_owned(), by.as_ref().into());
            }
        }
        if let Err(e) = self.store.record_audit(event).await {
            tracing::error!(error = %e, "failed to write an audit event");
        }
    }

    /// Audits an operator's change to a user (no client address: the CLI).
    async fn audit_change(&self, event: &str, user: &User, detail: Option<serde_json::Value>) {
        let event = NewAuditEvent {
            event,
            tenant_id: Some(user.tenant_id),
            user_id: Some(user.id),
            email: Some(&user.email),
            detail,
            ..Default::default()
        };
        self.audit(event).await;
    }

    /// Creates a user after validating email, password, roles and scopes.
    #[allow(clippy::too_many_arguments, reason = "one call site per entry point; a struct would only rename them")]
    pub async fn create_user(
        &self,
        tenant_id: Uuid,
        email: &str,
        password: &SecretString,
        roles: &[String],
        scopes: &[String],
        ip: Option<&str>,
        user_agent: Option<&str>,
        verified: bool,
    ) -> Result<User, AuthError> {
        let email = normalize_email(email);
        validate_email(&email).map_err(AuthError::InvalidRequest)?;
        self.check_password_strength(password)?;
        validate_names(roles, scopes)?;
        let hash = self.hasher.hash(password).await?;
        let user = self
            .store
            .create_user(NewUser { tenant_id, email: &email, password_hash: &hash, roles, scopes, verified })
            .await
            .map_err(|e| match e {
                StoreError::Conflict => AuthError::EmailTaken,
                other => other.into(),
            })?;
        self.audit(NewAuditEvent {
            event: "user_created",
            tenant_id: Some(tenant_id),
            user_id: Some(user.id),
            email: Some(&email),
            ip,
            user_agent,
            detail: (!verified).then(|| serde_json::json!({ "email_verified": false })),
        })
        .await;
        Ok(user)
    }

    /// Disables a user and revokes every session (the CLI's `user disable`;
    /// running gateways learn of it through the revocation poll).
    pub async fn disable_user(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<Vec<Uuid>, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let revoked = self.store.disable_user(tenant_id, user.id).await?.ok_or(AuthError::NotFound)?;
        self.audit_change("user_disabled", &user, Some(serde_json::json!({ "sessions_revoked": revoked.len() }))).await;
        Ok(revoked)
    }

    /// Deletes a user (the CLI's `user delete`; see
    /// [`Store::delete_user`]): revokes every session, voids every link,
    /// and leaves a tombstone; with `forget`, the user's audit events lose
    /// the email, address and user agent. Returns the revoked sessions.
    pub async fn delete_user(&self, tenant_id: Uuid, key: UserKey<'_>, forget: bool) -> Result<Vec<Uuid>, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let revoked = self.store.delete_user(tenant_id, &user, forget).await?.ok_or(AuthError::NotFound)?;
        let event = NewAuditEvent {
            event: "user_deleted",
            tenant_id: Some(tenant_id),
            user_id: Some(user.id),
            email: (!forget).then_some(user.email.as_str()),
            detail: Some(serde_json::json!({ "sessions_revoked": revoked.len(), "forget": forget })),
            ..Default::default()
        };
        self.audit(event).await;
        Ok(revoked)
    }

    /// Erases a user deleted without `forget` from the audit log (the
    /// CLI's `user forget`; see [`Store::forget_deleted_user`]), and audits
    /// it by id; how many events changed, or why none did.
    pub async fn forget_user(
        &self,
        tenant_id: Uuid,
        user_id: Uuid,
        email: &str,
    ) -> Result<Result<u64, crate::db::users::ForgetRefused>, AuthError> {
        let erased = self.store.forget_deleted_user(tenant_id, user_id, &normalize_email(email)).await?;
        if let Ok(events) = erased {
            let event = NewAuditEvent {
                event: "user_forgotten",
                tenant_id: Some(tenant_id),
                user_id: Some(user_id),
                detail: Some(serde_json::json!({ "events": events })),
                ..Default::default()
            };
            self.audit(event).await;
        }
        Ok(erased)
    }

    /// Enables a disabled user (the CLI's `user enable`). Its old sessions
    /// stay revoked, so it logs in again; running gateways accept the
    /// tokens issued more than `auth.leeway` after the disable, and refuse
    /// the rest.
    pub async fn enable_user(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<(), AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        if !self.store.enable_user(tenant_id, user.id).await? {
            return Err(AuthError::InvalidRequest(format!("email: {:?} is not disabled", user.email)));
        }
        self.audit_change("user_enabled", &user, None).await;
        Ok(())
    }

    /// Removes a user's second factor, confirmed, being set up or locked
    /// (the CLI's `user mfa-reset`, for a lost authenticator or after a
    /// lock), and revokes every session of the user: one may be a thief's
    /// who set the factor up. Returns the sessions revoked.
    pub async fn reset_mfa(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<Vec<Uuid>, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let Some(revoked) = self.store.reset_totp(tenant_id, user.id).await? else {
            return Err(AuthError::InvalidRequest(format!("email: {:?} has no second factor", user.email)));
        };
        self.audit_change("mfa_reset", &user, Some(serde_json::json!({ "sessions_revoked": revoked.len() }))).await;
        Ok(revoked)
    }

    /// Disables a tenant (the CLI's `tenant disable`): none of its users
    /// can log in or refresh, and every session in it is revoked. Running
    /// gateways refuse the tenant's tokens within `auth.revocation_poll`
    /// (at once on PostgreSQL's push), those issued up to `auth.leeway`
    /// after the disable included. Returns the sessions revoked.
    pub async fn disable_tenant(&self, tenant: &Tenant) -> Result<Vec<Uuid>, AuthError> {
        let Some(revoked) = self.store.disable_tenant(tenant.id).await? else {
            return Err(AuthError::InvalidRequest(format!("slug: tenant {:?} is already disabled", tenant.slug)));
        };
        let detail = serde_json::json!({ "tenant": tenant.slug, "sessions_revoked": revoked.len() });
        self.audit_tenant("tenant_disabled", tenant, detail).await;
        Ok(revoked)
    }

    /// Creates a tenant (the CLI's `tenant create`); the slug must be free.
    pub async fn create_tenant(&self, slug: &str, name: &str) -> Result<Tenant, AuthError> {
        if !is_slug(slug) {
            return Err(AuthError::InvalidRequest(format!(
                "slug: {slug:?} must be 1-64 lower-case letters, digits or '-'"
            )));
        }
        let tenant = self.store.create_tenant(slug, name).await.map_err(|e| match e {
            StoreError::Conflict => AuthError::TenantExists,
            other => other.into(),
        })?;
        self.audit_tenant("tenant_created", &tenant, serde_json::json!({ "tenant": tenant.slug })).await;
        Ok(tenant)
    }

    /// Enables a disabled tenant (the CLI's `tenant enable`). The sessions
    /// the disable revoked stay revoked: its users log in again.
    pub async fn enable_tenant(&self, tenant: &Tenant) -> Result<(), AuthError> {
        if !self.store.enable_tenant(tenant.id).await? {
            return Err(AuthError::InvalidRequest(format!("slug: tenant {:?} is not disabled", tenant.slug)));
        }
        self.audit_tenant("tenant_enabled", tenant, serde_json::json!({ "tenant": tenant.slug })).await;
        Ok(())
    }

    async fn audit_tenant(&self, event: &str, tenant: &Tenant, detail: serde_json::Value) {
        let event = NewAuditEvent { event, tenant_id: Some(tenant.id), detail: Some(detail), ..Default::default() };
        self.audit(event).await;
    }

    /// The open sessions of a user, newest first (the CLI's `session list`).
    pub async fn sessions(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<Vec<Session>, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let now = unix_now();
        let sessions = self.store.active_sessions(tenant_id, user.id, now).await?;
        Ok(within_lifetime(sessions, self.session_lifetime.map(secs), now))
    }

    /// Revokes one open session of the tenant, whoever's it is (the CLI's
    /// `session revoke`); `NotFound` when the tenant has no open session
    /// with that id.
    pub async fn revoke_session(&self, tenant_id: Uuid, session_id: Uuid) -> Result<(), AuthError> {
        let user_id = self
            .store
            .revoke_tenant_session(tenant_id, session_id, "revoked_by_operator", unix_now())
            .await?
            .ok_or(AuthError::NotFound)?;
        let user = self.store.user_by_id(tenant_id, user_id).await?;
        let event = NewAuditEvent {
            event: "session_revoked",
            tenant_id: Some(tenant_id),
            user_id: Some(user_id),
            email: user.as_ref().map(|u| u.email.as_str()),
            detail: Some(serde_json::json!({ "session_id": session_id, "by": "operator" })),
            ..Default::default()
        };
        self.audit(event).await;
        Ok(())
    }

    /// Revokes every open session of a user without disabling it (the
    /// CLI's `session revoke-all`): the user logs in again. Returns the
    /// sessions revoked.
    pub async fn revoke_all_sessions(&self, tenant_id: Uuid, key: UserKey<'_>) -> Result<Vec<Uuid>, AuthError> {
        let user = self.find_user(tenant_id, key).await?;
        let revoked =
            self.store.revoke_user_sessions(tenant_id, user.id, None, "revoked_by_operator", unix_now()).await?;
        let detail = serde_json::json!({ "sessions": revoked.len(), "by": "operator" });
        self.audit_change("logout_all", &user, Some(detail)).await;
        Ok(revoked)
    }

    /// Adds roles and scopes to a user (the CLI's `user grant`); returns
    /// the user as it now is, and whether anything was added. Live tokens
    /// keep their claims: the new ones arrive with the next login or
    /// refresh, which read the user again.
    pub async fn grant(
        &self,
        tenant_id: Uuid,
        key: UserKey<'_>,
        roles: &[String],
        scopes: &[String],
    ) -> Result<(User, bool), AuthError> {
        validate_names(roles, scopes)?;
        let add = |held: &[String], more: &[String]| {
            let mut all = held.to_vec();
            for name in more {
                if !all.contains(name) {
                    all.push(name.clone());
                }
            }
            all
        };
        let change = |u: &User| (add(&u.roles, roles), add(&u.scopes, scopes));
        let (user, changed) = self.change_access(tenant_id, key, "access_granted", None, change).await?;
        Ok((user, changed.is_some()))
    }

    /// Removes roles and scopes from a user and revokes every session, so
    /// that no live token still carries them (the CLI's `user revoke`):
    /// running gateways refuse those tokens within `auth.revocation_poll`,
    /// as after a logout. Returns the user as it now is and the sessions
    /// revoked, or `None` (nothing written, nothing revoked) when the user
    /// held none of them.
    pub async fn revoke(
        &self,
        tenant_id: Uuid,
        key: UserKey<'_>,
        roles: &[String],
        scopes: &[String],
    ) -> Result<(User, Option<Vec<Uuid>>), AuthError> {
        validate_names(roles, scopes)?;
        let keep = |held: &[String], gone: &[String]| held.iter().filter(|n| !gone.contains(n)).cloned().collect();
        let change = |u: &User| (keep(&u.roles, roles), keep(&u.scopes, scopes));
        self.change_access(tenant_id, key, "access_revoked", Some("access_revoked"), change).await
    }

    /// Reads the user, computes its new roles and scopes with `change`, and
    /// writes them only if nothing changed them meanwhile (three tries).
    /// With `revoke`, every session is revoked in the same transaction.
    /// Audits `event` with what was added or removed. A change that changes
    /// nothing writes, revokes and audits nothing, and returns `None`.
    async fn change_access(
        &self,
        tenant_id: Uuid,
        key: UserKey<'_>,
        event: &str,
        revoke: Option<&str>,
        change: impl Fn(&User) -> (Vec<String>, Vec<String>),
    ) -> Result<(User, Option<Vec<Uuid>>), AuthError> {
        let mut email = String::new();
        for _ in 0..3 {
            let mut user = self.find_user(tenant_id, key).await?;
            email.clone_from(&user.email);
            let (roles, scopes) = change(&user);
            if roles == user.roles && scopes == user.scopes {
                return Ok((user, None));
            }
            let old = Access { roles: &user.roles, scopes: &user.scopes };
            let new = Access { roles: &roles, scopes: &scopes };
            let Some(revoked) = self.store.update_access(tenant_id, user.id, &old, &new, revoke).await? else {
                continue;
            };
            let diff = |a: &[String], b: &[String]| a.iter().filter(|n| !b.contains(n)).cloned().collect::<Vec<_>>();
            let detail = serde_json::json!({
                "roles_added": diff(&roles, &user.roles),
                "roles_removed": diff(&user.roles, &roles),
                "scopes_added": diff(&scopes, &user.scopes),
                "scopes_removed": diff(&user.scopes, &scopes),
                "sessions_revoked": revoked.len(),
            });
            self.audit_change(event, &user, Some(detail)).await;
            user.roles = roles;
            user.scopes = scopes;
            return Ok((user, Some(revoked)));
        }
        Err(AuthError::InvalidRequest(format!("email: {email:?} kept changing during the update; run it again")))
    }

    /// Sets a user's password (the CLI's `user set-password`) and revokes
    /// every session, as a reset after a compromise needs. Returns the
    /// sessions revoked.
    pub async fn reset_password(
        &self,
        tenant_id: Uuid,
        key: UserKey<'_>,
        password: &SecretString,
    ) -> Result<Vec<Uuid>, AuthError> {
        self.check_password_strength(password)?;
        let user = self.find_user(tenant_id, key).await?;
        let hash = self.hasher.hash(password).await?;
        let revoked = self.store.reset_password(tenant_id, user.id, &hash).await?.ok_or(AuthError::NotFound)?;
        self.audit_change("password_reset", &user, Some(serde_json::json!({ "sessions_revoked": revoked.len() })))
            .await;
        Ok(revoked)
    }

    fn check_password_strength(&self, password: &SecretString) -> Result<(), AuthError> {
        check_password_size(password).map_err(AuthError::WeakPassword)?;
        let chars = password.expose_secret().chars().count();
        if chars < self.password_min_length {
            return Err(AuthError::WeakPassword(format!(
                "password must be at least {} characters",
                self.password_min_length
            )));
        }
        Ok(())
    }
}

/// Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}
