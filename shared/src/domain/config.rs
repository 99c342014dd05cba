//! Job definitions as written in YAML files, and their validation into a [`Job`].
//!
//! Validation reports every problem at once, each with the file, the path inside it and what is
//! wrong, so a user fixes a job file in one pass.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use thiserror::Error;

use super::canon::normalize;
use super::job::{
    AlertRule, App, AuthSpec, BatchFormat, ConnectorSpec, FieldMap, Flavor, IngressAuth, IngressSpec, Job, Lookup,
    Mode, OdataSpec, SecretRef, Side, TableMap, Tracking, ValueMap,
};

/// `capture:` value of an odata app whose changes dualsync polls by change tracking.
pub const CHANGE_TRACKING: &str = "change_tracking";

/// The file form of an integration job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDef {
    /// The job's name: letters, digits, `-` and `_`.
    pub job: String,
    /// Exactly two apps; the first is side A (its values are the canonical value space).
    pub apps: Vec<AppDef>,
    /// The app that is primary for conflict detection.
    pub primary: String,
    /// Default mode of the maps.
    #[serde(default)]
    pub mode: Mode,
    /// Companies (legal entities) in scope; empty means all.
    #[serde(default)]
    pub companies: Vec<String>,
    pub table_groups: Vec<TableGroupDef>,
    /// Pause the job after N application errors in M minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRule>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppDef {
    pub name: String,
    /// `sqlite` or `odata`.
    pub connector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// odata: `dataverse`, `fno` or `generic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flavor: Option<Flavor>,
    /// odata: how to authenticate (secrets by environment variable name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
    /// odata: operations per `$batch` request (default 100, at most 1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// odata: `multipart` (default) or `json` `$batch` requests (OData 4.01, generic services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_format: Option<BatchFormat>,
    /// odata: requests in flight at most (default 52 for Dataverse, 16 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    /// odata: records per page asked of the service (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
    /// Pushed change events (webhooks, business events): how they authenticate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// odata (Dataverse): how dualsync learns of the app's changes by itself:
    /// `change_tracking` polls every map of the app by delta links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<String>,
    /// With `capture: change_tracking`: seconds between polls (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableGroupDef {
    pub name: String,
    pub maps: Vec<TableMapDef>,
}

/// A pair of names, one per app: `{ fno: CustomerAccount, dataverse: accountnumber }`.
pub type PairDef = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapDef {
    pub name: String,
    pub sequence: u32,
    /// The entity (table) of each app.
    pub entities: PairDef,
    /// Integration key field pairs: required, like alternate keys.
    pub keys: Vec<PairDef>,
    #[serde(default)]
    pub fields: Vec<FieldMapDef>,
    #[serde(default)]
    pub lookups: Vec<LookupDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<PairDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Per app, the names its pushed events give this entity besides the entity's own: a
    /// Dataverse logical name (`account` for `accounts`), an fno business event id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub event_names: BTreeMap<String, Vec<String>>,
}

/// A field map: one field name per app, and optionally a value map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldMapDef {
    #[serde(flatten)]
    pub names: BTreeMap<String, String>,
    /// Value pairs, one value per app: `[{ fno: Person, dataverse: 1 }]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<BTreeMap<String, Value>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupDef {
    /// The referenced map's name.
    pub map: String,
    /// The fields holding the referenced key, in the referenced map's key order.
    pub fields: Vec<PairDef>,
    /// odata apps: the single-valued navigation property each app reads and writes this
    /// lookup through (`{ dv: parentcustomerid_account }`), for services where a lookup is a
    /// reference (Dataverse) rather than a column holding the parent's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind: Option<PairDef>,
}

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path inside the file, like `table_groups[0].maps[1].keys[0]`.
    pub path: String,
    pub message: String,
}

/// All the problems found in one job file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render(.file, .problems))]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

fn render(file: &str, problems: &[Problem]) -> String {
    let mut out = format!("{} problem(s) in {file}:", problems.len());
    for p in problems {
        out.push_str(&format!("\n  {file}: {}: {}", p.path, p.message));
    }
    out
}

/// Reads, parses and validates a job file.
pub fn load_job_file(path: &Path) -> Result<(JobDef, Job), ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: file.clone(),
        problems: vec![Problem { path: "(file)".into(), message: format!("cannot read: {e}") }],
    })?;
    let def = parse_job(&file, &text)?;
    let job = compile(&file, &def)?;
    Ok((def, job))
}

/// Parses YAML text into a [`JobDef`]; a syntax or shape error names the path inside the file.
pub fn parse_job(file: &str, text: &str) -> Result<JobDef, ConfigErrors> {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = match e.path().to_string() {
            p if p == "." || p.is_empty() => "(document)".to_string(),
            p => p,
        };
        ConfigErrors { file: file.to_string(), problems: vec![Problem { path, message: e.into_inner().to_string() }] }
    })
}

/// Validates a [`JobDef`] into a [`Job`], collecting every problem.
pub fn compile(file: &str, def: &JobDef) -> Result<Job, ConfigErrors> {
    let mut v = Validator { problems: Vec::new() };
    v.name("job", &def.job);
    let apps: Vec<&str> = def.apps.iter().map(|a| a.name.as_str()).collect();
    if def.apps.len() != 2 {
        v.push("apps", format!("a job pairs exactly two apps, found {}", def.apps.len()));
    }
    for (i, app) in def.apps.iter().enumerate() {
        let at = format!("apps[{i}]");
        v.name(&format!("{at}.name"), &app.name);
        if apps[..i].contains(&app.name.as_str()) {
            v.push(&format!("{at}.name"), format!("app '{}' is named twice", app.name));
        }
        match (app.connector.as_str(), &app.path, &app.url) {
            ("sqlite", Some(p), None) if !p.is_empty() => {}
            ("sqlite", _, Some(_)) => v.push(&format!("{at}.url"), "a sqlite app takes a path, not a url".into()),
            ("sqlite", _, _) => v.push(&format!("{at}.path"), "a sqlite app needs a path to its database file".into()),
            ("odata", None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {}
            ("odata", Some(_), _) => v.push(&format!("{at}.path"), "an odata app takes a url, not a path".into()),
            ("odata", _, _) => v.push(&format!("{at}.url"), "an odata app needs an http(s) url".into()),
            (other, _, _) => v.push(
                &format!("{at}.connector"),
                format!("unknown connector '{other}' (connectors are: sqlite, odata)"),
            ),
        }
        if let Some(ingress) = &app.ingress {
            v.ingress(&format!("{at}.ingress"), ingress);
        }
        if app.connector == "odata" {
            v.odata(&at, app);
        } else {
            let odata_only = [
                ("flavor", app.flavor.is_some()),
                ("auth", app.auth.is_some()),
                ("batch_size", app.batch_size.is_some()),
                ("batch_format", app.batch_format.is_some()),
                ("max_concurrency", app.max_concurrency.is_some()),
                ("page_size", app.page_size.is_some()),
                ("capture", app.capture.is_some()),
                ("poll_seconds", app.poll_seconds.is_some()),
            ];
            for (key, set) in odata_only {
                if set {
                    v.push(&format!("{at}.{key}"), format!("'{key}' is for odata apps only"));
                }
            }
        }
    }
    if let Some(rule) = &def.alert {
        if rule.application_errors == 0 {
            v.push("alert.application_errors", "must be at least 1".into());
        }
        if rule.minutes == 0 {
            v.push("alert.minutes", "must be at least 1".into());
        }
    }
    let app_list = apps.join(", ");
    let primary = apps.iter().position(|a| *a == def.primary);
    if primary.is_none() {
        v.push("primary", format!("primary '{}' is not one of the apps: {app_list}", def.primary));
    }
    for (i, c) in def.companies.iter().enumerate() {
        if c.is_empty() {
            v.push(&format!("companies[{i}]"), "empty company".into());
        } else if def.companies[..i].contains(c) {
            v.push(&format!("companies[{i}]"), format!("company '{c}' is listed twice"));
        }
    }
    if def.table_groups.is_empty() {
        v.push("table_groups", "a job needs at least one table group".into());
    }

    // Map names first, so lookups can point at maps defined later in the file.
    let mut order: Vec<(usize, usize)> = Vec::new(); // (group, map) in delivery order
    for (g, group) in def.table_groups.iter().enumerate() {
        let at = format!("table_groups[{g}]");
        if group.name.is_empty() {
            v.push(&format!("{at}.name"), "empty table group name".into());
        } else if def.table_groups[..g].iter().any(|x| x.name == group.name) {
            v.push(&format!("{at}.name"), format!("table group '{}' is named twice", group.name));
        }
        if group.maps.is_empty() {
            v.push(&format!("{at}.maps"), "a table group needs at least one table map".into());
        }
        let mut idx: Vec<usize> = (0..group.maps.len()).collect();
        idx.sort_by_key(|&m| group.maps[m].sequence);
        for (n, &m) in idx.iter().enumerate() {
            let map = &group.maps[m];
            if n > 0 && group.maps[idx[n - 1]].sequence == map.sequence {
                v.push(
                    &format!("{at}.maps[{m}].sequence"),
                    format!(
                        "sequence {} is used twice in table group '{}': maps '{}' and '{}'",
                        map.sequence,
                        group.name,
                        group.maps[idx[n - 1]].name,
                        map.name
                    ),
                );
            }
            order.push((g, m));
        }
    }
    let mut names: Vec<&str> = Vec::new();
    for &(g, m) in &order {
        let map = &def.table_groups[g].maps[m];
        let at = format!("table_groups[{g}].maps[{m}].name");
        v.name(&at, &map.name);
        if names.contains(&map.name.as_str()) {
            v.push(&at, format!("table map '{}' is named twice", map.name));
        }
        names.push(&map.name);
    }

    let mut maps = Vec::new();
    for (pos, &(g, m)) in order.iter().enumerate() {
        let (group, map) = (&def.table_groups[g], &def.table_groups[g].maps[m]);
        let at = format!("table_groups[{g}].maps[{m}]");
        let entity = v.pair(&format!("{at}.entities"), &map.entities, &apps, "entity");
        if map.keys.is_empty() {
            v.push(&format!("{at}.keys"), "a table map needs at least one integration key field pair".into());
        }
        let keys: Vec<[String; 2]> = map
            .keys
            .iter()
            .enumerate()
            .map(|(k, p)| v.pair(&format!("{at}.keys[{k}]"), p, &apps, "key field"))
            .collect();
        let mut fields = Vec::new();
        for (f, fm) in map.fields.iter().enumerate() {
            let fat = format!("{at}.fields[{f}]");
            let names = v.pair(&fat, &fm.names, &apps, "field");
            let values = fm.values.as_ref().map(|vals| v.value_map(&fat, vals, &apps));
            fields.push(FieldMap { names, values });
        }
        for side in 0..2 {
            let mut seen: Vec<&str> = Vec::new();
            let all = keys.iter().map(|k| ("keys", &k[side])).chain(fields.iter().map(|f| ("fields", &f.names[side])));
            for (what, name) in all {
                if !name.is_empty() && seen.contains(&name.as_str()) {
                    let app = apps.get(side).copied().unwrap_or("?");
                    v.push(&format!("{at}.{what}"), format!("field '{name}' of app '{app}' is mapped twice"));
                }
                seen.push(name);
            }
        }
        let company = map.company.as_ref().map(|c| v.pair(&format!("{at}.company"), c, &apps, "company field"));
        let mut lookups = Vec::new();
        for (l, lk) in map.lookups.iter().enumerate() {
            let lat = format!("{at}.lookups[{l}]");
            let target = order.iter().position(|&(g2, m2)| def.table_groups[g2].maps[m2].name == lk.map);
            let lfields: Vec<[String; 2]> = lk
                .fields
                .iter()
                .enumerate()
                .map(|(k, p)| v.pair(&format!("{lat}.fields[{k}]"), p, &apps, "lookup field"))
                .collect();
            for (k, lf) in lfields.iter().enumerate() {
                for side in 0..2 {
                    let known =
                        keys.iter().any(|x| x[side] == lf[side]) || fields.iter().any(|x| x.names[side] == lf[side]);
                    if !lf[side].is_empty() && !known {
                        v.push(
                            &format!("{lat}.fields[{k}]"),
                            format!(
                                "lookup field '{}' of app '{}' is not a key or mapped field of this map",
                                lf[side],
                                apps.get(side).copied().unwrap_or("?")
                            ),
                        );
                    }
                }
            }
            match target {
                None => v.push(&format!("{lat}.map"), format!("lookup to unknown map '{}'", lk.map)),
                Some(t) if t == pos => v.push(&format!("{lat}.map"), "a map cannot look up itself".into()),
                Some(t) if t > pos => {
                    let (g2, m2) = order[t];
                    let other = &def.table_groups[g2];
                    v.push(
                        &format!("{lat}.map"),
                        format!(
                            "lookup to map '{}' which is delivered after this map (group '{}', sequence {}): parents must come first",
                            lk.map, other.name, other.maps[m2].sequence
                        ),
                    );
                }
                Some(t) => {
                    let (g2, m2) = order[t];
                    let key_len = def.table_groups[g2].maps[m2].keys.len();
                    if lfields.len() != key_len {
                        v.push(
                            &format!("{lat}.fields"),
                            format!("map '{}' has {key_len} key field(s); the lookup gives {}", lk.map, lfields.len()),
                        );
                    }
                    let bind = v.bind(&lat, lk, &def.apps, &apps, &keys, &lfields);
                    lookups.push(Lookup { map: t, fields: lfields, bind });
                }
            }
        }
        let event_names = v.event_names(&at, &map.event_names, &apps);
        maps.push(TableMap {
            name: map.name.clone(),
            group: group.name.clone(),
            group_index: g,
            sequence: map.sequence,
            entity,
            keys,
            fields,
            lookups,
            company,
            mode: map.mode.unwrap_or(def.mode),
            event_names,
        });
    }
    // An event name picks one map: two maps of an app answering to one name would be a guess.
    for side in 0..2 {
        let mut seen: Vec<(&str, &str)> = Vec::new();
        for m in &maps {
            for n in &m.event_names[side] {
                match seen.iter().find(|(x, _)| x == n) {
                    Some((_, other)) => v.push(
                        "table_groups",
                        format!(
                            "event name '{n}' of app '{}' is given to maps '{other}' and '{}'",
                            apps.get(side).copied().unwrap_or("?"),
                            m.name
                        ),
                    ),
                    None => seen.push((n, &m.name)),
                }
            }
        }
    }

    if !v.problems.is_empty() {
        return Err(ConfigErrors { file: file.to_string(), problems: v.problems });
    }
    let app = |i: usize| {
        let a = &def.apps[i];
        let connector = match a.connector.as_str() {
            "odata" => {
                let flavor = a.flavor.unwrap_or(Flavor::Generic);
                ConnectorSpec::Odata(Box::new(OdataSpec {
                    url: a.url.clone().unwrap_or_default(),
                    flavor,
                    auth: a.auth.clone().unwrap_or(AuthSpec::None),
                    batch_size: a.batch_size.unwrap_or(OdataSpec::DEFAULT_BATCH_SIZE),
                    batch_format: a.batch_format.unwrap_or_default(),
                    max_concurrency: a.max_concurrency.unwrap_or(OdataSpec::default_concurrency(flavor)),
                    page_size: a.page_size.unwrap_or(OdataSpec::DEFAULT_PAGE_SIZE),
                }))
            }
            _ => ConnectorSpec::Sqlite { path: a.path.clone().unwrap_or_default() },
        };
        let tracking = (a.capture.as_deref() == Some(CHANGE_TRACKING))
            .then(|| Tracking { poll_seconds: a.poll_seconds.unwrap_or(Tracking::DEFAULT_POLL_SECONDS) });
        App { name: a.name.clone(), connector, ingress: a.ingress.clone(), tracking }
    };
    Ok(Job {
        name: def.job.clone(),
        apps: [app(0), app(1)],
        primary: if primary == Some(0) { Side::A } else { Side::B },
        companies: def.companies.clone(),
        maps,
        alert: def.alert,
    })
}

struct Validator {
    problems: Vec<Problem>,
}

impl Validator {
    fn push(&mut self, path: &str, message: String) {
        self.problems.push(Problem { path: path.to_string(), message });
    }

    fn name(&mut self, path: &str, name: &str) {
        if name.is_empty() {
            self.push(path, "empty name".into());
        } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.push(path, format!("'{name}' may hold only letters, digits, '-' and '_'"));
        }
    }

    /// An odata app's flavor, auth and sizes.
    fn odata(&mut self, at: &str, app: &AppDef) {
        if app.flavor.is_none() {
            self.push(&format!("{at}.flavor"), "an odata app needs a flavor: dataverse, fno or generic".into());
        }
        match &app.auth {
            None => self.push(
                &format!("{at}.auth"),
                "an odata app needs auth: client_credentials, basic, bearer or none".into(),
            ),
            Some(auth) => self.auth(&format!("{at}.auth"), auth),
        }
        if app.batch_format == Some(BatchFormat::Json) && matches!(app.flavor, Some(Flavor::Dataverse | Flavor::Fno)) {
            self.push(
                &format!("{at}.batch_format"),
                "Dataverse and fno take multipart $batch requests only: leave batch_format out".into(),
            );
        }
        let sizes = [
            ("batch_size", app.batch_size, OdataSpec::MAX_BATCH_SIZE),
            ("max_concurrency", app.max_concurrency, 1000),
            ("page_size", app.page_size, 5000),
        ];
        for (key, n, max) in sizes {
            match n {
                Some(n) if n == 0 || n > max => {
                    self.push(&format!("{at}.{key}"), format!("must be from 1 to {max}, found {n}"))
                }
                _ => {}
            }
        }
        self.capture(at, app);
    }

    /// An odata app's own capture: change tracking, served for Dataverse (fno's change
    /// tracking is not an OData feature: use its business or data events).
    fn capture(&mut self, at: &str, app: &AppDef) {
        match app.capture.as_deref() {
            None => {
                if app.poll_seconds.is_some() {
                    self.push(&format!("{at}.poll_seconds"), "'poll_seconds' needs 'capture: change_tracking'".into());
                }
                return;
            }
            Some(CHANGE_TRACKING) => {}
            Some(other) => {
                self.push(&format!("{at}.capture"), format!("unknown capture '{other}' (capture is: change_tracking)"));
                return;
            }
        }
        if app.flavor.is_some_and(|f| f != Flavor::Dataverse) {
            self.push(
                &format!("{at}.capture"),
                "change tracking is served for flavor dataverse only (fno: use business or data events)".into(),
            );
        }
        match app.poll_seconds {
            Some(n) if n == 0 || n > Tracking::MAX_POLL_SECONDS => self.push(
                &format!("{at}.poll_seconds"),
                format!("must be from 1 to {}, found {n}", Tracking::MAX_POLL_SECONDS),
            ),
            _ => {}
        }
    }

    /// A lookup's `bind`: per side, a navigation property name, on odata apps only, over
    /// mapped fields (a key field is part of the record's address, not a reference).
    fn bind(
        &mut self,
        at: &str,
        lk: &LookupDef,
        app_defs: &[AppDef],
        apps: &[&str],
        keys: &[[String; 2]],
        fields: &[[String; 2]],
    ) -> [Option<String>; 2] {
        let mut out = [None, None];
        let Some(bind) = &lk.bind else { return out };
        let at = format!("{at}.bind");
        if bind.is_empty() {
            self.push(&at, "name the navigation property of at least one app, or leave 'bind' out".into());
        }
        for (app, nav) in bind {
            let Some(side) = apps.iter().take(2).position(|a| a == app) else {
                self.push(&at, format!("unknown app '{app}' (apps are: {})", apps.join(", ")));
                continue;
            };
            let path = format!("{at}.{app}");
            if app_defs.get(side).is_some_and(|d| d.connector != "odata") {
                self.push(&path, format!("'bind' is for odata apps; '{app}' is a {} app", app_defs[side].connector));
                continue;
            }
            let ident = !nav.is_empty()
                && !nav.starts_with(|c: char| c.is_ascii_digit())
                && nav.chars().all(|c| c.is_alphanumeric() || c == '_');
            if !ident {
                self.push(
                    &path,
                    format!("'{nav}' is not a navigation property name (letters, digits and '_', not starting with a digit)"),
                );
                continue;
            }
            for f in fields {
                if keys.iter().any(|k| k[side] == f[side]) {
                    self.push(
                        &path,
                        format!(
                            "lookup field '{}' is a key field of this map: a key cannot be a bound lookup",
                            f[side]
                        ),
                    );
                }
            }
            out[side] = Some(nav.clone());
        }
        out
    }

    /// An app's `ingress`: the key's variable, the header or query parameter that carries it.
    fn ingress(&mut self, at: &str, ingress: &IngressSpec) {
        let auth = format!("{at}.auth");
        self.env_name(&format!("{auth}.key_env"), ingress.auth.key_env());
        let named = match &ingress.auth {
            IngressAuth::WebhookKey { .. } => None,
            IngressAuth::HttpHeader { name, .. } => Some(("header", name)),
            IngressAuth::HttpQueryString { name, .. } => Some(("query parameter", name)),
        };
        if let Some((what, name)) = named {
            // An HTTP header name is a token; a query parameter is kept to the same plain set
            // so that it needs no encoding in the URL registered with the sender.
            let token = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !token {
                self.push(
                    &format!("{auth}.name"),
                    format!("'{name}' is not a {what} name (letters, digits, '-', '_' and '.')"),
                );
            }
        }
        if ingress.own_user_id.as_deref().is_some_and(|u| u.trim().is_empty()) {
            self.push(
                &format!("{at}.own_user_id"),
                "empty user id: name dualsync's application user, or leave it out".into(),
            );
        }
    }

    /// A map's `event_names`: per known app, non-empty names, each once.
    fn event_names(&mut self, at: &str, names: &BTreeMap<String, Vec<String>>, apps: &[&str]) -> [Vec<String>; 2] {
        let mut out = [Vec::new(), Vec::new()];
        for (app, list) in names {
            let path = format!("{at}.event_names.{app}");
            let Some(side) = apps.iter().take(2).position(|a| a == app) else {
                self.push(&format!("{at}.event_names"), format!("unknown app '{app}' (apps are: {})", apps.join(", ")));
                continue;
            };
            for (i, n) in list.iter().enumerate() {
                if n.trim().is_empty() {
                    self.push(&format!("{path}[{i}]"), "empty event name".into());
                } else if out[side].contains(n) {
                    self.push(&format!("{path}[{i}]"), format!("event name '{n}' is listed twice"));
                } else {
                    out[side].push(n.clone());
                }
            }
        }
        out
    }

    fn auth(&mut self, at: &str, auth: &AuthSpec) {
        match auth {
            AuthSpec::ClientCredentials { tenant, token_url, client_id, client_id_env, .. } => {
                if let Some(e) = client_id_env {
                    self.env_name(&format!("{at}.client_id_env"), e);
                }
                match (tenant, token_url) {
                    (Some(_), None) => {}
                    (None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {}
                    (None, Some(_)) => self.push(&format!("{at}.token_url"), "must be an http(s) url".into()),
                    _ => self.push(at, "client_credentials needs either tenant or token_url".into()),
                }
                if client_id.is_some() == client_id_env.is_some() {
                    self.push(at, "client_credentials needs either client_id or client_id_env".into());
                }
            }
            AuthSpec::Basic { username, username_env, .. } => {
                if let Some(e) = username_env {
                    self.env_name(&format!("{at}.username_env"), e);
                }
                if username.is_some() == username_env.is_some() {
                    self.push(at, "basic needs either username or username_env".into());
                }
            }
            AuthSpec::Bearer { .. } | AuthSpec::None => {}
        }
        let (key, r, env) = match auth {
            AuthSpec::ClientCredentials { client_secret, client_secret_env, .. } => {
                ("client_secret", client_secret, client_secret_env)
            }
            AuthSpec::Basic { password, password_env, .. } => ("password", password, password_env),
            AuthSpec::Bearer { token, token_env } => ("token", token, token_env),
            AuthSpec::None => return,
        };
        match (r, env) {
            (Some(_), Some(_)) => self.push(at, format!("give {key} or {key}_env, not both")),
            (None, None) => self.push(
                at,
                format!("{key} missing: {key}: {{ env: NAME }}, {{ secrets_manager: NAME }} or {{ ssm: NAME }}"),
            ),
            (None, Some(e)) => self.env_name(&format!("{at}.{key}_env"), e),
            (Some(r), None) => self.secret_ref(&format!("{at}.{key}"), r),
        }
    }

    fn env_name(&mut self, path: &str, name: &str) {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            self.push(
                path,
                format!("'{name}' is not an environment variable name (A-Z, 0-9 and '_', not starting with a digit)"),
            );
        }
    }

    /// A secret's source: a variable, a store, or a variable with a store behind it.
    fn secret_ref(&mut self, at: &str, r: &SecretRef) {
        if let Some(e) = &r.env {
            self.env_name(&format!("{at}.env"), e);
        }
        if let Some(id) = &r.secrets_manager {
            // Names: letters, digits and /_+=.@-; an ARN adds ':' (Secrets Manager's own limits).
            let ok = (1..=2048).contains(&id.len())
                && id.chars().all(|c| c.is_ascii_alphanumeric() || "/_+=.@-:".contains(c));
            if !ok {
                self.push(
                    &format!("{at}.secrets_manager"),
                    format!("'{id}' is not a secret name or ARN (letters, digits and /_+=.@-)"),
                );
            }
        }
        if let Some(name) = &r.ssm {
            // Names: letters, digits and _.-/ (a path starts with '/'); an ARN adds ':'.
            let lower = name.trim_start_matches('/').to_ascii_lowercase();
            let ok = (1..=2048).contains(&name.len())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/:".contains(c))
                && (name.starts_with("arn:") || !(lower.starts_with("aws") || lower.starts_with("ssm")));
            if !ok {
                self.push(
                    &format!("{at}.ssm"),
                    format!("'{name}' is not a parameter name or ARN (letters, digits and _.-/, not starting with aws or ssm)"),
                );
            }
        }
        match (&r.env, &r.secrets_manager, &r.ssm) {
            (None, None, None) => self.push(at, "name the secret: env, secrets_manager or ssm".into()),
            (_, Some(_), Some(_)) => self.push(at, "give secrets_manager or ssm, not both".into()),
            _ => {}
        }
    }

    /// A pair must name both apps and no other; returns [A name, B name] (empty where missing).
    fn pair(&mut self, path: &str, pair: &PairDef, apps: &[&str], what: &str) -> [String; 2] {
        for k in pair.keys() {
            if !apps.contains(&k.as_str()) {
                self.push(path, format!("unknown app '{k}' (apps are: {})", apps.join(", ")));
            }
        }
        let mut out = [String::new(), String::new()];
        for (i, app) in apps.iter().take(2).enumerate() {
            match pair.get(*app) {
                Some(n) if !n.is_empty() => out[i] = n.clone(),
                Some(_) => self.push(path, format!("empty {what} name on side '{app}'")),
                None => self.push(path, format!("{what} missing on side '{app}'")),
            }
        }
        out
    }

    fn value_map(&mut self, path: &str, values: &[BTreeMap<String, Value>], apps: &[&str]) -> ValueMap {
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        for (i, entry) in values.iter().enumerate() {
            let at = format!("{path}.values[{i}]");
            for k in entry.keys() {
                if !apps.contains(&k.as_str()) {
                    self.push(&at, format!("unknown app '{k}' (apps are: {})", apps.join(", ")));
                }
            }
            let side = |s: usize| apps.get(s).and_then(|a| entry.get(*a)).map(normalize);
            let (Some(a), Some(b)) = (side(0), side(1)) else {
                self.push(&at, "a value pair needs a value for both apps".into());
                continue;
            };
            if !(a.is_string() || a.is_number() || a.is_boolean())
                || !(b.is_string() || b.is_number() || b.is_boolean())
            {
                self.push(&at, "values must be strings, numbers or booleans".into());
                continue;
            }
            for (s, val) in [(0, &a), (1, &b)] {
                if pairs.iter().any(|p| if s == 0 { &p.0 == val } else { &p.1 == val }) {
                    self.push(
                        &at,
                        format!("value {val} of app '{}' appears twice: the map must work both ways", apps[s]),
                    );
                }
            }
            pairs.push((a, b));
        }
        ValueMap { pairs }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::Side;

    const GOOD: &str = "job: j
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: sqlite, path: b.db }
primary: b
table_groups:
  - name: g1
    maps:
      - name: children
        sequence: 2
        entities: { a: c, b: d }
        keys: [{ a: pid, b: p }, { a: n, b: m }]
        fields: [{ a: label, b: caption }]
        lookups: [{ map: parents, fields: [{ a: pid, b: p }] }]
      - name: parents
        sequence: 1
        entities: { a: p, b: o }
        keys: [{ a: id, b: oid }]
        fields:
          - a: kind
            b: code
            values: [{ a: small, b: 1 }, { a: large, b: 2.0 }]
";

    /// The problems of `GOOD` with `from` replaced by `to`.
    fn problems(from: &str, to: &str) -> Vec<Problem> {
        assert!(GOOD.contains(from), "{from}");
        let text = GOOD.replacen(from, to, 1);
        let def = match parse_job("f.yaml", &text) {
            Ok(def) => def,
            Err(e) => return e.problems,
        };
        compile("f.yaml", &def).err().map(|e| e.problems).unwrap_or_default()
    }

    fn assert_problem(from: &str, to: &str, path: &str, message: &str) {
        let ps = problems(from, to);
        assert!(
            ps.iter().any(|p| p.path == path && p.message.contains(message)),
            "wanted {path}: {message}; got {ps:#?}"
        );
    }

    #[test]
    fn a_good_file_compiles_in_delivery_order() {
        let job = compile("f.yaml", &parse_job("f.yaml", GOOD).unwrap()).unwrap();
        assert_eq!(job.primary, Side::B);
        let names: Vec<&str> = job.maps.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["parents", "children"]);
        assert_eq!(job.maps[1].lookups[0].map, 0);
        let vm = job.maps[0].fields[0].values.as_ref().unwrap();
        assert_eq!(vm.pairs[1], (serde_json::json!("large"), serde_json::json!(2)));
    }

    #[test]
    fn the_example_job_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/sales.yaml");
        let (_, job) = load_job_file(&path).unwrap();
        assert_eq!(job.maps.len(), 4);
        assert_eq!(job.maps[3].lookups[0].map, 2);
        assert_eq!(job.companies, ["USMF", "DEMF"]);
    }

    #[test]
    fn the_odata_example_job_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dataverse-fno.yaml");
        let (_, job) = load_job_file(&path).unwrap();
        assert!(job.apps.iter().all(|a| matches!(a.connector, ConnectorSpec::Odata(_)) && a.ingress.is_some()));
        assert_eq!(job.maps[1].lookups[0].bind, [None, Some("transactioncurrencyid".to_string())]);
    }

    #[test]
    fn shape_errors_name_the_path() {
        assert_problem("sequence: 2", "sequence: two", "table_groups[0].maps[0].sequence", "invalid");
        assert_problem("primary: b", "primary: b\nextra: 1", "extra", "unknown field `extra`");
        let ps = problems("job: j", "job: [");
        assert_eq!(ps.len(), 1, "{ps:?}");
    }

    #[test]
    fn names_apps_and_connectors() {
        assert_problem("job: j", "job: 'j k'", "job", "only letters, digits");
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: a, connector: sqlite, path: b.db }",
            "apps[1].name",
            "named twice",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: ftp }",
            "apps[1].connector",
            "unknown connector 'ftp' (connectors are: sqlite, odata)",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: sqlite }",
            "apps[1].path",
            "needs a path",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: ftp://x }",
            "apps[1].url",
            "http(s) url",
        );
        assert_problem("  - { name: b, connector: sqlite, path: b.db }\n", "", "apps", "exactly two apps, found 1");
    }

    #[test]
    fn json_batches_are_for_generic_services() {
        let sq = "{ name: b, connector: sqlite, path: b.db }";
        let app = |flavor: &str| {
            format!("{{ name: b, connector: odata, url: 'https://x/', flavor: {flavor}, auth: {{ kind: none }}, batch_format: json }}")
        };
        let def = parse_job("f.yaml", &GOOD.replace(sq, &app("generic"))).unwrap();
        match &compile("f.yaml", &def).unwrap().apps[1].connector {
            ConnectorSpec::Odata(s) => assert_eq!(s.batch_format, BatchFormat::Json),
            other => panic!("{other:?}"),
        }
        for flavor in ["dataverse", "fno"] {
            assert_problem(sq, &app(flavor), "apps[1].batch_format", "multipart $batch requests only");
        }
        assert_problem(
            sq,
            "{ name: b, connector: sqlite, path: b.db, batch_format: json }",
            "apps[1].batch_format",
            "odata apps only",
        );
    }

    #[test]
    fn odata_apps_need_flavor_and_auth() {
        let odata =
            "{ name: b, connector: odata, url: 'https://x/api/data/v9.2/', flavor: dataverse, auth: { kind: none } }";
        assert!(problems("{ name: b, connector: sqlite, path: b.db }", odata).is_empty());
        let def = parse_job("f.yaml", &GOOD.replace("{ name: b, connector: sqlite, path: b.db }", odata)).unwrap();
        let job = compile("f.yaml", &def).unwrap();
        match &job.apps[1].connector {
            ConnectorSpec::Odata(s) => {
                assert_eq!((s.flavor, s.batch_size, s.max_concurrency), (Flavor::Dataverse, 100, 52));
            }
            other => panic!("{other:?}"),
        }
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: 'https://x/' }",
            "apps[1].flavor",
            "needs a flavor",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: 'https://x/', flavor: fno }",
            "apps[1].auth",
            "needs auth",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: 'https://x/', flavor: fno, auth: { kind: none }, batch_size: 5000 }",
            "apps[1].batch_size",
            "from 1 to 1000",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: 'https://x/', flavor: fno, auth: { kind: client_credentials, tenant: t, client_id: c, client_secret_env: 'my secret' } }",
            "apps[1].auth.client_secret_env",
            "not an environment variable name",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: odata, url: 'https://x/', flavor: fno, auth: { kind: client_credentials, client_id: c, client_secret_env: S } }",
            "apps[1].auth",
            "either tenant or token_url",
        );
        assert_problem(
            "{ name: b, connector: sqlite, path: b.db }",
            "{ name: b, connector: sqlite, path: b.db, flavor: fno }",
            "apps[1].flavor",
            "for odata apps only",
        );
    }

    #[test]
    fn ingress_names_its_key_variable_and_where_the_key_comes() {
        let b = "{ name: b, connector: sqlite, path: b.db }";
        let with = |ingress: &str| format!("{{ name: b, connector: sqlite, path: b.db, ingress: {ingress} }}");
        let good = with("{ auth: { kind: http_header, name: x-api-key, key_env: B_KEY }, own_user_id: u-1 }");
        assert!(problems(b, &good).is_empty(), "{:?}", problems(b, &good));
        let def = parse_job("f.yaml", &GOOD.replace(b, &good)).unwrap();
        let job = compile("f.yaml", &def).unwrap();
        let spec = job.apps[1].ingress.as_ref().unwrap();
        assert_eq!(spec.auth.key_env(), "B_KEY");
        assert_eq!(spec.own_user_id.as_deref(), Some("u-1"));
        assert_problem(
            b,
            &with("{ auth: { kind: webhook_key, key_env: b-key } }"),
            "apps[1].ingress.auth.key_env",
            "not an environment variable name",
        );
        assert_problem(
            b,
            &with("{ auth: { kind: http_query_string, name: 'a key', key_env: K } }"),
            "apps[1].ingress.auth.name",
            "not a query parameter name",
        );
        assert_problem(
            b,
            &with("{ auth: { kind: webhook_key, key_env: K }, own_user_id: ' ' }"),
            "apps[1].ingress.own_user_id",
            "empty user id",
        );
        assert_problem(
            b,
            &with("{ auth: { kind: api_key, key_env: K } }"),
            "apps[1].ingress.auth.kind",
            "unknown variant",
        );
    }

    #[test]
    fn event_names_belong_to_an_app_and_one_map() {
        let at = "        entities: { a: p, b: o }\n";
        let names = |n: &str| format!("{at}        event_names: {n}\n");
        assert!(problems(at, &names("{ b: [po] }")).is_empty());
        let def = parse_job("f.yaml", &GOOD.replace(at, &names("{ b: [po, pos] }"))).unwrap();
        assert_eq!(
            compile("f.yaml", &def).unwrap().maps[0].event_names,
            [vec![], vec!["po".to_string(), "pos".into()]]
        );
        assert_problem(at, &names("{ c: [po] }"), "table_groups[0].maps[1].event_names", "unknown app 'c'");
        assert_problem(at, &names("{ b: [''] }"), "table_groups[0].maps[1].event_names.b[0]", "empty event name");
        assert_problem(at, &names("{ b: [po, po] }"), "table_groups[0].maps[1].event_names.b[1]", "listed twice");
        let both = GOOD.replace(at, &names("{ b: [po] }")).replace(
            "        entities: { a: c, b: d }\n",
            "        entities: { a: c, b: d }\n        event_names: { b: [po] }\n",
        );
        let err = compile("f.yaml", &parse_job("f.yaml", &both).unwrap()).unwrap_err();
        assert!(
            err.to_string().contains("event name 'po' of app 'b' is given to maps 'parents' and 'children'"),
            "{err}"
        );
    }

    #[test]
    fn change_tracking_is_for_dataverse_apps_with_a_sane_interval() {
        let sq = "{ name: b, connector: sqlite, path: b.db }";
        let dv = |extra: &str| {
            format!("{{ name: b, connector: odata, url: 'https://x/api/data/v9.2/', flavor: dataverse, auth: {{ kind: none }}{extra} }}")
        };
        let def = parse_job("f.yaml", &GOOD.replace(sq, &dv(", capture: change_tracking"))).unwrap();
        let job = compile("f.yaml", &def).unwrap();
        assert_eq!(job.apps[1].tracking, Some(Tracking { poll_seconds: Tracking::DEFAULT_POLL_SECONDS }));
        assert_eq!(job.apps[0].tracking, None);
        let def = parse_job("f.yaml", &GOOD.replace(sq, &dv(", capture: change_tracking, poll_seconds: 5"))).unwrap();
        assert_eq!(compile("f.yaml", &def).unwrap().apps[1].tracking, Some(Tracking { poll_seconds: 5 }));
        assert_problem(
            sq,
            &dv(", capture: webhooks"),
            "apps[1].capture",
            "unknown capture 'webhooks' (capture is: change_tracking)",
        );
        assert_problem(sq, &dv(", poll_seconds: 5"), "apps[1].poll_seconds", "needs 'capture: change_tracking'");
        assert_problem(
            sq,
            &dv(", capture: change_tracking, poll_seconds: 0"),
            "apps[1].poll_seconds",
            "from 1 to 86400, found 0",
        );
        assert_problem(
            sq,
            "{ name: b, connector: odata, url: 'https://x/', flavor: fno, auth: { kind: none }, capture: change_tracking }",
            "apps[1].capture",
            "flavor dataverse only",
        );
        assert_problem(
            sq,
            "{ name: b, connector: sqlite, path: b.db, capture: change_tracking }",
            "apps[1].capture",
            "for odata apps only",
        );
    }

    #[test]
    fn a_secret_is_named_by_variable_or_store_and_the_first_form_still_reads() {
        let sqlite = "{ name: b, connector: sqlite, path: b.db }";
        let app = |auth: &str| {
            format!("{{ name: b, connector: odata, url: 'https://x/', flavor: dataverse, auth: {{ kind: client_credentials, tenant: t, client_id: c, {auth} }} }}")
        };
        let secret = |auth: &str| {
            let def = parse_job("f.yaml", &GOOD.replace(sqlite, &app(auth))).unwrap();
            match compile("f.yaml", &def).unwrap().apps[1].connector.clone() {
                ConnectorSpec::Odata(s) => s.auth.secret().unwrap(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(secret("client_secret_env: DV_SECRET"), ("client_secret", SecretRef::env("DV_SECRET")));
        let both = SecretRef { env: Some("DV".into()), secrets_manager: Some("dualsync/dv".into()), ssm: None };
        assert_eq!(secret("client_secret: { env: DV, secrets_manager: dualsync/dv }"), ("client_secret", both));
        let ssm = SecretRef { ssm: Some("/dualsync/dv".into()), ..Default::default() };
        assert_eq!(secret("client_secret: { ssm: /dualsync/dv }"), ("client_secret", ssm));

        let cases = [
            (
                "client_secret: { env: DV }, client_secret_env: DV",
                "apps[1].auth",
                "give client_secret or client_secret_env, not both",
            ),
            (
                "scope: s",
                "apps[1].auth",
                "client_secret missing: client_secret: { env: NAME }, { secrets_manager: NAME } or { ssm: NAME }",
            ),
            ("client_secret: {}", "apps[1].auth.client_secret", "name the secret: env, secrets_manager or ssm"),
            (
                "client_secret: { secrets_manager: a, ssm: b }",
                "apps[1].auth.client_secret",
                "give secrets_manager or ssm, not both",
            ),
            (
                "client_secret: { env: dv }",
                "apps[1].auth.client_secret.env",
                "'dv' is not an environment variable name",
            ),
            (
                "client_secret: { secrets_manager: 'my secret' }",
                "apps[1].auth.client_secret.secrets_manager",
                "'my secret' is not a secret name or ARN",
            ),
            ("client_secret: { ssm: /aws/x }", "apps[1].auth.client_secret.ssm", "not starting with aws or ssm"),
        ];
        for (auth, path, message) in cases {
            assert_problem(sqlite, &app(auth), path, message);
        }
        // An unknown key in a secret's source is refused by name.
        let err = parse_job("f.yaml", &GOOD.replace(sqlite, &app("client_secret: { vault: x }"))).unwrap_err();
        assert!(err.to_string().contains("vault"), "{err}");
    }

    #[test]
    fn primary_must_be_an_app() {
        assert_problem("primary: b", "primary: crm", "primary", "primary 'crm' is not one of the apps: a, b");
    }

    #[test]
    fn pairs_name_both_apps_and_no_other() {
        assert_problem(
            "keys: [{ a: id, b: oid }]",
            "keys: [{ a: id }]",
            "table_groups[0].maps[1].keys[0]",
            "key field missing on side 'b'",
        );
        assert_problem(
            "entities: { a: p, b: o }",
            "entities: { a: p, b: o, crm: x }",
            "table_groups[0].maps[1].entities",
            "unknown app 'crm' (apps are: a, b)",
        );
        assert_problem(
            "keys: [{ a: id, b: oid }]",
            "keys: []",
            "table_groups[0].maps[1].keys",
            "at least one integration key",
        );
        assert_problem(
            "fields: [{ a: label, b: caption }]",
            "fields: [{ a: n, b: caption }]",
            "table_groups[0].maps[0].fields",
            "field 'n' of app 'a' is mapped twice",
        );
    }

    #[test]
    fn sequences_are_unique_within_a_group() {
        assert_problem(
            "sequence: 2",
            "sequence: 1",
            "table_groups[0].maps[1].sequence",
            "sequence 1 is used twice in table group 'g1'",
        );
    }

    #[test]
    fn value_maps_work_both_ways() {
        assert_problem(
            "{ a: large, b: 2.0 }",
            "{ a: large, b: 1 }",
            "table_groups[0].maps[1].fields[0].values[1]",
            "value 1 of app 'b' appears twice",
        );
        assert_problem(
            "{ a: large, b: 2.0 }",
            "{ a: large }",
            "table_groups[0].maps[1].fields[0].values[1]",
            "needs a value for both apps",
        );
    }

    #[test]
    fn a_bind_names_a_navigation_property_of_an_odata_app_over_mapped_fields() {
        let odata =
            "{ name: b, connector: odata, url: 'https://x/api/data/v9.2/', flavor: dataverse, auth: { kind: none } }";
        let with = |lookup: &str| {
            let text = GOOD.replacen("{ name: b, connector: sqlite, path: b.db }", odata, 1).replacen(
                "lookups: [{ map: parents, fields: [{ a: pid, b: p }] }]",
                lookup,
                1,
            );
            let def = parse_job("f.yaml", &text).unwrap();
            compile("f.yaml", &def).map_err(|e| e.problems)
        };
        let job =
            with("lookups: [{ map: parents, fields: [{ a: label, b: caption }], bind: { b: parent_o } }]").unwrap();
        assert_eq!(job.maps[1].lookups[0].bind, [None, Some("parent_o".to_string())]);
        let path = "table_groups[0].maps[0].lookups[0].bind";
        let cases = [
            ("bind: { a: parent_o }", format!("{path}.a"), "'bind' is for odata apps; 'a' is a sqlite app"),
            ("bind: { z: parent_o }", path.to_string(), "unknown app 'z'"),
            ("bind: { b: 'parent/o' }", format!("{path}.b"), "'parent/o' is not a navigation property name"),
            ("bind: {}", path.to_string(), "name the navigation property of at least one app"),
        ];
        for (bind, at, message) in cases {
            let ps = with(&format!("lookups: [{{ map: parents, fields: [{{ a: label, b: caption }}], {bind} }}]"))
                .unwrap_err();
            assert!(ps.iter().any(|p| p.path == at && p.message.contains(message)), "{bind}: {ps:#?}");
        }
        let ps = with("lookups: [{ map: parents, fields: [{ a: pid, b: p }], bind: { b: parent_o } }]").unwrap_err();
        assert!(
            ps.iter().any(|p| p.path == format!("{path}.b") && p.message.contains("'p' is a key field")),
            "{ps:#?}"
        );
    }

    #[test]
    fn lookups_point_to_earlier_maps_with_matching_keys() {
        assert_problem(
            "map: parents",
            "map: nowhere",
            "table_groups[0].maps[0].lookups[0].map",
            "lookup to unknown map 'nowhere'",
        );
        assert_problem(
            "map: parents",
            "map: children",
            "table_groups[0].maps[0].lookups[0].map",
            "cannot look up itself",
        );
        assert_problem(
            "sequence: 2",
            "sequence: 0",
            "table_groups[0].maps[0].lookups[0].map",
            "delivered after this map",
        );
        assert_problem(
            "fields: [{ a: pid, b: p }] }",
            "fields: [{ a: pid, b: p }, { a: n, b: m }] }",
            "table_groups[0].maps[0].lookups[0].fields",
            "map 'parents' has 1 key field(s); the lookup gives 2",
        );
        assert_problem(
            "fields: [{ a: pid, b: p }] }",
            "fields: [{ a: zz, b: p }] }",
            "table_groups[0].maps[0].lookups[0].fields[0]",
            "lookup field 'zz' of app 'a' is not a key or mapped field",
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_with_file_and_path() {
        let text = GOOD
            .replace("primary: b", "primary: crm")
            .replace("connector: sqlite, path: b.db", "connector: ftp")
            .replace("map: parents", "map: nowhere");
        let err = compile("f.yaml", &parse_job("f.yaml", &text).unwrap()).unwrap_err();
        let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["apps[1].connector", "primary", "table_groups[0].maps[0].lookups[0].map"]);
        let shown = err.to_string();
        assert!(shown.starts_with("3 problem(s) in f.yaml:"), "{shown}");
        assert!(shown.contains("\n  f.yaml: primary: primary 'crm' is not one of the apps: a, b"), "{shown}");
    }
}
