//! Registration with the LB's embedded registry (`lb.registry.v1.Registry`
//! on its gRPC port), with every LB given: register, renew at a third of
//! the TTL, deregister on a graceful stop. A lease the LB no longer knows
//! (it restarted) makes the session fail and register again.

use std::time::Duration;

use lb_proto::registry::v1::{
    registry_client::RegistryClient, DeregisterRequest, KeepAliveRequest, RegisterRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{ClientTlsConfig, Endpoint};

use super::{deregister_within, Control, Registration, RegistrationOptions, Retry};
use crate::Error;

/// Registers `addr` as an instance of `service` with each LB in `lbs`.
pub fn start(
    lbs: Vec<String>,
    service: &str,
    addr: &str,
    options: RegistrationOptions,
) -> Result<Registration, Error> {
    if lbs.is_empty() {
        return Err(Error::Config("no LB address given".into()));
    }
    let request = RegisterRequest {
        service: service.to_string(),
        address: addr.to_string(),
        ttl_seconds: options.ttl.as_secs().max(1) as u32,
        metadata_json: options.metadata.map(|m| m.to_string()).unwrap_or_default(),
        instance: String::new(),
    };
    if let Some(tls) = &options.lb_tls {
        tls.check()?;
    }
    let tls = options.lb_tls.map(|t| t.tonic());
    let authorization = options
        .token
        .as_deref()
        .map(|t| format!("Bearer {}", t.trim()).parse::<MetadataValue<Ascii>>())
        .transpose()
        .map_err(|_| Error::Config("the registration token is not printable ASCII".into()))?;
    Ok(Registration::spawn(lbs.len(), move |i, control| {
        let lb = lbs[i].clone();
        let (tls, request, authorization) = (tls.clone(), request.clone(), authorization.clone());
        async move {
            let what = format!("{} at {lb}", request.service);
            let mut retry = Retry::new(&what, &control);
            loop {
                let outcome =
                    session(&lb, tls.clone(), &request, authorization.clone(), &control).await;
                if !retry.again(outcome).await {
                    return;
                }
            }
        }
    }))
}

/// One registration with one LB, kept alive until cancelled or lost.
async fn session(
    lb: &str,
    tls: Option<ClientTlsConfig>,
    request: &RegisterRequest,
    authorization: Option<MetadataValue<Ascii>>,
    control: &Control,
) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{lb}"))
        .map_err(|e| format!("bad LB address {lb:?}: {e}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("TLS settings for {lb}: {e}"))?;
    }
    let channel = endpoint
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("connect {lb}: {e}"))?;
    let mut client = RegistryClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        if let Some(value) = &authorization {
            r.metadata_mut().insert("authorization", value.clone());
        }
        Ok(r)
    });
    let status = |s: tonic::Status| format!("{lb}: {} {}", s.code(), s.message());
    let reply = client
        .register(request.clone())
        .await
        .map_err(status)?
        .into_inner();
    control.registered.send_replace(true);
    tracing::info!(%lb, service = %request.service, addr = %request.address, lease = reply.lease_id, "registered with the embedded registry");
    let every = Duration::from_secs(reply.ttl_seconds.max(1) as u64) / 3;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = control.cancel.cancelled() => {
                let what = format!("{} at {lb}", request.service);
                deregister_within(&what, async {
                    client
                        .deregister(DeregisterRequest { lease_id: reply.lease_id })
                        .await
                        .map(|_| ())
                        .map_err(status)
                })
                .await;
                return Ok(());
            }
            _ = tick.tick() => {
                client.keep_alive(KeepAliveRequest { lease_id: reply.lease_id }).await.map_err(status)?;
            }
        }
    }
}
