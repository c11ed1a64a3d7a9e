//! A black-holed port on loopback: every packet towards it is dropped in
//! the kernel (iptables `DROP`), with no RST and no ICMP, as a dead link or
//! a silently failing middlebox looks to its peers. Unlike a stopped
//! process, whose kernel still acknowledges what it is sent, nothing is
//! acknowledged: only TCP's own timers (keep-alive, `TCP_USER_TIMEOUT`) or
//! the caller's deadline end what waits on it.
//!
//! The rule is removed when the handle is dropped. It needs root and the
//! `iptables` command (`scripts/setup` installs Debian's package); either
//! missing is a loud failure with the fix.

use std::process::Command;

/// Packets to `127.0.0.1:<port>` dropped while this lives.
pub struct Blackhole {
    port: u16,
}

impl Blackhole {
    /// Drops every TCP packet sent to `port` on loopback.
    pub fn inbound(port: u16) -> Blackhole {
        iptables("-I", port);
        Blackhole { port }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        iptables("-D", self.port);
    }
}

fn iptables(op: &str, port: u16) {
    let port = port.to_string();
    let out = Command::new("iptables")
        .args(["-w", op, "INPUT", "-i", "lo", "-p", "tcp", "--dport", &port])
        .args(["-j", "DROP"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run iptables ({e}): run scripts/setup (it installs Debian's iptables)")
        });
    assert!(
        out.status.success(),
        "iptables {op} INPUT ... --dport {port} -j DROP failed (the black-hole tests need root and \
         the iptables package; scripts/setup installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
