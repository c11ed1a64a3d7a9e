//! Command-line and environment configuration of an `lb-server` process.
//!
//! Every flag can also be given as an `LB_…` environment variable; `--help`
//! documents them all. [`Config`] is plain data: [`crate::LbServer`] turns it
//! into running parts.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Configuration of one LB replica.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "lb-server",
    version,
    about = "Lookaside load balancer for gRPC: streams grpc.lb.v1 server lists built from a service registry.",
    long_about = None
)]
pub struct Config {
    /// Address of the gRPC port: grpc.lb.v1.LoadBalancer and the embedded
    /// registry's registration API.
    #[arg(long, env = "LB_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,

    /// Address of the admin HTTP port (health, JSON API, Prometheus metrics).
    #[arg(long, env = "LB_ADMIN_LISTEN", default_value = "127.0.0.1:7001")]
    pub admin_listen: SocketAddr,

    /// Where backends are registered: `memory` (embedded, fed by the
    /// registration API), `etcd://host1:2379,host2:2379`, or
    /// `file:///path/to/services.json`.
    #[arg(long, env = "LB_REGISTRY", default_value = "memory")]
    pub registry: String,

    /// Key prefix of service instances in etcd: keys are
    /// `<prefix><service>/<instance>`.
    #[arg(long, env = "LB_ETCD_PREFIX", default_value = "/services/")]
    pub etcd_prefix: String,

    /// Extra names for services, `name=service` (repeatable, or
    /// comma-separated in the env var).
    #[arg(long = "alias", env = "LB_ALIASES", value_delimiter = ',', value_parser = parse_alias)]
    pub aliases: Vec<(String, String)>,

    /// Domain suffixes stripped from requested names, e.g. `.svc.test` maps
    /// `greeter.svc.test:443` to `greeter` (repeatable / comma-separated).
    #[arg(
        long = "domain-suffix",
        env = "LB_DOMAIN_SUFFIXES",
        value_delimiter = ','
    )]
    pub domain_suffixes: Vec<String>,

    /// Interval at which clients are asked to report client stats (0 = never).
    #[arg(long, env = "LB_CLIENT_STATS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub client_stats_interval: Duration,

    /// A BalanceLoad stream that sends no initial request within this time is
    /// closed.
    #[arg(long, env = "LB_INITIAL_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub initial_request_timeout: Duration,

    /// Lease time to live given to embedded registrations that ask for none.
    #[arg(long, env = "LB_DEFAULT_TTL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,

    /// Longest server list sent (weights are expressed by repetition and are
    /// scaled down to fit).
    #[arg(long, env = "LB_MAX_LIST_LEN", default_value_t = 256)]
    pub max_list_len: usize,

    /// On shutdown, streams are closed spread over this window so that their
    /// clients do not reconnect to the other replicas all at once.
    #[arg(long, env = "LB_SHUTDOWN_SPREAD", default_value = "1s", value_parser = humantime::parse_duration)]
    pub shutdown_spread: Duration,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info,lb_server=debug`.
    #[arg(long, env = "LB_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// Defaults of every flag, with the given listen addresses: handy for
    /// embedding the LB in a program or a test.
    pub fn with_addrs(listen: SocketAddr, admin_listen: SocketAddr) -> Self {
        let mut cfg = Config::parse_from(["lb-server"]);
        cfg.listen = listen;
        cfg.admin_listen = admin_listen;
        cfg
    }
}

fn parse_alias(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, service)) if !name.trim().is_empty() && !service.trim().is_empty() => {
            Ok((name.trim().to_string(), service.trim().to_string()))
        }
        _ => Err(format!("alias {s:?} is not of the form name=service")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_and_suffixes_parse() {
        let cfg = Config::parse_from([
            "lb-server",
            "--alias",
            "hello=greeter",
            "--domain-suffix",
            ".svc.test,.example",
        ]);
        assert_eq!(cfg.aliases, vec![("hello".into(), "greeter".into())]);
        assert_eq!(cfg.domain_suffixes, vec![".svc.test", ".example"]);
        assert_eq!(cfg.client_stats_interval, Duration::from_secs(10));
    }

    #[test]
    fn bad_alias_is_refused() {
        assert!(Config::try_parse_from(["lb-server", "--alias", "nonsense"]).is_err());
    }
}
