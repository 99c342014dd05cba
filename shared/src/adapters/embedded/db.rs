//! The one SQLite file that holds all state of the local runner: the key-value table and every
//! queue (DESIGN §4). [`EmbeddedDb`] opens it and hands out the [`EmbeddedKv`] and the
//! [`EmbeddedQueue`]s, which share its connection.
//!
//! Durability: the file is in WAL mode with `synchronous=NORMAL`. Every call commits its own
//! transaction before it returns, and a commit in WAL mode is a write into the WAL file, which
//! the operating system keeps even if our process is killed (`kill -9`, panic, OOM). What
//! `NORMAL` gives up (compared to `FULL`) is only the fsync on each commit: after a power loss or
//! an OS crash the last few commits may be rolled back, but the file is never corrupted. A killed
//! process losing nothing is our requirement, so `NORMAL` meets it and keeps commits cheap.
use rusqlite::OpenFlags;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

use super::kv::EmbeddedKv;
use super::queue::{EmbeddedQueue, QueueConfig};
use crate::ports::clock::Clock;
use crate::ports::kv::KvError;

/// How long a statement waits for a lock held by another connection to the same file (another
/// process, e.g. an operator's CLI) before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bump when the schema changes (kept in `PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

/// The schema, created idempotently at open.
///
/// Queue rows: `visible_at IS NULL` means "visible since it was sent and never touched", which is
/// the state of almost every row of a busy queue. Rows that were received or released carry a
/// `visible_at`. Two partial indexes split the rows along that line, so that:
/// - the oldest fresh rows come straight off `queue_fresh` in id order (no filtering, no sort),
///   with their group, so that rows of blocked FIFO groups are skipped without reading the table;
/// - the touched rows (in flight, delayed, or back from an expired visibility timeout), which are
///   few, are found through `queue_touched` by the time they become visible;
/// - the FIFO question "has this group an invisible message?" is one probe of
///   `queue_touched_group`, however many groups are blocked.
///
/// `id` is `AUTOINCREMENT` so that ids are never reused: a receipt (id and receive count) of a
/// deleted message can never match a later message.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS kv (
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    rev INTEGER NOT NULL,
    body TEXT NOT NULL,
    expires_at INTEGER,
    PRIMARY KEY (pk, sk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS queue_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    grp TEXT,
    body TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    visible_at INTEGER,
    receive_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queue_fresh ON queue_messages (queue, id, grp, visible_at)
    WHERE visible_at IS NULL;
CREATE INDEX IF NOT EXISTS queue_touched ON queue_messages (queue, visible_at)
    WHERE visible_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS queue_touched_group ON queue_messages (queue, grp, visible_at)
    WHERE visible_at IS NOT NULL;

CREATE TABLE IF NOT EXISTS queue_dedup (
    queue TEXT NOT NULL,
    dedup_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (queue, dedup_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS queue_dedup_expiry ON queue_dedup (queue, expires_at);
";

/// The state file of the local runner. Cheap to clone: clones share the connection.
///
/// The connection sits behind a `std::sync::Mutex` and the async methods of the KV table and the
/// queues call SQLite while holding it, i.e. they block their executor thread. That is acceptable
/// here: the file is local, every call is one short transaction (well under a few milliseconds,
/// see the measurements in `queue.rs`), and the lock is never held across an `.await`. A
/// `spawn_blocking` hop per call would cost more than the calls themselves.
#[derive(Clone)]
pub struct EmbeddedDb {
    conn: Arc<Mutex<Connection>>,
    /// A second connection for key-value reads of a file database: in WAL mode readers never
    /// wait for the writer, so steps reading links do not queue behind steps writing them.
    reader: Option<Arc<Mutex<Connection>>>,
    clock: Arc<dyn Clock>,
    location: Arc<str>,
}

impl std::fmt::Debug for EmbeddedDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedDb").field("location", &self.location).finish_non_exhaustive()
    }
}

impl EmbeddedDb {
    /// Opens (or creates) the state file at `path` and creates the schema if missing. The parent
    /// folder must exist.
    pub fn open(path: &Path, clock: Arc<dyn Clock>) -> Result<Self, KvError> {
        let location = path.display().to_string();
        let conn = Connection::open(path).map_err(|e| open_error(&location, e))?;
        let mut db = Self::init(conn, clock, location)?;
        let reader =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .and_then(|r| {
                    r.busy_timeout(BUSY_TIMEOUT)?;
                    r.pragma_update(None, "cache_size", -32_768)?;
                    r.set_prepared_statement_cache_capacity(64);
                    Ok(r)
                })
                .map_err(|e| open_error(&db.location, e))?;
        db.reader = Some(Arc::new(Mutex::new(reader)));
        Ok(db)
    }

    /// A private database in memory: for tests.
    pub fn open_in_memory(clock: Arc<dyn Clock>) -> Result<Self, KvError> {
        let location = ":memory:".to_string();
        let conn = Connection::open_in_memory().map_err(|e| open_error(&location, e))?;
        Self::init(conn, clock, location)
    }

    fn init(conn: Connection, clock: Arc<dyn Clock>, location: String) -> Result<Self, KvError> {
        let setup = || -> rusqlite::Result<()> {
            conn.busy_timeout(BUSY_TIMEOUT)?;
            // In memory the answer is "memory": there is no file to make durable.
            let _mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
            // See the module comment: durable against a killed process.
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "temp_store", "MEMORY")?;
            // 32 MiB of page cache: the hot queue heads and indexes stay in memory.
            conn.pragma_update(None, "cache_size", -32_768)?;
            conn.set_prepared_statement_cache_capacity(64);
            conn.execute_batch(SCHEMA)?;
            let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
            if version < SCHEMA_VERSION {
                conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            }
            Ok(())
        };
        setup().map_err(|e| open_error(&location, e))?;
        Ok(EmbeddedDb { conn: Arc::new(Mutex::new(conn)), reader: None, clock, location: location.into() })
    }

    /// The key-value table.
    pub fn kv(&self) -> EmbeddedKv {
        EmbeddedKv::new(self.clone())
    }

    /// A queue in this file. Queues are rows tagged with their name, so this creates nothing:
    /// opening the same name again (even after a restart) gives the same messages.
    pub fn queue(&self, config: QueueConfig) -> EmbeddedQueue {
        EmbeddedQueue::new(self.clone(), config)
    }

    /// Where the file is (`:memory:` for a database in memory).
    pub fn location(&self) -> &str {
        &self.location
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// The connection. A panic while it was held poisons the mutex; the connection itself is
    /// still sound (an open transaction is rolled back when dropped during unwinding), so the
    /// poison is ignored rather than turned into a panic of every later call.
    /// Whether `other` is a handle on this same database.
    pub(crate) fn same_database(&self, other: &EmbeddedDb) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The connection for reads: the reader of a file database, else the one connection.
    pub(crate) fn read_lock(&self) -> MutexGuard<'_, Connection> {
        self.reader.as_ref().unwrap_or(&self.conn).lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn open_error(location: &str, e: rusqlite::Error) -> KvError {
    KvError::Unavailable(format!("cannot open state database {location}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::clock::ManualClock;

    #[test]
    fn open_is_idempotent_and_uses_wal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let clock = Arc::new(ManualClock::new(0));
        let db = EmbeddedDb::open(&path, clock.clone()).expect("first open");
        let mode: String = db.lock().pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("mode");
        assert_eq!(mode, "wal");
        let sync: i64 = db.lock().pragma_query_value(None, "synchronous", |r| r.get(0)).expect("sync");
        assert_eq!(sync, 1, "synchronous=NORMAL");
        drop(db);
        let again = EmbeddedDb::open(&path, clock).expect("second open");
        let version: i64 = again.lock().pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn open_in_missing_folder_is_unavailable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("no").join("such").join("state.db");
        let err = EmbeddedDb::open(&path, Arc::new(ManualClock::new(0))).expect_err("must fail");
        assert!(matches!(err, KvError::Unavailable(ref m) if m.contains("state.db")), "{err}");
    }
}
