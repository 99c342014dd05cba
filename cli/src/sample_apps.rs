//! The demo's two sample apps: an fno-like and a Dataverse-like database with the same business
//! data under different table and field names, and a value map between their customer types
//! and order statuses. The job that pairs them is `examples/sales.yaml`.
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::types::Value as SqlValue;
use rusqlite::Connection;
use serde_json::{json, Value};
use std::path::Path;

use dualsync::adapters::connectors::sqlite::transaction;
use dualsync::domain::job::Side;

pub const COMPANIES: [&str; 2] = ["USMF", "DEMF"];
pub const GROUPS: usize = 10;

const FNO_SCHEMA: &str = "
CREATE TABLE CustCustomerGroup (CustomerGroupId TEXT PRIMARY KEY, Description TEXT);
CREATE TABLE CustomersV3 (
  dataAreaId TEXT NOT NULL, CustomerAccount TEXT NOT NULL, Name TEXT NOT NULL,
  CustomerGroupId TEXT, CreditLimit REAL, CustomerType TEXT,
  PRIMARY KEY (dataAreaId, CustomerAccount));
CREATE TABLE SalesOrderHeadersV2 (
  dataAreaId TEXT NOT NULL, SalesOrderNumber TEXT NOT NULL,
  OrderingCustomerAccountNumber TEXT, OrderStatus TEXT,
  PRIMARY KEY (dataAreaId, SalesOrderNumber));
CREATE TABLE SalesOrderLines (
  dataAreaId TEXT NOT NULL, SalesOrderNumber TEXT NOT NULL, LineNumber INTEGER NOT NULL,
  ItemNumber TEXT, OrderedSalesQuantity REAL, SalesPrice REAL,
  PRIMARY KEY (dataAreaId, SalesOrderNumber, LineNumber));
";

const DATAVERSE_SCHEMA: &str = "
CREATE TABLE msdyn_customergroup (msdyn_groupid TEXT PRIMARY KEY, msdyn_description TEXT);
CREATE TABLE accounts (
  msdyn_company TEXT NOT NULL, accountnumber TEXT NOT NULL, name TEXT NOT NULL,
  msdyn_customergroupid TEXT, creditlimit REAL, customertypecode INTEGER,
  PRIMARY KEY (msdyn_company, accountnumber));
CREATE TABLE salesorders (
  msdyn_company TEXT NOT NULL, ordernumber TEXT NOT NULL, msdyn_customeraccount TEXT,
  statuscode INTEGER, PRIMARY KEY (msdyn_company, ordernumber));
CREATE TABLE salesorderdetails (
  msdyn_company TEXT NOT NULL, msdyn_salesordernumber TEXT NOT NULL, msdyn_linenumber INTEGER NOT NULL,
  msdyn_itemnumber TEXT, quantity REAL, priceperunit REAL,
  PRIMARY KEY (msdyn_company, msdyn_salesordernumber, msdyn_linenumber));
";

pub fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(conn)
}

pub fn create_fno(path: &Path) -> Result<Connection> {
    let conn = open(path)?;
    conn.execute_batch(FNO_SCHEMA).context("creating the fno sample schema")?;
    Ok(conn)
}

pub fn create_dataverse(path: &Path) -> Result<Connection> {
    let conn = open(path)?;
    conn.execute_batch(DATAVERSE_SCHEMA).context("creating the dataverse sample schema")?;
    Ok(conn)
}

pub fn account(i: usize) -> String {
    format!("C{i:06}")
}
pub fn company(i: usize) -> &'static str {
    COMPANIES[i % COMPANIES.len()]
}
pub fn order_number(i: usize) -> String {
    format!("SO{i:06}")
}

/// A record of a demo app: its table (entity set) and fields, in that app's own names.
#[derive(Debug, Clone)]
pub struct Row {
    pub table: &'static str,
    pub fields: Vec<(&'static str, Value)>,
}

impl Row {
    pub fn new(table: &'static str, fields: Vec<(&'static str, Value)>) -> Row {
        Row { table, fields }
    }
}

/// What the fno app holds before the job exists: groups, customers, orders with their lines.
pub fn fno_seed(customers: usize, orders: usize, lines: usize) -> Vec<Row> {
    let mut rng = StdRng::seed_from_u64(7);
    let mut rows = Vec::with_capacity(GROUPS + customers + orders * (1 + lines));
    for g in 0..GROUPS {
        rows.push(Row::new(
            "CustCustomerGroup",
            vec![("CustomerGroupId", json!(format!("G{g:02}"))), ("Description", json!(format!("Customer group {g}")))],
        ));
    }
    for i in 0..customers {
        let kind = if rng.random_bool(0.3) { "Person" } else { "Organization" };
        rows.push(Row::new(
            "CustomersV3",
            vec![
                ("dataAreaId", json!(company(i))),
                ("CustomerAccount", json!(account(i))),
                ("Name", json!(format!("Customer {i}"))),
                ("CustomerGroupId", json!(format!("G{:02}", i % GROUPS))),
                ("CreditLimit", json!((rng.random_range(10..500) * 100) as f64)),
                ("CustomerType", json!(kind)),
            ],
        ));
    }
    for o in 0..orders {
        // Customer i lives in company(i): pick a customer of the order's company.
        let c = (rng.random_range(0..customers / 2)) * 2 + o % 2;
        rows.push(order_header(o, &account(c)));
        for l in 1..=lines {
            let item = format!("ITEM-{:04}", rng.random_range(0..500));
            let quantity = rng.random_range(1..20) as f64;
            let price = rng.random_range(100..10000) as f64 / 100.0;
            rows.push(order_line(o, l as i64, &item, quantity, price));
        }
    }
    rows
}

/// An fno sales order header of company(o), backordered.
pub fn order_header(o: usize, customer: &str) -> Row {
    Row::new(
        "SalesOrderHeadersV2",
        vec![
            ("dataAreaId", json!(company(o))),
            ("SalesOrderNumber", json!(order_number(o))),
            ("OrderingCustomerAccountNumber", json!(customer)),
            ("OrderStatus", json!("Backorder")),
        ],
    )
}

/// An fno sales order line.
pub fn order_line(o: usize, line: i64, item: &str, quantity: f64, price: f64) -> Row {
    Row::new(
        "SalesOrderLines",
        vec![
            ("dataAreaId", json!(company(o))),
            ("SalesOrderNumber", json!(order_number(o))),
            ("LineNumber", json!(line)),
            ("ItemNumber", json!(item)),
            ("OrderedSalesQuantity", json!(quantity)),
            ("SalesPrice", json!(price)),
        ],
    )
}

/// A Dataverse account.
pub fn dataverse_account(
    company: &str,
    account: &str,
    name: &str,
    group: &str,
    credit_limit: f64,
    type_code: i64,
) -> Row {
    Row::new(
        "accounts",
        vec![
            ("msdyn_company", json!(company)),
            ("accountnumber", json!(account)),
            ("name", json!(name)),
            ("msdyn_customergroupid", json!(group)),
            ("creditlimit", json!(credit_limit)),
            ("customertypecode", json!(type_code)),
        ],
    )
}

/// Accounts that exist only in Dataverse before the job starts: the initial sync brings them
/// to fno.
pub fn dataverse_seed(from: usize, count: usize) -> Vec<Row> {
    (from..from + count)
        .map(|i| dataverse_account(company(i), &account(i), &format!("Account {i}"), "G01", 5000.0, 2))
        .collect()
}

/// The key fields of customer `i` in the app on `side` (fno, Dataverse).
pub fn customer_key(side: Side, i: usize) -> Vec<(&'static str, Value)> {
    let [company_field, account_field] = match side {
        Side::A => ["dataAreaId", "CustomerAccount"],
        Side::B => ["msdyn_company", "accountnumber"],
    };
    vec![(company_field, json!(company(i))), (account_field, json!(account(i)))]
}

/// Loads `rows` into a sqlite app in one transaction (before the job exists: no capture).
pub fn load(conn: &mut Connection, rows: &[Row], mut progress: impl FnMut(usize)) -> Result<()> {
    let tx = conn.transaction()?;
    for (n, row) in rows.iter().enumerate() {
        insert(&tx, row)?;
        if n % 1000 == 0 {
            progress(n);
        }
    }
    tx.commit()?;
    Ok(())
}

/// `INSERT` of a row (statements cached per table and field list).
pub fn insert(conn: &Connection, row: &Row) -> rusqlite::Result<()> {
    let names: Vec<&str> = row.fields.iter().map(|(f, _)| *f).collect();
    let marks: Vec<String> = (1..=names.len()).map(|i| format!("?{i}")).collect();
    let sql = format!("INSERT INTO {} ({}) VALUES ({})", row.table, names.join(", "), marks.join(", "));
    let values: Vec<SqlValue> = row.fields.iter().map(|(_, v)| sql_value(v)).collect();
    conn.prepare_cached(&sql)?.execute(rusqlite::params_from_iter(values))?;
    Ok(())
}

/// A JSON value as the SQLite value the sample apps store.
pub fn sql_value(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(*b as i64),
        Value::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

/// A SQLite value as JSON.
pub fn json_value(v: SqlValue) -> Value {
    match v {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(i) => json!(i),
        SqlValue::Real(f) => json!(f),
        SqlValue::Text(s) => json!(s),
        SqlValue::Blob(b) => json!(format!("{} bytes", b.len())),
    }
}

/// An app transaction that dualsync captures as one: all `statements` commit together.
pub fn in_transaction(
    conn: &mut Connection,
    txid: &str,
    f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()>,
) -> Result<()> {
    transaction(conn, txid, f).with_context(|| format!("app transaction {txid}"))
}
