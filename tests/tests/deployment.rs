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

/// The Kubernetes manifests: each file `kubernetes-validate --strict`
/// accepts against the API's schemas, and the wiring between them holds.
#[test]
fn kubernetes_manifests_validate_and_hang_together() {
    let dir = workspace().join("examples/deploy/kubernetes");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml"))
        .collect();
    files.sort();
    let load = |f: &str| {
        YamlLoader::load_from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };

    // kustomization.yaml lists every manifest, and only those.
    let kustomization = &load("kustomization.yaml")[0];
    let mut listed = strings(&kustomization["resources"]);
    listed.sort();
    let manifests: Vec<String> = files
        .iter()
        .filter(|f| *f != "kustomization.yaml")
        .cloned()
        .collect();
    assert_eq!(listed, manifests);

    // Strict schema validation (unknown fields are errors).
    let validate = lb_tests::python().with_file_name("kubernetes-validate");
    assert!(
        validate.exists(),
        "{} not found: run scripts/setup (it installs kubernetes-validate from tests/interop/requirements.txt)",
        validate.display()
    );
    let out = Command::new(&validate)
        .arg("--strict")
        .args(manifests.iter().map(|f| dir.join(f)))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes-validate: {text}");
    assert_eq!(text.matches(" passed for resource ").count(), 9, "{text}");

    let docs: Vec<Yaml> = manifests.iter().flat_map(|f| load(f)).collect();
    let by_kind = |kind: &str| -> Vec<&Yaml> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let deployment = by_kind("Deployment")[0];
    assert!(deployment["spec"]["replicas"].as_i64().unwrap() >= 2);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let account = pod["serviceAccountName"].as_str().unwrap();
    assert_eq!(
        by_kind("ServiceAccount")[0]["metadata"]["name"].as_str(),
        Some(account)
    );
    let binding = by_kind("ClusterRoleBinding")[0];
    assert_eq!(binding["subjects"][0]["name"].as_str(), Some(account));
    let role = by_kind("ClusterRole")[0];
    let rule = role["rules"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|r| strings(&r["resources"]).contains(&"endpointslices".to_string()))
        .expect("a rule for EndpointSlices");
    assert_eq!(strings(&rule["apiGroups"]), ["discovery.k8s.io"]);
    assert_eq!(strings(&rule["verbs"]), ["get", "list", "watch"]);
    let labels = &pod["metadata"]["labels"];
    let pdb = by_kind("PodDisruptionBudget")[0];
    let selector = &by_kind("Service")[0]["spec"];
    for matcher in [
        &pdb["spec"]["selector"]["matchLabels"],
        &selector["selector"],
    ] {
        assert_eq!(
            matcher["app.kubernetes.io/name"],
            deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
            "{labels:?}"
        );
    }
    // Headless, with the port name stock clients' SRV lookup needs
    // (_grpclb._tcp.<service>).
    assert_eq!(selector["clusterIP"].as_str(), Some("None"));
    let grpclb = selector["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("grpclb"))
        .expect("port grpclb");
    assert_eq!(grpclb["targetPort"].as_str(), Some("grpc"));

    // The config in the ConfigMap starts an LB (unknown keys would fail),
    // and its token file is where the Secret is mounted.
    let config = by_kind("ConfigMap")[0]["data"]["lb.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("lb.toml");
    std::fs::write(&file, &config).unwrap();
    let out = Command::new(bin("lb-server"))
        .args(["--config", file.to_str().unwrap(), "--print-config"])
        .env_clear()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("listen = \"0.0.0.0:7000\""), "{printed}");
    // It reads EndpointSlices, which the RBAC above allows, and nothing else.
    assert!(printed.contains("registry = [\"k8s://\"]"), "{printed}");
    assert_eq!(role["rules"].as_vec().unwrap().len(), 1);
    let mounts = container["volumeMounts"].as_vec().unwrap();
    let secret_mount = mounts
        .iter()
        .find(|m| m["name"].as_str() == Some("admin-token"))
        .unwrap();
    let token_path = format!(
        "{}/admin-token",
        secret_mount["mountPath"].as_str().unwrap()
    );
    assert!(
        config.contains(&format!("admin-token-file = \"{token_path}\"")),
        "{config}"
    );
    let config_mount = mounts
        .iter()
        .find(|m| m["name"].as_str() == Some("config"))
        .unwrap();
    assert_eq!(
        strings(&container["args"]),
        [
            "--config".to_string(),
            format!("{}/lb.toml", config_mount["mountPath"].as_str().unwrap())
        ]
    );
    assert!(
        by_kind("Secret")[0]["stringData"]["admin-token"]
            .as_str()
            .unwrap()
            .len()
            >= 16
    );
}

/// The Grafana dashboard: every query names only metrics the LB exports.
#[test]
fn grafana_dashboard_queries_name_only_exported_metrics() {
    let path = workspace().join("examples/deploy/grafana/lookaside-lb.json");
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exported: BTreeSet<String> = lb_server::internals::Metrics::new()
        .sample_names()
        .into_iter()
        .collect();
    let mut queries = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel without targets: {panel}"));
        assert!(!targets.is_empty(), "{}", panel["title"]);
        queries.extend(
            targets
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string()),
        );
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"].as_str().filter(|q| q.contains("lb_")) {
            queries.push(q.to_string());
        }
    }
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let mut named = BTreeSet::new();
    for q in &queries {
        let mut rest = q.as_str();
        while let Some(i) = rest.find("lb_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            named.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    let unknown: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "queries name metrics the LB does not export: {unknown:?}"
    );
    // Most of what the LB exports is on the dashboard.
    assert!(named.len() >= 20, "{named:?}");
}
