//! Where probes put what they learn: straight into the catalog, or through
//! the cluster, which applies a result locally and shares it with the other
//! replicas (so that each backend is probed by one replica only), or, for a
//! witness probe, as this replica's opinion of a backend another owns.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::cluster::Cluster;
use crate::model::{HealthState, LoadSample};

/// Where probe results go: the catalog, or the cluster (which applies them
/// to the catalog and publishes them to the other replicas).
pub struct Reporter {
    catalog: Arc<Catalog>,
    cluster: Option<Arc<Cluster>>,
    /// `lb_upstream_reconnects_total{kind="health"}`, looked up once: a zone
    /// of dead backends reconnects thousands of times a second.
    reconnects: prometheus_client::metrics::counter::Counter,
    /// Results are opinions of a witness, not the owner's verdicts.
    witness: bool,
}

impl Reporter {
    /// Results for `catalog`, shared through `cluster` when given.
    pub fn new(catalog: Arc<Catalog>, cluster: Option<Arc<Cluster>>) -> Self {
        let reconnects = catalog.metrics().upstream_reconnects_of("health");
        Reporter {
            catalog,
            cluster,
            reconnects,
            witness: false,
        }
    }

    /// Results of witness probes: published as this replica's opinion
    /// through `cluster`, never applied as the backend's health.
    pub fn witness(catalog: Arc<Catalog>, cluster: Arc<Cluster>) -> Self {
        Reporter {
            witness: true,
            ..Reporter::new(catalog, Some(cluster))
        }
    }

    /// A health check result.
    pub fn health(&self, service: &str, addr: SocketAddr, state: HealthState, detail: &str) {
        match &self.cluster {
            Some(c) if self.witness => c.report_opinion(service, addr, state, detail),
            Some(c) => c.report_health(service, addr, state, detail),
            None => self.catalog.set_health(service, addr, state, detail),
        }
    }

    /// A load report.
    pub fn load(&self, service: &str, addr: SocketAddr, report: &LoadSample) {
        match &self.cluster {
            Some(_) if self.witness => {}
            Some(c) => c.report_load(service, addr, report),
            None => self.catalog.set_load(service, addr, report),
        }
    }

    /// A probe's connection was lost and is being made again.
    pub fn reconnect(&self) {
        self.reconnects.inc();
    }

    /// The load stream ended.
    pub fn clear_load(&self, service: &str, addr: SocketAddr) {
        match &self.cluster {
            Some(_) if self.witness => {}
            Some(c) => c.clear_load(service, addr),
            None => self.catalog.clear_load(service, addr),
        }
    }
}
