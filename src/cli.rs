//! The command line: raw arguments become a [`Cli`] in one step (clap), and
//! [`execute`] runs it. Input and output are parameters so that tests drive
//! the very same code in-process.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;

use crate::app::{shutdown_signal, App};
use crate::auth::keys::{self, KeyRing};
use crate::auth::password::PasswordHasher;
use crate::auth::seal::SealingKeys;
use crate::auth::service::{rfc3339, Accounts, UserKey};
use crate::auth::AuthError;
use crate::config::Config;
use crate::db::audit::{AuditQuery, NewAuditEvent};
use crate::db::tenants::Tenant;
use crate::db::users::ForgetRefused;
use crate::db::users::User;
use crate::db::Store;

#[derive(Debug, Parser)]
#[command(name = "gateway", version, about = "Reverse-proxy auth gateway")]
pub struct Cli {
    /// Path of the configuration file.
    #[arg(long, global = true, env = "GATEWAY_CONFIG", default_value = "gateway.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Whether commands other than `serve` log too (to standard error:
    /// warnings, and their audit events). The binary sets it; tests that
    /// run commands in-process leave it off.
    #[arg(skip)]
    pub log: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (the default). Migrations run first when database.auto_migrate.
    Serve,
    /// Apply pending database migrations; safe to repeat.
    Migrate,
    /// Configuration file commands.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// See and end users' sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Read the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Delete what database.session_retention and database.audit_retention
    /// no longer keep, idle lockout counters, expired or spent links,
    /// expired mailer deliveries and stale TOTP setups (a running gateway
    /// does it every hour); prints the counts.
    Prune,
    /// See and hurry the deliveries the mailer has not taken yet.
    #[command(subcommand)]
    Mailer(MailerCommand),
}

#[derive(Debug, Subcommand)]
pub enum MailerCommand {
    /// List the deliveries waiting for the mailer, the next due first:
    /// webhook-id, type, attempts, next attempt, expiry (never a body).
    List,
    /// Make every waiting delivery due now: a running gateway sends them
    /// within seconds (after the mailer is back, rather than at the end of
    /// a long pause; one being attempted right then may go twice, with the
    /// same webhook-id); prints how many.
    Retry,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration file and report every problem.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant; prints its id.
    Create {
        /// Lower-case letters, digits and '-', 1 to 64 characters.
        slug: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List tenants.
    List,
    /// Disable a tenant: none of its users can log in or refresh, and every
    /// session in it is revoked. Users and data are kept.
    Disable { slug: String },
    /// Enable a disabled tenant. The sessions the disable revoked stay
    /// revoked: its users log in again.
    Enable { slug: String },
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List a user's open sessions, newest first.
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
    /// Revoke one session (an id from `session list`); the user's other
    /// sessions stay open.
    Revoke {
        #[arg(long)]
        tenant: String,
        /// The session's id.
        id: String,
    },
    /// Revoke every open session of a user without disabling it; the user
    /// logs in again.
    RevokeAll {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints its id.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
        /// A role (repeatable).
        #[arg(long = "role")]
        roles: Vec<String>,
        /// A scope (repeatable).
        #[arg(long = "scope")]
        scopes: Vec<String>,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the users of a tenant.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Delete a user: every session is revoked (running gateways refuse
    /// its tokens) and the row is left as a tombstone that identifies no
    /// one (the email is free again). With --forget, the user's audit
    /// events also lose the email, address and user agent.
    Delete {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
        /// Also erase the email, address and user agent from the user's
        /// audit events (a request to be forgotten).
        #[arg(long)]
        forget: bool,
    },
    /// Erase a deleted user from the audit log: its events, and those
    /// recorded with its former email, lose the email, address and user
    /// agent (for a user deleted without --forget).
    Forget {
        #[arg(long)]
        tenant: String,
        /// The deleted user's id (as `user delete` and the audit log show it).
        #[arg(long)]
        user_id: uuid::Uuid,
        /// The email the user had.
        #[arg(long)]
        email: String,
    },
    /// Disable a user and revoke every session.
    Disable {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
    /// Enable a disabled user. The sessions the disable revoked stay
    /// revoked: the user logs in again.
    Enable {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
    /// Add roles and scopes to a user. Live tokens keep their claims; the
    /// user's next login or refresh carries the new ones.
    Grant(AccessArgs),
    /// Remove roles and scopes from a user and revoke every session, so that
    /// no live token still carries them; the user logs in again.
    Revoke(AccessArgs),
    /// Set a user's password and revoke every session.
    SetPassword {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Remove the user's second factor (a lost authenticator): the password
    /// alone logs in again, and the user may set up a new one.
    MfaReset {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
    /// Print a password reset token for the user to redeem with `POST
    /// /auth/password/reset` (valid `auth.password_reset.token_ttl`, once;
    /// the user's earlier links stop working). Hand it over as you would a
    /// password.
    ResetToken {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
    /// Move a user to another email, verified on your word; the user's
    /// mailed links stop working, and its sessions stay open. (Users move
    /// themselves with `POST /auth/email/change`, which proves the new
    /// mailbox.)
    SetEmail {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
        #[arg(long)]
        new_email: String,
    },
    /// Vouch for a user's email: with `auth.email_verification.required`,
    /// a user who registered logs in without following the mailed link.
    VerifyEmail {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        email: String,
    },
}

/// The user and the roles and scopes that `user grant` adds and `user
/// revoke` removes.
#[derive(Debug, Args)]
pub struct AccessArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    email: String,
    /// A role (repeatable).
    #[arg(long = "role", required_unless_present = "scopes")]
    roles: Vec<String>,
    /// A scope (repeatable).
    #[arg(long = "scope")]
    scopes: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate a new Ed25519 key; it signs after the next start or SIGHUP.
    /// Also makes secrets.key (which seals the TOTP secrets) when there is
    /// none.
    Generate,
    /// List the signing keys (the newest signs) and the secrets keys (the
    /// newest seals), with how many stored TOTP secrets, and deliveries
    /// waiting for the mailer, each holds (TOTP setups too old to confirm
    /// are cleared first).
    List,
    /// Make a new secrets key (secrets-<UTC time>.key) and reseal every
    /// stored TOTP secret with it; running gateways read it when they meet
    /// a secret it sealed, or on SIGHUP. Remove an older secrets key file
    /// once `keys list` shows it holds nothing.
    RotateSecrets,
    /// Write every sealed TOTP secret back as it is, before a rollback to
    /// a release from before sealing (set auth.seal_totp_secrets = false on
    /// the replicas that keep running, or they seal them again at start).
    UnsealTotp,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print events, newest first.
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// Only this event (e.g. login_failed).
        #[arg(long)]
        event: Option<String>,
        /// Only events about this email: those recorded with it, and those
        /// of the users who have it (a logout records no email).
        #[arg(long)]
        email: Option<String>,
        /// Only events at or after this time: RFC 3339 in UTC
        /// ("2026-12-01T00:00:00Z") or how long ago ("24h", "7d").
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line (at, event, tenant, user_id, email, ip,
        /// user_agent, detail) instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one command. `input` feeds `--password-stdin`; `out` gets the output.
pub async fn execute(cli: Cli, input: &mut dyn BufRead, out: &mut dyn Write) -> anyhow::Result<()> {
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Config(ConfigCommand::Check) = command {
        Config::load(&cli.config)?;
        writeln!(out, "{}: ok", cli.config.display())?;
        return Ok(());
    }
    let config = Config::load(&cli.config)?;
    if cli.log && !matches!(command, Command::Serve) {
        crate::observability::init_tracing(config.log.format, "warn,gateway::audit=info");
    }
    match command {
        Command::Serve => {
            crate::observability::init_tracing(config.log.format, "info");
            let app = App::build(config).await?;
            app.run(shutdown_signal()).await
        }
        Command::Config(ConfigCommand::Check) => Ok(()),
        Command::Migrate => {
            let store = Store::connect(&config.database).await?;
            store.migrate().await?;
            store.close().await;
            writeln!(out, "migrations applied")?;
            Ok(())
        }
        Command::Keys(cmd) => keys_command(&config, cmd, out).await,
        Command::Tenant(cmd) => {
            let accounts = accounts(&config).await?;
            let result = tenant_command(&accounts, cmd, out).await;
            accounts.store.close().await;
            result
        }
        Command::User(cmd) => {
            let accounts = accounts(&config).await?;
            let result = user_command(&accounts, cmd, input, out).await;
            accounts.store.close().await;
            result
        }
        Command::Session(cmd) => {
            let accounts = accounts(&config).await?;
            let result = session_command(&accounts, cmd, out).await;
            accounts.store.close().await;
            result
        }
        Command::Prune => {
            let store = open(&config).await?;
            let pruned = store.prune(config.database.retention).await;
            let counters = store.purge_idle_login_attempts(config.auth.lockout_duration).await;
            let links = store.purge_email_links(crate::db::unix_now()).await;
            let deliveries = store.purge_deliveries(crate::db::unix_now()).await;
            let setups =
                store.clear_stale_totp_setups(crate::db::unix_now() - crate::auth::service::MFA_SETUP_TTL).await;
            store.close().await;
            let (pruned, counters, links, deliveries, setups) = (pruned?, counters?, links?, deliveries?, setups?);
            writeln!(
                out,
                "pruned {} session(s), {} refresh token(s), {} audit event(s), {counters} idle lockout counter(s), \
                 {links} expired or spent email link(s), {deliveries} expired mailer deliveries, \
                 {setups} stale TOTP setup(s)",
                pruned.sessions, pruned.refresh_tokens, pruned.audit_events
            )?;
            Ok(())
        }
        Command::Mailer(cmd) => {
            let store = open(&config).await?;
            let result = mailer_command(&store, cmd, out).await;
            store.close().await;
            result
        }
        Command::Audit(AuditCommand::List { tenant, event, email, since, limit, json }) => {
            let since = since.as_deref().map(parse_since).transpose()?;
            let store = open(&config).await?;
            let tenant_id = match tenant {
                Some(slug) => Some(find_tenant(&store, &slug).await?),
                None => None,
            };
            let email = email.map(|e| crate::auth::service::normalize_email(&e));
            let query = AuditQuery {
                tenant_id,
                event: event.as_deref(),
                email: email.as_deref(),
                since,
                limit: limit.clamp(1, 100_000),
            };
            for e in store.list_audit(&query).await? {
                if json {
                    let line = serde_json::json!({
                        "at": rfc3339(e.at),
                        "event": e.event,
                        "tenant": e.tenant,
                        "user_id": e.user_id,
                        "email": e.email,
                        "ip": e.ip,
                        "user_agent": e.user_agent,
                        "detail": e.detail,
                    });
                    writeln!(out, "{line}")?;
                    continue;
                }
                writeln!(
                    out,
                    "{}  {:<24} tenant={} user={} email={} ip={} detail={}",
                    rfc3339(e.at),
                    e.event,
                    e.tenant.as_deref().unwrap_or("-"),
                    e.user_id.map_or_else(|| "-".to_owned(), |u| u.to_string()),
                    e.email.as_deref().unwrap_or("-"),
                    e.ip.as_deref().unwrap_or("-"),
                    e.detail,
                )?;
            }
            store.close().await;
            Ok(())
        }
    }
}

/// `--since`: an RFC 3339 time in UTC (`Z`), or a duration back from now.
fn parse_since(text: &str) -> anyhow::Result<i64> {
    let at = match humantime::parse_rfc3339(text) {
        Ok(at) => at,
        Err(_) => match humantime::parse_duration(text) {
            Ok(ago) => std::time::SystemTime::now().checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH),
            Err(_) => bail!("since: {text:?} is neither a UTC time like 2026-12-01T00:00:00Z nor a duration like 24h"),
        },
    };
    let secs = at.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Ok(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// Opens the database, migrating first when the config allows it.
async fn open(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.database).await?;
    if config.database.auto_migrate {
        store.migrate().await?;
    }
    Ok(store)
}

/// The database (opened as [`open`] does) with the account rules.
async fn accounts(config: &Config) -> anyhow::Result<Accounts> {
    let hasher = PasswordHasher::new(config.auth.argon2)?;
    let store = open(config).await?;
    Ok(Accounts {
        store,
        hasher,
        password_min_length: config.auth.password_min_length,
        session_lifetime: config.auth.session_lifetime,
        reset_token_ttl: config.auth.reset_token_ttl,
        verification_token_ttl: config.auth.email_verification.token_ttl,
        login_token_ttl: config.auth.login_link.token_ttl,
        by: None,
    })
}

async fn find_tenant(store: &Store, slug: &str) -> anyhow::Result<uuid::Uuid> {
    Ok(tenant(store, slug).await?.id)
}

async fn tenant(store: &Store, slug: &str) -> anyhow::Result<Tenant> {
    match store.tenant_by_slug(slug).await? {
        Some(t) => Ok(t),
        None => bail!("tenant {slug:?} does not exist (see `gateway tenant list`)"),
    }
}

async fn tenant_command(accounts: &Accounts, cmd: TenantCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = &accounts.store;
    match cmd {
        TenantCommand::Create { slug, name } => {
            let name = name.unwrap_or_else(|| slug.clone());
            match accounts.create_tenant(&slug, &name).await {
                Ok(t) => {
                    writeln!(out, "{}", t.id)?;
                    Ok(())
                }
                Err(AuthError::TenantExists) => bail!("tenant {slug:?} already exists"),
                Err(AuthError::InvalidRequest(m)) => bail!("{m}"),
                Err(e) => Err(e.into()),
            }
        }
        TenantCommand::List => {
            for t in store.list_tenants().await? {
                writeln!(out, "{}  {:<24} {}{}", t.id, t.slug, t.name, if t.disabled { "  DISABLED" } else { "" })?;
            }
            Ok(())
        }
        TenantCommand::Disable { slug } => {
            let tenant = tenant(store, &slug).await?;
            let revoked = accounts.disable_tenant(&tenant).await.map_err(anyhow::Error::new)?;
            writeln!(out, "disabled tenant {slug}; {} session(s) revoked", revoked.len())?;
            Ok(())
        }
        TenantCommand::Enable { slug } => {
            let tenant = tenant(store, &slug).await?;
            accounts.enable_tenant(&tenant).await.map_err(anyhow::Error::new)?;
            writeln!(out, "enabled tenant {slug}; the sessions revoked by the disable stay revoked")?;
            Ok(())
        }
    }
}

async fn session_command(accounts: &Accounts, cmd: SessionCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    let store = &accounts.store;
    match cmd {
        SessionCommand::List { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            for s in accounts.sessions(tenant_id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))? {
                writeln!(
                    out,
                    "{}  created={} last_used={} expires={} amr={} ip={} user_agent={:?}",
                    s.id,
                    rfc3339(s.created_at),
                    rfc3339(s.last_used_at),
                    rfc3339(s.expires_at),
                    s.amr().values().join(","),
                    s.ip.as_deref().unwrap_or("-"),
                    s.user_agent.as_deref().unwrap_or("-"),
                )?;
            }
            Ok(())
        }
        SessionCommand::Revoke { tenant, id } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let Ok(session_id) = uuid::Uuid::parse_str(&id) else {
                bail!("id: {id:?} is not a session id (see `gateway session list`)");
            };
            match accounts.revoke_session(tenant_id, session_id).await {
                Ok(()) => writeln!(out, "session {session_id} revoked")?,
                Err(AuthError::NotFound) => bail!("id: no open session {session_id} in tenant {tenant:?}"),
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
        SessionCommand::RevokeAll { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let revoked = accounts
                .revoke_all_sessions(tenant_id, UserKey::Email(&email))
                .await
                .map_err(|e| cli_error(e, &email))?;
            writeln!(out, "{} session(s) of {email} revoked", revoked.len())?;
            Ok(())
        }
    }
}

async fn user_command(
    accounts: &Accounts,
    cmd: UserCommand,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let store = &accounts.store;
    match cmd {
        UserCommand::Create { tenant: slug, email, roles, scopes, password_stdin } => {
            let tenant = tenant(store, &slug).await?;
            let tenant_id = tenant.id;
            let password = if password_stdin { read_stdin_password(input)? } else { prompt_password()? };
            let user = accounts
                .create_user(tenant_id, &email, &password, &roles, &scopes, None, None, true)
                .await
                .map_err(|e| cli_error(e, &email))?;
            writeln!(out, "{}", user.id)?;
            if tenant.disabled {
                // Standard error: scripts read the id from standard output.
                eprintln!(
                    "note: tenant {slug:?} is disabled; the user can log in after `gateway tenant enable {slug}`"
                );
            }
            Ok(())
        }
        UserCommand::List { tenant } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            for u in store.list_users(tenant_id).await? {
                writeln!(
                    out,
                    "{}  {:<32} roles={} scopes={}{}{}{}",
                    u.id,
                    u.email,
                    u.roles.join(","),
                    u.scopes.join(","),
                    if u.totp_secret.is_some() { "  MFA" } else { "" },
                    if u.email_verified_at.is_none() { "  UNVERIFIED" } else { "" },
                    if u.disabled { "  DISABLED" } else { "" }
                )?;
            }
            Ok(())
        }
        UserCommand::Delete { tenant, email, forget } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let revoked = accounts
                .delete_user(tenant_id, UserKey::Email(&email), forget)
                .await
                .map_err(|e| cli_error(e, &email))?;
            let erased = if forget { "; its audit events no longer name it" } else { "" };
            writeln!(out, "deleted {email}; {} session(s) revoked{erased}", revoked.len())?;
            Ok(())
        }
        UserCommand::Forget { tenant, user_id, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let n = match accounts.forget_user(tenant_id, user_id, &email).await? {
                Ok(n) => n,
                Err(ForgetRefused::NotDeleted) => {
                    bail!("user-id: {user_id} is no deleted user of tenant {tenant:?} (`gateway user delete` first)")
                }
                Err(ForgetRefused::NotItsEmail) => bail!(
                    "email: no audit event of user {user_id} carries {email:?} (a typo? or retention pruned them)"
                ),
            };
            writeln!(out, "{n} audit event(s) no longer name the user")?;
            Ok(())
        }
        UserCommand::Disable { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let revoked =
                accounts.disable_user(tenant_id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))?;
            writeln!(out, "disabled {email}; {} session(s) revoked", revoked.len())?;
            Ok(())
        }
        UserCommand::Enable { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            accounts.enable_user(tenant_id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))?;
            writeln!(out, "enabled {email}; the sessions revoked by the disable stay revoked")?;
            Ok(())
        }
        UserCommand::Grant(AccessArgs { tenant, email, roles, scopes }) => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let (user, added) = accounts
                .grant(tenant_id, UserKey::Email(&email), &roles, &scopes)
                .await
                .map_err(|e| cli_error(e, &email))?;
            if added {
                writeln!(out, "{}; live tokens keep their claims until the next login or refresh", access(&user))?;
            } else {
                writeln!(out, "{}; already held, nothing changed", access(&user))?;
            }
            Ok(())
        }
        UserCommand::Revoke(AccessArgs { tenant, email, roles, scopes }) => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let (user, revoked) = accounts
                .revoke(tenant_id, UserKey::Email(&email), &roles, &scopes)
                .await
                .map_err(|e| cli_error(e, &email))?;
            match revoked {
                Some(revoked) => writeln!(out, "{}; {} session(s) revoked", access(&user), revoked.len())?,
                None => writeln!(out, "{}; none of them was held, nothing changed", access(&user))?,
            }
            Ok(())
        }
        UserCommand::SetPassword { tenant, email, password_stdin } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let password = if password_stdin { read_stdin_password(input)? } else { prompt_password()? };
            let revoked = accounts
                .reset_password(tenant_id, UserKey::Email(&email), &password)
                .await
                .map_err(|e| cli_error(e, &email))?;
            writeln!(out, "password of {email} set; {} session(s) revoked", revoked.len())?;
            Ok(())
        }
        UserCommand::MfaReset { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            let revoked =
                accounts.reset_mfa(tenant_id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))?;
            writeln!(out, "second factor of {email} removed; {} session(s) revoked", revoked.len())?;
            Ok(())
        }
        UserCommand::SetEmail { tenant, email, new_email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            accounts.set_email(tenant_id, UserKey::Email(&email), &new_email).await.map_err(|e| match e {
                AuthError::EmailTaken => anyhow::anyhow!("new_email: {new_email:?} is another user's in this tenant"),
                other => cli_error(other, &email),
            })?;
            writeln!(out, "{email} is now {}", crate::auth::service::normalize_email(&new_email))?;
            Ok(())
        }
        UserCommand::VerifyEmail { tenant, email } => {
            let tenant_id = find_tenant(store, &tenant).await?;
            accounts.mark_email_verified(tenant_id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))?;
            writeln!(out, "email of {email} verified")?;
            Ok(())
        }
        UserCommand::ResetToken { tenant: slug, email } => {
            let tenant = tenant(store, &slug).await?;
            if tenant.disabled {
                bail!("tenant {slug:?} is disabled; a link would not work (`gateway tenant enable {slug}` first)");
            }
            let link =
                accounts.reset_link(tenant.id, UserKey::Email(&email)).await.map_err(|e| cli_error(e, &email))?;
            // Standard output holds the token alone, for scripts.
            writeln!(out, "{}", link.token)?;
            eprintln!(
                "expires {}; redeem with POST /auth/password/reset {{\"token\", \"new_password\"}}; \
                 earlier links of {email} no longer work",
                rfc3339(link.expires_at)
            );
            Ok(())
        }
    }
}

/// `EMAIL: roles=a,b scopes=c`, as `user list` shows them.
fn access(user: &User) -> String {
    format!("{}: roles={} scopes={}", user.email, user.roles.join(","), user.scopes.join(","))
}

fn cli_error(e: AuthError, email: &str) -> anyhow::Error {
    match e {
        AuthError::EmailTaken => anyhow::anyhow!("email: {email:?} already exists in this tenant"),
        AuthError::NotFound => anyhow::anyhow!("email: no user {email:?} in this tenant"),
        AuthError::WeakPassword(m) => anyhow::anyhow!("password: {m}"),
        AuthError::InvalidRequest(m) => anyhow::anyhow!("{m}"),
        other => anyhow::Error::new(other),
    }
}

fn read_stdin_password(input: &mut dyn BufRead) -> anyhow::Result<SecretString> {
    let mut line = String::new();
    input.read_line(&mut line).context("reading the password from standard input")?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        bail!("password: standard input was empty");
    }
    Ok(SecretString::from(password))
}

fn prompt_password() -> anyhow::Result<SecretString> {
    let first = rpassword::prompt_password("Password: ").context("reading the password")?;
    let second = rpassword::prompt_password("Repeat password: ").context("reading the password")?;
    if first != second {
        bail!("password: the two entries differ");
    }
    Ok(SecretString::from(first))
}

/// How many stored TOTP secrets each key of `keys` holds (in its order),
/// and how many name a key it does not hold.
async fn secrets_key_counts(store: &Store, keys: &SealingKeys) -> anyhow::Result<(Vec<i64>, i64)> {
    let mut counts = Vec::new();
    for (_, prefix) in keys.prefixes() {
        counts.push(store.count_totp_with(&prefix).await?);
    }
    let sealed = store.count_totp_with("v1:").await? + store.count_totp_with("v2:").await?;
    let unkeyed = sealed - counts.iter().sum::<i64>();
    Ok((counts, unkeyed))
}

/// The secrets keys of `dir`, which must hold one: sealed secrets open only
/// with the key that sealed them, and a new one would open nothing.
fn existing_secrets_keys(dir: &std::path::Path) -> anyhow::Result<SealingKeys> {
    let Some(keys) = SealingKeys::load(dir)? else {
        bail!(
            "auth.keys_dir: {} holds no secrets key; sealed secrets cannot be opened without the file they were \
             sealed with (is auth.keys_dir the directory the gateways use?)",
            dir.display()
        );
    };
    Ok(keys)
}

async fn keys_command(config: &Config, cmd: KeysCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    let dir = &config.auth.keys_dir;
    match cmd {
        KeysCommand::Generate => {
            // The sealing key first: a bad file fails the command before a
            // signing key is made.
            let (_, made) = SealingKeys::load_or_generate(dir)?;
            let kid = keys::generate(dir)?;
            let store = open(config).await?;
            store
                .record_audit(NewAuditEvent {
                    event: "key_generated",
                    detail: Some(serde_json::json!({ "kid": kid, "by": "cli" })),
                    ..Default::default()
                })
                .await?;
            if made {
                let detail = serde_json::json!({ "key": crate::auth::seal::KEY_FILE, "by": "cli" });
                store
                    .record_audit(NewAuditEvent { event: "key_generated", detail: Some(detail), ..Default::default() })
                    .await?;
            }
            store.close().await;
            writeln!(out, "{kid}")?;
            if made {
                eprintln!(
                    "also made {}: it seals the TOTP secrets; every replica needs the same file",
                    crate::auth::seal::KEY_FILE
                );
            }
            Ok(())
        }
        KeysCommand::UnsealTotp => {
            let key = existing_secrets_keys(dir)?;
            let store = open(config).await?;
            let result = crate::auth::seal::rewrite_stored(&store, &key, false).await;
            store.close().await;
            let n = result?;
            writeln!(out, "{n} TOTP secret(s) written back unsealed")?;
            if config.auth.seal_totp_secrets {
                eprintln!(
                    "note: auth.seal_totp_secrets is on in this file: a gateway started with it seals them again"
                );
            }
            Ok(())
        }
        KeysCommand::List => {
            let ring = KeyRing::load(dir)?;
            let signer = ring.signer().0.to_owned();
            for k in ring.public_keys() {
                let role = if k.kid == signer { "signing" } else { "verify-only" };
                writeln!(out, "{}  {:<12} x={}", k.kid, role, k.x)?;
            }
            let Some(sealer) = SealingKeys::load(dir)? else {
                writeln!(out, "no secrets key (the first start or `gateway keys generate` makes secrets.key)")?;
                return Ok(());
            };
            let store = open(config).await.context("counting what each secrets key holds")?;
            // Setups too old to confirm hold nothing worth a key.
            store.clear_stale_totp_setups(crate::db::unix_now() - crate::auth::service::MFA_SETUP_TTL).await?;
            let counted = secrets_key_counts(&store, &sealer).await;
            let mut waiting = Vec::new();
            for (_, prefix) in sealer.prefixes() {
                waiting.push(store.count_deliveries_with(&prefix).await);
            }
            store.close().await;
            let (counts, unkeyed) = counted.context("counting what each secrets key holds")?;
            let keys = sealer.prefixes().into_iter().zip(counts).zip(waiting);
            for (i, (((file, _), held), waiting)) in keys.enumerate() {
                let role = if i == 0 { "sealing" } else { "open-only" };
                let waiting = waiting.context("counting the deliveries each secrets key seals")?;
                writeln!(out, "{file}  {role:<12} holds {held} TOTP secret(s), {waiting} waiting mailer deliveries")?;
            }
            if unkeyed > 0 {
                writeln!(
                    out,
                    "{unkeyed} TOTP secret(s) name a secrets key this directory does not hold: they do not open"
                )?;
            }
            Ok(())
        }
        KeysCommand::RotateSecrets => {
            let file = SealingKeys::rotate(dir)?;
            let sealer = existing_secrets_keys(dir)?;
            let store = open(config).await.with_context(|| {
                format!("made {file}, but could not reach the database to reseal (a gateway's next start reseals)")
            })?;
            // Setups too old to confirm are cleared, not resealed.
            let cleared = store.clear_stale_totp_setups(crate::db::unix_now() - crate::auth::service::MFA_SETUP_TTL);
            cleared.await?;
            let resealed = crate::auth::seal::rewrite_stored(&store, &sealer, true).await;
            let detail = serde_json::json!({
                "key": file,
                "by": "cli",
                "resealed": resealed.as_ref().ok(),
            });
            let audited = store.record_audit(NewAuditEvent {
                event: "key_generated",
                detail: Some(detail),
                ..Default::default()
            });
            let audited = audited.await;
            store.close().await;
            let resealed = resealed.with_context(|| format!("made {file}, but resealing failed"))?;
            audited?;
            writeln!(out, "{file}")?;
            eprintln!(
                "{resealed} TOTP secret(s) resealed with {file}; running gateways take it up when they meet a secret \
                 it sealed, or on SIGHUP. Remove an older secrets key once `gateway keys list` shows it holds nothing \
                 (a gateway started before this may still seal with it until then; its next start reseals)"
            );
            Ok(())
        }
    }
}

async fn mailer_command(store: &Store, cmd: MailerCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        MailerCommand::List => {
            for d in store.due_deliveries(i64::MAX, 10_000).await? {
                writeln!(
                    out,
                    "msg_{}  {}  attempts={} next={} expires={}",
                    d.id.simple(),
                    d.kind,
                    d.attempts,
                    rfc3339(d.next_attempt_at),
                    rfc3339(d.expires_at),
                )?;
            }
        }
        MailerCommand::Retry => {
            let n = store.hurry_deliveries(crate::db::unix_now()).await?;
            writeln!(out, "{n} deliveries due now")?;
        }
    }
    Ok(())
}
