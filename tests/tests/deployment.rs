//! The deployment files: `docker-compose.yml` is parsed as YAML and its
//! topology checked (3-member etcd cluster, 2 LB replicas, 3 greeters, one
//! client), and every command line in it is checked against the binaries'
//! own argument parsers. No Docker engine is needed; the same topology runs
//! as plain processes in `cluster.rs`
//! (`etcd_member_and_quorum_loss_change_nothing_for_clients`).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use lb_tests::{bin, workspace};
use yaml_rust2::{Yaml, YamlLoader};

/// Resolves YAML merge keys (`<<: *anchor`), which compose files use.
fn merged(y: &Yaml) -> Yaml {
    match y {
        Yaml::Hash(h) => {
            let mut out = yaml_rust2::yaml::Hash::new();
            if let Some(base) = h.get(&Yaml::String("<<".into())) {
                if let Yaml::Hash(b) = merged(base) {
                    out.extend(b);
                }
            }
            for (k, v) in h {
                if k.as_str() != Some("<<") {
                    out.insert(k.clone(), merged(v));
                }
            }
            Yaml::Hash(out)
        }
        Yaml::Array(a) => Yaml::Array(a.iter().map(merged).collect()),
        other => other.clone(),
    }
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("string item").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Checks a command line against a binary's parser: `--help` after the
/// arguments exits 0 only if everything before it parsed.
fn assert_accepted(binary: &str, args: &[String]) {
    let out = Command::new(bin(binary))
        .args(args)
        .arg("--help")
        .output()
        .expect("run binary");
    assert!(
        out.status.success(),
        "{binary} rejects {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_file_describes_the_cluster_and_every_command_parses() {
    let text = std::fs::read_to_string(workspace().join("docker-compose.yml"))
        .expect("docker-compose.yml");
    let docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    let doc = merged(&docs[0]);
    let services = doc["services"].as_hash().expect("services mapping");
    let names: BTreeSet<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    let service = |n: &str| &doc["services"][n];
    let of_kind = |prefix: &str| -> Vec<String> {
        names
            .iter()
            .filter(|n| n.starts_with(prefix))
            .cloned()
            .collect()
    };

    // etcd: three members, all naming the same initial cluster.
    let etcds = of_kind("etcd");
    assert_eq!(etcds.len(), 3, "{etcds:?}");
    let cluster = service(&etcds[0])["environment"]["ETCD_INITIAL_CLUSTER"]
        .as_str()
        .expect("ETCD_INITIAL_CLUSTER");
    let members: BTreeSet<String> = cluster
        .split(',')
        .map(|m| m.split('=').next().unwrap().to_string())
        .collect();
    assert_eq!(members, etcds.iter().cloned().collect());
    for e in &etcds {
        let cmd = strings(&service(e)["command"]);
        assert_eq!(flag(&cmd, "--name").as_deref(), Some(e.as_str()));
        assert_eq!(
            service(e)["environment"]["ETCD_INITIAL_CLUSTER"].as_str(),
            Some(cluster)
        );
        assert!(cluster.contains(&format!("{e}=http://{e}:2380")));
    }
    let registry = format!(
        "etcd://{}",
        etcds
            .iter()
            .map(|e| format!("{e}:2379"))
            .collect::<Vec<_>>()
            .join(",")
    );

    // Two LB replicas over all three members, with distinct ids and ports.
    let lbs = of_kind("lb");
    assert_eq!(lbs.len(), 2, "{lbs:?}");
    let mut ids = BTreeSet::new();
    for lb in &lbs {
        let s = service(lb);
        let mut args = Vec::new();
        for (k, v) in s["environment"].as_hash().expect("lb environment") {
            let k = k.as_str().unwrap();
            let flag = k
                .strip_prefix("LB_")
                .expect("LB_ variables only")
                .to_lowercase()
                .replace('_', "-");
            args.push(format!("--{flag}"));
            args.push(v.as_str().unwrap().to_string());
        }
        args.extend(strings(&s["command"]));
        assert_eq!(flag(&args, "--registry"), Some(registry.clone()));
        assert!(ids.insert(flag(&args, "--replica-id").expect("replica id")));
        assert_accepted("lb-server", &args);
    }
    let host_ports: Vec<String> = names
        .iter()
        .flat_map(|n| strings(&service(n)["ports"]))
        .map(|p| p.split(':').next().unwrap().to_string())
        .collect();
    let unique: BTreeSet<&String> = host_ports.iter().collect();
    assert_eq!(
        unique.len(),
        host_ports.len(),
        "host ports clash: {host_ports:?}"
    );

    // Three greeters registering in the cluster under their own names.
    let greeters = of_kind("greeter");
    assert_eq!(greeters.len(), 3, "{greeters:?}");
    for g in &greeters {
        let s = service(g);
        assert_eq!(strings(&s["entrypoint"]), ["greeter-server"]);
        let args = strings(&s["command"]);
        assert_eq!(flag(&args, "--registry"), Some(registry.clone()));
        assert_eq!(flag(&args, "--advertise"), Some(format!("{g}:50051")));
        assert_accepted("greeter-server", &args);
    }

    // One client using both replicas.
    let client = service("client");
    assert_eq!(strings(&client["entrypoint"]), ["greeter-client"]);
    let args = strings(&client["command"]);
    let lb_list = flag(&args, "--lb").expect("client --lb");
    let named: BTreeSet<String> = lb_list
        .split(',')
        .map(|a| a.split(':').next().unwrap().to_string())
        .collect();
    assert_eq!(named, lbs.iter().cloned().collect());
    assert_accepted("greeter-client", &args);

    // Dependencies name real services.
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in &names {
        deps.insert(n.clone(), strings(&service(n)["depends_on"]));
    }
    for (n, ds) in &deps {
        for d in ds {
            assert!(names.contains(d), "{n} depends on unknown service {d}");
        }
    }

    // The image has every binary the compose file runs.
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile")).expect("Dockerfile");
    for binary in ["lb-server", "greeter-server", "greeter-client"] {
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the image lacks {binary}"
        );
    }
}
