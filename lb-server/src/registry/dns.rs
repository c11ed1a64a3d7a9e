//! The DNS registry source: services found under DNS names.
//!
//! `--registry dns://[server:port]` with `--dns-service service=name[:port]`
//! per service. For each name the source asks, in order:
//! - SRV `_grpc._tcp.<name>`: every target of the lowest priority, at its
//!   port, weighted by the SRV weight (targets resolved from the answer's
//!   additional section, else looked up);
//! - if there is no SRV record: A and AAAA of `<name>`, at the configured
//!   port.
//!
//! Names are re-resolved when the shortest TTL of the answer runs out,
//! clamped to `--dns-min-ttl` / `--dns-max-ttl` (stock gRPC re-resolves
//! only every 30 s to 30 min). When resolution fails (timeout, SERVFAIL, no
//! server) or the answer is empty, the last good answer stays in force and
//! the failure is counted; retries back off from the floor to the ceiling.
//! Records that cannot be used (port 0, a target without addresses, an
//! unspecified or multicast address) are rejected one by one, counted, and
//! the rest of the answer is used.
//!
//! A name may say the zone of its backends: `service=name[:port]?zone=a`
//! (and `&region=r`). A service may be named several times (one name per
//! zone, say): its backends are the union of its names' answers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::FutureExt;
use hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use super::{Registry, RegistrySink};
use crate::model::{Instance, Locality, RejectReason, Rejected};

/// One service and the DNS name it is found under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsService {
    /// The service name clients ask for.
    pub service: String,
    /// The DNS name (without the `_grpc._tcp.` label).
    pub name: String,
    /// Port of A/AAAA answers (SRV answers carry their own).
    pub port: Option<u16>,
    /// The zone and region of the backends under this name (`?zone=…&region=…`).
    pub locality: Locality,
}

/// How the DNS source resolves.
#[derive(Debug, Clone)]
pub struct DnsSettings {
    /// The name server to ask; `None`: the system's (`/etc/resolv.conf`).
    pub server: Option<SocketAddr>,
    /// The services and their names.
    pub services: Vec<DnsService>,
    /// Shortest time between two resolutions of a name.
    pub min_ttl: Duration,
    /// Longest time between two resolutions of a name.
    pub max_ttl: Duration,
    /// Time allowed for one query (a whole resolution, which may take a
    /// few queries, gets three times this).
    pub timeout: Duration,
}

impl DnsSettings {
    /// Settings from the part of a `dns://[server:port]` URL after the
    /// scheme and the `--dns-…` flags.
    pub fn parse(rest: &str, cfg: &crate::config::RegistryFlags) -> anyhow::Result<Self> {
        let rest = rest.trim_end_matches('/');
        let server = if rest.is_empty() {
            None
        } else {
            Some(parse_server(rest)?)
        };
        anyhow::ensure!(
            !cfg.dns_services.is_empty(),
            "--registry dns://…: name the services to resolve with --dns-service service=name[:port]"
        );
        let services = cfg
            .dns_services
            .iter()
            .map(|(service, name)| parse_service(service, name))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let min_ttl = cfg.dns_min_ttl.max(Duration::from_millis(50));
        Ok(DnsSettings {
            server,
            services,
            min_ttl,
            max_ttl: cfg.dns_max_ttl.max(min_ttl),
            timeout: Duration::from_secs(2),
        })
    }
}

fn parse_server(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    anyhow::bail!("dns://{s}: the name server must be an IP address, with an optional :port")
}

/// Parses one `--dns-service service=name[:port][?zone=…&region=…]` value.
pub fn parse_service(service: &str, name: &str) -> anyhow::Result<DnsService> {
    let (name, query) = name.split_once('?').unwrap_or((name, ""));
    let mut locality = Locality::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("zone", z)) => locality.zone = Locality::new("", z).zone,
            Some(("region", r)) => locality.region = Locality::new(r, "").region,
            _ => anyhow::bail!(
                "--dns-service {service}={name}?{query}: {pair:?} is not zone=… or region=…"
            ),
        }
    }
    let (host, port) = match name.rsplit_once(':') {
        Some((h, p)) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| anyhow::anyhow!("--dns-service {service}={name}: bad port"))?;
            (h, Some(port))
        }
        _ => (name, None),
    };
    let host = host.trim_end_matches('.');
    anyhow::ensure!(
        !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')),
        "--dns-service {service}={name}: {host:?} is not a DNS name"
    );
    Ok(DnsService {
        service: service.to_string(),
        name: host.to_string(),
        port,
        locality,
    })
}

/// Reads services from DNS.
pub struct DnsRegistry {
    settings: DnsSettings,
}

impl DnsRegistry {
    /// A source resolving as `settings` says.
    pub fn new(settings: DnsSettings) -> Self {
        DnsRegistry { settings }
    }

    fn resolver(&self) -> anyhow::Result<TokioResolver> {
        let mut options = ResolverOpts::default();
        options.timeout = self.settings.timeout;
        options.attempts = 1;
        // Every resolution asks the server: the schedule follows the
        // records' TTLs, so a cache would only hide changes.
        options.cache_size = 0;
        let provider = TokioRuntimeProvider::default();
        let mut builder = match self.settings.server {
            Some(server) => {
                let mut ns = NameServerConfig::udp_and_tcp(server.ip());
                for c in &mut ns.connections {
                    c.port = server.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    provider,
                )
            }
            None => TokioResolver::builder(provider)
                .map_err(|e| anyhow::anyhow!("reading the system's DNS configuration: {e}"))?,
        };
        let base = builder.options_mut();
        base.timeout = options.timeout;
        base.attempts = options.attempts;
        base.cache_size = options.cache_size;
        builder
            .build()
            .map_err(|e| anyhow::anyhow!("building the DNS resolver: {e}"))
    }
}

/// One resolution of one service.
#[derive(Debug, Default)]
struct Answer {
    instances: Vec<Instance>,
    rejected: Vec<(String, Rejected)>,
    ttl: Option<Duration>,
}

impl Answer {
    fn ttl(&mut self, seconds: u32) {
        let t = Duration::from_secs(seconds as u64);
        self.ttl = Some(self.ttl.map_or(t, |old| old.min(t)));
    }

    fn add(&mut self, service: &DnsService, ip: IpAddr, port: u16, weight: u32, via: &str) {
        let key = format!("{}/{}", service.service, SocketAddr::new(ip, port));
        if ip.is_unspecified() || ip.is_multicast() || port == 0 {
            self.rejected.push((
                key,
                Rejected::new(
                    RejectReason::BadAddress,
                    format!("{via}: {ip} port {port} cannot be called"),
                ),
            ));
            return;
        }
        self.instances.push(Instance {
            service: service.service.clone(),
            key,
            addr: SocketAddr::new(ip, port),
            weight: weight.clamp(1, 10_000),
            metadata: Some(match service.locality.is_known() {
                true => serde_json::json!({
                    "dns": via,
                    "zone": service.locality.zone,
                    "region": service.locality.region,
                }),
                false => serde_json::json!({ "dns": via }),
            }),
            registered_at: SystemTime::now(),
        });
    }
}

/// Whether a lookup error means "no such records" rather than a failure.
fn no_records(e: &hickory_resolver::net::NetError) -> bool {
    e.is_no_records_found() || e.is_nx_domain()
}

async fn resolve(resolver: &TokioResolver, service: &DnsService) -> Result<Answer, String> {
    let mut answer = Answer::default();
    let srv_name = format!("_grpc._tcp.{}.", service.name);
    match resolver.lookup(srv_name.as_str(), RecordType::SRV).await {
        Ok(lookup) => {
            let srvs: Vec<_> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some((r.ttl, srv.clone())),
                    _ => None,
                })
                .collect();
            let best = srvs.iter().map(|(_, s)| s.priority).min();
            for (ttl, srv) in srvs.iter().filter(|(_, s)| Some(s.priority) == best) {
                answer.ttl(*ttl);
                let target = srv.target.to_ascii();
                if target == "." {
                    continue; // "service decidedly not available at this name"
                }
                let via = format!("SRV {srv_name} -> {target}:{}", srv.port);
                let mut ips: Vec<(u32, IpAddr)> = lookup
                    .additionals()
                    .iter()
                    .filter(|r| r.name == srv.target)
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some((r.ttl, IpAddr::V4(a.0))),
                        RData::AAAA(a) => Some((r.ttl, IpAddr::V6(a.0))),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    match resolver.lookup_ip(target.as_str()).await {
                        Ok(found) => {
                            let ttl = found
                                .as_lookup()
                                .answers()
                                .iter()
                                .map(|r| r.ttl)
                                .min()
                                .unwrap_or(0);
                            ips = found.iter().map(|ip| (ttl, ip)).collect();
                        }
                        Err(e) if no_records(&e) => {}
                        Err(e) => return Err(format!("resolving SRV target {target}: {e}")),
                    }
                }
                if ips.is_empty() {
                    answer.rejected.push((
                        format!("{}/{target}:{}", service.service, srv.port),
                        Rejected::new(
                            RejectReason::Unresolvable,
                            format!("{via}: the target has no A/AAAA records"),
                        ),
                    ));
                }
                for (ttl, ip) in ips {
                    answer.ttl(ttl);
                    answer.add(service, ip, srv.port, srv.weight as u32, &via);
                }
            }
            if !srvs.is_empty() {
                return Ok(answer);
            }
        }
        Err(e) if no_records(&e) => {}
        Err(e) => return Err(format!("SRV {srv_name}: {e}")),
    }
    let Some(port) = service.port else {
        return Err(format!(
            "no SRV records at {srv_name}, and --dns-service {}={} gives no port for A/AAAA answers",
            service.service, service.name
        ));
    };
    let name = format!("{}.", service.name);
    match resolver.lookup_ip(name.as_str()).await {
        Ok(found) => {
            for r in found.as_lookup().answers() {
                answer.ttl(r.ttl);
            }
            for ip in found.iter() {
                answer.add(service, ip, port, 1, &format!("A/AAAA {name}"));
            }
            Ok(answer)
        }
        Err(e) if no_records(&e) => Ok(answer),
        Err(e) => Err(format!("A/AAAA {name}: {e}")),
    }
}

impl Registry for DnsRegistry {
    fn kind(&self) -> &'static str {
        "dns"
    }

    fn run(
        self: Arc<Self>,
        sink: RegistrySink,
        shutdown: CancellationToken,
    ) -> BoxFuture<'static, ()> {
        async move {
            let resolver = match self.resolver() {
                Ok(r) => r,
                Err(e) => {
                    // Nothing to resolve with: report, and stay unready.
                    sink.source_error(&e.to_string());
                    shutdown.cancelled().await;
                    return;
                }
            };
            let pending = Arc::new(AtomicUsize::new(self.settings.services.len()));
            let answers = Answers::default();
            let watches: Vec<_> = self
                .settings
                .services
                .iter()
                .cloned()
                .map(|service| {
                    watch(
                        resolver.clone(),
                        service,
                        self.settings.clone(),
                        sink.clone(),
                        pending.clone(),
                        answers.clone(),
                        shutdown.clone(),
                    )
                })
                .collect();
            futures::future::join_all(watches).await;
        }
        .boxed()
    }
}

/// The last good answer of every name, per service: a service named more
/// than once is the union of its names' answers.
#[derive(Clone, Default)]
struct Answers(Arc<std::sync::Mutex<BTreeMap<String, NameAnswers>>>);

/// One service's instances per DNS name.
type NameAnswers = BTreeMap<String, Vec<Instance>>;

impl Answers {
    /// Records `service.name`'s answer; returns the service's union.
    fn set(&self, service: &DnsService, instances: Vec<Instance>) -> Vec<Instance> {
        let mut all = self.0.lock().expect("answers lock");
        let names = all.entry(service.service.clone()).or_default();
        names.insert(service.name.clone(), instances);
        names.values().flatten().cloned().collect()
    }
}

/// Resolves one service on its TTL schedule until `shutdown`.
async fn watch(
    resolver: TokioResolver,
    service: DnsService,
    s: DnsSettings,
    sink: RegistrySink,
    pending: Arc<AtomicUsize>,
    answers: Answers,
    shutdown: CancellationToken,
) {
    let mut first = true;
    let mut retry = s.min_ttl;
    let mut last: BTreeMap<String, SocketAddr> = BTreeMap::new();
    loop {
        let limit = s.timeout * 3;
        let resolved = tokio::time::timeout(limit, resolve(&resolver, &service))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
        let wait = match resolved {
            Ok(answer) => {
                for (key, r) in &answer.rejected {
                    sink.reject(key, r.reason, &r.detail);
                }
                if answer.instances.is_empty() {
                    sink.source_error(&format!(
                        "{}: no usable records for {}; keeping the last answer",
                        service.service, service.name
                    ));
                    retry_delay(&mut retry, &s)
                } else {
                    retry = s.min_ttl;
                    let now: BTreeMap<String, SocketAddr> = answer
                        .instances
                        .iter()
                        .map(|i| (i.key.clone(), i.addr))
                        .collect();
                    if now != last {
                        tracing::info!(service = %service.service, name = %service.name,
                            backends = now.len(), "DNS answer changed");
                        last = now;
                    }
                    let union = answers.set(&service, answer.instances);
                    sink.replace_service(&service.service, union);
                    answer.ttl.unwrap_or(s.max_ttl).clamp(s.min_ttl, s.max_ttl)
                }
            }
            Err(e) => {
                sink.source_error(&format!("{}: {e}", service.service));
                retry_delay(&mut retry, &s)
            }
        };
        if first {
            first = false;
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                sink.mark_synced();
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The delay before retrying after a failure: from the floor, doubling to
/// the ceiling.
fn retry_delay(retry: &mut Duration, s: &DnsSettings) -> Duration {
    let now = *retry;
    *retry = (*retry * 2).min(s.max_ttl);
    now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_and_servers_parse() {
        assert_eq!(
            parse_service("greeter", "greeter.svc.test:50051").unwrap(),
            DnsService {
                service: "greeter".into(),
                name: "greeter.svc.test".into(),
                port: Some(50051),
                locality: Locality::default(),
            }
        );
        let zoned = parse_service("g", "g-a.example:80?zone=a&region=eu").unwrap();
        assert_eq!(zoned.locality, Locality::new("eu", "a"));
        assert_eq!(zoned.name, "g-a.example");
        assert!(parse_service("g", "g.example:80?color=red").is_err());
        assert_eq!(parse_service("g", "g.example.").unwrap().port, None);
        assert!(parse_service("g", "bad name:1").is_err());
        assert!(parse_service("g", "g.example:0").is_err());
        assert_eq!(
            parse_server("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert_eq!(
            parse_server("10.0.0.1").unwrap(),
            "10.0.0.1:53".parse().unwrap()
        );
        assert!(parse_server("dns.example").is_err());
    }
}
