//! A small authoritative DNS server for the DNS registry tests: the Python
//! `tests/interop/zone_server.py` (dnslib) serving a JSON zone file that the
//! test rewrites to change records. It can be made to answer SERVFAIL, or
//! killed and restarted on the same port.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{python, workspace, Proc};

/// One DNS record of the zone.
pub fn a(name: &str, ip: &str, ttl: u32) -> Value {
    json!({"name": name, "type": "A", "value": ip, "ttl": ttl})
}

/// An SRV record.
pub fn srv(name: &str, priority: u16, weight: u16, port: u16, target: &str, ttl: u32) -> Value {
    json!({"name": name, "type": "SRV", "priority": priority, "weight": weight,
           "port": port, "target": target, "ttl": ttl})
}

/// The zone server.
pub struct ZoneServer {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    /// UDP and TCP port on 127.0.0.1.
    pub port: u16,
    records: Vec<Value>,
    fail: bool,
}

impl ZoneServer {
    /// Starts serving `records`.
    pub async fn start(records: Vec<Value>) -> ZoneServer {
        let mut z = ZoneServer {
            proc: None,
            dir: tempfile::tempdir().expect("temp dir"),
            port: 0,
            records,
            fail: false,
        };
        z.write();
        z.launch();
        z
    }

    fn zone_file(&self) -> PathBuf {
        self.dir.path().join("zone.json")
    }

    fn write(&self) {
        let tmp = self.dir.path().join("zone.json.tmp");
        let zone = json!({"fail": self.fail, "records": self.records});
        std::fs::write(&tmp, zone.to_string()).expect("write zone");
        std::fs::rename(&tmp, self.zone_file()).expect("replace zone");
    }

    fn launch(&mut self) {
        let mut cmd = Command::new(python());
        cmd.arg(workspace().join("tests/interop/zone_server.py"))
            .arg("--zone")
            .arg(self.zone_file())
            .args(["--port", &self.port.to_string()]);
        let mut proc = Proc::spawn("zone-server", cmd, true);
        let stdout = proc.child_stdout().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("zone server output");
        let port = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "zone server did not start ({line:?}); see {}",
                    proc.log.display()
                )
            });
        self.port = port;
        self.proc = Some(proc);
    }

    /// `dns://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("dns://127.0.0.1:{}", self.port)
    }

    /// Replaces the records.
    pub fn set(&mut self, records: Vec<Value>) {
        self.records = records;
        self.write();
    }

    /// Answers SERVFAIL to everything (or stops doing so).
    pub fn fail(&mut self, fail: bool) {
        self.fail = fail;
        self.write();
    }

    /// Kills the server: queries go unanswered.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        for _ in 0..50 {
            let free = std::net::UdpSocket::bind(("127.0.0.1", self.port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", self.port)).is_ok();
            if free {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.launch();
    }

    /// Queries received so far for `name` (any type).
    pub fn queries(&self, name: &str) -> usize {
        let Some(p) = &self.proc else { return 0 };
        std::fs::read_to_string(&p.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("QUERY ") && l.split_whitespace().nth(1) == Some(name))
            .count()
    }
}

impl Drop for ZoneServer {
    fn drop(&mut self) {
        self.kill();
    }
}
