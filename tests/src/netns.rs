//! Test hosts in network namespaces: real kernel networking between
//! processes, so that a test can cut, one-way-cut or black-hole a link,
//! which killing or stopping a process cannot do.
//!
//! A [`Net`] is one router namespace; each [`Host`] is a namespace of its own
//! joined to the router by a veth pair, with one address in 198.18.0.0/15
//! (the range set aside for testing network devices, RFC 2544):
//! `198.18.<n>.2` on the host, `198.18.<n>.1` on the router, which
//! forwards between them. Nothing leaves the machine: the namespaces have
//! no other link. Faults are iptables rules in the router's `FORWARD`
//! chain, so each host keeps its own view intact (its sockets, its
//! loopback) while packets between two hosts vanish, one way or both,
//! with no RST and no ICMP: what a partition or a dead middlebox looks like.
//!
//! Processes run in a host with [`Ns::wrap`] (`ip netns exec`); the test's
//! own sockets (admin requests, in-process clients) are made on threads
//! that entered the namespace ([`Ns::run`], [`Ns::enter`]).
//!
//! It needs root, `ip` (iproute2) and `iptables` (`scripts/setup` installs
//! Debian's package); either missing is a loud failure with the fix.
//! Everything is removed when the [`Net`] is dropped (drop it after the
//! processes in it).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A network namespace by name: where processes and sockets can be put.
#[derive(Debug, Clone)]
pub struct Ns {
    name: Arc<str>,
}

impl Ns {
    /// Its name (as `ip netns` lists it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `cmd`, to run inside this namespace (`ip netns exec`; the process
    /// keeps the PID `ip` was started with). Program, arguments,
    /// environment and working directory are carried over.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            c.current_dir(dir);
        }
        c
    }

    /// Moves the calling thread into this namespace: the sockets it makes
    /// from now on are the namespace's (e.g. from a Tokio runtime's
    /// `on_thread_start`).
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns(2) on a namespace file we hold open; it changes only
        // the calling thread's network namespace.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into {}: {}",
            self.name,
            std::io::Error::last_os_error()
        );
    }

    /// Runs `f` on a thread inside this namespace and returns what it
    /// returns (for blocking socket work: admin requests, probes).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .expect("thread in namespace")
        })
    }

    /// Sets a kernel setting of this namespace's network stack
    /// (`sysctl -w key=value`), as a host's operator would.
    pub fn sysctl(&self, key: &str, value: &str) {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-qw",
                &format!("{key}={value}"),
            ],
        );
    }

    /// Kills every TCP socket in this namespace whose peer is `peer`
    /// (`ss -K`): both ends get a reset, as when a middlebox or a kernel
    /// drops a connection's state.
    pub fn kill_sockets_to(&self, peer: Ipv4Addr) {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "ss",
                "-K",
                "dst",
                &peer.to_string(),
            ],
        );
    }

    /// A Tokio runtime whose threads all live in this namespace: an
    /// in-process client made and driven on it is a client on this host.
    pub fn runtime(&self) -> HostRuntime {
        let ns = self.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || ns.enter())
            .build()
            .expect("runtime");
        HostRuntime(Some(rt))
    }
}

/// A runtime on a test host ([`Ns::runtime`]). Dropped anywhere, a test's
/// own async context included, it shuts down without blocking.
pub struct HostRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for HostRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("runtime")
    }
}

impl Drop for HostRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One test host: a namespace with an address.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub ns: Ns,
    /// Its address.
    pub ip: Ipv4Addr,
}

impl Host {
    /// `ip:port` on this host.
    pub fn addr(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.ip, port))
    }
}

/// A router namespace and the hosts joined to it.
pub struct Net {
    prefix: String,
    router: Ns,
    hosts: Mutex<Vec<Ns>>,
    next: AtomicU8,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// A new, empty network (its router namespace, forwarding on).
    pub fn new() -> Arc<Net> {
        remove_stale();
        let n = NETS.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("lbt{}n{n}", std::process::id());
        let router = Ns {
            name: format!("{prefix}r").into(),
        };
        ip(&["netns", "add", &router.name]);
        ip(&["-n", &router.name, "link", "set", "lo", "up"]);
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &router.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        );
        Arc::new(Net {
            prefix,
            router,
            hosts: Mutex::new(Vec::new()),
            next: AtomicU8::new(1),
        })
    }

    /// Adds a host, joined to the router.
    pub fn host(&self) -> Host {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        assert!(n < 250, "too many hosts on one test network");
        let ns = Ns {
            name: format!("{}h{n}", self.prefix).into(),
        };
        ip(&["netns", "add", &ns.name]);
        self.hosts.lock().unwrap().push(ns.clone());
        // Interface names are at most 15 bytes: short, unique per host,
        // and created in the router namespace so that no two tests collide.
        let (inner, outer) = ("eth0", format!("r{n}"));
        let r = &*self.router.name;
        ip(&[
            "-n", r, "link", "add", &outer, "type", "veth", "peer", "name", inner, "netns",
            &ns.name,
        ]);
        let host_ip = Ipv4Addr::new(198, 18, n, 2);
        let gw = Ipv4Addr::new(198, 18, n, 1);
        ip(&["-n", r, "addr", "add", &format!("{gw}/24"), "dev", &outer]);
        ip(&["-n", r, "link", "set", &outer, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            inner,
        ]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ip(&["-n", &ns.name, "link", "set", inner, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ]);
        Host { ns, ip: host_ip }
    }

    /// Drops every packet between `a` and `b`, both ways, silently, until
    /// the returned fault is dropped (or healed).
    pub fn cut(&self, a: &Host, b: &Host) -> Fault {
        self.fault(vec![(a.ip, b.ip, None), (b.ip, a.ip, None)])
    }

    /// Drops every packet from `from` to `to` (the other way still flows).
    pub fn cut_one_way(&self, from: &Host, to: &Host) -> Fault {
        self.fault(vec![(from.ip, to.ip, None)])
    }

    /// Drops each packet between `a` and `b`, both ways, with probability
    /// `loss` (iptables' `statistic` match: independent random loss).
    pub fn lossy(&self, a: &Host, b: &Host, loss: f64) -> Fault {
        assert!((0.0..=1.0).contains(&loss), "loss is a probability");
        self.fault(vec![(a.ip, b.ip, Some(loss)), (b.ip, a.ip, Some(loss))])
    }

    fn fault(&self, rules: Vec<Rule>) -> Fault {
        let fault = Fault {
            router: self.router.clone(),
            rules,
        };
        for rule in &fault.rules {
            iptables(&fault.router, "-I", rule);
        }
        fault
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and with
        // it the other end.
        for ns in self.hosts.lock().unwrap().drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.router.name])
            .status();
    }
}

/// One rule of a fault: packets from, to, and the share dropped (`None`:
/// all).
type Rule = (Ipv4Addr, Ipv4Addr, Option<f64>);

/// A fault on the router: packets dropped until this is dropped.
pub struct Fault {
    router: Ns,
    rules: Vec<Rule>,
}

impl Fault {
    /// Ends the fault now.
    pub fn heal(self) {}
}

impl Drop for Fault {
    fn drop(&mut self) {
        for rule in &self.rules {
            iptables(&self.router, "-D", rule);
        }
    }
}

/// Deletes the namespaces of test processes that are gone (killed before
/// they could clean up): names are `lbt<pid>n…`.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix("lbt")
            .and_then(|rest| rest.split('n').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn iptables(router: &Ns, op: &str, (from, to, loss): &Rule) {
    let (from, to) = (from.to_string(), to.to_string());
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        router.name.to_string(),
        "iptables".into(),
        "-w".into(),
        op.into(),
        "FORWARD".into(),
        "-s".into(),
        from,
        "-d".into(),
        to,
    ];
    if let Some(p) = loss {
        args.extend(
            ["-m", "statistic", "--mode", "random", "--probability"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.push(format!("{p}"));
    }
    args.extend(["-j".to_string(), "DROP".into()]);
    sh("ip", &args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn ip(args: &[&str]) {
    sh("ip", args);
}

fn sh(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args.iter().map(OsStr::new))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): the network-fault tests need iproute2 and iptables \
                 (scripts/setup installs them) and root"
            )
        });
    assert!(
        out.status.success(),
        "{program} {} failed (the network-fault tests need root, iproute2 and iptables; \
         scripts/setup installs them): {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}
