//! A real ZooKeeper server for the ZooKeeper registry tests: Debian's
//! `zookeeper` package (`/usr/share/java/zookeeper.jar`, or the classpath in
//! `$ZOOKEEPER_CLASSPATH`), standalone, on a free loopback port with a
//! temporary data dir and a 200 ms tick, so that sessions may be as short as
//! 400 ms. A missing installation is a loud failure with a fix-it message.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use zookeeper_client as zk;

use crate::{free_port, Proc};

/// The Java classpath holding the ZooKeeper server.
fn classpath() -> String {
    if let Ok(cp) = std::env::var("ZOOKEEPER_CLASSPATH") {
        return cp;
    }
    let jar = PathBuf::from("/usr/share/java/zookeeper.jar");
    assert!(
        jar.exists(),
        "ZooKeeper not found ({} is missing and ZOOKEEPER_CLASSPATH is not set). Install it \
         (Debian: `apt-get install zookeeper`), or run scripts/test, which installs it.",
        jar.display()
    );
    // The jar's manifest names its dependencies in /usr/share/java.
    format!("/etc/zookeeper/conf:{}", jar.display())
}

/// One standalone ZooKeeper server.
pub struct ZooKeeper {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    /// Its client port on 127.0.0.1.
    pub port: u16,
}

impl ZooKeeper {
    /// Starts a server and waits until it answers.
    pub async fn start() -> ZooKeeper {
        let mut zk = ZooKeeper {
            proc: None,
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        };
        zk.launch().await;
        zk
    }

    async fn launch(&mut self) {
        let java = std::env::var("JAVA").unwrap_or_else(|_| "java".into());
        // Loopback only: the port alone on the command line would bind
        // every interface.
        let config = self.dir.path().join("zoo.cfg");
        std::fs::write(
            &config,
            format!(
                "tickTime=200\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\nmaxClientCnxns=0\n4lw.commands.whitelist=\n",
                self.dir.path().join("data").display(),
                self.port
            ),
        )
        .expect("write zoo.cfg");
        let mut cmd = Command::new(java);
        cmd.args([
            "-Xmx256m",
            "-Dzookeeper.admin.enableServer=false",
            "-Dzookeeper.jmx.log4j.disable=true",
            "-Dzookeeper.4lw.commands.whitelist=",
            "-Dzookeeper.log.dir=",
        ])
        .arg("-cp")
        .arg(classpath())
        .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
        .arg(&config);
        self.proc = Some(Proc::spawn("zookeeper", cmd, false));
        let log = self
            .proc
            .as_ref()
            .map(|p| p.log.display().to_string())
            .unwrap_or_default();
        let up = async {
            loop {
                if let Ok(Ok(c)) =
                    tokio::time::timeout(Duration::from_secs(2), self.try_client()).await
                {
                    if c.list_children("/").await.is_ok() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(30), up)
            .await
            .unwrap_or_else(|_| panic!("ZooKeeper did not come up within 30 s; see {log}"));
    }

    async fn try_client(&self) -> Result<zk::Client, zk::Error> {
        zk::Client::connector()
            .with_session_timeout(Duration::from_secs(4))
            .connect(&format!("127.0.0.1:{}", self.port))
            .await
    }

    /// A connected client.
    pub async fn client(&self) -> zk::Client {
        self.try_client().await.expect("connect ZooKeeper")
    }

    /// `zk://127.0.0.1:<port><prefix>`.
    pub fn url(&self, prefix: &str) -> String {
        format!("zk://127.0.0.1:{}{prefix}", self.port)
    }

    /// SIGKILLs the server (its data stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }
}

/// Creates `path` with `data` (persistent), and its missing parents.
pub async fn create_all(client: &zk::Client, path: &str, data: &[u8]) {
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut at = String::new();
    for (i, segment) in segments.iter().enumerate() {
        at.push('/');
        at.push_str(segment);
        let bytes: &[u8] = if i + 1 == segments.len() { data } else { &[] };
        match client.create(&at, bytes, &persistent).await {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => panic!("create {at}: {e}"),
        }
    }
}
