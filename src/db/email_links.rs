//! `email_links`: one row per link mailed to a user (or handed over by an
//! operator), of one [`LinkPurpose`]: a password reset, an email
//! verification, an email change or the revert of one, a sign-in link.
//! Only the SHA-256 of a link's token is
//! stored (as for refresh tokens), and the SHA-256 of what the link is
//! bound to (column `password_fingerprint`): for a reset, the password hash
//! it was made against, so that a link made before a change (by the user,
//! an operator or another link) is dead; for a verification, the email it
//! proves; for an email change, the email and password hash (a reset after
//! a compromise kills the intruder's change); for a revert, the user's
//! second factor's secret when the change was made (not a binding: a
//! factor that differs at the revert is removed by it); for a sign-in
//! link, the email and password hash. An email change link also
//! holds the address it moves the user to (`new_email`), and a revert link
//! the address it moves the user back to.
//!
//! A link is spent in the same transaction that does what it is for (sets
//! the password and revokes the user's sessions; marks the email
//! verified; moves the user to the new address; opens a session, in
//! [`crate::db::sessions`]), by a conditional update:
//! of two requests presenting one link, one does it. A newer link of a kind
//! voids the user's older ones of that kind; an email change voids every
//! link of the user (they were mailed to the old address) but the revert
//! links; a user or tenant disable, or an operator's email change, voids
//! them all; a sign-out everywhere voids the email change and sign-in
//! links.
//!
//! Revert links are the exception to "only the newest works": each is
//! made in the transaction that confirms a change, goes to the address
//! that change left, and none voids another, so that an intruder who moves
//! the account on (and on) cannot void the owner's. A revert voids every
//! link of the user but the revert links of earlier changes (numbered by
//! `seq` in that transaction, not by a clock): an intruder reverting a
//! later move of their own leaves the owner's earlier one working, and the
//! owner's revert voids the intruder's.

use uuid::Uuid;

use super::outbox::NewDelivery;
use super::{on_pool, unix_now, Store, StoreResult};

/// What a link is for; a link of one kind never serves the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPurpose {
    PasswordReset,
    EmailVerification,
    EmailChange,
    /// Moves the user back to the address an email change left (mailed
    /// there in the `email.changed` notice), with a new password.
    EmailRevert,
    /// Opens a session, without the password (a "magic link"); the
    /// second factor is still asked for.
    Login,
}

impl LinkPurpose {
    fn as_str(self) -> &'static str {
        match self {
            LinkPurpose::PasswordReset => "password_reset",
            LinkPurpose::EmailVerification => "email_verification",
            LinkPurpose::EmailChange => "email_change",
            LinkPurpose::EmailRevert => "email_revert",
            LinkPurpose::Login => "login",
        }
    }
}

/// A link to store.
pub struct NewLink<'a> {
    pub purpose: LinkPurpose,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub token_hash: &'a [u8; 32],
    /// What the link is bound to (see the module docs).
    pub fingerprint: &'a [u8; 32],
    /// For an email change, the address it moves the user to.
    pub new_email: Option<&'a str>,
    /// For a sign-in link, the PKCE challenge its confirmation must answer.
    pub code_challenge: Option<&'a str>,
    pub now: i64,
    pub expires_at: i64,
    /// No link is made when the user got one of this kind less than this
    /// many seconds ago (0: always made).
    pub min_interval: i64,
}

/// A revert link to store with the email change it undoes.
pub struct NewRevert<'a> {
    pub token_hash: &'a [u8; 32],
    /// A digest of the user's second factor as the change found it.
    pub factor: &'a [u8; 32],
    /// The address the change leaves, which the link moves back to.
    pub address: &'a str,
    pub expires_at: i64,
}

/// What the second factor was when a change or revert read the user: the
/// stored secret and recovery codes as they were (`""` for none); the
/// write is refused if either changed meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct FactorRead<'a> {
    pub secret: &'a str,
    pub recovery: &'a str,
}

/// A link that is neither spent, replaced nor expired.
#[derive(Debug, Clone)]
pub struct PendingLink {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub user_id: Uuid,
    pub fingerprint: Vec<u8>,
    /// For an email change, the address it moves the user to.
    pub new_email: Option<String>,
    /// For a sign-in link, the PKCE challenge its confirmation must answer.
    pub code_challenge: Option<String>,
    pub expires_at: i64,
}

/// What [`Store::create_email_link`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMade {
    Made,
    /// The user got a link of this kind within the minimum interval: none
    /// was made.
    Throttled,
    /// The user or its tenant is disabled (or gone), or, for a
    /// verification, the email is verified already (for a sign-in link,
    /// not yet): none was made.
    Refused,
}

/// Why a link did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unredeemed {
    /// Spent, replaced or expired meanwhile.
    LinkGone,
    /// The user changed meanwhile (password or email, disabled, verified
    /// already), or its tenant was disabled, or it is gone.
    UserChanged,
}

impl Unredeemed {
    /// The audit reason.
    pub fn reason(self) -> &'static str {
        match self {
            Unredeemed::LinkGone => "link_spent_meanwhile",
            Unredeemed::UserChanged => "user_changed_meanwhile",
        }
    }
}

/// A link's row as [`Store::pending_email_link`] reads it: id, tenant id,
/// user id, fingerprint, new email, code challenge, expiry.
type LinkRow = (Uuid, Uuid, Uuid, Vec<u8>, Option<String>, Option<String>, i64);

const INSERT: &str = "
    INSERT INTO email_links
        (id, token_hash, tenant_id, user_id, password_fingerprint, created_at, expires_at, purpose, new_email,
         code_challenge)
    SELECT $1, $2, $3, $4, $5, $6, $7, $9, $10, $11
    WHERE NOT EXISTS (SELECT 1 FROM email_links
                      WHERE tenant_id = $3 AND user_id = $4 AND purpose = $9 AND created_at > $8)";

/// Voids the user's other unspent links of a kind (`$3`: now, `$4`: the
/// one kept, `$5`: the kind, or NULL for every kind).
const VOID_OTHERS: &str = "
    UPDATE email_links SET used_at = $3
    WHERE tenant_id = $1 AND user_id = $2 AND ($5 IS NULL OR purpose = $5) AND used_at IS NULL
      AND ($4 IS NULL OR id <> $4)";

/// Voids every unspent link of the user but the revert links (after an
/// email change: the others went to the old address; `$3`: now).
const VOID_ALL_BUT_REVERTS: &str = "
    UPDATE email_links SET used_at = $3
    WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL AND purpose <> 'email_revert'";

/// Voids every unspent link of the user but the revert link `$4` and
/// those of earlier changes (`$3`: now).
const VOID_ALL_BUT_OLDER_REVERTS: &str = "
    UPDATE email_links SET used_at = $3
    WHERE tenant_id = $1 AND user_id = $2 AND used_at IS NULL AND id <> $4
      AND NOT (purpose = 'email_revert' AND seq < (SELECT seq FROM email_links WHERE id = $4))";

/// Stores a revert link (`$1` id, `$2` token hash, `$3` tenant, `$4` user,
/// `$5` factor digest, `$6` now, `$7` expiry, `$8` the address it moves
/// back to), numbered after the user's earlier ones: the user's row is
/// locked by the change that makes it, so two are numbered in turn.
const INSERT_REVERT: &str = "
    INSERT INTO email_links
        (id, token_hash, tenant_id, user_id, password_fingerprint, created_at, expires_at, purpose, new_email, seq)
    SELECT $1, $2, $3, $4, $5, $6, $7, 'email_revert', $8,
           COALESCE((SELECT MAX(seq) FROM email_links
                     WHERE tenant_id = $3 AND user_id = $4 AND purpose = 'email_revert'), 0) + 1";

/// Spends a link (`$1`) at `$2`, if it is unspent and unexpired.
const SPEND: &str = "UPDATE email_links SET used_at = $2 WHERE id = $1 AND used_at IS NULL AND expires_at > $2";

impl Store {
    /// Stores a link and voids the user's earlier unspent ones of its kind
    /// (only the newest link works), in one transaction, if the user and
    /// its tenant are enabled (and, for a verification, the email is not
    /// verified yet) and the user got no link of the kind within
    /// `min_interval`.
    ///
    /// The transaction starts by locking the user's row (a write that
    /// changes nothing, and checks the user): on SQLite it queues for the
    /// write lock rather than failing on a stale read; on PostgreSQL two
    /// links for one user are made one after the other, so the second sees
    /// the first (the one-a-minute rule holds, and one link stays). The
    /// tenant's row is then share-locked and checked: a tenant disable,
    /// which voids the tenant's links in its own transaction, either sees
    /// this link or is seen by it.
    pub async fn create_email_link(&self, new: NewLink<'_>) -> StoreResult<LinkMade> {
        let lock_user = match new.purpose {
            LinkPurpose::PasswordReset | LinkPurpose::EmailChange | LinkPurpose::EmailRevert => {
                "UPDATE users SET updated_at = updated_at WHERE tenant_id = $1 AND id = $2 AND NOT disabled"
            }
            LinkPurpose::EmailVerification => {
                "UPDATE users SET updated_at = updated_at
                 WHERE tenant_id = $1 AND id = $2 AND NOT disabled AND email_verified_at IS NULL"
            }
            // Only to a proved address: see `auth::service::login_link`.
            LinkPurpose::Login => {
                "UPDATE users SET updated_at = updated_at
                 WHERE tenant_id = $1 AND id = $2 AND NOT disabled AND email_verified_at IS NOT NULL"
            }
        };
        const TENANT: &str = "SELECT disabled FROM tenants WHERE id = $1";
        let tenant = match self.pool() {
            super::Pool::Sqlite(_) => TENANT.to_owned(),
            super::Pool::Postgres(_) => format!("{TENANT} FOR SHARE"),
        };
        let purpose = new.purpose.as_str();
        let id = Uuid::new_v4();
        let since = if new.min_interval > 0 { new.now - new.min_interval } else { i64::MAX };
        let made = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let locked = sqlx::query(lock_user).bind(new.tenant_id).bind(new.user_id).execute(&mut *tx).await?;
            let tenant: Option<(bool,)> = sqlx::query_as(&tenant).bind(new.tenant_id).fetch_optional(&mut *tx).await?;
            if locked.rows_affected() == 0 || tenant.is_none_or(|(disabled,)| disabled) {
                tx.rollback().await?;
                LinkMade::Refused
            } else {
                let inserted = sqlx::query(INSERT)
                    .bind(id)
                    .bind(&new.token_hash[..])
                    .bind(new.tenant_id)
                    .bind(new.user_id)
                    .bind(&new.fingerprint[..])
                    .bind(new.now)
                    .bind(new.expires_at)
                    .bind(since)
                    .bind(purpose)
                    .bind(new.new_email)
                    .bind(new.code_challenge)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if inserted == 1 {
                    let void = sqlx::query(VOID_OTHERS).bind(new.tenant_id).bind(new.user_id).bind(new.now);
                    void.bind(Some(id)).bind(Some(purpose)).execute(&mut *tx).await?;
                    tx.commit().await?;
                    LinkMade::Made
                } else {
                    tx.rollback().await?;
                    LinkMade::Throttled
                }
            }
        });
        Ok(made)
    }

    /// The link of kind `purpose` whose token hashes to `token_hash`, if it
    /// is unspent and unexpired at `now`.
    pub async fn pending_email_link(
        &self,
        purpose: LinkPurpose,
        token_hash: &[u8; 32],
        now: i64,
    ) -> StoreResult<Option<PendingLink>> {
        let sql = "SELECT id, tenant_id, user_id, password_fingerprint, new_email, code_challenge, expires_at
                   FROM email_links
                   WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2 AND purpose = $3";
        let row: Option<LinkRow> = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(&token_hash[..])
            .bind(now)
            .bind(purpose.as_str())
            .fetch_optional(p)
            .await)?;
        Ok(row.map(|(id, tenant_id, user_id, fingerprint, new_email, code_challenge, expires_at)| PendingLink {
            id,
            tenant_id,
            user_id,
            fingerprint,
            new_email,
            code_challenge,
            expires_at,
        }))
    }

    /// Spends the reset `link`, replaces the user's password hash `old`
    /// (the one the link was made against) by `new`, marks the email
    /// verified (the link proved the mailbox), voids the user's other reset
    /// links and revokes every open session (reason `password_reset`), all
    /// in one transaction; returns the revoked sessions. Nothing is written when the link was spent meanwhile, or
    /// the user's password is no longer `old`, or the user or its tenant is
    /// disabled.
    pub async fn redeem_password_reset(
        &self,
        link: &PendingLink,
        old: &str,
        new: &str,
        now: i64,
    ) -> StoreResult<Result<Vec<Uuid>, Unredeemed>> {
        let set =
            "UPDATE users SET password_hash = $3, updated_at = $4, email_verified_at = COALESCE(email_verified_at, $4)
                   WHERE tenant_id = $1 AND id = $2 AND password_hash = $5 AND NOT disabled
                     AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        let revoke = "UPDATE sessions SET revoked_at = $3, revoke_reason = 'password_reset'
                      WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id";
        let outcome =
            self.redeem(link, LinkPurpose::PasswordReset, set, &[new, old], Some(revoke), (None, None), now).await?;
        Ok(outcome.map(|revoked| revoked.unwrap_or_default()))
    }

    /// Spends the verification `link` and marks the user's email verified,
    /// in one transaction, if the email is still `email`, unverified, and
    /// the user and its tenant enabled; voids the user's other verification
    /// links.
    pub async fn redeem_email_verification(
        &self,
        link: &PendingLink,
        email: &str,
        now: i64,
    ) -> StoreResult<Result<(), Unredeemed>> {
        let verify = "UPDATE users SET email_verified_at = $4
                      WHERE tenant_id = $1 AND id = $2 AND email = $3 AND email_verified_at IS NULL AND NOT disabled
                        AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        let outcome =
            self.redeem(link, LinkPurpose::EmailVerification, verify, &[email], None, (None, None), now).await?;
        Ok(outcome.map(drop))
    }

    /// Spends the email change `link` and moves the user from `old` (its
    /// email when the link was made) to `new`, marked verified (the link
    /// proved the mailbox), in one transaction, if the user's email is
    /// still `old`, its password hash still `password_hash`, its second
    /// factor still `factor` (what the revert link, if any, was told of
    /// it), and the user and its tenant enabled; voids every other link of
    /// the user (mailed to the old address) but the revert links, and
    /// stores `revert`, the link that undoes this change, and `notice`,
    /// the delivery that mails it (so that neither is without the other). [`StoreError::Conflict`](super::StoreError::Conflict)
    /// when another user of the tenant has taken `new` meanwhile.
    #[allow(clippy::too_many_arguments, reason = "one caller; each is a condition of the write")]
    pub async fn redeem_email_change(
        &self,
        link: &PendingLink,
        old: &str,
        password_hash: &str,
        factor: FactorRead<'_>,
        new: &str,
        (revert, notice): (Option<NewRevert<'_>>, Option<&NewDelivery>),
        now: i64,
    ) -> StoreResult<Result<(), Unredeemed>> {
        let change = "UPDATE users SET email = $3, email_verified_at = $4, updated_at = $4
                      WHERE tenant_id = $1 AND id = $2 AND email = $5 AND password_hash = $6
                        AND COALESCE(totp_secret, '') = $7 AND COALESCE(totp_recovery, '') = $8 AND NOT disabled
                        AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        let args = [new, old, password_hash, factor.secret, factor.recovery];
        let outcome = self.redeem(link, LinkPurpose::EmailChange, change, &args, None, (revert, notice), now).await?;
        Ok(outcome.map(drop))
    }

    /// Spends the revert `link` and moves the user back to `address` (the
    /// link's), with the password hash `new` (the one set since may be an
    /// intruder's), marked verified, in one transaction, if the user's
    /// second factor (secret and recovery codes) is still `factor` and the
    /// user and its tenant are enabled; with `drop_factor` the factor (and
    /// one being set up) is removed. Revokes every open
    /// session (reason `email_reverted`) and returns them; voids every link
    /// of the user but the revert links older than this one (an intruder
    /// who moved the account on, and reverts the second move, does not
    /// void the owner's). [`StoreError::Conflict`](super::StoreError::Conflict)
    /// when another user of the tenant has `address`.
    pub async fn redeem_email_revert(
        &self,
        link: &PendingLink,
        address: &str,
        new: &str,
        (factor, drop_factor): (FactorRead<'_>, bool),
        now: i64,
    ) -> StoreResult<Result<Vec<Uuid>, Unredeemed>> {
        const KEEP: &str = "UPDATE users SET email = $3, password_hash = $5, email_verified_at = $4, updated_at = $4
            WHERE tenant_id = $1 AND id = $2 AND COALESCE(totp_secret, '') = $6 AND COALESCE(totp_recovery, '') = $7
              AND NOT disabled AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        const DROP: &str = "UPDATE users SET email = $3, password_hash = $5, email_verified_at = $4, updated_at = $4,
                totp_secret = NULL, totp_pending = NULL, totp_pending_at = NULL, totp_last_step = NULL, totp_failures = 0, totp_recovery = NULL
            WHERE tenant_id = $1 AND id = $2 AND COALESCE(totp_secret, '') = $6 AND COALESCE(totp_recovery, '') = $7
              AND NOT disabled AND EXISTS (SELECT 1 FROM tenants t WHERE t.id = $1 AND NOT t.disabled)";
        let revoke = "UPDATE sessions SET revoked_at = $3, revoke_reason = 'email_reverted'
                      WHERE tenant_id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id";
        let change = if drop_factor { DROP } else { KEEP };
        let args = [address, new, factor.secret, factor.recovery];
        let outcome =
            self.redeem(link, LinkPurpose::EmailRevert, change, &args, Some(revoke), (None, None), now).await?;
        Ok(outcome.map(|revoked| revoked.unwrap_or_default()))
    }

    /// One transaction: run `change` (bound to tenant id, user id,
    /// `args[0]`, now, then the rest of `args`) on the user's row; spend
    /// `link`; void the user's other links of the kind (after an email
    /// change or a revert, of every kind but the revert links it keeps);
    /// store `revert`; with `revoke`
    /// (bound to tenant id, user id, now), revoke and return sessions.
    /// Rolled back, with why, when the user's row or the link does not
    /// match. The user's row first, as in [`Store::create_email_link`] and
    /// a disable: on PostgreSQL every transaction that touches both takes
    /// the user's row lock before any link's, so none deadlocks another
    /// (and on SQLite the first statement is a write).
    #[allow(clippy::too_many_arguments, reason = "private; each caller names what its kind of link does")]
    async fn redeem(
        &self,
        link: &PendingLink,
        purpose: LinkPurpose,
        change: &str,
        args: &[&str],
        revoke: Option<&str>,
        (revert, notice): (Option<NewRevert<'_>>, Option<&NewDelivery>),
        now: i64,
    ) -> StoreResult<Result<Option<Vec<Uuid>>, Unredeemed>> {
        let (tenant_id, user_id) = (link.tenant_id, link.user_id);
        let outcome = on_pool!(self, |p| {
            let mut tx = p.begin().await?;
            let mut query = sqlx::query(change).bind(tenant_id).bind(user_id).bind(args.first().copied()).bind(now);
            for arg in args.iter().skip(1) {
                query = query.bind(*arg);
            }
            let changed = query.execute(&mut *tx).await?.rows_affected() == 1;
            let spent =
                changed && sqlx::query(SPEND).bind(link.id).bind(now).execute(&mut *tx).await?.rows_affected() == 1;
            if !changed {
                tx.rollback().await?;
                Err(Unredeemed::UserChanged)
            } else if !spent {
                tx.rollback().await?;
                Err(Unredeemed::LinkGone)
            } else {
                match purpose {
                    LinkPurpose::EmailChange => {
                        sqlx::query(VOID_ALL_BUT_REVERTS)
                            .bind(tenant_id)
                            .bind(user_id)
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                    }
                    LinkPurpose::EmailRevert => {
                        let void = sqlx::query(VOID_ALL_BUT_OLDER_REVERTS).bind(tenant_id).bind(user_id).bind(now);
                        void.bind(link.id).execute(&mut *tx).await?;
                    }
                    LinkPurpose::PasswordReset | LinkPurpose::EmailVerification | LinkPurpose::Login => {
                        let void = sqlx::query(VOID_OTHERS).bind(tenant_id).bind(user_id).bind(now).bind(None::<Uuid>);
                        void.bind(Some(purpose.as_str())).execute(&mut *tx).await?;
                    }
                }
                if let Some(r) = &revert {
                    sqlx::query(INSERT_REVERT)
                        .bind(Uuid::new_v4())
                        .bind(&r.token_hash[..])
                        .bind(tenant_id)
                        .bind(user_id)
                        .bind(&r.factor[..])
                        .bind(now)
                        .bind(r.expires_at)
                        .bind(r.address)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(n) = notice {
                    sqlx::query(super::outbox::INSERT)
                        .bind(n.id)
                        .bind(n.kind)
                        .bind(&n.body)
                        .bind(n.now)
                        .bind(n.now)
                        .bind(n.expires_at)
                        .bind(0_i64)
                        .execute(&mut *tx)
                        .await?;
                }
                let revoked = match revoke {
                    Some(revoke) => {
                        let rows: Vec<(Uuid,)> =
                            sqlx::query_as(revoke).bind(tenant_id).bind(user_id).bind(now).fetch_all(&mut *tx).await?;
                        Some(rows.into_iter().map(|(id,)| id).collect())
                    }
                    None => None,
                };
                tx.commit().await?;
                Ok(revoked)
            }
        });
        Ok(outcome)
    }

    /// Voids the user's unspent links of `purpose` (a sign-out everywhere
    /// or a second factor set up drops a pending email change); returns how
    /// many.
    pub async fn void_email_links(&self, tenant_id: Uuid, user_id: Uuid, purpose: LinkPurpose) -> StoreResult<u64> {
        let (now, purpose) = (unix_now(), purpose.as_str());
        Ok(on_pool!(self, |p| sqlx::query(VOID_OTHERS)
            .bind(tenant_id)
            .bind(user_id)
            .bind(now)
            .bind(None::<Uuid>)
            .bind(Some(purpose))
            .execute(p)
            .await
            .map(|d| d.rows_affected()))?)
    }

    /// Whether `email` is where a live revert link of a user of the tenant
    /// other than `except` would move that user back: registration and
    /// email changes leave such an address alone (see
    /// `auth::service::email_change`).
    pub async fn address_reserved(&self, tenant_id: Uuid, email: &str, except: Option<Uuid>) -> StoreResult<bool> {
        let sql = "SELECT COUNT(*) FROM email_links
                   WHERE tenant_id = $1 AND purpose = 'email_revert' AND new_email = $2 AND used_at IS NULL
                     AND expires_at > $3 AND ($4 IS NULL OR user_id <> $4)";
        let (n,): (i64,) = on_pool!(self, |p| sqlx::query_as(sql)
            .bind(tenant_id)
            .bind(email)
            .bind(unix_now())
            .bind(except)
            .fetch_one(p)
            .await)?;
        Ok(n > 0)
    }

    /// Deletes links that expired or were spent before `before` (the hourly
    /// upkeep and `gateway prune`: the audit log keeps their story); returns
    /// how many.
    pub async fn purge_email_links(&self, before: i64) -> StoreResult<u64> {
        let sql = "DELETE FROM email_links WHERE expires_at < $1 OR used_at < $1";
        Ok(on_pool!(self, |p| sqlx::query(sql).bind(before).execute(p).await.map(|d| d.rows_affected()))?)
    }
}
