//! What a running LB can take from a re-read configuration (`SIGHUP`).
//!
//! Some settings are read on every use and swap safely: the log filter,
//! name mapping (aliases, domain suffixes) and the list policy's knobs
//! (every service's list is rebuilt with the new ones). Everything else
//! (ports, registries, probes, caps, TLS, zones, replicas) is wired into
//! running parts at start; a change to it is reported as needing a restart
//! and not applied, so a reload never leaves the LB half-way between two
//! configurations.
//!
//! `max-list-len` sits with the policy flags but is one of the latter: zone
//! views are cut to it when their tables are made, and an operator who reads
//! "needs a restart" in the log must find every list at the running length,
//! not the catalog's lists at the new one and zone views at the old. A
//! reload rebuilds lists with the new knobs and the running length
//! ([`policy`]).

use super::file::Settings;
use super::PolicyFlags;
use crate::policy::Policy;

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

/// The list policy a reload applies: `next`'s reloadable knobs, with what
/// needs a restart (the list length) as `running` has it.
pub fn policy(next: &PolicyFlags, running: &PolicyFlags) -> Policy {
    Policy {
        max_list_len: running.policy().max_list_len,
        ..next.policy()
    }
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

    #[test]
    fn the_list_length_needs_a_restart_and_a_reload_keeps_the_running_one() {
        let load = |args: &[&str]| {
            let mut all = vec!["lb-server"];
            all.extend_from_slice(args);
            super::super::file::load(all, false).unwrap()
        };
        let old = load(&["--max-list-len", "4"]);
        let new = load(&["--max-list-len", "100", "--slow-start", "5s"]);
        let r = Reload::between(&old.settings, &new.settings);
        assert_eq!(r.apply, vec!["slow-start"]);
        assert_eq!(r.restart, vec!["max-list-len"]);
        let applied = policy(&new.config.policy, &old.config.policy);
        assert_eq!(applied.max_list_len, 4);
        assert_eq!(applied.slow_start, std::time::Duration::from_secs(5));
    }
}
