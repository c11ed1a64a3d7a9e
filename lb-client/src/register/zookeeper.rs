//! Registration in ZooKeeper, Dubbo style: an ephemeral znode
//! `/<prefix>/<service>/providers/<URL-encoded grpc://host:port/service>`
//! holding `host:port`, on a session of `ttl`. The parents are created as
//! persistent nodes when missing. When the session expires (a long
//! partition, an ensemble restart that outlived it) a new session makes the
//! znode again; a graceful stop deletes it and closes the session. A killed
//! backend's znode disappears when its session times out.

use std::time::Duration;

use zookeeper_client as zk;

use super::{deregister_within, Control, Registration, RegistrationOptions, Retry};
use crate::Error;

/// Registers `addr` as an instance of `service` under the ensemble and
/// prefix of `rest` (`h1:2181,h2:2181/prefix`, prefix `/dubbo` by default).
pub fn start(
    rest: &str,
    service: &str,
    addr: &str,
    options: RegistrationOptions,
) -> Result<Registration, Error> {
    let (hosts, prefix) = match rest.split_once('/') {
        Some((h, p)) => (h.to_string(), format!("/{}", p.trim_matches('/'))),
        None => (rest.to_string(), "/dubbo".to_string()),
    };
    if hosts.is_empty() || prefix == "/" {
        return Err(Error::Config(format!(
            "registry zk://{rest}: give zk://host:2181[,…]/prefix"
        )));
    }
    let weight = options
        .metadata
        .as_ref()
        .and_then(|m| m.get("weight"))
        .and_then(|w| w.as_u64());
    let mut url = format!("grpc://{addr}/{service}");
    if let Some(w) = weight {
        url.push_str(&format!("?weight={w}"));
    }
    let node = percent_encoding::utf8_percent_encode(&url, percent_encoding::NON_ALPHANUMERIC);
    let path = format!("{prefix}/{service}/providers/{node}");
    let data = addr.to_string();
    let timeout = options.ttl.max(Duration::from_millis(100));
    Ok(Registration::spawn(1, move |_, control| {
        let (hosts, path, data) = (hosts.clone(), path.clone(), data.clone());
        async move {
            let mut retry = Retry::new(&path, &control);
            loop {
                let outcome = session(&hosts, &path, &data, timeout, &control).await;
                if !retry.again(outcome).await {
                    return;
                }
            }
        }
    }))
}

/// One session: connect, make the znode, hold it until cancelled or the
/// session ends.
async fn session(
    hosts: &str,
    path: &str,
    data: &str,
    timeout: Duration,
    control: &Control,
) -> Result<(), String> {
    let client = zk::Client::connector()
        .with_session_timeout(timeout)
        .connect(hosts)
        .await
        .map_err(|e| format!("connect {hosts}: {e}"))?;
    let mut state = client.state_watcher();
    ensure_parents(&client, path).await?;
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    match client.create(path, data.as_bytes(), &ephemeral).await {
        Ok(_) => {}
        Err(zk::Error::NodeExists) => {
            // Left by an earlier session of ours that has not expired yet:
            // replace it so that it lives with this session.
            let _ = client.delete(path, None).await;
            client
                .create(path, data.as_bytes(), &ephemeral)
                .await
                .map_err(|e| format!("create {path}: {e}"))?;
        }
        Err(e) => return Err(format!("create {path}: {e}")),
    }
    control.registered.send_replace(true);
    tracing::info!(%path, session_timeout = ?client.session_timeout(), "registered in ZooKeeper");
    loop {
        tokio::select! {
            _ = control.cancel.cancelled() => {
                deregister_within(path, async {
                    client.delete(path, None).await.map_err(|e| format!("delete: {e}"))
                })
                .await;
                return Ok(());
            }
            s = state.changed() => {
                if s.is_terminated() {
                    return Err(format!("ZooKeeper session ended: {s}"));
                }
            }
        }
    }
}

/// Creates the persistent parents of `path` that do not exist yet.
async fn ensure_parents(client: &zk::Client, path: &str) -> Result<(), String> {
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let mut parent = String::new();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    for segment in &segments[..segments.len() - 1] {
        parent.push('/');
        parent.push_str(segment);
        match client.create(&parent, &[], &persistent).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => return Err(format!("create {parent}: {e}")),
        }
    }
    Ok(())
}
