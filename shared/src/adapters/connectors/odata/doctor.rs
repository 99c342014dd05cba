//! `dualsync doctor` for an OData app: the checks a person would make by hand before a first
//! sync, each problem said with how to fix it. In order, stopping at the first that fails:
//! the service root answers and takes the credentials; then every entity set is read once
//! with the job's `$select` and `$expand` (a missing set, property or navigation property is
//! refused by the service, which names it); then, where the flavor has them, Dataverse
//! alternate keys over the map's key fields, active, and fno companies.
use reqwest::Method;
use serde::Deserialize;

use super::errors::{classify, Class, ServiceError};
use super::http::Answer;
use super::{binds, keys, OdataApp};
use crate::domain::job::Flavor;
use crate::ports::{ConnectorError, EntitySpec, Finding};

impl OdataApp {
    pub(super) async fn doctor(&self, entities: &[EntitySpec], companies: &[String]) -> Vec<Finding> {
        if let Some(f) = self.service().await {
            return vec![f];
        }
        let mut out = Vec::new();
        for e in entities {
            if let Some(f) = self.entity_set(e).await {
                out.push(f);
                continue;
            }
            if self.flavor() == Flavor::Dataverse {
                out.extend(self.alternate_key(e).await);
            }
        }
        if self.flavor() == Flavor::Fno {
            out.extend(self.companies(companies).await);
        }
        out
    }

    /// The service root: reachable and authenticated.
    async fn service(&self) -> Option<Finding> {
        let subject = format!("service {}", self.t.root);
        match self.t.send(Method::GET, self.t.root.as_str(), &[], None).await {
            Err(e) => Some(self.unusable(subject, &e)),
            Ok(a) if a.ok() => None,
            Ok(a) => {
                let err = ServiceError::parse(&a.body);
                let fix = match classify(a.status, a.retry_after(), &err) {
                    Class::Unauthenticated => format!("check the credentials ({})", self.t.auth_hint),
                    Class::Forbidden => "give the identity dualsync signs in as access to the service (Dataverse: \
                                         an application user with a security role; fno: the Entra application's user)"
                        .to_string(),
                    Class::NotFound => "check the app's url: it must be the service root (Dataverse: \
                                        https://<org>.crm.dynamics.com/api/data/v9.2/, fno: https://<env>/data/)"
                        .to_string(),
                    _ => "see the service's answer; try again once the service is up".to_string(),
                };
                Some(Finding { subject, problem: answer_text(&a, &err), fix })
            }
        }
    }

    fn unusable(&self, subject: String, e: &ConnectorError) -> Finding {
        let fix = match e {
            ConnectorError::Transient { .. } => "check the app's url, DNS and the network (proxy, firewall) from here",
            ConnectorError::Rejected { .. } => "check the app's auth settings and the variables they name",
        };
        Finding { subject, problem: e.message().to_string(), fix: fix.to_string() }
    }

    /// One record of the set with the job's projection: the set, its key and mapped fields and
    /// its navigation properties exist.
    async fn entity_set(&self, e: &EntitySpec) -> Option<Finding> {
        let mut query = binds::projection(e);
        query.push("$top=1".into());
        let url = self.url(&keys::encode(&e.name), &query);
        let subject = format!("entity set {}", e.name);
        let a = match self.t.send(Method::GET, &url, &[], None).await {
            Ok(a) => a,
            Err(err) => return Some(self.unusable(subject, &err)),
        };
        if a.ok() {
            return None;
        }
        let err = ServiceError::parse(&a.body);
        let fix = match a.status {
            404 => "use the entity set's name as the service's $metadata lists it (Dataverse: the table's \
                    EntitySetName, such as accounts; fno: the entity's public collection name, such as CustomersV3)"
                .to_string(),
            400 => format!(
                "map only properties {} has (see $metadata): key fields {}; fields {}; a Dataverse lookup is a \
                 lookup with `bind`, not a field",
                e.name,
                e.key_fields.join(", "),
                e.fields.join(", ")
            ),
            401 | 403 => "give the identity dualsync signs in as read access to this entity".to_string(),
            _ => "see the service's answer".to_string(),
        };
        Some(Finding { subject, problem: answer_text(&a, &err), fix })
    }

    /// Dataverse reads and writes by alternate key: one over exactly the map's key fields, and
    /// active (its index is built in the background, and a key still pending or failed refuses
    /// every request by key).
    async fn alternate_key(&self, e: &EntitySpec) -> Option<Finding> {
        let filter = format!("$filter={}", keys::encode(&format!("EntitySetName eq '{}'", e.name.replace('\'', "''"))));
        let expand =
            format!("$expand={}", keys::encode("Keys($select=LogicalName,KeyAttributes,EntityKeyIndexStatus)"));
        let url = self.url("EntityDefinitions", &["$select=LogicalName".into(), filter, expand]);
        let subject = format!("entity set {}", e.name);
        let a = match self.t.send(Method::GET, &url, &[], None).await {
            Ok(a) if a.ok() => a,
            Ok(a) => {
                let err = ServiceError::parse(&a.body);
                return Some(Finding {
                    subject,
                    problem: format!("cannot read its table definition: {}", answer_text(&a, &err)),
                    fix: "give the application user read access to table definitions (any Dataverse security \
                          role grants it) to let doctor check alternate keys"
                        .to_string(),
                });
            }
            Err(err) => return Some(self.unusable(subject, &err)),
        };
        let defs: Definitions = match serde_json::from_slice(&a.body) {
            Ok(d) => d,
            Err(err) => {
                return Some(Finding {
                    subject,
                    problem: format!("unreadable table definition: {err}"),
                    fix: "check that the app's flavor is dataverse".to_string(),
                })
            }
        };
        let Some(table) = defs.value.into_iter().next() else {
            return Some(Finding {
                subject,
                problem: "no table has this entity set name".to_string(),
                fix: "use the table's EntitySetName (Dataverse: usually the plural of its logical name)".to_string(),
            });
        };
        let mut wanted: Vec<&str> = e.key_fields.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        let key = table.keys.iter().find(|k| {
            let mut have: Vec<&str> = k.key_attributes.iter().map(String::as_str).collect();
            have.sort_unstable();
            have == wanted
        });
        match key {
            None => Some(Finding {
                subject,
                problem: format!(
                    "table {} has no alternate key of exactly {}",
                    table.logical_name,
                    e.key_fields.join(", ")
                ),
                fix: format!(
                    "create one (Power Apps: table {} → Keys → New key, columns {}), or map the key fields of an \
                     existing key",
                    table.logical_name,
                    e.key_fields.join(", ")
                ),
            }),
            Some(k) if k.status != "Active" => Some(Finding {
                subject,
                problem: format!("alternate key {} is {}, not Active", k.logical_name, k.status),
                fix: "wait until Dataverse has built its index; a Failed key is reactivated from the table's Keys \
                      (its records must be unique over the key)"
                    .to_string(),
            }),
            Some(_) => None,
        }
    }

    /// fno: each company in the job's scope is a legal entity.
    async fn companies(&self, companies: &[String]) -> Vec<Finding> {
        let mut out = Vec::new();
        for c in companies {
            let filter = format!("$filter={}", keys::encode(&format!("LegalEntityId eq '{}'", c.replace('\'', "''"))));
            let url = self.url("LegalEntities", &["$select=LegalEntityId".into(), filter]);
            let subject = format!("company {c}");
            match self.t.send(Method::GET, &url, &[], None).await {
                Ok(a) if a.ok() => {
                    let found = serde_json::from_slice::<Listed>(&a.body).is_ok_and(|l| !l.value.is_empty());
                    if !found {
                        out.push(Finding {
                            subject,
                            problem: "no legal entity has this id".to_string(),
                            fix: "correct the job's companies, or create the legal entity in fno".to_string(),
                        });
                    }
                }
                Ok(a) => {
                    let err = ServiceError::parse(&a.body);
                    out.push(Finding {
                        subject,
                        problem: format!("cannot list legal entities: {}", answer_text(&a, &err)),
                        fix: "give the Entra application's user read access to LegalEntities".to_string(),
                    });
                }
                Err(err) => out.push(self.unusable(subject, &err)),
            }
        }
        out
    }
}

/// The status and the service's own words (its code and message hold names, never values we
/// sent: nothing was written).
fn answer_text(a: &Answer, err: &ServiceError) -> String {
    let mut text = format!("HTTP {}", a.status);
    if !err.code.is_empty() {
        text.push_str(&format!(" {}", err.code));
    }
    if !err.message.is_empty() {
        text.push_str(&format!(": {}", err.message));
    }
    text
}

#[derive(Deserialize)]
struct Definitions {
    value: Vec<Table>,
}

#[derive(Deserialize)]
struct Table {
    #[serde(rename = "LogicalName", default)]
    logical_name: String,
    #[serde(rename = "Keys", default)]
    keys: Vec<TableKey>,
}

#[derive(Deserialize)]
struct TableKey {
    #[serde(rename = "LogicalName", default)]
    logical_name: String,
    #[serde(rename = "KeyAttributes", default)]
    key_attributes: Vec<String>,
    #[serde(rename = "EntityKeyIndexStatus", default)]
    status: String,
}

#[derive(Deserialize)]
struct Listed {
    value: Vec<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_definitions_read_as_dataverse_writes_them() {
        let body = br#"{"value":[{"LogicalName":"account","MetadataId":"x","Keys":[
            {"LogicalName":"account_number","KeyAttributes":["accountnumber"],"EntityKeyIndexStatus":"Pending"}]}]}"#;
        let d: Definitions = serde_json::from_slice(body).expect("parses");
        let t = &d.value[0];
        assert_eq!((t.logical_name.as_str(), t.keys[0].status.as_str()), ("account", "Pending"));
        assert_eq!(t.keys[0].key_attributes, ["accountnumber"]);
    }

    #[test]
    fn an_answer_is_told_by_status_code_and_message() {
        let a = Answer { status: 400, headers: vec![], body: vec![] };
        let err =
            ServiceError::parse(br#"{"error":{"code":"0x80060888","message":"Could not find a property named 'x'."}}"#);
        assert_eq!(answer_text(&a, &err), "HTTP 400 0x80060888: Could not find a property named 'x'.");
    }
}
