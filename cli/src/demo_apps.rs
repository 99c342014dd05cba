//! The demo's two apps, whatever they are: two sqlite sample databases (`--apps sqlite`), or two
//! OData sample services in this process (`--apps odata`: fno flavor and Dataverse flavor). The
//! scenario in `demo.rs` is written once over [`DemoApps`]: load, point the job at them, edit
//! as their users in transactions, read a field back.
//!
//! With OData apps, changes reach the pipeline as the real apps send them: fno's data events
//! are POSTed to the demo's own ingress route (`/ingress/sales/fno/fno`, behind a header key),
//! and Dataverse's changes are polled by change tracking (`capture: change_tracking`).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use rusqlite::Connection;
use serde_json::{Map, Value};

use dualsync::domain::config::JobDef;
use dualsync::domain::job::{AuthSpec, Flavor, IngressAuth, IngressSpec, Side};
use odata_sample::{EventKey, Kind, Options, Server, Subscription};

use crate::pipeline::Pipeline;
use crate::sample_apps::{self as apps, json_value, sql_value, Row};

/// A user's change to one record, in the app's own names.
#[derive(Debug, Clone)]
pub enum Edit {
    Insert(Row),
    /// The record with these key fields gets the other fields' values.
    Update {
        table: &'static str,
        key: Vec<(&'static str, Value)>,
        set: Vec<(&'static str, Value)>,
    },
    Delete {
        table: &'static str,
        key: Vec<(&'static str, Value)>,
    },
}

/// What the scenario does with the two apps (fno is side A, Dataverse side B).
pub trait DemoApps {
    /// Where the apps are, for the first line of output.
    fn describe(&self) -> String;
    /// Loads records before the job exists (no capture, no events).
    async fn load(&self, side: Side, rows: Vec<Row>, progress: &(dyn Fn(usize) + Sync)) -> Result<()>;
    /// Points the job of `examples/sales.yaml` at these apps.
    fn point(&self, def: &mut JobDef);
    /// Connects the apps' change capture to the started pipeline (ingress routes, event
    /// subscriptions); the sqlite apps' triggers need nothing more.
    async fn connect(&self, rt: &Pipeline) -> Result<()>;
    /// Edits made by the app's user in one transaction.
    async fn edit(&self, side: Side, txid: &str, edits: Vec<Edit>) -> Result<()>;
    /// Returns once what the apps send of their own accord (events) has reached the pipeline.
    async fn sent(&self) -> Result<()>;
    /// How the apps' changes came, when there is something to say.
    fn capture_report(&self) -> Option<String>;
    /// A field of the record with these key fields: `None` when there is no such record.
    async fn field(&self, side: Side, table: &str, key: &[(&str, Value)], field: &str) -> Result<Option<Value>>;
}

/// Two sqlite sample databases in the demo's folder.
pub struct SqliteApps {
    paths: [PathBuf; 2],
    conns: [Arc<Mutex<Connection>>; 2],
}

impl SqliteApps {
    pub fn create(dir: &Path) -> Result<SqliteApps> {
        let paths = [dir.join("fno.db"), dir.join("dataverse.db")];
        let conns = [apps::create_fno(&paths[0])?, apps::create_dataverse(&paths[1])?];
        Ok(SqliteApps { paths, conns: conns.map(|c| Arc::new(Mutex::new(c))) })
    }

    /// Runs `f` on the side's connection off the async workers (SQLite waits on its locks).
    async fn with<T: Send + 'static>(
        &self,
        side: Side,
        f: impl FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conns[side.index()].clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().unwrap_or_else(|e| e.into_inner()))).await?
    }
}

impl DemoApps for SqliteApps {
    fn describe(&self) -> String {
        format!("sqlite sample apps {} and {}", self.paths[0].display(), self.paths[1].display())
    }

    async fn load(&self, side: Side, rows: Vec<Row>, progress: &(dyn Fn(usize) + Sync)) -> Result<()> {
        let mut conn = self.conns[side.index()].lock().unwrap_or_else(|e| e.into_inner());
        apps::load(&mut conn, &rows, progress)
    }

    fn point(&self, def: &mut JobDef) {
        for (app, path) in def.apps.iter_mut().zip(&self.paths) {
            app.path = Some(path.display().to_string());
        }
    }

    async fn connect(&self, _rt: &Pipeline) -> Result<()> {
        Ok(())
    }

    async fn edit(&self, side: Side, txid: &str, edits: Vec<Edit>) -> Result<()> {
        let txid = txid.to_string();
        self.with(side, move |conn| {
            apps::in_transaction(conn, &txid, |tx| edits.iter().try_for_each(|e| sql_edit(tx, e)))
        })
        .await
    }

    async fn sent(&self) -> Result<()> {
        Ok(())
    }

    fn capture_report(&self) -> Option<String> {
        None
    }

    async fn field(&self, side: Side, table: &str, key: &[(&str, Value)], field: &str) -> Result<Option<Value>> {
        let (w, values) = where_key(key);
        let sql = format!("SELECT {field} FROM {table} WHERE {w}");
        self.with(side, move |conn| {
            let mut stmt = conn.prepare(&sql)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(values))?;
            Ok(match rows.next()? {
                Some(r) => Some(json_value(r.get(0)?)),
                None => None,
            })
        })
        .await
    }
}

/// `a = ?1 AND b = ?2` and the key's values.
fn where_key(key: &[(&str, Value)]) -> (String, Vec<rusqlite::types::Value>) {
    let w: Vec<String> = key.iter().enumerate().map(|(i, (f, _))| format!("{f} = ?{}", i + 1)).collect();
    (w.join(" AND "), key.iter().map(|(_, v)| sql_value(v)).collect())
}

fn sql_edit(tx: &rusqlite::Transaction, edit: &Edit) -> rusqlite::Result<()> {
    match edit {
        Edit::Insert(row) => apps::insert(tx, row),
        Edit::Update { table, key, set } => {
            let (w, key_values) = where_key(key);
            // The SET values are numbered after the key's.
            let sets: Vec<String> =
                set.iter().enumerate().map(|(i, (f, _))| format!("{f} = ?{}", key.len() + i + 1)).collect();
            let mut values = key_values;
            values.extend(set.iter().map(|(_, v)| sql_value(v)));
            let sql = format!("UPDATE {table} SET {} WHERE {w}", sets.join(", "));
            tx.execute(&sql, rusqlite::params_from_iter(values)).map(|_| ())
        }
        Edit::Delete { table, key } => {
            let (w, values) = where_key(key);
            tx.execute(&format!("DELETE FROM {table} WHERE {w}"), rusqlite::params_from_iter(values)).map(|_| ())
        }
    }
}

/// The environment variable name the job file gives fno's ingress key (the demo hands the
/// ingress handler the key itself: nothing is read from the environment).
const FNO_KEY_ENV: &str = "DEMO_FNO_INGRESS_KEY";
const FNO_KEY_HEADER: &str = "x-fno-key";

/// Two OData sample services on loopback ports: fno and Dataverse flavors.
pub struct OdataApps {
    fno: Server,
    dataverse: Server,
    /// fno's ingress key, fresh each run.
    key: String,
    /// The demo's ingress server, while the pipeline runs.
    ingress: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for OdataApps {
    fn drop(&mut self) {
        if let Some(task) = self.ingress.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

impl OdataApps {
    pub async fn start() -> Result<OdataApps> {
        let fno = Server::start(Kind::Fno, Options::default()).await;
        fno.add_set("CustCustomerGroup", &["CustomerGroupId"], None);
        fno.add_set("CustomersV3", &["dataAreaId", "CustomerAccount"], None);
        fno.add_set("SalesOrderHeadersV2", &["dataAreaId", "SalesOrderNumber"], None);
        fno.add_set("SalesOrderLines", &["dataAreaId", "SalesOrderNumber", "LineNumber"], None);
        let dataverse = Server::start(Kind::Dataverse, Options::default()).await;
        dataverse.add_set("msdyn_customergroup", &["msdyn_groupid"], Some("msdyn_customergroupid"));
        dataverse.add_set("accounts", &["msdyn_company", "accountnumber"], Some("accountid"));
        dataverse.add_set("salesorders", &["msdyn_company", "ordernumber"], Some("salesorderid"));
        dataverse.add_set(
            "salesorderdetails",
            &["msdyn_company", "msdyn_salesordernumber", "msdyn_linenumber"],
            Some("salesorderdetailid"),
        );
        let key = format!("{}", uuid::Uuid::new_v4().simple());
        Ok(OdataApps { fno, dataverse, key, ingress: Mutex::new(None) })
    }

    fn server(&self, side: Side) -> &Server {
        match side {
            Side::A => &self.fno,
            Side::B => &self.dataverse,
        }
    }
}

/// A row as the record JSON a user's form would save.
fn record(fields: &[(&'static str, Value)]) -> Value {
    Value::Object(fields.iter().map(|(f, v)| (f.to_string(), v.clone())).collect::<Map<_, _>>())
}

impl DemoApps for OdataApps {
    fn describe(&self) -> String {
        format!("OData sample services: fno at {}, Dataverse at {}", self.fno.url, self.dataverse.url)
    }

    async fn load(&self, side: Side, rows: Vec<Row>, progress: &(dyn Fn(usize) + Sync)) -> Result<()> {
        let server = self.server(side);
        for (n, row) in rows.iter().enumerate() {
            server.put(row.table, record(&row.fields));
            if n % 1000 == 0 {
                progress(n);
            }
        }
        Ok(())
    }

    fn point(&self, def: &mut JobDef) {
        for (app, (server, flavor)) in
            def.apps.iter_mut().zip([(&self.fno, Flavor::Fno), (&self.dataverse, Flavor::Dataverse)])
        {
            app.connector = "odata".into();
            app.path = None;
            app.url = Some(server.url.clone());
            app.flavor = Some(flavor);
            app.auth = Some(AuthSpec::None);
        }
        // fno sends data events to the demo's ingress route; Dataverse is polled every second.
        def.apps[0].ingress = Some(IngressSpec {
            auth: IngressAuth::HttpHeader { name: FNO_KEY_HEADER.into(), key_env: FNO_KEY_ENV.into() },
            own_user_id: None,
        });
        def.apps[1].capture = Some("change_tracking".into());
        def.apps[1].poll_seconds = Some(1);
    }

    async fn connect(&self, rt: &Pipeline) -> Result<()> {
        let Some(ingress) = rt.ingress() else {
            bail!("--apps odata runs on the local backend only: its apps listen on this machine's loopback")
        };
        let key = self.key.clone();
        let ingress = ingress.with_env(Arc::new(move |name| (name == FNO_KEY_ENV).then(|| key.clone())));
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.context("listening for the ingress routes")?;
        let addr = listener.local_addr()?;
        let router = dualsync_ingress::router(Arc::new(ingress));
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "demo ingress server");
            }
        });
        *self.ingress.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        self.fno.subscribe(Subscription {
            url: format!("http://{addr}/ingress/sales/fno/fno"),
            key: EventKey::Header { name: FNO_KEY_HEADER.into(), value: self.key.clone() },
        });
        Ok(())
    }

    async fn edit(&self, side: Side, _txid: &str, edits: Vec<Edit>) -> Result<()> {
        let server = self.server(side);
        // Refused before anything is applied: a record the edit names must exist.
        for e in &edits {
            if let Edit::Update { table, key, .. } | Edit::Delete { table, key } = e {
                let values: Vec<Value> = key.iter().map(|(_, v)| v.clone()).collect();
                if server.get(table, &values).is_none() {
                    bail!("{table}: no record with key {}", key_text(key));
                }
            }
        }
        // The edits of the other app go on meanwhile, as its users' would.
        tokio::task::yield_now().await;
        server.user_transaction(|tx| {
            for e in edits {
                match e {
                    Edit::Insert(row) => tx.put(row.table, record(&row.fields)),
                    Edit::Update { table, mut key, set } => {
                        key.extend(set);
                        tx.put(table, record(&key));
                    }
                    Edit::Delete { table, key } => {
                        tx.delete(table, &key.into_iter().map(|(_, v)| v).collect::<Vec<_>>());
                    }
                }
            }
        });
        Ok(())
    }

    async fn sent(&self) -> Result<()> {
        for side in Side::BOTH {
            let server = self.server(side);
            server.events_delivered().await;
            let failed = server.event_failures();
            if !failed.is_empty() {
                let app = ["fno", "dataverse"][side.index()];
                bail!("{} of {app}'s events were not delivered: {}", failed.len(), failed.join("; "));
            }
        }
        Ok(())
    }

    fn capture_report(&self) -> Option<String> {
        Some(format!(
            "capture: {} fno data events POSTed to the ingress route, Dataverse by change tracking",
            self.fno.events_sent()
        ))
    }

    async fn field(&self, side: Side, table: &str, key: &[(&str, Value)], field: &str) -> Result<Option<Value>> {
        let values: Vec<Value> = key.iter().map(|(_, v)| v.clone()).collect();
        Ok(self
            .server(side)
            .get(table, &values)
            .map(|props| props.get(field).and_then(|raw| serde_json::from_str(raw).ok()).unwrap_or(Value::Null)))
    }
}

/// `C000003/USMF`-like text of a key, for messages.
fn key_text(key: &[(&str, Value)]) -> String {
    key.iter().map(|(_, v)| v.as_str().map_or_else(|| v.to_string(), str::to_string)).collect::<Vec<_>>().join("/")
}
