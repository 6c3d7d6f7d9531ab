//! The store: one pool, one function per query.
//!
//! Queries are grouped by table under `db/`. Every query that reads or writes
//! tenant data takes the tenant id and filters by it, so a bug in a handler
//! cannot reach across tenants. Correctness under concurrency (refresh
//! rotation, lockout counters) is enforced by single conditional statements in
//! the database, never by an in-process lock alone, so it holds for the CLI
//! and for several gateway processes sharing one database.
//!
//! Timestamps are unix seconds; ids are UUIDs stored as text.

pub mod audit;
pub mod login_attempts;
pub mod sessions;
pub mod tenants;
pub mod users;

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use uuid::Uuid;

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
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict,
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => StoreError::Unavailable(e),
            _ => StoreError::Other(e),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the configured database.
    pub async fn connect(config: &DatabaseConfig) -> StoreResult<Store> {
        let DatabaseUrl::Sqlite(path) = &config.url;
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
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Store { pool })
    }

    /// Applies pending migrations; a no-op when up to date.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("migrations/sqlite").run(&self.pool).await
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
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

pub(crate) fn parse_uuid(text: &str) -> StoreResult<Uuid> {
    Uuid::from_str(text).map_err(|_| StoreError::Corrupt(format!("bad uuid {text:?}")))
}

/// Space-separated list column → values.
pub(crate) fn split_list(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}
