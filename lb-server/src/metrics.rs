//! Prometheus metrics of the LB, served as text on the admin port's
//! `/metrics`.
//!
//! One [`Metrics`] value is shared by every part of the server; each part
//! only increments what it owns. Names follow Prometheus conventions
//! (`lb_` prefix, `_total` on counters).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

/// Registers metric families and remembers each one's full name and type,
/// so that the set the LB exports can be listed (dashboards built on the
/// metrics are checked against it).
struct Registrar<'a> {
    registry: &'a mut Registry,
    prefix: &'static str,
    families: &'a mut Vec<(String, MetricType)>,
}

impl Registrar<'_> {
    fn add<M: Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        self.families
            .push((format!("{}_{name}", self.prefix), M::TYPE));
        self.registry.register(name, help, metric);
    }
}

/// Labels naming a registry source and what happened.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Registry source: `memory`, `etcd`, `file`.
    pub source: String,
    /// Event kind (`put`, `delete`, `snapshot`) or reject reason.
    pub kind: String,
}

/// Labels naming a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    /// The service name in the registry.
    pub service: String,
}

/// The ends of a call `lb_backend_outcomes_total` counts per service.
pub const OUTCOME_ENDS: [&str; 4] = ["success", "error", "deadline", "cancelled"];

/// Labels of client-reported call counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// The service name in the registry.
    pub service: String,
    /// `started`, `finished`, `failed_to_send`, `known_received`, `dropped`.
    pub kind: String,
}

/// Labels naming one backend of a service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// The service name in the registry.
    pub service: String,
    /// The backend's address.
    pub backend: String,
}

/// Labels naming a port.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    /// `lb` (gRPC) or `admin` (HTTP).
    pub port: String,
}

/// Labels naming a port and why a connection was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortReasonLabels {
    /// `lb` (gRPC) or `admin` (HTTP).
    pub port: String,
    /// Short machine-readable reason, e.g. `too_many_connections`.
    pub reason: String,
}

/// Labels naming why a stream was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Short machine-readable reason, e.g. `unknown_service`.
    pub reason: String,
}

/// Labels naming a registry source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistrySourceLabels {
    /// Registry source: `etcd`, `zk`, `dns`, `k8s`, `consul`, `file`, `memory`.
    pub source: String,
}

/// Labels naming the kind of an outgoing connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `health` (LB → backend probes), `etcd`, `zk`, `consul`, `dns`
    /// (registry sessions), `cluster` (the replicas' etcd session).
    pub kind: String,
}

/// Every metric the LB exports.
pub struct Metrics {
    registry: Registry,
    /// Every family registered (full name, type), for [`Metrics::families`].
    families: Vec<(String, MetricType)>,
    /// BalanceLoad streams open now.
    pub streams_open: Gauge,
    /// BalanceLoad streams accepted since start.
    pub streams_total: Counter,
    /// BalanceLoad streams refused, by reason.
    pub streams_refused: Family<ReasonLabels, Counter>,
    /// Server lists written to streams.
    pub lists_sent: Counter,
    /// Heartbeats written to quiet BalanceLoad streams that asked for them.
    pub heartbeats_sent: Counter,
    /// Time from a catalog change to a stream writing the resulting list.
    pub list_push_seconds: Histogram,
    /// Registry events applied, by source and kind.
    pub registry_events: Family<SourceLabels, Counter>,
    /// Registry entries rejected, by source and reason.
    pub registry_rejects: Family<SourceLabels, Counter>,
    /// Whether a registry source's last read succeeded (1) or failed (0,
    /// serving its last known state).
    pub registry_source_ok: Family<RegistrySourceLabels, Gauge>,
    /// Backends currently registered, per service.
    pub backends: Family<ServiceLabels, Gauge>,
    /// List version per service (increments on every changed list).
    pub list_version: Family<ServiceLabels, Gauge>,
    /// Calls reported by clients in client stats, per service and kind.
    pub client_calls: Family<CallLabels, Counter>,
    /// Health transitions, per service and new state.
    pub health_transitions: Family<CallLabels, Counter>,
    /// Per-backend call outcomes clients reported (LRS), all backends of a
    /// service together, per end: success, error, deadline, cancelled.
    pub backend_outcomes: Family<CallLabels, Counter>,
    /// Relative weight of each backend in its service's list (0 = not listed).
    pub backend_weight: Family<BackendLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 when a backend's health check says it serves, else 0.
    pub backend_healthy: Family<BackendLabels, Gauge>,
    /// Admin mutations applied, by action.
    pub admin_mutations: Family<ReasonLabels, Counter>,
    /// Admin requests refused, by reason.
    pub admin_errors: Family<ReasonLabels, Counter>,
    /// Connections open now, per port.
    pub connections_open: Family<PortLabels, Gauge>,
    /// Connections refused or closed by a guard, per port and reason.
    pub connections_refused: Family<PortReasonLabels, Counter>,
    /// Client-stats reports ignored or refused, by reason.
    pub client_stats_refused: Family<ReasonLabels, Counter>,
    /// Embedded-registry calls refused, by reason.
    pub registrations_refused: Family<ReasonLabels, Counter>,
    /// Registry sources besides the first defining a service (present
    /// only while there is a conflict).
    pub registry_conflicts: Family<ServiceLabels, Gauge>,
    /// Backends kept in a service's list against one replica's view: silent
    /// to their checker beyond the unconfirmed-removal cap, or serving to
    /// another replica (present only while some are held). An alert.
    pub backends_held: Family<ServiceLabels, Gauge>,
    /// Backends ejected for failing clients' calls, per service.
    pub gray_ejected: Family<ServiceLabels, Gauge>,
    /// Backends suspect but kept listed: the ejection cap is reached.
    pub gray_held: Family<ServiceLabels, Gauge>,
    /// Ejections for failing clients' calls, per service.
    pub gray_ejections: Family<ServiceLabels, Counter>,
    /// Backends kept listed after leaving the registry because they still
    /// pass health checks (present only while some are kept). An alert.
    pub backends_kept_unregistered: Family<ServiceLabels, Gauge>,
    /// Outgoing sessions lost and opened again, per connection kind. In
    /// steady state this does not move: a rising count is a peer closing
    /// connections (for instance over its keep-alive policy).
    pub upstream_reconnects: Family<KindLabels, Counter>,
    /// The xDS frontend's streams, responses, ACKs and NACKs.
    pub xds: XdsMetrics,
    /// Fraction of the zoned clients' calls the zone plan sends across
    /// zones, per service (present once a client of known zone connected).
    pub zone_cross_fraction: Family<ServiceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Zone plans published, per service.
    pub zone_plans: Family<ServiceLabels, Counter>,
    /// Client streams whose zone was treated as unknown because their
    /// service already had `--zone-max-client-zones` client zones.
    pub zone_clients_over_cap: Family<ServiceLabels, Counter>,
    /// Services forgotten after `--idle-service-grace` without backends
    /// or streams.
    pub services_forgotten: Counter,
    /// 1 while this replica is clustered but has no etcd session
    /// (`crate::cluster`): it checks every backend itself and can neither
    /// hand checks over nor take them over.
    pub cluster_degraded: Gauge,
}

/// Labels naming an xDS resource type.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `lds`, `rds`, `cds` or `eds`.
    pub r#type: String,
}

/// What the xDS frontend counts (`lb_xds_*`).
pub struct XdsMetrics {
    /// ADS streams open now.
    pub streams_open: Gauge,
    /// ADS streams accepted.
    pub streams_total: Counter,
    /// ADS and LRS streams refused or closed, and requests ignored, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// Responses written, per resource type.
    pub responses: Family<TypeLabels, Counter>,
    /// Responses the client accepted, per resource type.
    pub acks: Family<TypeLabels, Counter>,
    /// Responses the client rejected, per resource type.
    pub nacks: Family<TypeLabels, Counter>,
    /// Time from a catalog change to a stream writing the new assignment.
    pub push_seconds: Histogram,
    /// LRS load reports folded into the client stats.
    pub load_reports: Counter,
    /// Encoded assignments cached (one per live service list and zone view).
    pub assignments_cached: Gauge,
}

impl XdsMetrics {
    fn new() -> Self {
        XdsMetrics {
            streams_open: Gauge::default(),
            streams_total: Counter::default(),
            refused: Family::default(),
            responses: Family::default(),
            acks: Family::default(),
            nacks: Family::default(),
            push_seconds: Histogram::new(PUSH_BUCKETS),
            load_reports: Counter::default(),
            assignments_cached: Gauge::default(),
        }
    }

    /// Counts one refusal (or ignored request) for `reason`.
    pub fn refuse(&self, reason: &str) {
        self.refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// The counter of `family` for resource type `kind`.
    pub fn of<'a>(
        family: &'a Family<TypeLabels, Counter>,
        kind: &str,
    ) -> impl std::ops::Deref<Target = Counter> + 'a {
        family.get_or_create(&TypeLabels {
            r#type: kind.into(),
        })
    }

    fn register(&self, parent: &mut Registrar<'_>) {
        let mut r = Registrar {
            registry: parent.registry.sub_registry_with_prefix("xds"),
            prefix: "lb_xds",
            families: parent.families,
        };
        r.add(
            "streams_open",
            "ADS streams open now",
            self.streams_open.clone(),
        );
        r.add(
            "streams",
            "ADS streams accepted",
            self.streams_total.clone(),
        );
        r.add(
            "refused",
            "ADS and LRS streams refused or closed, and requests ignored, by reason",
            self.refused.clone(),
        );
        r.add(
            "responses",
            "xDS responses written, per resource type",
            self.responses.clone(),
        );
        r.add(
            "acks",
            "xDS responses accepted by the client, per resource type",
            self.acks.clone(),
        );
        r.add(
            "nacks",
            "xDS responses rejected by the client, per resource type",
            self.nacks.clone(),
        );
        r.add(
            "push_seconds",
            "Time from a catalog change to an ADS stream writing the new assignment",
            self.push_seconds.clone(),
        );
        r.add(
            "load_reports",
            "LRS load reports folded into the client stats",
            self.load_reports.clone(),
        );
        r.add(
            "assignments_cached",
            "Encoded ClusterLoadAssignments cached: one per live service list and client-zone view",
            self.assignments_cached.clone(),
        );
    }
}

/// Buckets of the push-latency histograms (seconds).
const PUSH_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("lb");
        let m = Metrics {
            streams_open: Gauge::default(),
            streams_total: Counter::default(),
            streams_refused: Family::default(),
            lists_sent: Counter::default(),
            heartbeats_sent: Counter::default(),
            list_push_seconds: Histogram::new(PUSH_BUCKETS),
            registry_events: Family::default(),
            registry_rejects: Family::default(),
            registry_source_ok: Family::default(),
            backends: Family::default(),
            list_version: Family::default(),
            zone_cross_fraction: Family::default(),
            zone_plans: Family::default(),
            zone_clients_over_cap: Family::default(),
            services_forgotten: Counter::default(),
            cluster_degraded: Gauge::default(),
            client_calls: Family::default(),
            backend_outcomes: Family::default(),
            health_transitions: Family::default(),
            backend_weight: Family::default(),
            backend_healthy: Family::default(),
            admin_mutations: Family::default(),
            admin_errors: Family::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            client_stats_refused: Family::default(),
            registrations_refused: Family::default(),
            registry_conflicts: Family::default(),
            backends_held: Family::default(),
            gray_ejected: Family::default(),
            gray_held: Family::default(),
            gray_ejections: Family::default(),
            backends_kept_unregistered: Family::default(),
            upstream_reconnects: Family::default(),
            xds: XdsMetrics::new(),
            registry: Registry::default(),
            families: Vec::new(),
        };
        let mut families = Vec::new();
        let mut reg = Registrar {
            registry: &mut registry,
            prefix: "lb",
            families: &mut families,
        };
        reg.add(
            "streams_open",
            "BalanceLoad streams open now",
            m.streams_open.clone(),
        );
        reg.add(
            "streams",
            "BalanceLoad streams accepted",
            m.streams_total.clone(),
        );
        reg.add(
            "streams_refused",
            "BalanceLoad streams refused, by reason",
            m.streams_refused.clone(),
        );
        reg.add(
            "lists_sent",
            "Server lists written to streams",
            m.lists_sent.clone(),
        );
        reg.add(
            "heartbeats_sent",
            "Heartbeats written to quiet BalanceLoad streams that asked for them",
            m.heartbeats_sent.clone(),
        );
        reg.add(
            "list_push_seconds",
            "Time from a catalog change to a stream writing the new list",
            m.list_push_seconds.clone(),
        );
        reg.add(
            "registry_events",
            "Registry events applied, by source and kind",
            m.registry_events.clone(),
        );
        reg.add(
            "registry_source_ok",
            "Whether a registry source's last read succeeded (1) or failed (0: its last known state is served)",
            m.registry_source_ok.clone(),
        );
        reg.add(
            "registry_rejects",
            "Registry entries rejected, by source and reason",
            m.registry_rejects.clone(),
        );
        reg.add(
            "backends",
            "Backends registered, per service",
            m.backends.clone(),
        );
        reg.add(
            "list_version",
            "Current list version, per service",
            m.list_version.clone(),
        );
        reg.add(
            "zone_cross_fraction",
            "Fraction of zoned clients' calls the zone plan sends across zones, per service",
            m.zone_cross_fraction.clone(),
        );
        reg.add(
            "zone_plans",
            "Zone plans published, per service",
            m.zone_plans.clone(),
        );
        reg.add(
            "zone_clients_over_cap",
            "Client streams treated as of unknown zone because their service had --zone-max-client-zones client zones, per service",
            m.zone_clients_over_cap.clone(),
        );
        reg.add(
            "services_forgotten",
            "Services forgotten after --idle-service-grace without backends or streams",
            m.services_forgotten.clone(),
        );
        reg.add(
            "cluster_degraded",
            "1 while this clustered replica has no etcd session: it checks every backend itself until it rejoins",
            m.cluster_degraded.clone(),
        );
        reg.add(
            "client_calls",
            "Calls reported in client stats, per service and kind",
            m.client_calls.clone(),
        );
        reg.add(
            "gray_ejected",
            "Backends out of every list for failing clients' calls (gray failures), per service",
            m.gray_ejected.clone(),
        );
        reg.add(
            "gray_held",
            "Backends suspect of gray failure but kept listed: the ejection cap is reached, per service",
            m.gray_held.clone(),
        );
        reg.add(
            "gray_ejections",
            "Ejections for failing clients' calls, per service",
            m.gray_ejections.clone(),
        );
        reg.add(
            "backend_outcomes",
            "Call outcomes clients reported per backend (LRS), summed per service and end (success, error, deadline, cancelled)",
            m.backend_outcomes.clone(),
        );
        reg.add(
            "health_transitions",
            "Health transitions, per service and new state",
            m.health_transitions.clone(),
        );
        reg.add(
            "backend_weight",
            "Relative weight of each backend in its list (0 = not listed)",
            m.backend_weight.clone(),
        );
        reg.add(
            "backend_healthy",
            "1 when a backend's health check says it serves",
            m.backend_healthy.clone(),
        );
        reg.add(
            "admin_mutations",
            "Admin mutations applied, by action",
            m.admin_mutations.clone(),
        );
        reg.add(
            "admin_errors",
            "Admin requests refused, by reason",
            m.admin_errors.clone(),
        );
        reg.add(
            "connections_open",
            "Connections open now, per port",
            m.connections_open.clone(),
        );
        reg.add(
            "connections_refused",
            "Connections refused or closed by a guard (limits, handshake deadline), per port and reason",
            m.connections_refused.clone(),
        );
        reg.add(
            "client_stats_refused",
            "Client-stats reports refused, by reason",
            m.client_stats_refused.clone(),
        );
        reg.add(
            "registrations_refused",
            "Embedded-registry calls refused, by reason",
            m.registrations_refused.clone(),
        );
        reg.add(
            "registry_conflicts",
            "Registry sources that define a service another source (earlier in --registry) defines",
            m.registry_conflicts.clone(),
        );
        reg.add(
            "backends_held",
            "Backends kept listed against one replica's view (silent to their checker beyond --max-unconfirmed-removal, or serving to another replica)",
            m.backends_held.clone(),
        );
        reg.add(
            "backends_kept_unregistered",
            "Backends kept listed after leaving the registry, because they still pass health checks (--deregistration-grace)",
            m.backends_kept_unregistered.clone(),
        );
        reg.add(
            "upstream_reconnects",
            "Outgoing sessions (health probes, registry and cluster sessions) lost and opened again, per kind",
            m.upstream_reconnects.clone(),
        );
        m.xds.register(&mut reg);
        families.extend(
            ProcessCollector::FAMILIES
                .iter()
                .map(|name| (name.to_string(), MetricType::Gauge)),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            families,
            ..m
        }
    }

    /// The name of every sample the LB can export (counters with their
    /// `_total`, histograms' `_bucket`, `_sum` and `_count`), whether or
    /// not it has a value yet.
    pub fn sample_names(&self) -> Vec<String> {
        self.families
            .iter()
            .flat_map(|(name, kind)| match kind {
                MetricType::Counter => vec![format!("{name}_total")],
                MetricType::Histogram => ["bucket", "sum", "count"]
                    .iter()
                    .map(|s| format!("{name}_{s}"))
                    .collect(),
                _ => vec![name.clone()],
            })
            .collect()
    }

    /// Counts one registry entry rejected by `source` for `reason`.
    pub fn reject(&self, source: &str, reason: &str) {
        self.registry_rejects
            .get_or_create(&SourceLabels {
                source: source.into(),
                kind: reason.into(),
            })
            .inc();
    }

    /// Counts one registry event applied.
    pub fn event(&self, source: &str, kind: &str) {
        self.registry_events
            .get_or_create(&SourceLabels {
                source: source.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// Counts a connection accepted on `port`.
    pub fn connection_opened(&self, port: &str) {
        self.connections_open
            .get_or_create(&PortLabels { port: port.into() })
            .inc();
    }

    /// Counts a connection on `port` closed.
    pub fn connection_closed(&self, port: &str) {
        self.connections_open
            .get_or_create(&PortLabels { port: port.into() })
            .dec();
    }

    /// Counts a connection on `port` refused or closed for `reason`.
    pub fn connection_refused(&self, port: &str, reason: &str) {
        self.connections_refused
            .get_or_create(&PortReasonLabels {
                port: port.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one refused BalanceLoad stream.
    pub fn refuse(&self, reason: &str) {
        self.streams_refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts one lost outgoing session of `kind` that is being reopened.
    pub fn upstream_reconnect(&self, kind: &str) {
        self.upstream_reconnects_of(kind).inc();
    }

    /// The reconnect counter of `kind`, to keep where reconnects are hot.
    pub fn upstream_reconnects_of(&self, kind: &str) -> Counter {
        self.upstream_reconnects
            .get_or_create(&KindLabels { kind: kind.into() })
            .clone()
    }

    /// Counts one health transition of a backend of `service` to `to`.
    pub fn health_transition(&self, service: &str, to: crate::model::HealthState) {
        let to = format!("{to:?}").to_lowercase();
        self.health_transitions
            .get_or_create(&CallLabels {
                service: service.into(),
                kind: to,
            })
            .inc();
    }

    /// Sets a per-service alert gauge to `n`, or removes its series at 0
    /// (an alert present only while it holds).
    pub fn set_alert(family: &Family<ServiceLabels, Gauge>, service: &str, n: usize) {
        let labels = ServiceLabels {
            service: service.into(),
        };
        if n == 0 {
            family.remove(&labels);
        } else {
            family.get_or_create(&labels).set(n as i64);
        }
    }

    /// Sets the per-backend gauges.
    pub fn set_backend(
        &self,
        service: &str,
        addr: std::net::SocketAddr,
        weight: f64,
        healthy: bool,
    ) {
        let labels = BackendLabels {
            service: service.into(),
            backend: addr.to_string(),
        };
        self.backend_weight.get_or_create(&labels).set(weight);
        self.backend_healthy
            .get_or_create(&labels)
            .set(healthy as i64);
    }

    /// Drops the per-backend gauges of a backend that left.
    pub fn forget_backend(&self, service: &str, addr: std::net::SocketAddr) {
        let labels = BackendLabels {
            service: service.into(),
            backend: addr.to_string(),
        };
        self.backend_weight.remove(&labels);
        self.backend_healthy.remove(&labels);
    }

    /// Drops the per-service series of a service the catalog forgot (its
    /// backends' series went with them).
    pub fn forget_service(&self, service: &str) {
        let labels = ServiceLabels {
            service: service.into(),
        };
        self.backends.remove(&labels);
        self.list_version.remove(&labels);
        self.registry_conflicts.remove(&labels);
        self.backends_held.remove(&labels);
        self.gray_ejected.remove(&labels);
        self.gray_held.remove(&labels);
        self.gray_ejections.remove(&labels);
        self.backends_kept_unregistered.remove(&labels);
        self.zone_cross_fraction.remove(&labels);
        self.zone_plans.remove(&labels);
        self.zone_clients_over_cap.remove(&labels);
        let calls = [
            "started",
            "finished",
            "failed_to_send",
            "known_received",
            "dropped",
        ];
        for kind in calls {
            self.client_calls.remove(&CallLabels {
                service: service.into(),
                kind: kind.into(),
            });
        }
        for end in OUTCOME_ENDS {
            self.backend_outcomes.remove(&CallLabels {
                service: service.into(),
                kind: end.into(),
            });
        }
        for to in crate::model::HealthState::ALL {
            self.health_transitions.remove(&CallLabels {
                service: service.into(),
                kind: format!("{to:?}").to_lowercase(),
            });
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Process-level gauges read at scrape time: tokio tasks alive, open file
/// descriptors and resident memory. A leak shows here first.
#[derive(Debug)]
struct ProcessCollector;

impl ProcessCollector {
    /// The gauges it writes.
    const FAMILIES: [&'static str; 3] = [
        "lb_runtime_tasks",
        "lb_process_open_fds",
        "lb_process_resident_memory_bytes",
    ];
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let mut gauge = |name: &str, help: &str, value: i64| -> Result<(), std::fmt::Error> {
            let g: Gauge = Gauge::default();
            g.set(value);
            let metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(metric)
        };
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            gauge(
                "runtime_tasks",
                "Tokio tasks alive in the LB process",
                handle.metrics().num_alive_tasks() as i64,
            )?;
        }
        if let Some(fds) = process::open_fds() {
            gauge(
                "process_open_fds",
                "Open file descriptors of the LB process",
                fds as i64,
            )?;
        }
        if let Some(rss) = process::resident_bytes() {
            gauge(
                "process_resident_memory_bytes",
                "Resident memory of the LB process",
                rss as i64,
            )?;
        }
        Ok(())
    }
}

/// Readings of this process from `/proc` (Linux; `None` elsewhere).
pub mod process {
    /// Open file descriptors.
    pub fn open_fds() -> Option<usize> {
        std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
    }

    /// Resident set size in bytes.
    pub fn resident_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}
