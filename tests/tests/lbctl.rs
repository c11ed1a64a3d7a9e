//! `lbctl` run as an operator runs it, against live LBs: tables and
//! `--json` for services, a service, clients and the cluster (two replicas
//! over a real etcd), and drain / undrain / weight overrides taking effect
//! in what clients are sent, with the token from a file or the environment.

use std::process::Command;
use std::time::Duration;

use lb_tests::{bin, channel, greeters, listed, output, wait_backends, wait_until, Etcd, Lb};

const TOKEN: &str = "lbctl-test-token-0123456789";

/// `lbctl ARGS` against `lb` with `env`: (status, stdout, stderr).
fn lbctl(lb: &Lb, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    output(
        Command::new(bin("lbctl"))
            .arg("--admin")
            .arg(format!("http://{}", lb.admin))
            .args(args)
            .env_remove("LB_ADMIN_TOKEN")
            .env_remove("LB_ADMIN_TOKEN_FILE")
            .envs(env.iter().copied()),
    )
}

fn ok(lb: &Lb, args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, out, err) = lbctl(lb, args, env);
    assert_eq!(code, 0, "lbctl {args:?}: {err}");
    out
}

/// The table row that starts with `first`, split into cells.
fn row(table: &str, first: &str) -> Vec<String> {
    let line = table
        .lines()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"));
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn tables_json_and_mutations_against_a_live_lb() {
    let (lb, token_file) = Lb::with_admin_token(TOKEN, &[]).await;
    let file = token_file.path();
    let gs = greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    let ch = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&ch, 2, Duration::from_secs(10)).await);
    let a = gs[0].addr.to_string();

    let services = ok(&lb, &["services"], &[]);
    assert_eq!(
        row(&services, "SERVICE")[..3],
        ["SERVICE", "BACKENDS", "HEALTHY"]
    );
    assert_eq!(
        row(&services, "greeter")[1..4],
        ["2", "2", "2"],
        "{services}"
    );

    let service = ok(&lb, &["service", "greeter"], &[]);
    let backend = row(&service, &a);
    assert_eq!(backend[2], "serving", "{service}");
    assert_eq!(backend[5], "50.0%", "{service}");
    assert!(
        backend.last().unwrap().starts_with("serving"),
        "why: {service}"
    );

    let clients = ok(&lb, &["clients"], &[]);
    assert!(clients.contains("grpclb streams: 1"), "{clients}");
    assert_eq!(
        row(&clients, "1 ")[2..4],
        ["greeter", "greeter"],
        "{clients}"
    );

    // --json is the API's answer (load reports, which arrive every second,
    // set aside).
    let steady = |mut v: serde_json::Value| {
        for b in v["backends"].as_array_mut().unwrap() {
            b["load_report"] = serde_json::Value::Null;
        }
        v
    };
    let json = serde_json::from_str(&ok(&lb, &["--json", "service", "greeter"], &[])).unwrap();
    assert_eq!(steady(json), steady(lb.json("/api/v1/services/greeter")));

    // Mutations need the token: refused without, with a readable reason.
    let (code, _, err) = lbctl(&lb, &["drain", "greeter", &a], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--token-file or LB_ADMIN_TOKEN"), "{err}");
    let (code, _, err) = lbctl(
        &lb,
        &["drain", "greeter", &a],
        &[("LB_ADMIN_TOKEN", "wrong-token-0123456789")],
    );
    assert_eq!(code, 1);
    assert!(err.contains("401 unauthorized"), "{err}");

    // Drain (token from the environment): the client's list loses it.
    let out = ok(&lb, &["drain", "greeter", &a], &[("LB_ADMIN_TOKEN", TOKEN)]);
    assert_eq!(out.trim(), format!("drain greeter {a}"));
    assert!(wait_until(Duration::from_secs(5), || listed(&ch) == vec![gs[1].addr]).await);
    let service = ok(&lb, &["service", "greeter"], &[]);
    assert_eq!(row(&service, &a)[2], "serving (drained)", "{service}");
    assert!(
        row(&service, &a).last().unwrap().contains("drained"),
        "{service}"
    );

    // Undrain and a weight override (token from a file, as the server reads it).
    ok(
        &lb,
        &["undrain", "greeter", &a],
        &[("LB_ADMIN_TOKEN_FILE", &file)],
    );
    let out = ok(
        &lb,
        &[
            "--token-file",
            &file,
            "weight",
            "greeter",
            &a,
            "3",
            "--ttl",
            "10m",
        ],
        &[],
    );
    assert_eq!(
        out.trim(),
        format!("weight_override greeter {a} weight 3 for 10m")
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            row(&ok(&lb, &["service", "greeter"], &[]), &a)[5] == "75.0%"
        })
        .await
    );
    let service = ok(&lb, &["service", "greeter"], &[]);
    assert_eq!(
        row(&service, &a)[3..6],
        ["0", "3 (override)", "75.0%"],
        "{service}"
    );
    ok(
        &lb,
        &["--token-file", &file, "weight", "greeter", &a, "--clear"],
        &[],
    );
    let service = ok(&lb, &["service", "greeter"], &[]);
    assert_eq!(row(&service, &a)[5], "50.0%", "{service}");

    // Errors of the API come back as one line and a failing status.
    let (code, _, err) = lbctl(&lb, &["service", "nope"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("404 unknown_service"), "{err}");
    let (code, _, err) = lbctl(
        &lb,
        &["--token-file", &file, "weight", "greeter", &a, "0"],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("400 bad_weight"), "{err}");
}

#[tokio::test]
async fn cluster_shows_both_replicas_and_who_checks_each_backend() {
    let etcd = Etcd::start().await;
    let url = etcd.registry_url();
    let lb1 = Lb::start(&["--registry", &url, "--replica-id", "lb-1"]).await;
    let lb2 = Lb::start(&["--registry", &url, "--replica-id", "lb-2"]).await;
    let gs = greeters(4, &url, &[]).await;
    assert!(
        wait_until(Duration::from_secs(15), || {
            let out = lbctl(&lb1, &["cluster"], &[]).1;
            out.contains("lb-1 (this one)") && out.contains("lb-2")
        })
        .await,
        "{}",
        lbctl(&lb1, &["cluster"], &[]).1
    );
    let cluster = ok(&lb2, &["cluster"], &[]);
    assert!(
        cluster.starts_with("replica lb-2, etcd session connected"),
        "{cluster}"
    );
    assert_eq!(row(&cluster, "lb-1")[1], lb1.addr.to_string(), "{cluster}");
    assert_eq!(
        row(&cluster, "lb-2 (this one)")[2],
        lb2.admin.to_string(),
        "{cluster}"
    );

    // Every backend checked by one of the two, and both replicas agree.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let s = lbctl(&lb1, &["service", "greeter"], &[]).1;
            gs.iter().all(|g| s.contains(&g.addr.to_string()))
        })
        .await
    );
    let one = ok(&lb1, &["service", "greeter"], &[]);
    let two = ok(&lb2, &["service", "greeter"], &[]);
    for g in &gs {
        let by = row(&one, &g.addr.to_string())[6].clone();
        assert!(by == "lb-1" || by == "lb-2", "{one}");
        assert_eq!(row(&two, &g.addr.to_string())[6], by, "{two}");
    }
}
