//! Registration in etcd: the key `<prefix><service>/<addr>` on a lease kept
//! alive. When the lease is lost (etcd restarted, a long partition) a new
//! lease is granted and the key written again; a graceful stop deletes the
//! key and revokes the lease.

use std::time::Duration;

use etcd_client::PutOptions;

use super::{deregister_within, Control, Registration, RegistrationOptions, Retry};
use crate::etcd::EtcdAccess;
use crate::Error;

/// Registers `addr` as an instance of `service` in the etcd at `endpoints`.
pub fn start(
    endpoints: Vec<String>,
    service: &str,
    addr: &str,
    options: RegistrationOptions,
) -> Result<Registration, Error> {
    if endpoints.is_empty() {
        return Err(Error::Config("no etcd endpoint given".into()));
    }
    let key = format!("{}{service}/{addr}", options.etcd_prefix);
    let value = if options.plain_value {
        addr.to_string()
    } else {
        serde_json::json!({"Op": 0, "Addr": addr, "Metadata": options.metadata}).to_string()
    };
    if let Some(tls) = &options.etcd_tls {
        tls.check()?;
    }
    let access = EtcdAccess::new(
        endpoints,
        options.etcd_tls.map(|t| t.tonic()),
        options.etcd_user,
    );
    let ttl = options.ttl;
    let mut access = Some(access);
    Ok(Registration::spawn(1, move |_, control| {
        let (access, key, value) = (access.take().expect("one task"), key.clone(), value.clone());
        async move {
            let mut previous_lease: Option<i64> = None;
            let mut retry = Retry::new(&key, &control);
            loop {
                let outcome =
                    session(&access, &key, &value, ttl, &control, &mut previous_lease).await;
                if outcome.is_err() {
                    access.rotate();
                }
                if !retry.again(outcome).await {
                    return;
                }
            }
        }
    }))
}

/// One lease: grant, put, keep alive until cancelled or lost.
async fn session(
    access: &EtcdAccess,
    key: &str,
    value: &str,
    ttl: Duration,
    control: &Control,
    previous_lease: &mut Option<i64>,
) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: etcd_client::Error| format!("{what}: {err}")
    };
    let mut client = access.connect().await.map_err(e("connect"))?;
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await
        .map_err(e("lease grant"))?
        .id();
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map_err(e("put"))?;
    if let Some(old) = previous_lease.replace(lease) {
        // The key now hangs on the new lease; the old one is not needed.
        let _ = client.lease_revoke(old).await;
    }
    control.registered.send_replace(true);
    tracing::info!(%key, lease, "registered in etcd");
    let (mut keeper, mut responses) = client
        .lease_keep_alive(lease)
        .await
        .map_err(e("keep-alive"))?;
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(200)));
    loop {
        tokio::select! {
            _ = control.cancel.cancelled() => {
                deregister_within(key, async {
                    client.delete(key, None).await.map_err(e("delete"))?;
                    client.lease_revoke(lease).await.map_err(e("revoke"))?;
                    Ok(())
                })
                .await;
                return Ok(());
            }
            _ = tick.tick() => keeper.keep_alive().await.map_err(e("keep-alive"))?,
            message = responses.message() => match message.map_err(e("keep-alive"))? {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => return Err(format!("lease {lease} expired")),
                None => return Err("keep-alive stream ended".into()),
            },
        }
    }
}
