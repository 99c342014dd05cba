//! Opening `odata` apps from their spec: the one place both the local registry and the AWS
//! registry build them. Each app is opened once per process and shared, and every app of one
//! service shares the process's limiter of that service (see `odata::limiter`).
use std::sync::Arc;

use crate::domain::job::OdataSpec;
use crate::ports::{Connector, ConnectorError, SecretStore};

/// The `odata` apps of a process, with the store their auth reads secrets from.
pub struct OdataApps {
    #[cfg_attr(not(feature = "odata"), allow(dead_code))]
    secrets: Arc<dyn SecretStore>,
    #[cfg(feature = "odata")]
    open: std::sync::Mutex<std::collections::HashMap<(String, String), Arc<super::odata::OdataApp>>>,
}

impl OdataApps {
    pub fn new(secrets: Arc<dyn SecretStore>) -> OdataApps {
        OdataApps {
            secrets,
            #[cfg(feature = "odata")]
            open: Default::default(),
        }
    }

    /// The connector of app `name`, opened now or earlier (by name and service root). Secrets
    /// an environment variable holds are read now; those in a store at the first request.
    pub fn open(&self, name: &str, spec: &OdataSpec) -> Result<Arc<dyn Connector>, ConnectorError> {
        #[cfg(feature = "odata")]
        {
            Ok(self.app(name, spec)? as Arc<dyn Connector>)
        }
        #[cfg(not(feature = "odata"))]
        {
            let _ = spec;
            Err(ConnectorError::Rejected {
                app: name.to_string(),
                message: "the odata connector is not in this build (cargo feature `odata`)".into(),
            })
        }
    }

    /// As [`Self::open`], as the odata app itself (its change tracking, too).
    #[cfg(feature = "odata")]
    pub fn app(&self, name: &str, spec: &OdataSpec) -> Result<Arc<super::odata::OdataApp>, ConnectorError> {
        use super::odata::OdataApp;
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let id = (name.to_string(), spec.url.clone());
        if let Some(a) = open.get(&id) {
            return Ok(a.clone());
        }
        let a = Arc::new(OdataApp::with_store(
            name,
            spec,
            super::odata::DEFAULT_TIMEOUT,
            &|k| std::env::var(k).ok(),
            self.secrets.clone(),
        )?);
        open.insert(id, a.clone());
        Ok(a)
    }
}
