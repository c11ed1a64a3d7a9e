//! The config file: `--config lb.toml` holds any flag's setting, in the
//! sections `--help` shows (`[registry]`, `[policy]`, …; the top-level
//! flags before the first section), each key a flag's long name:
//!
//! ```toml
//! listen = "0.0.0.0:7000"
//!
//! [registry]
//! registry = ["etcd://10.0.0.1:2379,10.0.0.2:2379"]
//!
//! [policy]
//! slow-start = "30s"
//! ```
//!
//! **Order of precedence:** a flag on the command line, then its `LB_…`
//! environment variable, then the file, then the default. The file is
//! applied by appending a flag for each of its settings that neither the
//! command line nor the environment gave, so a file value is parsed and
//! checked exactly as the flag would be.
//!
//! A key the LB does not know is an error naming the key and the nearest
//! valid one (or the section it belongs in): a misspelt setting must not be
//! silently ignored. [`Settings`] is the effective value of every setting;
//! [`Settings::to_toml`] writes it back as a file that starts the same LB
//! (`--print-config`). Secrets are never flags, so they are never printed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches};

use super::Config;

/// Flags that steer loading rather than the LB: never in a file.
const NOT_SETTINGS: &[&str] = &["config", "print_config", "help", "version"];

/// A parsed configuration and the effective value of each of its settings.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration (secrets not yet filled: [`Config::with_secrets`]).
    pub config: Config,
    /// Every setting's effective value, for `--print-config` and reloads.
    pub settings: Settings,
}

/// The effective value of every setting, in `--help` order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Settings {
    entries: Vec<Setting>,
}

/// One setting: where it lives in the file and what it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Section (`""` for the top-level flags).
    pub section: String,
    /// The key: the flag's long name.
    pub key: String,
    /// Its values (one unless `multiple`); `None` when unset.
    pub values: Option<Vec<String>>,
    /// Whether the flag is repeatable (an array in the file).
    pub multiple: bool,
    /// The flag's one-paragraph help.
    pub help: String,
}

/// Parses `args` (the program name first), then the file `--config` names,
/// filling what the command line and, with `read_env`, the `LB_…`
/// variables did not set. Errors from clap itself (`--help`, a bad flag)
/// come back as a [`clap::Error`] inside the [`anyhow::Error`], for the
/// binary to print and exit with.
pub fn load<I, T>(args: I, read_env: bool) -> anyhow::Result<Loaded>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = Config::command();
    if !read_env {
        command = command.mut_args(|a| a.env(None));
    }
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut matches = command.clone().try_get_matches_from(&args)?;
    if let Some(path) = matches.get_one::<std::path::PathBuf>("config").cloned() {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?;
        let extra = file_flags(&command, &matches, &path, &text)?;
        args.extend(extra);
        matches = command.clone().try_get_matches_from(&args)?;
    }
    let config = Config::from_arg_matches(&matches)?;
    let settings = Settings::of(&command, &matches);
    Ok(Loaded { config, settings })
}

/// The config file's section of a `--help` heading: the word in brackets
/// at its end (`"List policy [policy]"` → `policy`); top-level flags have
/// no heading and no section.
fn section_of(arg: &clap::Arg) -> String {
    arg.get_help_heading()
        .and_then(|h| h.rsplit_once('[')?.1.strip_suffix(']'))
        .unwrap_or("")
        .to_string()
}

/// The settings of a command: every flag with a long name but those that
/// steer loading.
fn setting_args(command: &clap::Command) -> impl Iterator<Item = &clap::Arg> {
    command.get_arguments().filter(|a| {
        a.get_long().is_some() && !NOT_SETTINGS.contains(&a.get_id().as_str()) && !a.is_hide_set()
    })
}

/// The flags that carry the file's settings not already given on the
/// command line or in the environment; every key and value checked.
fn file_flags(
    command: &clap::Command,
    matches: &clap::ArgMatches,
    path: &Path,
    text: &str,
) -> anyhow::Result<Vec<OsString>> {
    let file = path.display();
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("{file}: {e}"))?;
    let known: Vec<(String, &clap::Arg)> =
        setting_args(command).map(|a| (section_of(a), a)).collect();
    let sections: Vec<&str> = {
        let mut s: Vec<&str> = known.iter().map(|(s, _)| s.as_str()).collect();
        s.dedup();
        s.retain(|s| !s.is_empty());
        s
    };
    let mut entries: Vec<(String, String, &toml::Value)> = Vec::new();
    for (name, value) in &table {
        match value {
            toml::Value::Table(inner) => {
                if !sections.contains(&name.as_str()) {
                    anyhow::bail!(
                        "{file}: unknown section [{name}]{}",
                        nearest(name, sections.iter().copied())
                            .map(|n| format!("; the nearest valid one is [{n}]"))
                            .unwrap_or_default()
                    );
                }
                for (key, value) in inner {
                    entries.push((name.clone(), key.clone(), value));
                }
            }
            _ => entries.push((String::new(), name.clone(), value)),
        }
    }
    let mut flags = Vec::new();
    for (section, key, value) in entries {
        let place = if section.is_empty() {
            format!("`{key}` (top level)")
        } else {
            format!("`{key}` in [{section}]")
        };
        let Some((_, arg)) = known
            .iter()
            .find(|(s, a)| *s == section && a.get_long() == Some(key.as_str()))
        else {
            return Err(unknown_key(&file.to_string(), &place, &key, &known));
        };
        let multiple = matches!(arg.get_action(), ArgAction::Append);
        let values =
            scalars(value, multiple).map_err(|why| anyhow::anyhow!("{file}: {place}: {why}"))?;
        check_values(arg, &values).map_err(|why| anyhow::anyhow!("{file}: {place}: {why}"))?;
        let id = arg.get_id().as_str();
        let given = matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !given {
            let long = arg.get_long().expect("settings have long names");
            flags.extend(
                values
                    .iter()
                    .map(|v| OsString::from(format!("--{long}={v}"))),
            );
        }
    }
    Ok(flags)
}

/// Parses `values` as the flag `arg` would, alone (its ties to other flags,
/// such as a key needing its certificate, are checked in the full parse).
fn check_values(arg: &clap::Arg, values: &[String]) -> Result<(), String> {
    let long = arg.get_long().expect("settings have long names");
    let alone = clap::Command::new("lb-server").no_binary_name(true).arg(
        arg.clone()
            .env(None)
            .requires(clap::builder::Resettable::<clap::Id>::Reset)
            .required(false),
    );
    for v in values {
        if let Err(e) = alone
            .clone()
            .try_get_matches_from([format!("--{long}={v}")])
        {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            return Err(format!(
                "{v:?}: {}",
                first.trim_start_matches("error: ").trim()
            ));
        }
    }
    Ok(())
}

/// The error for a key the LB does not know: the section it belongs in,
/// or the nearest valid key.
fn unknown_key(
    file: &str,
    place: &str,
    key: &str,
    known: &[(String, &clap::Arg)],
) -> anyhow::Error {
    let named = |section: &str, long: &str| {
        if section.is_empty() {
            format!("`{long}` (top level)")
        } else {
            format!("`{long}` in [{section}]")
        }
    };
    if let Some((section, arg)) = known.iter().find(|(_, a)| a.get_long() == Some(key)) {
        return anyhow::anyhow!(
            "{file}: {place} is in the wrong section: it belongs in {}",
            named(section, arg.get_long().unwrap_or(key))
        );
    }
    let longs = known.iter().filter_map(|(_, a)| a.get_long());
    let hint = nearest(key, longs)
        .and_then(|long| {
            known
                .iter()
                .find(|(_, a)| a.get_long() == Some(long))
                .map(|(s, _)| format!("; the nearest valid key is {}", named(s, long)))
        })
        .unwrap_or_default();
    anyhow::anyhow!("{file}: unknown key {place}{hint}")
}

/// The candidate closest to `word`, if any is reasonably close.
fn nearest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// A file value as flag values: scalars as text, arrays (of repeatable
/// flags only) element by element.
fn scalars(value: &toml::Value, multiple: bool) -> Result<Vec<String>, String> {
    fn one(v: &toml::Value) -> Result<String, String> {
        match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            toml::Value::Datetime(d) => Ok(d.to_string()),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                Err("expected a single value here, not an array or a table".into())
            }
        }
    }
    match value {
        toml::Value::Array(items) if multiple => items.iter().map(one).collect(),
        toml::Value::Array(_) => Err("takes one value, not an array".into()),
        v => one(v).map(|s| vec![s]),
    }
}

impl Settings {
    fn of(command: &clap::Command, matches: &clap::ArgMatches) -> Settings {
        let entries = setting_args(command)
            .map(|arg| {
                let id = arg.get_id().as_str();
                let values = matches.get_raw(id).map(|raw| {
                    raw.map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                });
                Setting {
                    section: section_of(arg),
                    key: arg.get_long().unwrap_or(id).to_string(),
                    values,
                    multiple: matches!(arg.get_action(), ArgAction::Append),
                    help: arg.get_help().map(|h| h.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        Settings { entries }
    }

    /// Every setting, in `--help` order.
    pub fn iter(&self) -> impl Iterator<Item = &Setting> {
        self.entries.iter()
    }

    /// The flags (long names) whose values differ between `self` and `new`.
    pub fn changed(&self, new: &Settings) -> Vec<String> {
        let old: BTreeMap<&str, &Option<Vec<String>>> = self
            .entries
            .iter()
            .map(|s| (s.key.as_str(), &s.values))
            .collect();
        new.entries
            .iter()
            .filter(|s| old.get(s.key.as_str()) != Some(&&s.values))
            .map(|s| s.key.clone())
            .collect()
    }

    /// These settings with the values `other` has for the flags `keys`.
    pub fn with_values_of(&self, other: &Settings, keys: &[String]) -> Settings {
        let mut out = self.clone();
        for s in &mut out.entries {
            if keys.contains(&s.key) {
                if let Some(o) = other.entries.iter().find(|o| o.key == s.key) {
                    s.values.clone_from(&o.values);
                }
            }
        }
        out
    }

    /// The settings as a config file: each with its help as a comment,
    /// unset ones commented out. Loading it (with no flags and no `LB_…`
    /// variables) gives the same settings.
    pub fn to_toml(&self) -> String {
        let mut out = String::from(
            "# lb-server configuration (lb-server --config FILE).\n\
             # Precedence: command-line flags, then LB_* environment variables,\n\
             # then this file, then the defaults. Secrets are not settings: give\n\
             # them as files (*-token-file, *-password-file) or LB_* variables.\n",
        );
        let mut section = "";
        for s in &self.entries {
            if s.section != section {
                section = &s.section;
                out.push_str(&format!("\n[{section}]\n"));
            }
            out.push('\n');
            for line in wrap(&s.help, 76) {
                out.push_str(&format!("# {line}\n"));
            }
            match &s.values {
                Some(values) if s.multiple => {
                    let items: Vec<String> = values.iter().map(|v| toml_value(v)).collect();
                    out.push_str(&format!("{} = [{}]\n", s.key, items.join(", ")));
                }
                Some(values) => {
                    let v = values.first().map(String::as_str).unwrap_or("");
                    out.push_str(&format!("{} = {}\n", s.key, toml_value(v)));
                }
                None if s.multiple => out.push_str(&format!("# {} = []\n", s.key)),
                None => out.push_str(&format!("# {} = (not set)\n", s.key)),
            }
        }
        out
    }
}

/// A flag value as a TOML value: numbers and booleans bare, the rest quoted.
fn toml_value(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<i64>().is_ok() {
        return v.to_string();
    }
    if v.parse::<f64>().is_ok_and(f64::is_finite) && v.contains('.') && !v.starts_with('.') {
        return v.to_string();
    }
    toml::Value::String(v.to_string()).to_string()
}

/// `text` broken into lines of at most `width` characters at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_file(text: &str, flags: &[&str]) -> anyhow::Result<Loaded> {
        let dir = std::env::temp_dir().join(format!(
            "lb-config-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, text).unwrap();
        let mut args = vec![
            "lb-server".to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        args.extend(flags.iter().map(|s| s.to_string()));
        let loaded = load(args, false);
        std::fs::remove_dir_all(&dir).ok();
        loaded
    }

    #[test]
    fn every_heading_names_its_section() {
        let command = Config::command();
        for arg in setting_args(&command) {
            if let Some(h) = arg.get_help_heading() {
                assert!(
                    !section_of(arg).is_empty(),
                    "heading {h:?} of --{} names no [section]",
                    arg.get_long().unwrap()
                );
            }
        }
    }

    #[test]
    fn file_settings_fill_what_flags_do_not_set() {
        let loaded = with_file(
            "log = \"debug\"\n[policy]\nslow-start = \"30s\"\nmax-list-len = 50\n\
             [grpc]\nalias = [\"hello=greeter\", \"hi=greeter\"]\n\
             [zones]\nzone-overload-tolerance = 0.2\nzone-aware = false\n",
            &["--max-list-len", "99"],
        )
        .unwrap();
        let cfg = loaded.config;
        assert_eq!(cfg.log, "debug");
        assert_eq!(cfg.policy.slow_start, std::time::Duration::from_secs(30));
        assert_eq!(cfg.policy.max_list_len, 99, "the flag wins over the file");
        assert_eq!(cfg.grpc.aliases.len(), 2);
        assert_eq!(cfg.zones.zone_overload_tolerance, 0.2);
        assert!(!cfg.zones.zone_aware);
    }

    #[test]
    fn unknown_keys_name_the_nearest_valid_one() {
        let e = with_file("[policy]\nslow-strat = \"1s\"\n", &[]).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`slow-strat` in [policy]"), "{msg}");
        assert!(msg.contains("`slow-start` in [policy]"), "{msg}");

        let e = with_file("[zones]\nmax-list-len = 3\n", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("belongs in `max-list-len` in [policy]"),
            "{e}"
        );

        let e = with_file("[polcy]\nslow-start = \"1s\"\n", &[]).unwrap_err();
        assert!(
            e.to_string().contains("nearest valid one is [policy]"),
            "{e}"
        );

        let e = with_file("[policy]\nmax-list-len = \"many\"\n", &[]).unwrap_err();
        assert!(
            e.to_string()
                .contains("max-list-len` in [policy]: \"many\": invalid value"),
            "{e}"
        );

        let e = with_file("[policy]\nmax-list-len = [1, 2]\n", &[]).unwrap_err();
        assert!(e.to_string().contains("not an array"), "{e}");

        let e = with_file("listen = \n", &[]).unwrap_err();
        assert!(e.to_string().contains("lb.toml"), "{e}");
    }

    #[test]
    fn printed_settings_load_back_the_same() {
        let first = with_file(
            "[registry]\nregistry = [\"memory\"]\ndns-service = [\"a=a.test:80\"]\n\
             [grpc]\ndomain-suffix = [\".svc.test\", \".example\"]\n\
             [policy]\nshed-utilization = 0.9\nerror-penalty = 1.5\n",
            &["--replica-id", "r1", "--list-unchecked", "true"],
        )
        .unwrap();
        let printed = first.settings.to_toml();
        let second = with_file(&printed, &[]).unwrap();
        assert_eq!(first.settings, second.settings, "{printed}");
        assert_eq!(second.config.cluster.replica_id.as_deref(), Some("r1"));
        assert!(second.config.policy.list_unchecked);
        assert_eq!(
            second.config.grpc.domain_suffixes,
            vec![".svc.test", ".example"]
        );
        assert_eq!(second.settings.to_toml(), printed);
    }

    #[test]
    fn changed_names_the_flags_that_differ() {
        let a = with_file("[policy]\nslow-start = \"1s\"\n", &[]).unwrap();
        let b = with_file(
            "[policy]\nslow-start = \"2s\"\n[grpc]\nmax-streams = 5\n",
            &[],
        )
        .unwrap();
        assert_eq!(
            a.settings.changed(&b.settings),
            vec!["slow-start", "max-streams"]
        );
        assert!(a.settings.changed(&a.settings).is_empty());
    }
}
