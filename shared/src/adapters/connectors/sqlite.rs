//! The `sqlite` connector: a local app that is a SQLite database file with ordinary tables.
//!
//! dualsync reads and writes the app's tables by integration key, and learns of the app's
//! changes through triggers that [`SqliteApp::install_capture`] puts on each captured table:
//!
//! - `_dualsync_changes` is the change log: one row per inserted, updated or deleted record,
//!   holding the entity (table), the key (a JSON array of the key values), the operation, the
//!   transaction id, the company (if the entity has a company field) and the time.
//! - `_dualsync_tx` lets an app group several writes into ONE captured transaction: it inserts a
//!   row holding the txid at the start of its SQLite transaction and deletes it before commit
//!   (see [`transaction`]). SQLite serializes writers, so only that transaction sees the row.
//!   Changes made without it get a txid of their own, `seq-<seq>`.
//! - every captured table gets a version column, `_ds_version`: the seq of the record's latest
//!   change. So a change-log row's seq is the version the record had right after that change,
//!   which is what lets dualsync recognise the echo of its own write without reading the record.
//!
//! Values: reading maps INTEGER to a JSON integer, REAL to a JSON float (a non-finite REAL to
//! null), TEXT to a string, NULL to null and BLOB to an array of byte values (0..=255).
//! Writing maps null to NULL, a bool to 0/1, an integer to INTEGER, any other number to REAL, a
//! string to TEXT, an array of byte values to a BLOB when the column is declared BLOB, and any
//! other array or object to its JSON text. A write that SQLite would store changed (column
//! affinity turns TEXT `'007'` into INTEGER 7 and `'1.50'` into REAL 1.5, a REAL in a TEXT column
//! keeps 15 digits) is read back, undone and refused for that op, naming the field and never the
//! value: no silent coercion (DESIGN §3). `'7'` stored as 7 is the same value (see
//! [`crate::domain::canon::same_value`]).
//!
//! Keys are [`Key`]s: the canonical text of each key value (see [`key_text`]). They are bound as
//! TEXT; SQLite's column affinity converts them for INTEGER/REAL/NUMERIC key columns. A key
//! column with no declared type (BLOB affinity) that holds numbers cannot be looked up by text:
//! declare key columns with a type. BLOB and NULL key values are not keys: such rows are not
//! logged and are skipped by `list`.
//!
//! Limits: deferred foreign keys (`DEFERRABLE INITIALLY DEFERRED`) are checked at commit, so a
//! violation there fails the whole `write` call rather than the one op. The update trigger
//! compares the columns the table had when capture was installed; run `install_capture` again
//! after adding columns (it recreates triggers whose text changed).
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::types::{ToSql, ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::OpenFlags;
use rusqlite::{ffi, params_from_iter, Connection, ErrorCode, OptionalExtension, Transaction};
use rusqlite::{Row, TransactionBehavior};
use serde_json::Value;

use crate::domain::canon;
use crate::domain::change::{Key, Operation};
use crate::ports::connector::{
    ChangeFeed, Connector, ConnectorError, EntitySpec, Finding, ListPage, Precondition, RawChange, Record,
    WriteFailure, WriteOp,
};

/// The change-log table.
pub const CHANGES_TABLE: &str = "_dualsync_changes";
/// The table an app's transaction puts its txid in (see [`transaction`]).
pub const TX_TABLE: &str = "_dualsync_tx";
pub use crate::domain::change::OWN_WRITE_TXID_PREFIX;
/// The version column added to each captured table.
pub const VERSION_COLUMN: &str = "_ds_version";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const STATEMENT_CACHE: usize = 256;

/// What to capture of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// The table (dualsync's entity name).
    pub entity: String,
    /// The integration key fields, in key order.
    pub key_fields: Vec<String>,
    /// The field holding the record's company, logged with each change, if the entity has one.
    pub company_field: Option<String>,
}

/// A local app: one SQLite database file.
pub struct SqliteApp {
    app: String,
    path: PathBuf,
    // A std Mutex, held only for the duration of one call's SQLite work. Every call is a short
    // run of local statements on a WAL database (a 500-record batch takes a few ms), so blocking
    // the async worker for that long is cheaper than a spawn_blocking hop per call, and the
    // guard is never held across an `.await`.
    conn: Arc<Mutex<Connection>>,
    /// A read-only connection for reads, lists and the change log: in WAL mode they never wait
    /// for the writer, so delivery's reads and local ingress run beside delivery's writes.
    reader: Mutex<Connection>,
    /// Column information per table (lower-cased name), loaded on first use; refreshed when a
    /// field is not found and after `install_capture`.
    tables: Mutex<HashMap<String, Arc<TableInfo>>>,
}

impl std::fmt::Debug for SqliteApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteApp").field("app", &self.app).field("path", &self.path).finish()
    }
}

#[derive(Debug)]
struct Column {
    name: String,
    /// Declared type, upper-cased.
    decl_type: String,
    /// Position in the primary key (1-based), 0 if not part of it.
    pk: i64,
}

#[derive(Debug)]
struct TableInfo {
    name: String,
    columns: Vec<Column>,
    /// Column index by exact name and by lower-cased name (SQLite names are case-insensitive).
    by_name: HashMap<String, usize>,
    without_rowid: bool,
    has_version: bool,
}

impl TableInfo {
    fn column(&self, name: &str) -> Option<&Column> {
        let i = match self.by_name.get(name) {
            Some(i) => *i,
            None => *self.by_name.get(&name.to_ascii_lowercase())?,
        };
        self.columns.get(i)
    }

    fn is_blob_column(&self, name: &str) -> bool {
        self.column(name).is_some_and(|c| c.decl_type.contains("BLOB"))
    }

    /// Checks that every field is a column (and that capture is installed); the message names
    /// the entity and the field.
    fn check<'a>(&self, fields: impl Iterator<Item = &'a str>) -> Result<(), String> {
        if !self.has_version {
            return Err(format!(
                "entity `{}`: change capture is not installed (no `{VERSION_COLUMN}` column); \
                 run install_capture first",
                self.name
            ));
        }
        self.has_fields(fields)
    }

    /// Whether every field is a column, whether capture is installed or not.
    fn has_fields<'a>(&self, mut fields: impl Iterator<Item = &'a str>) -> Result<(), String> {
        match fields.find(|f| self.column(f).is_none()) {
            Some(f) => {
                Err(format!("entity `{}` has no field `{f}` (no such column in table `{}`)", self.name, self.name))
            }
            None => Ok(()),
        }
    }
}

/// Quotes an identifier: `"..."` with `"` doubled.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal: `'...'` with `'` doubled.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `"k1" = ?n AND "k2" = ?n+1 ...`
fn key_match(key_fields: &[String], first_param: usize) -> String {
    key_fields
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = ?{}", ident(k), first_param + i))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Canonical text of a key value: TEXT as-is, INTEGER in decimal, REAL in Rust's shortest
/// round-trip form (an integral REAL such as 3.0 as `3`). NULL, BLOB and an infinite REAL are
/// not key values.
pub fn key_text(v: &ValueRef<'_>) -> Option<String> {
    match *v {
        ValueRef::Null | ValueRef::Blob(_) => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) if !f.is_finite() => None,
        ValueRef::Real(f) => Some(real_text(f)),
        ValueRef::Text(t) => Some(String::from_utf8_lossy(t).into_owned()),
    }
}

fn real_text(f: f64) -> String {
    // 2^53: below it every integral f64 is exactly an i64.
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
        (f as i64).to_string()
    } else {
        f.to_string()
    }
}

/// Canonical text of a JSON value as a key value (the JSON form of [`key_text`]); a bool is
/// stored as 0/1, so its key text is `0`/`1`.
fn json_key_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Some(i.to_string()),
            None => match n.as_u64() {
                Some(u) => Some(u.to_string()),
                None => n.as_f64().map(real_text),
            },
        },
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.to_string()),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// A SQLite value as JSON (see the module doc).
fn value_to_json(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Array(b.iter().map(|&x| Value::from(x)).collect()),
    }
}

/// A JSON value as a SQLite value (see the module doc).
fn json_to_sql(v: &Value, blob_column: bool) -> ToSqlOutput<'_> {
    match v {
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        Value::Bool(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ToSqlOutput::Owned(SqlValue::Integer(i)),
            None => ToSqlOutput::Owned(n.as_f64().map_or(SqlValue::Null, SqlValue::Real)),
        },
        Value::String(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Value::Array(items) if blob_column => {
            let bytes: Option<Vec<u8>> = items.iter().map(|x| x.as_u64().and_then(|b| u8::try_from(b).ok())).collect();
            match bytes {
                Some(bytes) => ToSqlOutput::Owned(SqlValue::Blob(bytes)),
                None => ToSqlOutput::Owned(SqlValue::Text(v.to_string())),
            }
        }
        Value::Array(_) | Value::Object(_) => ToSqlOutput::Owned(SqlValue::Text(v.to_string())),
    }
}

/// A statement parameter, bound without copying strings.
enum Bind<'a> {
    Json { value: &'a Value, blob: bool },
    Text(&'a str),
    Int(i64),
}

impl ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Bind::Json { value, blob } => json_to_sql(value, *blob),
            Bind::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Bind::Int(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
        })
    }
}

/// Errors worth retrying: contention, I/O, resources.
fn is_transient(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _) if matches!(
            f.code,
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::DiskFull
                | ErrorCode::OutOfMemory
                | ErrorCode::OperationInterrupted
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::CannotOpen
        )
    )
}

/// The text after `failed: ` in a constraint message (`UNIQUE constraint failed: t.a, t.b`):
/// column names or the CHECK constraint's name/expression, from the schema, never a value.
fn failed_on(msg: Option<&str>) -> Option<&str> {
    msg.and_then(|m| m.split_once("failed: ")).map(|(_, on)| on)
}

/// A description of an error that never holds record values: constraint messages are reduced to
/// their kind and the schema names SQLite gives; a trigger's RAISE text (which an app could build
/// from values) is left out.
fn describe(e: &rusqlite::Error) -> String {
    let rusqlite::Error::SqliteFailure(f, msg) = e else {
        return e.to_string();
    };
    let msg = msg.as_deref();
    let with_on = |kind: &str| match failed_on(msg) {
        Some(on) => format!("{kind} constraint failed on {on}"),
        None => format!("{kind} constraint failed"),
    };
    match f.code {
        ErrorCode::ConstraintViolation => match f.extended_code {
            ffi::SQLITE_CONSTRAINT_NOTNULL => with_on("NOT NULL"),
            ffi::SQLITE_CONSTRAINT_UNIQUE => with_on("UNIQUE"),
            ffi::SQLITE_CONSTRAINT_PRIMARYKEY => with_on("PRIMARY KEY"),
            ffi::SQLITE_CONSTRAINT_CHECK => with_on("CHECK"),
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => "FOREIGN KEY constraint failed".to_string(),
            // "cannot store TEXT value in INTEGER column t.c": types and names only.
            ffi::SQLITE_CONSTRAINT_DATATYPE => match msg {
                Some(m) => format!("datatype constraint failed: {m}"),
                None => "datatype constraint failed".to_string(),
            },
            ffi::SQLITE_CONSTRAINT_TRIGGER => "refused by a trigger (RAISE)".to_string(),
            _ => "constraint failed".to_string(),
        },
        ErrorCode::TypeMismatch => "datatype mismatch".to_string(),
        ErrorCode::TooBig => "value too big".to_string(),
        _ => match msg {
            Some(m) => format!("{m} ({:?})", f.code),
            None => format!("{:?}", f.code),
        },
    }
}

/// Why one write op failed, for the op's result.
fn op_failure(entity: &str, key: &Key, e: &rusqlite::Error) -> WriteFailure {
    let message = format!("{entity} {key}: {}", describe(e));
    if is_transient(e) {
        WriteFailure::Transient { message, retry_after: None }
    } else {
        WriteFailure::Rejected(message)
    }
}

/// Marks the open SQLite transaction as one of dualsync's write batches (an id with
/// [`OWN_WRITE_TXID_PREFIX`]), so that its change-log rows are known as dualsync's own. Without
/// capture installed there is no marker table: `false`, nothing to unmark.
fn mark_own_write(tx: &rusqlite::Transaction<'_>) -> bool {
    let batch_txid = format!("{OWN_WRITE_TXID_PREFIX}{}", uuid::Uuid::new_v4().simple());
    tx.prepare_cached("INSERT INTO \"_dualsync_tx\" (txid) VALUES (?1)")
        .and_then(|mut st| st.execute([&batch_txid]))
        .is_ok()
}

fn unmark_own_write(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM \"_dualsync_tx\"").and_then(|mut st| st.execute([])).map(|_| ())
}

/// Runs `f` as ONE captured transaction with id `txid`: puts `txid` in `_dualsync_tx` first and
/// removes it before commit, so the capture triggers log every change `f` makes under `txid`.
/// Uses BEGIN IMMEDIATE (the write lock up front, so no lock-upgrade deadlock). On error the
/// transaction rolls back and nothing is logged. Needs `_dualsync_tx`, which
/// [`SqliteApp::install_capture`] creates.
pub fn transaction<T>(
    conn: &mut Connection,
    txid: &str,
    f: impl FnOnce(&Transaction) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.prepare_cached("INSERT INTO \"_dualsync_tx\" (txid) VALUES (?1)")?.execute([txid])?;
    let out = f(&tx)?;
    tx.prepare_cached("DELETE FROM \"_dualsync_tx\"")?.execute([])?;
    tx.commit()?;
    Ok(out)
}

/// Loads a table's column information; `None` if there is no such table.
fn load_table(conn: &Connection, table: &str) -> rusqlite::Result<Option<TableInfo>> {
    let kind: Option<(String, String, bool)> = conn
        .prepare_cached("SELECT name, type, wr FROM pragma_table_list(?1) WHERE schema = 'main' LIMIT 1")?
        .query_row([table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((name, kind, without_rowid)) = kind else {
        return Ok(None);
    };
    if kind != "table" {
        return Ok(None);
    }
    let mut stmt = conn.prepare_cached("SELECT name, type, pk FROM pragma_table_info(?1)")?;
    let columns = stmt
        .query_map([&name], |r| {
            Ok(Column { name: r.get(0)?, decl_type: r.get::<_, String>(1)?.to_ascii_uppercase(), pk: r.get(2)? })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut by_name = HashMap::new();
    for (i, c) in columns.iter().enumerate() {
        by_name.entry(c.name.to_ascii_lowercase()).or_insert(i);
        by_name.insert(c.name.clone(), i);
    }
    let has_version = columns.iter().any(|c| c.name.eq_ignore_ascii_case(VERSION_COLUMN));
    Ok(Some(TableInfo { name, columns, by_name, without_rowid, has_version }))
}

/// Whether a PRIMARY KEY or UNIQUE index covers exactly the key fields.
fn key_is_unique(conn: &Connection, info: &TableInfo, key_fields: &[String]) -> rusqlite::Result<bool> {
    let mut wanted: Vec<String> = key_fields.iter().map(|k| k.to_ascii_lowercase()).collect();
    wanted.sort();
    let mut pk: Vec<String> = info.columns.iter().filter(|c| c.pk > 0).map(|c| c.name.to_ascii_lowercase()).collect();
    pk.sort();
    if pk == wanted {
        return Ok(true);
    }
    let indexes: Vec<String> = conn
        .prepare_cached("SELECT name FROM pragma_index_list(?1) WHERE \"unique\" = 1")?
        .query_map([&info.name], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for index in indexes {
        let mut cols: Vec<String> = conn
            .prepare_cached("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&index], |r| r.get::<_, Option<String>>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(|c| c.unwrap_or_default().to_ascii_lowercase())
            .collect();
        cols.sort();
        if cols == wanted {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The three capture triggers of a table: (name, definition after `CREATE TRIGGER `).
fn capture_triggers(spec: &CaptureSpec, info: &TableInfo) -> Vec<(String, String)> {
    let table = ident(&info.name);
    let entity = literal(&spec.entity);
    let version = ident(VERSION_COLUMN);
    // A key value is TEXT, INTEGER or a finite REAL (9e999 is SQLite's infinity); rows with a
    // NULL or BLOB key (or an infinite one) are not keyed records and are not logged.
    let keys_valid = |row: &str| {
        spec.key_fields
            .iter()
            .map(|k| {
                format!(
                    "(typeof({v}) IN ('integer', 'text') OR \
                     (typeof({v}) = 'real' AND abs({v}) < 9e999))",
                    v = format!("{row}.{}", ident(k))
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    };
    // json_array renders a REAL with 15 digits, which does not always round-trip; quote() does,
    // so a REAL goes in as the JSON number quote() writes, and `key_text` text comes back out.
    let key_json = |row: &str| {
        let values: Vec<String> = spec
            .key_fields
            .iter()
            .map(|k| {
                format!(
                    "CASE WHEN typeof({v}) = 'real' THEN json(quote({v})) ELSE {v} END",
                    v = format!("{row}.{}", ident(k))
                )
            })
            .collect();
        format!("json_array({})", values.join(", "))
    };
    let key_changed = spec
        .key_fields
        .iter()
        .map(|k| format!("NEW.{k} IS NOT OLD.{k}", k = ident(k)))
        .collect::<Vec<_>>()
        .join(" OR ");
    let company = |row: &str| match &spec.company_field {
        Some(c) => format!("{row}.{}", ident(c)),
        None => "NULL".to_string(),
    };
    // This row, for setting its version: by rowid, or by primary key without one.
    let this_row = if info.without_rowid {
        info.columns
            .iter()
            .filter(|c| c.pk > 0)
            .map(|c| format!("{c} = NEW.{c}", c = ident(&c.name)))
            .collect::<Vec<_>>()
            .join(" AND ")
    } else {
        "rowid = NEW.rowid".to_string()
    };
    let others_same = info
        .columns
        .iter()
        .filter(|c| !c.name.eq_ignore_ascii_case(VERSION_COLUMN))
        .map(|c| format!("NEW.{c} IS OLD.{c}", c = ident(&c.name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    // The next change-log seq, computed so the fallback txid can be derived from it in the same
    // INSERT. AUTOINCREMENT keeps the largest seq ever used in sqlite_sequence, so a seq is never
    // reused after the log is trimmed; but SQLite writes sqlite_sequence back only at the end of
    // the top-level statement, so within one statement (a multi-row INSERT, the two rows of a key
    // change) the log's own max(seq) is the current one. Both are O(log n) seeks.
    let next_seq = "(SELECT max(COALESCE((SELECT max(seq) FROM \"_dualsync_changes\"), 0), \
                    COALESCE((SELECT seq FROM sqlite_sequence \
                    WHERE name = '_dualsync_changes'), 0)) + 1 AS s)";
    let txid = "(SELECT txid FROM \"_dualsync_tx\" LIMIT 1)";
    let now_ms = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
    let log = "INSERT INTO \"_dualsync_changes\" (seq, entity, key, op, txid, company, at_ms)";
    let name = |suffix: &str| format!("_ds_{}_{suffix}", spec.entity);

    let insert = format!(
        "{trigger} AFTER INSERT ON {table} FOR EACH ROW \
         WHEN {new_valid} BEGIN \
         {log} SELECT s, {entity}, {new_key}, 'upsert', COALESCE({txid}, 'seq-' || s), \
         {new_company}, {now_ms} FROM {next_seq}; \
         UPDATE {table} SET {version} = last_insert_rowid() WHERE {this_row}; \
         END",
        trigger = ident(&name("ins")),
        new_valid = keys_valid("NEW"),
        new_key = key_json("NEW"),
        new_company = company("NEW"),
    );
    // Skipped when the version column is all that changed: that is the triggers' own version
    // update (which would otherwise fire this trigger from the insert trigger) or a direct one.
    // When the key changed, the old key is logged as deleted first, in the same txid.
    let update = format!(
        "{trigger} AFTER UPDATE ON {table} FOR EACH ROW \
         WHEN NEW.{version} IS OLD.{version} OR NOT ({others_same}) BEGIN \
         {log} SELECT s, {entity}, {old_key}, 'delete', COALESCE({txid}, 'seq-' || s), \
         {old_company}, {now_ms} FROM {next_seq} WHERE ({key_changed}) AND {old_valid}; \
         {log} SELECT s, {entity}, {new_key}, 'upsert', \
         COALESCE({txid}, 'seq-' || (s - (({key_changed}) AND {old_valid}))), \
         {new_company}, {now_ms} FROM {next_seq} WHERE {new_valid}; \
         UPDATE {table} SET {version} = last_insert_rowid() WHERE {this_row} AND {new_valid}; \
         END",
        trigger = ident(&name("upd")),
        old_valid = keys_valid("OLD"),
        new_valid = keys_valid("NEW"),
        old_key = key_json("OLD"),
        new_key = key_json("NEW"),
        old_company = company("OLD"),
        new_company = company("NEW"),
    );
    let delete = format!(
        "{trigger} AFTER DELETE ON {table} FOR EACH ROW \
         WHEN {old_valid} BEGIN \
         {log} SELECT s, {entity}, {old_key}, 'delete', COALESCE({txid}, 'seq-' || s), \
         {old_company}, {now_ms} FROM {next_seq}; \
         END",
        trigger = ident(&name("del")),
        old_valid = keys_valid("OLD"),
        old_key = key_json("OLD"),
        old_company = company("OLD"),
    );
    vec![(name("ins"), insert), (name("upd"), update), (name("del"), delete)]
}

/// The outcome of one op inside a write transaction.
enum OpOutcome {
    Done(Result<String, WriteFailure>),
    /// The op failed and SQLite rolled back the whole transaction (ON CONFLICT ROLLBACK,
    /// RAISE(ROLLBACK), I/O): the op's failure is final, the others must run again.
    RolledBack(WriteFailure),
}

impl SqliteApp {
    /// Opens (or creates) the app's database file: WAL, synchronous=NORMAL, a 5 s busy timeout
    /// and foreign keys enforced.
    pub fn open(app_name: &str, path: &Path) -> Result<Self, ConnectorError> {
        let fail = |e: rusqlite::Error| {
            let message = format!("cannot open {}: {}", path.display(), describe(&e));
            if is_transient(&e) {
                ConnectorError::Transient { app: app_name.to_string(), message, retry_after: None }
            } else {
                ConnectorError::Rejected { app: app_name.to_string(), message }
            }
        };
        let conn = Connection::open(path).map_err(fail)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(fail)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(app = app_name, mode, "sqlite app: WAL mode not available");
        }
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(fail)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(fail)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let reader =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(fail)?;
        reader.busy_timeout(BUSY_TIMEOUT).map_err(fail)?;
        reader.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        Ok(SqliteApp {
            app: app_name.to_string(),
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            reader: Mutex::new(reader),
            tables: Mutex::new(HashMap::new()),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The connection, for app code that shares it (lock briefly).
    pub fn connection(&self) -> &Arc<Mutex<Connection>> {
        &self.conn
    }

    /// Creates the change log, the txid table, the version columns and the capture triggers.
    /// Idempotent: existing pieces are kept, and a trigger is recreated only if its text
    /// changed (another key, company field or column set).
    pub fn install_capture(&self, specs: &[CaptureSpec]) -> Result<(), ConnectorError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| self.error("install capture", &e))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS \"_dualsync_changes\" (
                 seq INTEGER PRIMARY KEY AUTOINCREMENT,
                 entity TEXT NOT NULL,
                 key TEXT NOT NULL,
                 op TEXT NOT NULL,
                 txid TEXT NOT NULL,
                 company TEXT NULL,
                 at_ms INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS \"_dualsync_tx\" (txid TEXT NOT NULL);",
        )
        .map_err(|e| self.error("install capture", &e))?;
        for spec in specs {
            self.install_one(&tx, spec)?;
        }
        tx.commit().map_err(|e| self.error("install capture", &e))?;
        drop(conn);
        let mut tables = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        for spec in specs {
            tables.remove(&spec.entity.to_ascii_lowercase());
        }
        Ok(())
    }

    fn install_one(&self, conn: &Connection, spec: &CaptureSpec) -> Result<(), ConnectorError> {
        let entity = &spec.entity;
        let what = format!("install capture on `{entity}`");
        if spec.key_fields.is_empty() {
            return Err(self.rejected(format!("{what}: no key fields")));
        }
        if entity.starts_with("_dualsync_") {
            return Err(self.rejected(format!("{what}: `{entity}` is dualsync's own table")));
        }
        let load = |conn: &Connection| match load_table(conn, entity) {
            Ok(Some(info)) => Ok(info),
            Ok(None) => Err(self.rejected(format!("{what}: no such table `{entity}`"))),
            Err(e) => Err(self.error(&what, &e)),
        };
        let mut info = load(conn)?;
        let fields = spec.key_fields.iter().chain(spec.company_field.iter());
        if let Some(f) = fields.clone().find(|f| info.column(f).is_none()) {
            return Err(self.rejected(format!(
                "{what}: entity `{entity}` has no field `{f}` (no such column in table `{entity}`)"
            )));
        }
        if let Some(f) = fields.clone().find(|f| f.eq_ignore_ascii_case(VERSION_COLUMN)) {
            return Err(self.rejected(format!("{what}: field `{f}` is reserved for dualsync")));
        }
        if !info.has_version {
            let sql = format!(
                "ALTER TABLE {} ADD COLUMN {} INTEGER NOT NULL DEFAULT 0",
                ident(&info.name),
                ident(VERSION_COLUMN)
            );
            conn.execute_batch(&sql).map_err(|e| self.error(&what, &e))?;
            info = load(conn)?;
        }
        if !key_is_unique(conn, &info, &spec.key_fields).map_err(|e| self.error(&what, &e))? {
            tracing::warn!(
                app = %self.app, entity = %entity, key = ?spec.key_fields,
                "sqlite app: no PRIMARY KEY or UNIQUE index on the key fields; lookups by key \
                 scan the table and duplicate keys are possible"
            );
        }
        for (name, definition) in capture_triggers(spec, &info) {
            // sqlite_schema keeps the statement as `CREATE TRIGGER <definition>`.
            let sql = format!("CREATE TRIGGER {definition}");
            let existing: Option<String> = conn
                .prepare_cached("SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND name = ?1")
                .and_then(|mut s| s.query_row([&name], |r| r.get(0)).optional())
                .map_err(|e| self.error(&what, &e))?;
            if existing.as_deref() == Some(sql.as_str()) {
                continue;
            }
            if existing.is_some() {
                conn.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", ident(&name)))
                    .map_err(|e| self.error(&what, &e))?;
            }
            conn.execute_batch(&format!("CREATE TRIGGER IF NOT EXISTS {definition}"))
                .map_err(|e| self.error(&what, &e))?;
        }
        Ok(())
    }

    /// Deletes consumed change-log rows, `seq <= upto`; returns how many.
    pub fn trim_changes(&self, upto: u64) -> Result<usize, ConnectorError> {
        let conn = self.lock();
        let upto = i64::try_from(upto).unwrap_or(i64::MAX);
        conn.prepare_cached("DELETE FROM \"_dualsync_changes\" WHERE seq <= ?1")
            .and_then(|mut s| s.execute([upto]))
            .map_err(|e| self.error("trim changes", &e))
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves no open transaction (rusqlite rolls back on
        // drop), so the connection is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read_lock(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rejected(&self, message: String) -> ConnectorError {
        ConnectorError::Rejected { app: self.app.clone(), message }
    }

    fn error(&self, what: &str, e: &rusqlite::Error) -> ConnectorError {
        let message = format!("{what}: {}", describe(e));
        if is_transient(e) {
            ConnectorError::Transient { app: self.app.clone(), message, retry_after: None }
        } else {
            ConnectorError::Rejected { app: self.app.clone(), message }
        }
    }

    /// The table of an entity, checked to have every field; reloaded once if a field is missing
    /// (the app may have altered its table).
    fn table<'a>(
        &self,
        conn: &Connection,
        entity: &str,
        fields: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<Arc<TableInfo>, ConnectorError> {
        let name = entity.to_ascii_lowercase();
        let cached = self.tables.lock().unwrap_or_else(|p| p.into_inner()).get(&name).cloned();
        if let Some(info) = cached {
            if info.check(fields.clone()).is_ok() {
                return Ok(info);
            }
        }
        let info = match load_table(conn, entity) {
            Ok(Some(info)) => Arc::new(info),
            Ok(None) => return Err(self.rejected(format!("entity `{entity}`: no such table"))),
            Err(e) => return Err(self.error(&format!("entity `{entity}`"), &e)),
        };
        self.tables.lock().unwrap_or_else(|p| p.into_inner()).insert(name, info.clone());
        info.check(fields).map_err(|m| self.rejected(m))?;
        Ok(info)
    }

    fn check_key(&self, entity: &EntitySpec, key: &Key) -> Result<(), ConnectorError> {
        if key.0.len() == entity.key_fields.len() {
            Ok(())
        } else {
            Err(self.rejected(format!(
                "entity `{}`: key {key} has {} values, the entity has {} key fields",
                entity.name,
                key.0.len(),
                entity.key_fields.len()
            )))
        }
    }

    fn read_sync(&self, entity: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError> {
        let conn = self.read_lock();
        let fields = entity.key_fields.iter().chain(&entity.fields).map(String::as_str);
        let info = self.table(&conn, &entity.name, fields)?;
        let mut select: Vec<String> = entity.fields.iter().map(|f| ident(f)).collect();
        select.push(ident(VERSION_COLUMN));
        let sql = format!(
            "SELECT {} FROM {} WHERE {} LIMIT 1",
            select.join(", "),
            ident(&info.name),
            key_match(&entity.key_fields, 1)
        );
        let what = || format!("read {}", entity.name);
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.error(&what(), &e))?;
        let n = entity.fields.len();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            self.check_key(entity, key)?;
            let record = stmt
                .query_row(params_from_iter(key.0.iter().map(|k| Bind::Text(k))), |row| {
                    let mut fields = BTreeMap::new();
                    for (i, f) in entity.fields.iter().enumerate() {
                        fields.insert(f.clone(), value_to_json(row.get_ref(i)?));
                    }
                    let version: i64 = row.get(n)?;
                    // The version is the seq of the record's latest change-log row.
                    Ok(Record { fields, version: version.to_string(), seq: u64::try_from(version).ok() })
                })
                .optional()
                .map_err(|e| self.error(&what(), &e))?;
            out.push(record);
        }
        Ok(out)
    }

    fn write_sync(
        &self,
        entity: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError> {
        let mut conn = self.lock();
        let fields = entity
            .key_fields
            .iter()
            .map(String::as_str)
            .chain(ops.iter().flat_map(|op| op.fields.keys().map(String::as_str)));
        let info = self.table(&conn, &entity.name, fields.clone())?;
        if let Some(f) = fields.clone().find(|f| f.eq_ignore_ascii_case(VERSION_COLUMN)) {
            return Err(self.rejected(format!("entity `{}`: field `{f}` is reserved for dualsync", entity.name)));
        }
        for op in ops {
            self.check_key(entity, &op.key)?;
        }
        // Failures that stand whatever else happens: the ops are skipped on a rerun.
        let mut settled: Vec<Option<WriteFailure>> = vec![None; ops.len()];
        for (op, settled) in ops.iter().zip(settled.iter_mut()) {
            *settled = key_disagreement(entity, op);
        }
        let what = || format!("write {}", entity.name);
        loop {
            let tx =
                conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.error(&what(), &e))?;
            // One batch is one app transaction: its echoes reach capture as one notification,
            // not one per record. Without capture installed there is no marker table: no-op.
            let marked = mark_own_write(&tx);
            let mut results = Vec::with_capacity(ops.len());
            let mut rolled_back = false;
            for (i, op) in ops.iter().enumerate() {
                if let Some(failure) = &settled[i] {
                    results.push(Err(failure.clone()));
                    continue;
                }
                match apply_exact(&tx, &info, entity, op) {
                    OpOutcome::Done(result) => results.push(result),
                    OpOutcome::RolledBack(failure) => {
                        settled[i] = Some(failure);
                        rolled_back = true;
                        break;
                    }
                }
            }
            if rolled_back {
                // Dropping the transaction is a no-op: SQLite already ended it.
                drop(tx);
                continue;
            }
            if marked {
                unmark_own_write(&tx).map_err(|e| self.error(&what(), &e))?;
            }
            tx.commit().map_err(|e| self.error(&what(), &e))?;
            return Ok(results);
        }
    }

    fn delete_sync(&self, entity: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError> {
        let mut conn = self.lock();
        let info = self.table(&conn, &entity.name, entity.key_fields.iter().map(String::as_str))?;
        for key in keys {
            self.check_key(entity, key)?;
        }
        let sql = format!("DELETE FROM {} WHERE {}", ident(&info.name), key_match(&entity.key_fields, 1));
        let what = |key: Option<&Key>| match key {
            Some(key) => format!("delete {} {key}", entity.name),
            None => format!("delete {}", entity.name),
        };
        let tx =
            conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.error(&what(None), &e))?;
        // dualsync's deletes are its own writes exactly like its upserts: marked as one of its
        // write batches, so that ingress does not take their echo for a user's delete.
        let marked = mark_own_write(&tx);
        {
            let mut stmt = tx.prepare_cached(&sql).map_err(|e| self.error(&what(None), &e))?;
            for key in keys {
                stmt.execute(params_from_iter(key.0.iter().map(|k| Bind::Text(k))))
                    .map_err(|e| self.error(&what(Some(key)), &e))?;
            }
        }
        if marked {
            unmark_own_write(&tx).map_err(|e| self.error(&what(None), &e))?;
        }
        tx.commit().map_err(|e| self.error(&what(None), &e))
    }

    /// One page in key order. The cursor is the JSON array of the page's last key values as
    /// stored (typed, so `(k1, k2) > (?, ?)` compares as the ORDER BY does).
    fn list_sync(&self, entity: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError> {
        let conn = self.read_lock();
        let fields = entity.key_fields.iter().chain(&entity.fields).map(String::as_str);
        let info = self.table(&conn, &entity.name, fields)?;
        let nk = entity.key_fields.len();
        if nk == 0 {
            return Err(self.rejected(format!("entity `{}`: no key fields", entity.name)));
        }
        let cursor: Option<Vec<Value>> = match after {
            None => None,
            Some(text) => match serde_json::from_str::<Vec<Value>>(text) {
                Ok(values) if values.len() == nk => Some(values),
                _ => {
                    return Err(
                        self.rejected(format!("list {}: invalid cursor (not one from this connector)", entity.name))
                    )
                }
            },
        };
        let keys: Vec<String> = entity.key_fields.iter().map(|k| ident(k)).collect();
        let mut select = keys.clone();
        select.extend(entity.fields.iter().map(|f| ident(f)));
        select.push(ident(VERSION_COLUMN));
        let mut conditions: Vec<String> = keys.iter().map(|k| format!("{k} IS NOT NULL")).collect();
        let mut params: Vec<Bind> = Vec::new();
        if let Some(values) = &cursor {
            let placeholders: Vec<String> = (1..=nk).map(|i| format!("?{i}")).collect();
            conditions.push(format!("({}) > ({})", keys.join(", "), placeholders.join(", ")));
            params.extend(values.iter().map(|v| Bind::Json { value: v, blob: true }));
        }
        let sql = format!(
            "SELECT {} FROM {} WHERE {} ORDER BY {} LIMIT ?{}",
            select.join(", "),
            ident(&info.name),
            conditions.join(" AND "),
            keys.join(", "),
            params.len() + 1
        );
        let limit = limit.max(1);
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX - 1) + 1;
        params.push(Bind::Int(fetch));
        let what = || format!("list {}", entity.name);
        let mut stmt = conn.prepare_cached(&sql).map_err(|e| self.error(&what(), &e))?;
        let mut rows = stmt.query(params_from_iter(params.iter())).map_err(|e| self.error(&what(), &e))?;
        let mut records = Vec::new();
        let mut seen = 0usize;
        let mut last: Option<Vec<Value>> = None;
        let mut more = false;
        while let Some(row) = rows.next().map_err(|e| self.error(&what(), &e))? {
            if seen == limit {
                more = true;
                break;
            }
            seen += 1;
            let entry = list_row(row, entity, nk).map_err(|e| self.error(&what(), &e))?;
            last = Some(entry.cursor);
            if let Some(item) = entry.item {
                records.push(item);
            }
        }
        let next = match (more, last) {
            (true, Some(values)) => Some(Value::Array(values).to_string()),
            _ => None,
        };
        Ok(ListPage { records, next })
    }

    /// The rows `list` would give, counted by SQLite.
    fn count_sync(&self, entity: &EntitySpec) -> Result<u64, ConnectorError> {
        let conn = self.read_lock();
        let info = self.table(&conn, &entity.name, entity.key_fields.iter().map(String::as_str))?;
        let present: Vec<String> = entity.key_fields.iter().map(|k| format!("{} IS NOT NULL", ident(k))).collect();
        let sql = format!("SELECT count(*) FROM {} WHERE {}", ident(&info.name), present.join(" AND "));
        let what = || format!("count {}", entity.name);
        let n: i64 = conn.query_row(&sql, [], |r| r.get(0)).map_err(|e| self.error(&what(), &e))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    fn changes_sync(&self, after: u64, limit: usize) -> Result<Vec<RawChange>, ConnectorError> {
        let conn = self.read_lock();
        let what = "read change log";
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, entity, key, op, txid, company, at_ms FROM \"_dualsync_changes\" \
                 WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| match e.to_string().contains("no such table") {
                true => self.rejected(format!("{what}: change capture is not installed")),
                false => self.error(what, &e),
            })?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt
            .query_map(rusqlite::params![after, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, i64>(6)?,
                ))
            })
            .map_err(|e| self.error(what, &e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, entity, key, op, txid, company, at_ms) = row.map_err(|e| self.error(what, &e))?;
            let malformed = || self.rejected(format!("{what}: malformed change-log row seq {seq}"));
            let key = serde_json::from_str::<Vec<Value>>(&key)
                .ok()
                .and_then(|values| values.iter().map(json_key_text).collect::<Option<Vec<_>>>())
                .ok_or_else(malformed)?;
            let op = match op.as_str() {
                "upsert" => Operation::Upsert,
                "delete" => Operation::Delete,
                _ => return Err(malformed()),
            };
            let seq = u64::try_from(seq).map_err(|_| malformed())?;
            let version = (op == Operation::Upsert).then(|| seq.to_string());
            out.push(RawChange { seq, entity, key: Key(key), op, txid, company, version, at_ms });
        }
        Ok(out)
    }
}

/// A failure when a key field in `op.fields` disagrees with `op.key`.
fn key_disagreement(entity: &EntitySpec, op: &WriteOp) -> Option<WriteFailure> {
    for (k, expected) in entity.key_fields.iter().zip(&op.key.0) {
        let value =
            op.fields.get(k).or_else(|| op.fields.iter().find(|(f, _)| f.eq_ignore_ascii_case(k)).map(|(_, v)| v));
        if let Some(value) = value {
            if json_key_text(value).as_deref() != Some(expected.as_str()) {
                return Some(WriteFailure::Rejected(format!(
                    "{} {}: field `{k}` does not hold the key value",
                    entity.name, op.key
                )));
            }
        }
    }
    None
}

fn is_key_field(entity: &EntitySpec, field: &str) -> bool {
    entity.key_fields.iter().any(|k| k.eq_ignore_ascii_case(field))
}

/// Applies one op in the write transaction.
fn apply_op(tx: &Transaction, info: &TableInfo, entity: &EntitySpec, op: &WriteOp) -> OpOutcome {
    let table = ident(&info.name);
    let nk = entity.key_fields.len();
    let version_sql =
        format!("SELECT {} FROM {table} WHERE {} LIMIT 1", ident(VERSION_COLUMN), key_match(&entity.key_fields, 1));
    let key_params = || op.key.0.iter().map(|k| Bind::Text(k));
    let current_version = || -> rusqlite::Result<Option<i64>> {
        tx.prepare_cached(&version_sql)?.query_row(params_from_iter(key_params()), |r| r.get(0)).optional()
    };
    let fail = |e: rusqlite::Error| {
        let failure = op_failure(&entity.name, &op.key, &e);
        if tx.is_autocommit() {
            OpOutcome::RolledBack(failure)
        } else {
            OpOutcome::Done(Err(failure))
        }
    };
    let written = || match current_version() {
        Ok(Some(v)) => OpOutcome::Done(Ok(v.to_string())),
        Ok(None) => OpOutcome::Done(Err(WriteFailure::Rejected(format!(
            "{} {}: record not found after the write",
            entity.name, op.key
        )))),
        Err(e) => fail(e),
    };
    match &op.precondition {
        Precondition::CreateOnly => {
            match current_version() {
                Ok(Some(_)) => return OpOutcome::Done(Err(WriteFailure::PreconditionFailed)),
                Ok(None) => {}
                Err(e) => return fail(e),
            }
            let mut columns: Vec<String> = op.fields.keys().map(|f| ident(f)).collect();
            let mut params: Vec<Bind> =
                op.fields.iter().map(|(f, v)| Bind::Json { value: v, blob: info.is_blob_column(f) }).collect();
            for (k, value) in entity.key_fields.iter().zip(&op.key.0) {
                if !op.fields.keys().any(|f| f.eq_ignore_ascii_case(k)) {
                    columns.push(ident(k));
                    params.push(Bind::Text(value));
                }
            }
            let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
            let sql = format!("INSERT INTO {table} ({}) VALUES ({})", columns.join(", "), placeholders.join(", "));
            let inserted = tx.prepare_cached(&sql).and_then(|mut s| s.execute(params_from_iter(params.iter())));
            match inserted {
                Ok(_) => written(),
                Err(e) if is_key_conflict(&e, entity) => OpOutcome::Done(Err(WriteFailure::PreconditionFailed)),
                Err(e) => fail(e),
            }
        }
        Precondition::IfMatch(expected) => {
            let Ok(expected) = expected.parse::<i64>() else {
                return OpOutcome::Done(Err(WriteFailure::PreconditionFailed));
            };
            let set: Vec<(&String, &Value)> = op.fields.iter().filter(|(f, _)| !is_key_field(entity, f)).collect();
            if set.is_empty() {
                // Nothing to change: the write is its precondition check.
                return match current_version() {
                    Ok(Some(v)) if v == expected => OpOutcome::Done(Ok(v.to_string())),
                    Ok(_) => OpOutcome::Done(Err(WriteFailure::PreconditionFailed)),
                    Err(e) => fail(e),
                };
            }
            let assignments: Vec<String> =
                set.iter().enumerate().map(|(i, (f, _))| format!("{} = ?{}", ident(f), i + 1)).collect();
            let sql = format!(
                "UPDATE {table} SET {} WHERE {} AND {} = ?{}",
                assignments.join(", "),
                key_match(&entity.key_fields, set.len() + 1),
                ident(VERSION_COLUMN),
                set.len() + nk + 1
            );
            let mut params: Vec<Bind> =
                set.iter().map(|(f, v)| Bind::Json { value: v, blob: info.is_blob_column(f) }).collect();
            params.extend(key_params());
            params.push(Bind::Int(expected));
            let updated = tx.prepare_cached(&sql).and_then(|mut s| s.execute(params_from_iter(params.iter())));
            match updated {
                Ok(0) => OpOutcome::Done(Err(WriteFailure::PreconditionFailed)),
                Ok(_) => written(),
                Err(e) => fail(e),
            }
        }
    }
}

/// Applies one op under a savepoint and reads back what it wrote: a field whose stored value
/// is not the value written (SQLite's column affinity turned TEXT `'007'` into INTEGER 7, or
/// `'1.50'` into REAL 1.5) undoes the op and refuses it, naming the field and never the value.
/// The comparison is [`canon::same_value`], so `'7'` stored as 7 is the same value. A bool and
/// an array or object are compared as the connector binds them (0/1, JSON text: module doc).
fn apply_exact(tx: &Transaction, info: &TableInfo, entity: &EntitySpec, op: &WriteOp) -> OpOutcome {
    if op.fields.iter().all(|(f, v)| stored_as_written(info, f, v)) {
        // Nothing the columns could change: no savepoint, no read-back (most writes).
        return apply_op(tx, info, entity, op);
    }
    if let Err(e) = tx.execute_batch("SAVEPOINT ds_op") {
        return OpOutcome::Done(Err(op_failure(&entity.name, &op.key, &e)));
    }
    let outcome = apply_op(tx, info, entity, op);
    if tx.is_autocommit() {
        // SQLite ended the transaction (and the savepoint with it).
        return outcome;
    }
    let changed = match &outcome {
        OpOutcome::Done(Ok(_)) => changed_field(tx, info, entity, op),
        _ => Ok(None),
    };
    let undo = !matches!(changed, Ok(None));
    let end = if undo { "ROLLBACK TO ds_op; RELEASE ds_op" } else { "RELEASE ds_op" };
    if let Err(e) = tx.execute_batch(end) {
        return OpOutcome::Done(Err(op_failure(&entity.name, &op.key, &e)));
    }
    match changed {
        Ok(None) => outcome,
        Ok(Some(column)) => OpOutcome::Done(Err(WriteFailure::Rejected(format!(
            "{} {}: field `{}` cannot hold the value exactly (its {} column would store it changed)",
            entity.name,
            op.key,
            column.name,
            if column.decl_type.is_empty() { "untyped" } else { column.decl_type.as_str() }
        )))),
        Err(e) => OpOutcome::Done(Err(op_failure(&entity.name, &op.key, &e))),
    }
}

/// Whether `value` is stored in column `field` exactly as bound, whatever it is: null anywhere;
/// text in a column of TEXT or no affinity; an integer in one of INTEGER, NUMERIC or no
/// affinity; a float (that an f64 holds exactly) in one of REAL or no affinity. SQLite converts
/// none of these; anything else takes the read-back of [`apply_exact`].
fn stored_as_written(info: &TableInfo, field: &str, value: &Value) -> bool {
    let Some(column) = info.column(field) else { return false };
    // SQLite's affinity rules, in their order (https://sqlite.org/datatype3.html §3.1).
    let t = column.decl_type.as_str();
    let affinity = if t.contains("INT") {
        Affinity::Integer
    } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
        Affinity::Text
    } else if t.is_empty() || t.contains("BLOB") {
        Affinity::None
    } else if t.contains("REAL") || t.contains("FLOA") || t.contains("DOUB") {
        Affinity::Real
    } else {
        Affinity::Numeric
    };
    match value {
        Value::Null => true,
        Value::String(_) => matches!(affinity, Affinity::Text | Affinity::None),
        // Bound as an INTEGER (see `json_to_sql`), which these keep as it is.
        Value::Number(n) if n.as_i64().is_some() => {
            matches!(affinity, Affinity::Integer | Affinity::Numeric | Affinity::None)
        }
        // Bound as a REAL; a whole one would become an INTEGER in the others.
        Value::Number(n) if n.is_f64() => {
            n.as_f64().and_then(serde_json::Number::from_f64).as_ref() == Some(n)
                && matches!(affinity, Affinity::Real | Affinity::None)
        }
        _ => false,
    }
}

/// A column's type affinity, which decides what SQLite does to a value stored in it.
enum Affinity {
    Integer,
    Text,
    None,
    Real,
    Numeric,
}

/// The first written field whose stored value differs from the value written.
fn changed_field<'i>(
    tx: &Transaction,
    info: &'i TableInfo,
    entity: &EntitySpec,
    op: &WriteOp,
) -> rusqlite::Result<Option<&'i Column>> {
    if op.fields.is_empty() {
        return Ok(None);
    }
    let names: Vec<&String> = op.fields.keys().collect();
    let sql = format!(
        "SELECT {} FROM {} WHERE {} LIMIT 1",
        names.iter().map(|f| ident(f)).collect::<Vec<_>>().join(", "),
        ident(&info.name),
        key_match(&entity.key_fields, 1)
    );
    let stored: Vec<Value> =
        tx.prepare_cached(&sql)?.query_row(params_from_iter(op.key.0.iter().map(|k| Bind::Text(k))), |r| {
            (0..names.len()).map(|i| r.get_ref(i).map(value_to_json)).collect()
        })?;
    for (name, stored) in names.into_iter().zip(stored) {
        let written = &op.fields[name];
        let blob = info.is_blob_column(name);
        let expected = match written {
            Value::Bool(_) | Value::Array(_) | Value::Object(_) => bound_json(written, blob),
            _ => written.clone(),
        };
        if !canon::same_value(&expected, &stored) {
            return Ok(info.column(name));
        }
    }
    Ok(None)
}

/// A JSON value as the connector binds it, read back as JSON.
fn bound_json(v: &Value, blob_column: bool) -> Value {
    match json_to_sql(v, blob_column) {
        ToSqlOutput::Borrowed(r) => value_to_json(r),
        ToSqlOutput::Owned(o) => value_to_json(ValueRef::from(&o)),
        _ => v.clone(),
    }
}

/// A UNIQUE/PRIMARY KEY violation on exactly the key columns: the record exists (its key did
/// not match the existence check, e.g. a differently typed value in an untyped column).
fn is_key_conflict(e: &rusqlite::Error, entity: &EntitySpec) -> bool {
    let rusqlite::Error::SqliteFailure(f, msg) = e else {
        return false;
    };
    if !matches!(f.extended_code, ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY) {
        return false;
    }
    let Some(on) = failed_on(msg.as_deref()) else {
        return false;
    };
    let mut columns: Vec<String> =
        on.split(", ").map(|c| c.rsplit_once('.').map_or(c, |(_, c)| c).to_ascii_lowercase()).collect();
    columns.sort();
    let mut keys: Vec<String> = entity.key_fields.iter().map(|k| k.to_ascii_lowercase()).collect();
    keys.sort();
    columns == keys
}

struct ListEntry {
    cursor: Vec<Value>,
    item: Option<(Key, Record)>,
}

/// One `list` row: its raw key values (the cursor) and, when the key is valid, the record.
fn list_row(row: &Row<'_>, entity: &EntitySpec, nk: usize) -> rusqlite::Result<ListEntry> {
    let mut cursor = Vec::with_capacity(nk);
    let mut key = Vec::with_capacity(nk);
    for i in 0..nk {
        let v = row.get_ref(i)?;
        cursor.push(value_to_json(v));
        key.push(key_text(&v));
    }
    let Some(key) = key.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(ListEntry { cursor, item: None });
    };
    let mut fields = BTreeMap::new();
    for (i, f) in entity.fields.iter().enumerate() {
        fields.insert(f.clone(), value_to_json(row.get_ref(nk + i)?));
    }
    let version: i64 = row.get(nk + entity.fields.len())?;
    let record = Record { fields, version: version.to_string(), seq: u64::try_from(version).ok() };
    Ok(ListEntry { cursor, item: Some((Key(key), record)) })
}

// The async methods run their SQLite work inline: see the note on `SqliteApp::conn`.
#[async_trait]
impl Connector for SqliteApp {
    fn app(&self) -> &str {
        &self.app
    }

    fn reads_change_seq(&self) -> bool {
        true
    }

    async fn read(&self, entity: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError> {
        self.read_sync(entity, keys)
    }

    async fn count(&self, entity: &EntitySpec) -> Result<u64, ConnectorError> {
        self.count_sync(entity)
    }

    /// Each table and its mapped columns exist (change capture is installed when the job
    /// starts), and a key that nothing makes unique is said, as capture warns of it.
    async fn diagnose(&self, entities: &[EntitySpec], _companies: &[String]) -> Vec<Finding> {
        let conn = self.read_lock();
        let mut out = Vec::new();
        for e in entities {
            let fields = e.key_fields.iter().chain(&e.fields).map(String::as_str);
            let create = || format!("create the table with the key and fields the job maps in {}", self.path.display());
            let finding = match load_table(&conn, &e.name) {
                Err(err) => Some((err.to_string(), "check the database file".to_string())),
                Ok(None) => Some((format!("entity `{}`: no such table", e.name), create())),
                Ok(Some(info)) => match info.has_fields(fields) {
                    Err(m) => Some((m, create())),
                    Ok(()) => match key_is_unique(&conn, &info, &e.key_fields) {
                        Ok(true) => None,
                        Ok(false) => Some((
                            format!("no PRIMARY KEY or UNIQUE index on the key fields {}", e.key_fields.join(", ")),
                            "add one: without it a key can be held twice and reads by key scan the table".to_string(),
                        )),
                        Err(err) => Some((err.to_string(), "check the database file".to_string())),
                    },
                },
            };
            if let Some((problem, fix)) = finding {
                out.push(Finding { subject: e.name.clone(), problem, fix });
            }
        }
        out
    }

    async fn write(
        &self,
        entity: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError> {
        self.write_sync(entity, ops)
    }

    async fn delete(&self, entity: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError> {
        self.delete_sync(entity, keys)
    }

    async fn list(&self, entity: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError> {
        self.list_sync(entity, after, limit)
    }
}

#[async_trait]
impl ChangeFeed for SqliteApp {
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<RawChange>, ConnectorError> {
        self.changes_sync(after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tempfile::TempDir;

    /// The fast path of `apply_exact` never skips a value SQLite would store changed: each
    /// value it lets through, stored in a column of each affinity, reads back the same.
    #[test]
    fn what_skips_the_read_back_is_stored_exactly() {
        let conn = Connection::open_in_memory().expect("open");
        let types =
            ["INTEGER", "BIGINT", "TEXT", "VARCHAR(20)", "BLOB", "", "REAL", "DOUBLE", "NUMERIC", "DECIMAL(10,2)"];
        let columns: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("c{i} {t}")).collect();
        conn.execute_batch(&format!("CREATE TABLE t (id INTEGER PRIMARY KEY, {})", columns.join(", ")))
            .expect("create");
        let info = load_table(&conn, "t").expect("load").expect("table");
        let values = [
            Value::Null,
            Value::from("007"),
            Value::from("1.50"),
            Value::from("x"),
            Value::from(7),
            Value::from(-9_007_199_254_740_993_i64),
            Value::from(u64::MAX),
            Value::from(1.5),
            Value::from(2.0),
            Value::from(0.1),
            Value::from(true),
        ];
        let mut skipped = 0;
        for (i, _) in types.iter().enumerate() {
            let column = format!("c{i}");
            for v in &values {
                if !stored_as_written(&info, &column, v) {
                    continue;
                }
                skipped += 1;
                conn.execute("DELETE FROM t", []).expect("delete");
                conn.execute(
                    &format!("INSERT INTO t (id, {column}) VALUES (1, ?1)"),
                    [Bind::Json { value: v, blob: false }],
                )
                .expect("insert");
                let back: Value = conn
                    .query_row(&format!("SELECT {column} FROM t"), [], |r| r.get_ref(0).map(value_to_json))
                    .expect("read");
                assert_eq!(&back, v, "{v} in a {} column", types[i]);
            }
        }
        assert!(skipped > 20, "the fast path covers the common cases ({skipped})");
    }

    struct Fixture {
        _dir: TempDir,
        app: SqliteApp,
        path: PathBuf,
    }

    impl Fixture {
        /// A second connection, as the app itself would have.
        fn app_conn(&self) -> Connection {
            let conn = Connection::open(&self.path).unwrap();
            conn.busy_timeout(BUSY_TIMEOUT).unwrap();
            conn
        }

        async fn changes(&self) -> Vec<RawChange> {
            self.app.changes_after(0, 10_000).await.unwrap()
        }
    }

    /// `items` (composite text key, company field) and `parts` (integer key).
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE items (
                     company TEXT NOT NULL,
                     code TEXT NOT NULL,
                     name TEXT NOT NULL,
                     qty INTEGER CHECK (qty >= 0),
                     price REAL,
                     data BLOB,
                     PRIMARY KEY (company, code)
                 );
                 CREATE TABLE parts (id INTEGER PRIMARY KEY, label TEXT NOT NULL);",
            )
            .unwrap();
        }
        let app = SqliteApp::open("local", &path).unwrap();
        app.install_capture(&[
            CaptureSpec {
                entity: "items".into(),
                key_fields: vec!["company".into(), "code".into()],
                company_field: Some("company".into()),
            },
            CaptureSpec { entity: "parts".into(), key_fields: vec!["id".into()], company_field: None },
        ])
        .unwrap();
        Fixture { _dir: dir, app, path }
    }

    fn items() -> EntitySpec {
        EntitySpec {
            name: "items".into(),
            key_fields: vec!["company".into(), "code".into()],
            fields: vec!["company".into(), "code".into(), "name".into(), "qty".into()],
            binds: vec![],
        }
    }

    fn parts() -> EntitySpec {
        EntitySpec { name: "parts".into(), key_fields: vec!["id".into()], fields: vec!["label".into()], binds: vec![] }
    }

    fn key(parts: &[&str]) -> Key {
        Key(parts.iter().map(|p| p.to_string()).collect())
    }

    fn fields(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn item_op(code: &str, name: &str, qty: i64, precondition: Precondition) -> WriteOp {
        WriteOp {
            key: key(&["acme", code]),
            fields: fields(&[
                ("company", "acme".into()),
                ("code", code.into()),
                ("name", name.into()),
                ("qty", qty.into()),
            ]),
            precondition,
        }
    }

    fn part_op(id: i64, label: Value, precondition: Precondition) -> WriteOp {
        WriteOp { key: key(&[&id.to_string()]), fields: fields(&[("id", id.into()), ("label", label)]), precondition }
    }

    fn count(conn: &Connection, sql: &str) -> i64 {
        conn.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    #[tokio::test]
    async fn triggers_log_insert_update_delete() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute("INSERT INTO items (company, code, name, qty) VALUES ('acme', 'A1', 'x', 1)", []).unwrap();
        conn.execute("UPDATE items SET qty = 2 WHERE code = 'A1'", []).unwrap();
        conn.execute("DELETE FROM items WHERE code = 'A1'", []).unwrap();
        conn.execute("INSERT INTO parts (id, label) VALUES (42, 'p')", []).unwrap();

        let changes = fx.changes().await;
        assert_eq!(changes.len(), 4, "one row per change, no echo of the version update");
        let raw: Vec<String> = conn
            .prepare("SELECT key FROM _dualsync_changes ORDER BY seq")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(raw, ["[\"acme\",\"A1\"]", "[\"acme\",\"A1\"]", "[\"acme\",\"A1\"]", "[42]"]);
        let ops: Vec<Operation> = changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, [Operation::Upsert, Operation::Upsert, Operation::Delete, Operation::Upsert]);
        for (i, c) in changes.iter().enumerate() {
            assert_eq!(c.seq, i as u64 + 1);
            assert_eq!(c.txid, format!("seq-{}", c.seq), "own txid without _dualsync_tx");
            assert!(c.at_ms > 1_600_000_000_000, "at_ms is epoch ms: {}", c.at_ms);
        }
        assert_eq!(changes[0].entity, "items");
        assert_eq!(changes[0].key, key(&["acme", "A1"]));
        assert_eq!(changes[0].company.as_deref(), Some("acme"));
        assert_eq!(changes[2].company.as_deref(), Some("acme"), "delete logs the old company");
        assert_eq!(changes[0].version.as_deref(), Some("1"));
        assert_eq!(changes[2].version, None);
        assert_eq!(changes[3].entity, "parts");
        assert_eq!(changes[3].key, key(&["42"]));
        assert_eq!(changes[3].company, None);
    }

    #[tokio::test]
    async fn transaction_helper_groups_writes_under_one_txid() {
        let fx = fixture();
        let mut conn = fx.app_conn();
        let n = transaction(&mut conn, "order-7", |tx| {
            tx.execute("INSERT INTO parts (id, label) VALUES (1, 'a')", [])?;
            tx.execute("INSERT INTO parts (id, label) VALUES (2, 'b')", [])?;
            tx.execute("UPDATE parts SET label = 'c' WHERE id = 1", [])
        })
        .unwrap();
        assert_eq!(n, 1);
        conn.execute("INSERT INTO parts (id, label) VALUES (3, 'd')", []).unwrap();
        // A failed transaction logs nothing.
        let failed = transaction(&mut conn, "order-8", |tx| {
            tx.execute("INSERT INTO parts (id, label) VALUES (4, 'e')", [])?;
            tx.execute("INSERT INTO parts (id, label) VALUES (5, NULL)", [])
        });
        assert!(failed.is_err());

        let txids: Vec<String> = fx.changes().await.into_iter().map(|c| c.txid).collect();
        assert_eq!(txids, ["order-7", "order-7", "order-7", "seq-4"]);
        assert_eq!(count(&conn, "SELECT count(*) FROM _dualsync_tx"), 0);
    }

    #[tokio::test]
    async fn version_is_the_seq_of_the_latest_change() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute("INSERT INTO parts (id, label) VALUES (1, 'a')", []).unwrap();
        conn.execute("INSERT INTO parts (id, label) VALUES (2, 'b')", []).unwrap();
        conn.execute("UPDATE parts SET label = 'c' WHERE id = 1", []).unwrap();
        let changes = fx.changes().await;
        let read = fx.app.read(&parts(), &[key(&["1"]), key(&["2"])]).await.unwrap();
        assert_eq!(read[0].as_ref().unwrap().version, "3");
        assert_eq!(changes[2].version.as_deref(), Some("3"));
        assert_eq!(read[1].as_ref().unwrap().version, "2");
        assert_eq!(changes[1].version.as_deref(), Some("2"));
    }

    #[tokio::test]
    async fn updating_only_the_version_is_not_logged() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute("INSERT INTO parts (id, label) VALUES (1, 'a')", []).unwrap();
        conn.execute("UPDATE parts SET _ds_version = 99 WHERE id = 1", []).unwrap();
        assert_eq!(fx.changes().await.len(), 1);
        assert_eq!(count(&conn, "SELECT _ds_version FROM parts WHERE id = 1"), 99);
        // Even with recursive triggers on, the version update inside the triggers is not logged.
        conn.execute_batch("PRAGMA recursive_triggers = ON").unwrap();
        conn.execute("UPDATE parts SET label = 'b' WHERE id = 1", []).unwrap();
        conn.execute("INSERT INTO parts (id, label) VALUES (2, 'a')", []).unwrap();
        let changes = fx.changes().await;
        assert_eq!(changes.len(), 3);
        assert_eq!(count(&conn, "SELECT _ds_version FROM parts WHERE id = 1"), 2);
        // A no-op update of a real column is still a change.
        conn.execute("UPDATE parts SET label = label WHERE id = 1", []).unwrap();
        assert_eq!(fx.changes().await.len(), 4);
    }

    #[tokio::test]
    async fn key_change_logs_delete_of_old_key_then_upsert() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute("INSERT INTO parts (id, label) VALUES (1, 'a')", []).unwrap();
        conn.execute("UPDATE parts SET id = 5 WHERE id = 1", []).unwrap();
        let changes = fx.changes().await;
        assert_eq!(changes.len(), 3);
        assert_eq!((changes[1].op, &changes[1].key), (Operation::Delete, &key(&["1"])));
        assert_eq!((changes[2].op, &changes[2].key), (Operation::Upsert, &key(&["5"])));
        assert_eq!(changes[1].txid, changes[2].txid, "one statement, one transaction");
        let read = fx.app.read(&parts(), &[key(&["5"])]).await.unwrap();
        assert_eq!(read[0].as_ref().unwrap().version, "3");
    }

    #[tokio::test]
    async fn install_capture_is_idempotent() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute("INSERT INTO parts (id, label) VALUES (1, 'a')", []).unwrap();
        let spec = CaptureSpec { entity: "parts".into(), key_fields: vec!["id".into()], company_field: None };
        let triggers = "SELECT group_concat(rowid || ':' || sql, ';') FROM sqlite_schema \
                        WHERE type = 'trigger' ORDER BY rowid";
        let before: String = conn.query_row(triggers, [], |r| r.get(0)).unwrap();
        fx.app.install_capture(std::slice::from_ref(&spec)).unwrap();
        fx.app.install_capture(&[spec]).unwrap();
        let after: String = conn.query_row(triggers, [], |r| r.get(0)).unwrap();
        assert_eq!(before, after, "the triggers were kept, not recreated");
        assert_eq!(count(&conn, "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger'"), 6);
        conn.execute("INSERT INTO parts (id, label) VALUES (2, 'b')", []).unwrap();
        assert_eq!(fx.changes().await.len(), 2);
        assert_eq!(count(&conn, "SELECT _ds_version FROM parts WHERE id = 2"), 2);
        // A new company field recreates the triggers.
        fx.app
            .install_capture(&[CaptureSpec {
                entity: "parts".into(),
                key_fields: vec!["id".into()],
                company_field: Some("label".into()),
            }])
            .unwrap();
        let recreated: String = conn.query_row(triggers, [], |r| r.get(0)).unwrap();
        assert_ne!(after, recreated);
        conn.execute("INSERT INTO parts (id, label) VALUES (3, 'c')", []).unwrap();
        assert_eq!(fx.changes().await[2].company.as_deref(), Some("c"));
        assert_eq!(fx.changes().await.len(), 3);
    }

    #[tokio::test]
    async fn read_by_key_in_key_order_with_integer_key_and_missing_keys() {
        let fx = fixture();
        let conn = fx.app_conn();
        conn.execute(
            "INSERT INTO items (company, code, name, qty, price, data) \
             VALUES ('acme', '007', 'x', 3, 2.5, x'0102')",
            [],
        )
        .unwrap();
        conn.execute("INSERT INTO parts (id, label) VALUES (42, 'p')", []).unwrap();

        let read = fx.app.read(&parts(), &[key(&["7"]), key(&["42"]), key(&["042x"])]).await.unwrap();
        assert_eq!(read.len(), 3);
        assert!(read[0].is_none());
        assert_eq!(read[1].as_ref().unwrap().fields, fields(&[("label", "p".into())]));
        assert!(read[2].is_none());

        let mut entity = items();
        entity.fields.extend(["price".to_string(), "data".to_string()]);
        let read = fx.app.read(&entity, &[key(&["acme", "7"]), key(&["acme", "007"])]).await.unwrap();
        assert!(read[0].is_none(), "a TEXT key column compares as text");
        let record = read[1].as_ref().unwrap();
        assert_eq!(record.fields["code"], Value::from("007"));
        assert_eq!(record.fields["qty"], Value::from(3));
        assert_eq!(record.fields["price"], Value::from(2.5));
        assert_eq!(record.fields["data"], serde_json::json!([1, 2]));
        assert_eq!(record.version, "1");
    }

    #[tokio::test]
    async fn write_create_only_and_if_match() {
        let fx = fixture();
        let out = fx.app.write(&items(), &[item_op("A1", "first", 1, Precondition::CreateOnly)]).await.unwrap();
        let v1 = out[0].clone().unwrap();
        assert_eq!(v1, "1");

        // Create-only on an existing record.
        let out = fx.app.write(&items(), &[item_op("A1", "again", 1, Precondition::CreateOnly)]).await.unwrap();
        assert_eq!(out[0], Err(WriteFailure::PreconditionFailed));

        // If-Match at the current version.
        let out =
            fx.app.write(&items(), &[item_op("A1", "second", 2, Precondition::IfMatch(v1.clone()))]).await.unwrap();
        let v2 = out[0].clone().unwrap();
        assert_eq!(v2, "2");

        // If-Match at a stale version: nothing changes, nothing is logged.
        let out = fx.app.write(&items(), &[item_op("A1", "third", 3, Precondition::IfMatch(v1))]).await.unwrap();
        assert_eq!(out[0], Err(WriteFailure::PreconditionFailed));
        let read = fx.app.read(&items(), &[key(&["acme", "A1"])]).await.unwrap();
        let record = read[0].clone().unwrap();
        assert_eq!(record.fields["name"], Value::from("second"));
        assert_eq!(record.version, v2);
        // If-Match on a missing record.
        let out = fx.app.write(&items(), &[item_op("B9", "x", 1, Precondition::IfMatch("2".into()))]).await.unwrap();
        assert_eq!(out[0], Err(WriteFailure::PreconditionFailed));

        // The writes were captured (dualsync's echoes), with the versions returned.
        let changes = fx.changes().await;
        let versions: Vec<_> = changes.iter().map(|c| c.version.clone().unwrap()).collect();
        assert_eq!(versions, ["1", "2"]);
    }

    #[tokio::test]
    async fn write_to_integer_key_table_binds_key_text() {
        let fx = fixture();
        let op = WriteOp {
            key: key(&["42"]),
            fields: fields(&[("label", "p".into())]),
            precondition: Precondition::CreateOnly,
        };
        let out = fx.app.write(&parts(), &[op]).await.unwrap();
        assert_eq!(out[0], Ok("1".to_string()));
        let conn = fx.app_conn();
        assert_eq!(count(&conn, "SELECT typeof(id) = 'integer' AND id = 42 FROM parts"), 1);
        let out = fx.app.write(&parts(), &[part_op(42, "q".into(), Precondition::IfMatch("1".into()))]).await.unwrap();
        assert_eq!(out[0], Ok("2".to_string()));
        // A key field that disagrees with the key.
        let mut op = part_op(43, "r".into(), Precondition::CreateOnly);
        op.key = key(&["44"]);
        let out = fx.app.write(&parts(), &[op]).await.unwrap();
        assert!(matches!(&out[0], Err(WriteFailure::Rejected(m)) if m.contains("`id`")), "{out:?}");
    }

    #[tokio::test]
    async fn constraint_violation_is_rejected_without_values() {
        let fx = fixture();
        let secret = "SECRET-VALUE-123";
        let mut op = item_op("A1", secret, 1, Precondition::CreateOnly);
        op.fields.insert("name".into(), Value::Null);
        op.fields.insert("price".into(), secret.into());
        let out = fx.app.write(&items(), &[op]).await.unwrap();
        let Err(WriteFailure::Rejected(message)) = &out[0] else { panic!("{out:?}") };
        assert!(message.contains("items acme/A1"), "{message}");
        assert!(message.contains("NOT NULL"), "{message}");
        assert!(!message.contains(secret), "{message}");

        let op = item_op("A2", secret, -5, Precondition::CreateOnly);
        let out = fx.app.write(&items(), &[op]).await.unwrap();
        let Err(WriteFailure::Rejected(message)) = &out[0] else { panic!("{out:?}") };
        assert!(message.contains("CHECK") && !message.contains(secret), "{message}");
        assert!(fx.changes().await.is_empty());
    }

    #[tokio::test]
    async fn one_bad_op_does_not_undo_the_batch() {
        let fx = fixture();
        let ops = [
            part_op(1, "a".into(), Precondition::CreateOnly),
            part_op(2, Value::Null, Precondition::CreateOnly),
            part_op(3, "c".into(), Precondition::CreateOnly),
        ];
        let out = fx.app.write(&parts(), &ops).await.unwrap();
        assert_eq!(out[0], Ok("1".into()));
        assert!(matches!(out[1], Err(WriteFailure::Rejected(_))));
        assert_eq!(out[2], Ok("2".into()));
        let read = fx.app.read(&parts(), &[key(&["1"]), key(&["2"]), key(&["3"])]).await.unwrap();
        assert!(read[0].is_some() && read[1].is_none() && read[2].is_some());
    }

    #[tokio::test]
    async fn an_op_that_rolls_back_the_transaction_does_not_lose_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL ON CONFLICT ROLLBACK)")
            .unwrap();
        let app = SqliteApp::open("local", &path).unwrap();
        app.install_capture(&[CaptureSpec { entity: "t".into(), key_fields: vec!["id".into()], company_field: None }])
            .unwrap();
        let entity =
            EntitySpec { name: "t".into(), key_fields: vec!["id".into()], fields: vec!["v".into()], binds: vec![] };
        let op = |id: i64, v: Value| WriteOp {
            key: key(&[&id.to_string()]),
            fields: fields(&[("v", v)]),
            precondition: Precondition::CreateOnly,
        };
        let out = app.write(&entity, &[op(1, "a".into()), op(2, Value::Null), op(3, "c".into())]).await.unwrap();
        assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
        assert!(matches!(out[1], Err(WriteFailure::Rejected(_))));
        let read = app.read(&entity, &[key(&["1"]), key(&["3"])]).await.unwrap();
        assert!(read.iter().all(Option::is_some));
        assert_eq!(app.changes_after(0, 100).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn values_round_trip_blob_bool_real_json() {
        let fx = fixture();
        let mut op = item_op("B1", "n", 1, Precondition::CreateOnly);
        op.fields.insert("data".into(), serde_json::json!([0, 7, 255]));
        op.fields.insert("price".into(), Value::from(9.75));
        op.fields.insert("name".into(), serde_json::json!({"nested": [1, "x"]}));
        op.fields.insert("qty".into(), Value::Bool(true));
        let out = fx.app.write(&items(), &[op]).await.unwrap();
        assert!(out[0].is_ok(), "{out:?}");
        let conn = fx.app_conn();
        let types: String = conn
            .query_row(
                "SELECT typeof(data) || ',' || typeof(price) || ',' || typeof(name) || ',' || \
                 typeof(qty) FROM items",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(types, "blob,real,text,integer");
        let mut entity = items();
        entity.fields.extend(["price".to_string(), "data".to_string()]);
        let read = fx.app.read(&entity, &[key(&["acme", "B1"])]).await.unwrap();
        let record = read[0].as_ref().unwrap();
        assert_eq!(record.fields["data"], serde_json::json!([0, 7, 255]));
        assert_eq!(record.fields["price"], Value::from(9.75));
        assert_eq!(record.fields["name"], Value::from("{\"nested\":[1,\"x\"]}"));
        assert_eq!(record.fields["qty"], Value::from(1));
    }

    #[tokio::test]
    async fn a_value_the_column_would_store_changed_is_refused_alone_and_undone() {
        let fx = fixture();
        let with = |code: &str, field: &str, v: Value| {
            let mut op = item_op(code, "n", 1, Precondition::CreateOnly);
            op.fields.insert(field.into(), v);
            op
        };
        let ops = [
            with("A", "qty", "007".into()),
            with("B", "qty", "7".into()),
            with("C", "price", "1.50".into()),
            with("D", "price", "1.5".into()),
            with("E", "qty", " 7".into()),
            with("F", "name", Value::from(0.1 + 0.2)),
            with("G", "name", Value::from(2.25)),
            with("H", "qty", Value::from(u64::MAX)),
        ];
        let out = fx.app.write(&items(), &ops).await.unwrap();
        let refused: Vec<&str> =
            ops.iter().zip(&out).filter(|(_, r)| r.is_err()).map(|(op, _)| op.key.0[1].as_str()).collect();
        assert_eq!(refused, ["A", "C", "E", "F", "H"], "{out:?}");
        let Err(WriteFailure::Rejected(m)) = &out[0] else { panic!("{:?}", out[0]) };
        assert_eq!(
            m,
            "items acme/A: field `qty` cannot hold the value exactly (its INTEGER column would store it changed)"
        );
        let conn = fx.app_conn();
        assert_eq!(count(&conn, "SELECT count(*) FROM items"), 3);
        assert_eq!(count(&conn, "SELECT count(*) FROM items WHERE code IN ('A', 'C', 'E', 'F', 'H')"), 0);
        assert_eq!(count(&conn, "SELECT count(*) FROM _dualsync_changes"), 3, "a refused op logs nothing");
        // An update is refused the same way and leaves the record as it was.
        let mut op = with("B", "qty", "08".into());
        op.precondition = Precondition::IfMatch(
            fx.app.read(&items(), &[key(&["acme", "B"])]).await.unwrap()[0].as_ref().unwrap().version.clone(),
        );
        let out = fx.app.write(&items(), &[op]).await.unwrap();
        assert!(matches!(&out[0], Err(WriteFailure::Rejected(m)) if m.contains("`qty`")), "{out:?}");
        assert_eq!(count(&conn, "SELECT qty FROM items WHERE code = 'B'"), 7);
    }

    #[tokio::test]
    async fn delete_by_key_and_missing_is_fine() {
        let fx = fixture();
        let ops = [part_op(1, "a".into(), Precondition::CreateOnly)];
        fx.app.write(&parts(), &ops).await.unwrap();
        fx.app.delete(&parts(), &[key(&["1"]), key(&["77"])]).await.unwrap();
        assert!(fx.app.read(&parts(), &[key(&["1"])]).await.unwrap()[0].is_none());
        let changes = fx.changes().await;
        assert_eq!(changes.last().map(|c| (c.op, c.key.clone())), Some((Operation::Delete, key(&["1"]))));
    }

    #[tokio::test]
    async fn list_pages_through_every_record_once_in_key_order() {
        let fx = fixture();
        let ops: Vec<WriteOp> =
            (1..=53).map(|i| part_op(i, format!("p{i}").into(), Precondition::CreateOnly)).collect();
        fx.app.write(&parts(), &ops).await.unwrap();
        let mut seen = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            let page = fx.app.list(&parts(), after.as_deref(), 10).await.unwrap();
            pages += 1;
            for (k, r) in &page.records {
                assert_eq!(r.fields["label"], Value::from(format!("p{}", k.0[0])));
            }
            seen.extend(page.records.into_iter().map(|(k, _)| k.0[0].parse::<i64>().unwrap()));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(pages, 6);
        assert_eq!(seen, (1..=53).collect::<Vec<_>>(), "numeric order, each once");

        // Composite text keys.
        let conn = fx.app_conn();
        for (c, k) in [("b", "1"), ("a", "2"), ("a", "10"), ("b", "0")] {
            conn.execute("INSERT INTO items (company, code, name) VALUES (?1, ?2, 'n')", [c, k]).unwrap();
        }
        let first = fx.app.list(&items(), None, 3).await.unwrap();
        let second = fx.app.list(&items(), first.next.as_deref(), 3).await.unwrap();
        let keys: Vec<String> = first.records.iter().chain(&second.records).map(|(k, _)| k.display()).collect();
        assert_eq!(keys, ["a/10", "a/2", "b/0", "b/1"]);
        assert!(second.next.is_none());
        assert!(fx.app.list(&items(), Some("garbage"), 3).await.is_err());
    }

    #[tokio::test]
    async fn changes_after_pages_and_trim() {
        let fx = fixture();
        let ops: Vec<WriteOp> = (1..=25).map(|i| part_op(i, "x".into(), Precondition::CreateOnly)).collect();
        fx.app.write(&parts(), &ops).await.unwrap();
        let mut after = 0;
        let mut seqs = Vec::new();
        loop {
            let page = fx.app.changes_after(after, 10).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 10);
            after = page.last().unwrap().seq;
            seqs.extend(page.iter().map(|c| c.seq));
        }
        assert_eq!(seqs, (1..=25).collect::<Vec<u64>>());
        assert_eq!(fx.app.trim_changes(20).unwrap(), 20);
        let rest = fx.app.changes_after(0, 100).await.unwrap();
        assert_eq!(rest.first().map(|c| c.seq), Some(21));
        // Seqs are not reused after a trim.
        fx.app.trim_changes(u64::MAX).unwrap();
        fx.app.write(&parts(), &[part_op(99, "x".into(), Precondition::CreateOnly)]).await.unwrap();
        assert_eq!(fx.app.changes_after(0, 100).await.unwrap()[0].seq, 26);
    }

    #[tokio::test]
    async fn unknown_table_or_column_is_a_clear_rejection() {
        let fx = fixture();
        let mut entity = parts();
        entity.fields.push("colour".into());
        let err = fx.app.read(&entity, &[key(&["1"])]).await.unwrap_err();
        let ConnectorError::Rejected { app, message } = &err else { panic!("{err:?}") };
        assert_eq!(app, "local");
        assert!(message.contains("`parts`") && message.contains("`colour`"), "{message}");
        assert!(err.to_string().starts_with("local: "), "{err}");

        let op = WriteOp {
            key: key(&["1"]),
            fields: fields(&[("label", "a".into()), ("colour", "red".into())]),
            precondition: Precondition::CreateOnly,
        };
        let err = fx.app.write(&parts(), &[op]).await.unwrap_err();
        assert!(matches!(&err, ConnectorError::Rejected { message, .. } if message.contains("`colour`")));

        let mut entity = parts();
        entity.name = "nope".into();
        let err = fx.app.list(&entity, None, 10).await.unwrap_err();
        assert!(matches!(&err, ConnectorError::Rejected { message, .. } if message.contains("`nope`")));
        let err = fx
            .app
            .install_capture(&[CaptureSpec {
                entity: "parts".into(),
                key_fields: vec!["ident".into()],
                company_field: None,
            }])
            .unwrap_err();
        assert!(matches!(&err, ConnectorError::Rejected { message, .. } if message.contains("`ident`")));
    }

    #[test]
    fn key_text_is_canonical() {
        assert_eq!(key_text(&ValueRef::Text(b"007")), Some("007".into()));
        assert_eq!(key_text(&ValueRef::Integer(-42)), Some("-42".into()));
        assert_eq!(key_text(&ValueRef::Real(3.0)), Some("3".into()));
        assert_eq!(key_text(&ValueRef::Real(2.5)), Some("2.5".into()));
        assert_eq!(key_text(&ValueRef::Real(0.1 + 0.2)), Some("0.30000000000000004".into()));
        assert_eq!(key_text(&ValueRef::Real(f64::INFINITY)), None);
        assert_eq!(key_text(&ValueRef::Null), None);
    }

    #[tokio::test]
    async fn real_keys_match_between_the_log_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        Connection::open(&path).unwrap().execute_batch("CREATE TABLE r (k REAL PRIMARY KEY, v TEXT)").unwrap();
        let app = SqliteApp::open("local", &path).unwrap();
        app.install_capture(&[CaptureSpec { entity: "r".into(), key_fields: vec!["k".into()], company_field: None }])
            .unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "INSERT INTO r (k, v) VALUES (?1, 'a'), (3.0, 'b'), (1e300, 'c'), (0.1, 'd'), \
             (-1e-7, 'e'), (9e999, 'not a key')",
            [0.1 + 0.2],
        )
        .unwrap();
        let entity =
            EntitySpec { name: "r".into(), key_fields: vec!["k".into()], fields: vec!["v".into()], binds: vec![] };
        let changes = app.changes_after(0, 10).await.unwrap();
        let keys: Vec<Key> = changes.into_iter().map(|c| c.key).collect();
        let listed: Vec<Key> = app.list(&entity, None, 10).await.unwrap().records.into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys.len(), 5, "the infinite key is not logged");
        assert_eq!(keys[0], key(&["0.30000000000000004"]));
        assert_eq!(keys[1], key(&["3"]));
        assert_eq!(keys[3], key(&["0.1"]));
        let mut sorted = keys.clone();
        sorted.sort_by(|a, b| a.0[0].parse::<f64>().unwrap().total_cmp(&b.0[0].parse().unwrap()));
        assert_eq!(listed, sorted, "the log's key text is key_text's");
        let read = app.read(&entity, &keys).await.unwrap();
        assert!(read.iter().all(Option::is_some), "{keys:?}");
    }

    #[test]
    fn busy_is_transient() {
        let busy = rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_BUSY), None);
        assert!(matches!(op_failure("t", &key(&["1"]), &busy), WriteFailure::Transient { .. }));
        let notnull = rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_CONSTRAINT_NOTNULL),
            Some("NOT NULL constraint failed: t.v".into()),
        );
        assert_eq!(
            op_failure("t", &key(&["1"]), &notnull),
            WriteFailure::Rejected("t 1: NOT NULL constraint failed on t.v".into())
        );
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(literal("it's"), "'it''s'");
    }

    #[tokio::test]
    async fn odd_identifiers_work() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE \"my \"\"odd\"\" table\" (\"the key\" TEXT PRIMARY KEY, \"it's\" TEXT)")
            .unwrap();
        let app = SqliteApp::open("local", &path).unwrap();
        let name = "my \"odd\" table".to_string();
        app.install_capture(&[CaptureSpec {
            entity: name.clone(),
            key_fields: vec!["the key".into()],
            company_field: None,
        }])
        .unwrap();
        let entity =
            EntitySpec { name, key_fields: vec!["the key".into()], fields: vec!["it's".into()], binds: vec![] };
        let op = WriteOp {
            key: key(&["k1"]),
            fields: fields(&[("it's", "v".into())]),
            precondition: Precondition::CreateOnly,
        };
        assert_eq!(app.write(&entity, &[op]).await.unwrap()[0], Ok("1".into()));
        let changes = app.changes_after(0, 10).await.unwrap();
        assert_eq!(changes[0].entity, entity.name);
        assert_eq!(app.read(&entity, &[key(&["k1"])]).await.unwrap()[0].as_ref().unwrap().fields["it's"], "v");
    }

    /// Prints the time of a 500-key read and 500-op writes (no timed assertion).
    #[tokio::test]
    async fn batch_timings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE customers (id INTEGER PRIMARY KEY, company TEXT NOT NULL, \
                 name TEXT NOT NULL, email TEXT, city TEXT, balance REAL, active INTEGER)",
            )
            .unwrap();
        let app = SqliteApp::open("local", &path).unwrap();
        app.install_capture(&[CaptureSpec {
            entity: "customers".into(),
            key_fields: vec!["id".into()],
            company_field: Some("company".into()),
        }])
        .unwrap();
        let entity = EntitySpec {
            name: "customers".into(),
            key_fields: vec!["id".into()],
            fields: ["id", "company", "name", "email", "city", "balance", "active"].map(String::from).to_vec(),
            binds: vec![],
        };
        let record = |i: i64, n: i64| {
            fields(&[
                ("id", i.into()),
                ("company", "acme".into()),
                ("name", format!("Customer {i} v{n}").into()),
                ("email", format!("c{i}@example.com").into()),
                ("city", "Lisbon".into()),
                ("balance", (i as f64 * 1.5).into()),
                ("active", true.into()),
            ])
        };
        let rounds = 20;
        let (mut create, mut read, mut update) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for round in 0..rounds {
            let ids: Vec<i64> = (round * 500..(round + 1) * 500).collect();
            let keys: Vec<Key> = ids.iter().map(|i| Key(vec![i.to_string()])).collect();
            let ops: Vec<WriteOp> = ids
                .iter()
                .map(|&i| WriteOp {
                    key: Key(vec![i.to_string()]),
                    fields: record(i, 0),
                    precondition: Precondition::CreateOnly,
                })
                .collect();
            let t = Instant::now();
            let out = app.write(&entity, &ops).await.unwrap();
            create += t.elapsed();
            assert!(out.iter().all(Result::is_ok));

            let t = Instant::now();
            let records = app.read(&entity, &keys).await.unwrap();
            read += t.elapsed();
            let ops: Vec<WriteOp> = ids
                .iter()
                .zip(records)
                .map(|(&i, r)| WriteOp {
                    key: Key(vec![i.to_string()]),
                    fields: record(i, 1),
                    precondition: Precondition::IfMatch(r.unwrap().version),
                })
                .collect();
            let t = Instant::now();
            let out = app.write(&entity, &ops).await.unwrap();
            update += t.elapsed();
            assert!(out.iter().all(Result::is_ok));
        }
        let per = |d: Duration| d / rounds as u32;
        eprintln!(
            "sqlite connector, per 500-record batch (mean of {rounds}): create {:?}, read {:?}, \
             update (If-Match) {:?}",
            per(create),
            per(read),
            per(update)
        );
        let t = Instant::now();
        let changes = app.changes_after(0, 20_000).await.unwrap();
        eprintln!("changes_after 20000 rows: {:?}", t.elapsed());
        assert_eq!(changes.len(), 20_000);
        let t = Instant::now();
        let mut after = None;
        let mut n = 0;
        loop {
            let page = app.list(&entity, after.as_deref(), 500).await.unwrap();
            n += page.records.len();
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        eprintln!("list 10000 records in pages of 500: {:?}", t.elapsed());
        assert_eq!(n, 10_000);
    }
}
