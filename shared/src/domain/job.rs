//! The compiled integration job (validated from a [`super::config::JobDef`]) and its status.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;

/// One of the job's two apps, by position in the job definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    pub fn index(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
    pub const BOTH: [Side; 2] = [Side::A, Side::B];
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Async,
    Live,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "connector", rename_all = "lowercase")]
pub enum ConnectorSpec {
    /// A local app database: a file path (relative paths resolve against the job file's folder).
    Sqlite { path: String },
    /// An OData v4 service (Dataverse Web API, fno data entities). Boxed: its spec is many times
    /// the size of a path.
    Odata(Box<OdataSpec>),
}

/// Which OData service an `odata` app is: where Dataverse and fno differ from plain OData v4
/// (how a create is made exclusive, company scope, which key values a URL can carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    /// Dataverse Web API v9.2: alternate keys, upsert by key with `If-None-Match: *`.
    Dataverse,
    /// finance and operations data entities: keys with `dataAreaId`, `cross-company=true`.
    Fno,
    /// Any OData v4 service.
    Generic,
}

/// How an odata app's `$batch` requests are written: multipart (OData 4.0, every service) or
/// JSON (OData 4.01, services that say they take it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchFormat {
    #[default]
    Multipart,
    Json,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::Dataverse => "dataverse",
            Flavor::Fno => "fno",
            Flavor::Generic => "generic",
        }
    }
}

/// How an `odata` app authenticates. Secrets are named (where to read them), never written in
/// the job file: see [`SecretRef`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthSpec {
    /// OAuth2 client credentials (Microsoft Entra ID): the token endpoint is the tenant's
    /// (`https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token`) unless `token_url` says.
    ClientCredentials {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tenant: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_url: Option<String>,
        /// The application (client) id, or the variable that holds it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id_env: Option<String>,
        /// Where the client secret is (one of this and `client_secret_env`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_secret: Option<SecretRef>,
        /// The first form, kept for job files written before `client_secret`: the same as
        /// `client_secret: { env: NAME }`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_secret_env: Option<String>,
        /// Defaults to `<origin of url>/.default`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
    },
    /// HTTP basic: the user name as written or from a variable, the password from a secret.
    Basic {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username_env: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<SecretRef>,
        /// As `password: { env: NAME }`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_env: Option<String>,
    },
    /// A bearer token taken as it is from a secret.
    Bearer {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<SecretRef>,
        /// As `token: { env: NAME }`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token_env: Option<String>,
    },
    /// No authentication (test servers).
    None,
}

impl AuthSpec {
    /// The job-file key of the secret (`client_secret`, `password`, `token`) and where it is,
    /// whichever of the two forms the file used; `None` without a secret (or before validation).
    pub fn secret(&self) -> Option<(&'static str, SecretRef)> {
        let pick = |key: &'static str, r: &Option<SecretRef>, env: &Option<String>| {
            let r = r.clone().or_else(|| env.clone().map(SecretRef::env))?;
            Some((key, r))
        };
        match self {
            AuthSpec::ClientCredentials { client_secret, client_secret_env, .. } => {
                pick("client_secret", client_secret, client_secret_env)
            }
            AuthSpec::Basic { password, password_env, .. } => pick("password", password, password_env),
            AuthSpec::Bearer { token, token_env } => pick("token", token, token_env),
            AuthSpec::None => None,
        }
    }
}

/// Where a secret of an app's auth is read: an environment variable, a Secrets Manager secret
/// (name or ARN) or an SSM parameter (name or ARN; a SecureString is decrypted), or an
/// environment variable with a store behind it: `{ env: DV_SECRET, secrets_manager: dv }`
/// reads the variable where it is set (a developer's machine) and the store where it is not (a
/// Lambda function), so one job file serves both. The value itself is never in the job file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_manager: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm: Option<String>,
}

/// A secret kept in an AWS store, by the id the job file gives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StoredSecret {
    SecretsManager(String),
    Ssm(String),
}

impl std::fmt::Display for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredSecret::SecretsManager(id) => write!(f, "Secrets Manager secret '{id}'"),
            StoredSecret::Ssm(name) => write!(f, "SSM parameter '{name}'"),
        }
    }
}

impl SecretRef {
    /// A secret in the environment variable `name`.
    pub fn env(name: impl Into<String>) -> SecretRef {
        SecretRef { env: Some(name.into()), ..Default::default() }
    }

    /// The store behind the reference, if any (validation allows one at most).
    pub fn store(&self) -> Option<StoredSecret> {
        match (&self.secrets_manager, &self.ssm) {
            (Some(id), _) => Some(StoredSecret::SecretsManager(id.clone())),
            (None, Some(name)) => Some(StoredSecret::Ssm(name.clone())),
            (None, None) => None,
        }
    }
}

/// Names where the secret is read, for messages: `environment variable DV_SECRET or Secrets
/// Manager secret 'dv'`.
impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.env, self.store()) {
            (Some(v), Some(s)) => write!(f, "environment variable {v} or {s}"),
            (Some(v), None) => write!(f, "environment variable {v}"),
            (None, Some(s)) => write!(f, "{s}"),
            (None, None) => f.write_str("no secret source"),
        }
    }
}

/// An `odata` app: the service root and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OdataSpec {
    /// The service root, like `https://org.crm.dynamics.com/api/data/v9.2/`.
    pub url: String,
    pub flavor: Flavor,
    pub auth: AuthSpec,
    /// Operations per `$batch` request.
    pub batch_size: usize,
    pub batch_format: BatchFormat,
    /// Requests in flight at most (the adaptive limiter never goes above it).
    pub max_concurrency: usize,
    /// Records per page asked with `Prefer: odata.maxpagesize`.
    pub page_size: usize,
}

impl OdataSpec {
    pub const DEFAULT_BATCH_SIZE: usize = 100;
    /// Dataverse allows 1,000 operations in one `$batch`.
    pub const MAX_BATCH_SIZE: usize = 1000;
    pub const DEFAULT_PAGE_SIZE: usize = 500;

    /// Dataverse's service protection allows 52 concurrent requests per user; the others get a
    /// cautious default the limiter ramps within.
    pub fn default_concurrency(flavor: Flavor) -> usize {
        match flavor {
            Flavor::Dataverse => 52,
            Flavor::Fno | Flavor::Generic => 16,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct App {
    pub name: String,
    pub connector: ConnectorSpec,
    /// How the app pushes its change events to dualsync's ingress, if it does.
    pub ingress: Option<IngressSpec>,
    /// Set when dualsync polls the app's changes itself (odata change tracking).
    pub tracking: Option<Tracking>,
}

/// An app that pushes its change events (a Dataverse webhook, fno business or data events, the
/// project's own notification) to `POST /ingress/{job}/{app}/{source}`: how the sender proves
/// who it is, and which user is dualsync itself in that app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressSpec {
    pub auth: IngressAuth,
    /// dualsync's own application user in the app (Dataverse `InitiatingUserId`, fno
    /// `InitiatingUserAADObjectId`): events it caused are echoes of dualsync's writes, skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_user_id: Option<String>,
}

/// How a pushed event is authenticated, as Dataverse's webhook registration offers it. The key
/// is named by environment variable, never written in the job file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IngressAuth {
    /// Dataverse `WebhookKey`: the key in the query string as `code=<key>`.
    WebhookKey { key_env: String },
    /// Dataverse `HttpHeader`: the key as the value of the header `name`.
    HttpHeader { name: String, key_env: String },
    /// Dataverse `HttpQueryString`: the key as the value of the query parameter `name`.
    HttpQueryString { name: String, key_env: String },
}

impl IngressAuth {
    /// The environment variable holding the expected key.
    pub fn key_env(&self) -> &str {
        match self {
            IngressAuth::WebhookKey { key_env }
            | IngressAuth::HttpHeader { key_env, .. }
            | IngressAuth::HttpQueryString { key_env, .. } => key_env,
        }
    }
}

/// Change tracking of an odata app: every map of the app is polled by delta links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    pub poll_seconds: u64,
}

impl Tracking {
    pub const DEFAULT_POLL_SECONDS: u64 = 30;
    /// A day: Dataverse keeps changes for days (`ExpireChangeTrackingInDays`, 7 by default).
    pub const MAX_POLL_SECONDS: u64 = 86_400;
}

/// A value map between the two apps' value spaces. Side A's values are the canonical space.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValueMap {
    /// (A value, B value) pairs, both normalized.
    pub pairs: Vec<(Value, Value)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FieldMap {
    /// Field name on side A and on side B.
    pub names: [String; 2],
    pub values: Option<ValueMap>,
}

/// A field (or fields) of this map that hold another map's integration key: a dependency.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// Index of the referenced map in [`Job::maps`].
    pub map: usize,
    /// Field names on A and B, in the referenced map's key-pair order.
    pub fields: Vec<[String; 2]>,
    /// Per side, the navigation property the lookup is read and written through (an odata
    /// app's `<navigation>@odata.bind`); `None` where the fields are plain columns.
    pub bind: [Option<String>; 2],
}

#[derive(Debug, Clone, PartialEq)]
pub struct TableMap {
    pub name: String,
    pub group: String,
    /// Position of the table group in the job: groups deliver in this order.
    pub group_index: usize,
    pub sequence: u32,
    pub entity: [String; 2],
    pub keys: Vec<[String; 2]>,
    pub fields: Vec<FieldMap>,
    pub lookups: Vec<Lookup>,
    pub company: Option<[String; 2]>,
    pub mode: Mode,
    /// Per side, the names the app's pushed events give this map's entity besides its own
    /// (a Dataverse logical name, an fno business event id).
    pub event_names: [Vec<String>; 2],
}

impl TableMap {
    pub fn entity(&self, side: Side) -> &str {
        &self.entity[side.index()]
    }
    pub fn key_fields(&self, side: Side) -> Vec<String> {
        self.keys.iter().map(|k| k[side.index()].clone()).collect()
    }
    /// Every field dualsync reads on `side`: keys, mapped fields and the company field.
    pub fn read_fields(&self, side: Side) -> Vec<String> {
        let i = side.index();
        let mut out: Vec<String> = self.keys.iter().map(|k| k[i].clone()).collect();
        for f in &self.fields {
            if !out.contains(&f.names[i]) {
                out.push(f.names[i].clone());
            }
        }
        if let Some(c) = &self.company {
            if !out.contains(&c[i]) {
                out.push(c[i].clone());
            }
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub name: String,
    pub apps: [App; 2],
    /// The app that wins conflicts.
    pub primary: Side,
    /// Companies (legal entities) in scope; empty means all.
    pub companies: Vec<String>,
    /// Table maps in delivery order: table group, then sequence.
    pub maps: Vec<TableMap>,
    /// Pauses the job after this many application errors in a time window.
    pub alert: Option<AlertRule>,
}

/// An alert rule: pause the job when `application_errors` new application errors are first
/// seen within `minutes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    pub application_errors: u32,
    pub minutes: u32,
}

impl Job {
    pub fn side_of(&self, app: &str) -> Option<Side> {
        Side::BOTH.into_iter().find(|s| self.apps[s.index()].name == app)
    }
    pub fn app_name(&self, side: Side) -> &str {
        &self.apps[side.index()].name
    }
    pub fn map(&self, name: &str) -> Option<(usize, &TableMap)> {
        self.maps.iter().enumerate().find(|(_, m)| m.name == name)
    }
    /// The map that pairs `entity` of `side`, if any.
    pub fn map_for_entity(&self, side: Side, entity: &str) -> Option<(usize, &TableMap)> {
        self.maps.iter().enumerate().find(|(_, m)| m.entity(side) == entity)
    }
    pub fn company_in_scope(&self, company: Option<&str>) -> bool {
        match company {
            _ if self.companies.is_empty() => true,
            Some(c) => self.companies.iter().any(|x| x == c),
            None => true,
        }
    }
}

/// Job status: `stopped → starting → active → stopping → stopped` (DESIGN §1), and
/// `active → paused → resuming → active`: a paused job keeps what it captures and delivers it,
/// in order, once resumed (`resuming` while the kept changes are handed back to delivery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    #[default]
    Stopped,
    Starting,
    Active,
    Stopping,
    Paused,
    Resuming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    Start,
    Activate,
    Stop,
    Halt,
    Pause,
    Resume,
}

impl JobAction {
    pub fn as_str(self) -> &'static str {
        match self {
            JobAction::Start => "start",
            JobAction::Activate => "activate",
            JobAction::Stop => "stop",
            JobAction::Halt => "halt",
            JobAction::Pause => "pause",
            JobAction::Resume => "resume",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("job '{job}' is {}: cannot {} it (allowed from {allowed})", from.as_str(), action.as_str())]
pub struct IllegalTransition {
    pub job: String,
    pub from: JobStatus,
    pub action: JobAction,
    pub allowed: &'static str,
}

impl JobStatus {
    /// The status after `action`, or an error that names the job, its status and the action.
    pub fn apply(self, job: &str, action: JobAction) -> Result<JobStatus, IllegalTransition> {
        use JobAction::*;
        use JobStatus::*;
        let (next, allowed) = match action {
            Start => (matches!(self, Stopped).then_some(Starting), "stopped"),
            Activate => (matches!(self, Starting | Resuming).then_some(Active), "starting or resuming"),
            Stop => (
                matches!(self, Starting | Active | Paused | Resuming).then_some(Stopping),
                "starting, active, paused or resuming",
            ),
            Halt => (matches!(self, Stopping).then_some(Stopped), "stopping"),
            Pause => (matches!(self, Active).then_some(Paused), "active"),
            Resume => (matches!(self, Paused).then_some(Resuming), "paused"),
        };
        next.ok_or(IllegalTransition { job: job.to_string(), from: self, action, allowed })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Stopped => "stopped",
            JobStatus::Starting => "starting",
            JobStatus::Active => "active",
            JobStatus::Stopping => "stopping",
            JobStatus::Paused => "paused",
            JobStatus::Resuming => "resuming",
        }
    }

    /// Paused or resuming: capture goes on while delivery keeps the changes aside (as it does
    /// for any job that is not active).
    pub fn holds_deliveries(self) -> bool {
        matches!(self, JobStatus::Paused | JobStatus::Resuming)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_machine_walks_the_cycle() {
        let s = JobStatus::Stopped;
        let s = s.apply("j", JobAction::Start).unwrap();
        assert_eq!(s, JobStatus::Starting);
        let s = s.apply("j", JobAction::Activate).unwrap();
        assert_eq!(s, JobStatus::Active);
        let s = s.apply("j", JobAction::Stop).unwrap();
        assert_eq!(s, JobStatus::Stopping);
        assert_eq!(s.apply("j", JobAction::Halt).unwrap(), JobStatus::Stopped);
    }

    #[test]
    fn illegal_transition_names_job_status_and_action() {
        let err = JobStatus::Stopped.apply("sales", JobAction::Stop).unwrap_err();
        let msg = err.to_string();
        assert_eq!(msg, "job 'sales' is stopped: cannot stop it (allowed from starting, active, paused or resuming)");
        assert!(JobStatus::Active.apply("j", JobAction::Start).is_err());
        assert!(JobStatus::Stopping.apply("j", JobAction::Activate).is_err());
    }

    #[test]
    fn pause_and_resume_only_from_their_states() {
        let s = JobStatus::Active.apply("j", JobAction::Pause).unwrap();
        assert_eq!(s, JobStatus::Paused);
        assert_eq!(
            s.apply("j", JobAction::Pause).unwrap_err().to_string(),
            "job 'j' is paused: cannot pause it (allowed from active)"
        );
        let s = s.apply("j", JobAction::Resume).unwrap();
        assert_eq!(s, JobStatus::Resuming);
        assert!(s.holds_deliveries());
        assert_eq!(s.apply("j", JobAction::Activate).unwrap(), JobStatus::Active);
        for from in [JobStatus::Stopped, JobStatus::Starting, JobStatus::Active, JobStatus::Stopping] {
            assert!(from.apply("j", JobAction::Resume).is_err(), "{from:?}");
        }
        assert_eq!(JobStatus::Paused.apply("j", JobAction::Stop).unwrap(), JobStatus::Stopping);
        assert!(!JobStatus::Active.holds_deliveries());
    }
}
