//! What a running LB can take from a re-read configuration (`SIGHUP`).
//!
//! Some settings are read on every use and swap safely: the log filter,
//! name mapping (aliases, domain suffixes) and the list policy's knobs
//! (every service's list is rebuilt with the new ones). Everything else
//! (ports, registries, probes, caps, TLS, zones, replicas) is wired into
//! running parts at start; a change to it is reported as needing a restart
//! and not applied, so a reload never leaves the LB half-way between two
//! configurations.

use super::file::Settings;

/// The log filter's flag: swapped by the program that installed it.
const LOG: &str = "log";

/// Name mapping's flags: its rules are replaced whole.
const NAMES: &[&str] = &["alias", "domain-suffix"];

/// The list policy's knobs: every list is rebuilt with them.
const POLICY: &[&str] = &[
    "list-unchecked",
    "weight-blackout",
    "weight-expiry",
    "error-penalty",
    "slow-start",
    "panic-threshold",
    "shed-utilization",
    "max-shed",
];

/// Whether a running LB applies a change of `flag` (a long name) on reload.
pub fn reloadable(flag: &str) -> bool {
    flag == LOG || NAMES.contains(&flag) || POLICY.contains(&flag)
}

/// The changes between two configurations, split by whether a running LB
/// can apply them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reload {
    /// Changed flags that are applied now.
    pub apply: Vec<String>,
    /// Changed flags that take effect only after a restart.
    pub restart: Vec<String>,
}

impl Reload {
    /// What changed from `old` to `new`.
    pub fn between(old: &Settings, new: &Settings) -> Reload {
        let (apply, restart) = old.changed(new).into_iter().partition(|k| reloadable(k));
        Reload { apply, restart }
    }

    /// Whether `flag` (a long name) is among the changes applied now.
    pub fn applies(&self, flag: &str) -> bool {
        self.apply.iter().any(|k| k == flag)
    }

    /// Whether any of the list policy's knobs changed.
    pub fn policy_changed(&self) -> bool {
        self.apply.iter().any(|k| POLICY.contains(&k.as_str()))
    }

    /// Whether name mapping changed.
    pub fn names_changed(&self) -> bool {
        self.apply.iter().any(|k| NAMES.contains(&k.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn reloadable_flags_exist() {
        let command = crate::Config::command();
        for flag in std::iter::once(&LOG).chain(NAMES).chain(POLICY) {
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(flag)),
                "--{flag} is not a flag"
            );
        }
    }

    #[test]
    fn changes_split_by_what_can_be_applied() {
        let load = |args: &[&str]| {
            let mut all = vec!["lb-server"];
            all.extend_from_slice(args);
            super::super::file::load(all, false).unwrap().settings
        };
        let old = load(&["--alias", "a=b"]);
        let new = load(&["--alias", "a=c", "--max-streams", "5", "--slow-start", "5s"]);
        let r = Reload::between(&old, &new);
        assert_eq!(r.apply, vec!["slow-start", "alias"]);
        assert_eq!(r.restart, vec!["max-streams"]);
        assert!(r.policy_changed() && r.names_changed());
    }
}
