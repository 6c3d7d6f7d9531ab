//! The store: one pool, one function per query.
//!
//! Queries are grouped by table under `db/`. Every query that reads or writes
//! tenant data takes the tenant id and filters by it, so a bug in a handler
//! cannot reach across tenants. Correctness under concurrency (refresh
//! rotation, lockout counters) is enforced by single conditional statements in
//! the database, never by an in-process lock alone, so it holds for the CLI
//! and for several gateway processes sharing one database.
//!
//! Timestamps are unix seconds; ids are UUIDs (16-byte BLOBs in SQLite,
//! native `uuid` in PostgreSQL).

pub mod audit;
pub mod email_links;
pub mod login_attempts;
pub mod outbox;
pub mod retention;
pub mod sessions;
pub mod tenants;
pub mod users;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::config::{DatabaseConfig, DatabaseUrl};

/// What can go wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint refused the write (duplicate slug or email).
    #[error("already exists")]
    Conflict,
    /// The database could not be reached or timed out.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Other(#[source] sqlx::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::PoolTimedOut
            | sqlx::Error::Io(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            // The database is there but cannot serve now; the client may retry:
            // PostgreSQL connection exceptions (08), shutdown (57P), too many
            // connections (53300), statement timeout (57014), serialization
            // failure and deadlock (40001, 40P01), read-only after a failover
            // (25006); SQLite busy and locked (5, 6, and their extended codes).
            sqlx::Error::Database(db) if db.code().is_some_and(|c| is_transient(&c)) => StoreError::Unavailable(e),
            _ => StoreError::Other(e),
        }
    }
}

fn is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("57P")
        || matches!(code, "53300" | "57014" | "40001" | "40P01" | "25006")
        // SQLite codes are short numbers; PostgreSQL SQLSTATEs are five characters.
        || (code.len() < 5 && code.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)))
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The connection pool of one backend.
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same code against whichever backend the store has. The body is
/// type-checked once per backend, so one SQL text serves both: queries use
/// `$N` placeholders (which sqlx's SQLite driver maps by number) and only
/// syntax both databases share (`RETURNING`, `ON CONFLICT … DO UPDATE`).
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match $store.pool() {
            $crate::db::Pool::Sqlite($pool) => $body,
            $crate::db::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// Opens the configured database (creating a SQLite file if needed).
    /// PostgreSQL connections are opened lazily, so with `auto_migrate =
    /// false` a gateway starts while its database is away (fail closed: its
    /// revocation state is stale until the database answers).
    pub async fn connect(config: &DatabaseConfig) -> StoreResult<Store> {
        let pool = match &config.url {
            DatabaseUrl::Sqlite(path) => {
                if let Some(dir) = path.parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
                    }
                }
                // WAL lets readers proceed while one writer commits; busy_timeout makes
                // concurrent writers (the CLI, parallel logins) wait instead of failing.
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(10));
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(config.max_connections)
                        .acquire_timeout(config.acquire_timeout)
                        .connect_with(options)
                        .await?,
                )
            }
            DatabaseUrl::Postgres(url) => {
                let timeout_ms = config.statement_timeout.as_millis().to_string();
                let options: PgConnectOptions = url.parse()?;
                let options = options.options([("statement_timeout", timeout_ms.as_str())]);
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(config.max_connections)
                        .acquire_timeout(config.acquire_timeout)
                        .connect_lazy_with(options.application_name("gateway")),
                )
            }
        };
        Ok(Store { pool })
    }

    /// Applies pending migrations; a no-op when up to date. On PostgreSQL,
    /// sqlx holds an advisory lock meanwhile, so replicas starting together
    /// take turns.
    ///
    /// Migrations a newer release applied are left alone rather than
    /// refused: every migration only adds (tables, columns with defaults,
    /// indexes), so an older release still runs on the newer schema. That
    /// is what a rolling upgrade needs (an old replica restarting after a
    /// new one migrated), and what a rollback needs.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        match &self.pool {
            Pool::Sqlite(p) => {
                let mut migrator = sqlx::migrate!("migrations/sqlite");
                migrator.set_ignore_missing(true);
                migrator.run(p).await
            }
            Pool::Postgres(p) => {
                let mut migrator = sqlx::migrate!("migrations/postgres");
                migrator.set_ignore_missing(true);
                migrator.run(p).await
            }
        }
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        on_pool!(self, |p| sqlx::query("SELECT 1").execute(p).await.is_ok())
    }

    pub async fn close(&self) {
        on_pool!(self, |p| p.close().await);
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// Seconds since the unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Seconds in a duration, saturating.
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Space-separated list column → values.
pub(crate) fn split_list(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn transient_codes() {
        for code in ["08006", "57P01", "53300", "57014", "40001", "40P01", "25006", "5", "6", "517", "262"] {
            assert!(super::is_transient(code), "{code}");
        }
        for code in ["23505", "22021", "42P01", "1", "19", "2067"] {
            assert!(!super::is_transient(code), "{code}");
        }
    }
}
