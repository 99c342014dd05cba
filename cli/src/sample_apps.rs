//! The demo's two sample apps: an fno-like and a Dataverse-like database with the same business
//! data under different table and field names, and a value map between their customer types
//! and order statuses. The job that pairs them is `examples/sales.yaml`.
use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection};
use std::path::Path;

use dualsync::adapters::connectors::sqlite::transaction;

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

/// Loads the fno app before the job exists: groups, customers, orders with their lines.
pub fn seed_fno(
    conn: &mut Connection,
    customers: usize,
    orders: usize,
    lines: usize,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(7);
    let tx = conn.transaction()?;
    for g in 0..GROUPS {
        tx.execute(
            "INSERT INTO CustCustomerGroup VALUES (?1, ?2)",
            params![format!("G{g:02}"), format!("Customer group {g}")],
        )?;
    }
    {
        let mut ins = tx.prepare("INSERT INTO CustomersV3 VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for i in 0..customers {
            let kind = if rng.random_bool(0.3) { "Person" } else { "Organization" };
            ins.execute(params![
                company(i),
                account(i),
                format!("Customer {i}"),
                format!("G{:02}", i % GROUPS),
                (rng.random_range(10..500) * 100) as f64,
                kind
            ])?;
            if i % 1000 == 0 {
                progress(i);
            }
        }
        let mut head = tx.prepare("INSERT INTO SalesOrderHeadersV2 VALUES (?1, ?2, ?3, ?4)")?;
        let mut line = tx.prepare("INSERT INTO SalesOrderLines VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for o in 0..orders {
            // Customer i lives in company(i): pick a customer of the order's company.
            let c = (rng.random_range(0..customers / 2)) * 2 + o % 2;
            head.execute(params![company(o), order_number(o), account(c), "Backorder"])?;
            for l in 1..=lines {
                line.execute(params![
                    company(o),
                    order_number(o),
                    l as i64,
                    format!("ITEM-{:04}", rng.random_range(0..500)),
                    rng.random_range(1..20) as f64,
                    rng.random_range(100..10000) as f64 / 100.0
                ])?;
            }
            if o % 200 == 0 {
                progress(customers + o);
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Accounts that exist only in Dataverse before the job starts: the initial sync brings them
/// to fno.
pub fn seed_dataverse(conn: &mut Connection, from: usize, count: usize) -> Result<()> {
    let tx = conn.transaction()?;
    for i in from..from + count {
        tx.execute(
            "INSERT INTO accounts VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![company(i), account(i), format!("Account {i}"), "G01", 5000.0, 2],
        )?;
    }
    tx.commit()?;
    Ok(())
}

/// An app transaction that dualsync captures as one: all `statements` commit together.
pub fn in_transaction(
    conn: &mut Connection,
    txid: &str,
    f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()>,
) -> Result<()> {
    transaction(conn, txid, f).with_context(|| format!("app transaction {txid}"))
}
