//! [`AwsRegistry`]: the apps' connectors as the Lambda functions open them. `odata` apps are
//! opened from their spec, with their secrets from Secrets Manager or SSM; a `sqlite` app is a
//! file on someone's machine, which a function cannot reach, so a job with one is refused here
//! with a message that says so (its changes fail, and reach an error row, not a panic).
use std::sync::Arc;

use crate::adapters::connectors::odata_apps::OdataApps;
use crate::domain::job::{ConnectorSpec, Job, Side};
use crate::ports::{Connector, ConnectorError, SecretStore};
use crate::steps::ConnectorRegistry;

pub struct AwsRegistry {
    odata: OdataApps,
}

impl AwsRegistry {
    /// Odata apps read their stored secrets through `secrets` (an [`super::AwsSecrets`]).
    pub fn new(secrets: Arc<dyn SecretStore>) -> AwsRegistry {
        AwsRegistry { odata: OdataApps::new(secrets) }
    }

    fn connector(&self, job: &Job, side: Side) -> Result<Arc<dyn Connector>, ConnectorError> {
        let app = &job.apps[side.index()];
        match &app.connector {
            ConnectorSpec::Odata(spec) => self.odata.open(&app.name, spec),
            ConnectorSpec::Sqlite { .. } => Err(sqlite_refused(&app.name)),
        }
    }
}

/// Why a `sqlite` app cannot be opened on AWS.
pub fn sqlite_refused(app: &str) -> ConnectorError {
    ConnectorError::Rejected {
        app: app.to_string(),
        message: format!(
            "app '{app}' is a sqlite app, and sqlite apps run only locally (`dualsync run`): on AWS a job's apps are odata apps"
        ),
    }
}

impl ConnectorRegistry for AwsRegistry {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError> {
        Ok([self.connector(job, Side::A)?, self.connector(job, Side::B)?])
    }

    #[cfg(feature = "odata")]
    fn tracker(&self, job: &Job, side: Side) -> Result<Arc<dyn crate::ports::ChangeTracking>, ConnectorError> {
        let app = &job.apps[side.index()];
        match &app.connector {
            ConnectorSpec::Odata(spec) => Ok(self.odata.app(&app.name, spec)?),
            ConnectorSpec::Sqlite { .. } => Err(sqlite_refused(&app.name)),
        }
    }
}
