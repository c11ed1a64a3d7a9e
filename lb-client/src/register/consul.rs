//! Registration with a Consul agent: `PUT /v1/agent/service/register` with
//! a gRPC health check on the backend (Consul calls its
//! `grpc.health.v1.Health`), renewed when the agent forgets it (an agent
//! restart): the registration is checked every third of `ttl`. A graceful
//! stop deregisters it; a crashed backend fails its check, leaves the
//! passing set, and is removed by the agent after a minute critical.

use std::time::Duration;

use super::{deregister_within, Control, Registration, RegistrationOptions, Retry};
use crate::Error;

/// Registers `addr` as an instance of `service` with the Consul agent of
/// `url`: `consul://host:8500`, or `consul+https://host:8501` with
/// `options.consul_tls`.
pub fn start(
    url: &str,
    service: &str,
    addr: &str,
    options: RegistrationOptions,
) -> Result<Registration, Error> {
    let (scheme, rest, default_port) = match url.strip_prefix("consul+https://") {
        Some(rest) => ("https", rest, 8501),
        None => ("http", url.strip_prefix("consul://").unwrap_or(""), 8500),
    };
    let agent = Some(
        rest.split(['/', '?'])
            .next()
            .unwrap_or_default()
            .to_string(),
    )
    .filter(|a| !a.is_empty())
    .ok_or_else(|| Error::Config(format!("registry {url:?}: give consul://host:8500")))?;
    let agent = if agent.contains(':') {
        agent
    } else {
        format!("{agent}:{default_port}")
    };
    let tls = match (scheme, &options.consul_tls) {
        ("https", Some(tls)) => {
            let mut config = (*tls.rustls()?).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(config)
        }
        ("https", None) => {
            return Err(Error::Config(format!(
                "registry {url:?}: HTTPS to Consul needs the agent's CA (consul_tls)"
            )))
        }
        (_, Some(_)) => {
            return Err(Error::Config(format!(
                "registry {url:?}: TLS settings are given but the URL is plain HTTP: use consul+https://"
            )))
        }
        // Plain HTTP: reqwest still wants a TLS backend with a provider.
        _ => None,
    };
    let tls = tls.unwrap_or_else(|| {
        use tokio_rustls::rustls;
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth()
    });
    let (host, port) = addr
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().ok()?,
            ))
        })
        .ok_or_else(|| Error::Config(format!("{addr:?} is not host:port")))?;
    let id = format!("{service}-{host}-{port}");
    let interval = (options.ttl / 3).max(Duration::from_secs(1));
    let meta: serde_json::Map<String, serde_json::Value> = options
        .metadata
        .as_ref()
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let text = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), serde_json::Value::String(text))
                })
                .collect()
        })
        .unwrap_or_default();
    let weight = options
        .metadata
        .as_ref()
        .and_then(|m| m.get("weight"))
        .and_then(|w| w.as_u64())
        .unwrap_or(1);
    let body = serde_json::json!({
        "ID": id,
        "Name": service,
        "Address": host,
        "Port": port,
        "Meta": meta,
        "Weights": { "Passing": weight, "Warning": 1 },
        "Check": {
            "Name": "gRPC health",
            "GRPC": addr,
            "Interval": format!("{}s", interval.as_secs()),
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
    let agent = Agent {
        base: format!("{scheme}://{agent}"),
        token: options.token.clone(),
        http,
    };
    Ok(Registration::spawn(1, move |_, control| {
        let (agent, id, body) = (agent.clone(), id.clone(), body.clone());
        async move {
            let mut retry = Retry::new(&id, &control);
            loop {
                let outcome = session(&agent, &id, &body, interval, &control).await;
                if !retry.again(outcome).await {
                    return;
                }
            }
        }
    }))
}

/// The agent's HTTP API.
#[derive(Clone)]
struct Agent {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Agent {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.header("X-Consul-Token", t),
            None => r,
        }
    }

    async fn send(
        &self,
        r: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<reqwest::StatusCode, String> {
        let response = r.send().await.map_err(|e| format!("{what}: {e}"))?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            return Ok(status);
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!("{what}: {status}: {}", text.trim()))
    }
}

/// Registers, then checks every `every` that the agent still has the
/// service, until cancelled.
async fn session(
    agent: &Agent,
    id: &str,
    body: &serde_json::Value,
    every: Duration,
    control: &Control,
) -> Result<(), String> {
    let register = agent
        .request(reqwest::Method::PUT, "/v1/agent/service/register")
        .json(body);
    let status = agent.send(register, "register").await?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err("register: the agent answered 404".into());
    }
    control.registered.send_replace(true);
    tracing::info!(%id, base = %agent.base, "registered with the Consul agent");
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = control.cancel.cancelled() => {
                deregister_within(id, async {
                    let r = agent.request(reqwest::Method::PUT, &format!("/v1/agent/service/deregister/{id}"));
                    agent.send(r, "deregister").await.map(|_| ())
                })
                .await;
                return Ok(());
            }
            _ = tick.tick() => {
                let r = agent.request(reqwest::Method::GET, &format!("/v1/agent/service/{id}"));
                if agent.send(r, "check").await? == reqwest::StatusCode::NOT_FOUND {
                    return Err("the agent forgot the service".into());
                }
            }
        }
    }
}
