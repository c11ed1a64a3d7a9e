//! The config file, run as an operator runs it: `lb-server --config
//! lb.toml`, the order of flags, environment and file, `--print-config`
//! starting the same LB, a misspelt key refused with the nearest valid
//! one, and SIGHUP applying what can change and naming what needs a
//! restart, on a live LB with clients.

use std::process::Command;
use std::time::Duration;

use lb_tests::{bin, call_n, channel, greeters, output, wait_backends, wait_until, Lb};

/// `lb-server ARGS` with only the environment `env`: (status, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    output(
        Command::new(bin("lb-server"))
            .args(args)
            .env_clear()
            .envs(env.iter().copied()),
    )
}

/// The file of the SIGHUP test after its edit: a new log level, an alias
/// and a policy knob (applied) and a stream cap (needs a restart).
const EDITED: &str = "log = \"info\"\n[registry]\nregistry = [\"memory\"]\n\
     [grpc]\nmax-streams = 5\nalias = [\"hello=greeter\"]\n\
     [policy]\npanic-threshold = 0.9\n";

fn line<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(&format!("{key} = ")))
}

#[test]
fn flags_beat_environment_beat_file_beat_defaults_and_printed_config_starts_the_same_lb() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.toml");
    std::fs::write(
        &file,
        "log = \"warn\"\n\
         [policy]\nslow-start = \"30s\"\nmax-shed = 0.3\n\
         [grpc]\nmax-streams = 77\nalias = [\"hello=greeter\"]\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = run(
        &["--config", path, "--print-config", "--max-streams", "88"],
        &[("LB_MAX_SHED", "0.4")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        line(&out, "max-streams"),
        Some("max-streams = 88"),
        "flag over file"
    );
    assert_eq!(
        line(&out, "max-shed"),
        Some("max-shed = 0.4"),
        "environment over file"
    );
    assert_eq!(
        line(&out, "slow-start"),
        Some("slow-start = \"30s\""),
        "file over default"
    );
    assert_eq!(
        line(&out, "max-list-len"),
        Some("max-list-len = 256"),
        "default"
    );
    assert_eq!(line(&out, "alias"), Some("alias = [\"hello=greeter\"]"));
    assert_eq!(line(&out, "log"), Some("log = \"warn\""));
    assert!(
        out.contains("\n[policy]\n") && out.contains("\n[zones]\n"),
        "{out}"
    );

    // The printed file alone (no flags, no environment) gives the same
    // effective configuration.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (code, again, err) = run(
        &["--config", printed.to_str().unwrap(), "--print-config"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);

    // LB_CONFIG names the file as well.
    let (code, by_env, err) = run(
        &["--print-config"],
        &[("LB_CONFIG", printed.to_str().unwrap())],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(by_env, out);
}

#[test]
fn a_misspelt_or_misplaced_key_is_refused_naming_the_nearest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.toml");
    for (text, want) in [
        (
            "[zones]\nzone-overload-tolerence = 0.2\n",
            "unknown key `zone-overload-tolerence` in [zones]; the nearest valid key is `zone-overload-tolerance` in [zones]",
        ),
        (
            "[policy]\nhealth-timeout = \"2s\"\n",
            "`health-timeout` in [policy] is in the wrong section: it belongs in `health-timeout` in [probes]",
        ),
        ("[prob]\nhealth-timeout = \"2s\"\n", "unknown section [prob]; the nearest valid one is [probes]"),
        ("[probes]\nhealth-timeout = \"soon\"\n", "`health-timeout` in [probes]: \"soon\": invalid value"),
        ("[probes\n", "lb.toml"),
    ] {
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = run(&["--config", file.to_str().unwrap()], &[]);
        assert_eq!(code, 2, "{text:?} must be refused: {out}{err}");
        assert!(err.contains(want), "{text:?}: want {want:?} in: {err}");
    }
}

/// Sends SIGHUP and waits for the LB to log the reload; returns that line.
async fn sighup(lb: &Lb) -> String {
    const RELOADED: &str = "SIGHUP: configuration reloaded";
    let log = || std::fs::read_to_string(&lb.proc.log).unwrap_or_default();
    let before = log().matches(RELOADED).count();
    lb.proc.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || log().matches(RELOADED).count()
            > before)
        .await,
        "no reload line: {}",
        log()
    );
    log()
        .lines()
        .rfind(|l| l.contains(RELOADED))
        .expect("reload line")
        .to_string()
}

#[tokio::test]
async fn sighup_applies_names_policy_and_log_level_and_names_what_needs_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.toml");
    let path = file.to_str().unwrap().to_string();
    std::fs::write(
        &file,
        "log = \"warn\"\n[registry]\nregistry = [\"memory\"]\n[grpc]\nmax-streams = 1000\n",
    )
    .unwrap();
    // Without the harness's LB_LOG, the file's log filter applies.
    let lb = Lb::start_with_env(&["--config", &path], &[("LB_LOG", "")]).await;
    let _gs = greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    let direct = channel("greeter", &[lb.addr]);
    assert!(wait_backends(&direct, 2, Duration::from_secs(10)).await);
    let log = || std::fs::read_to_string(&lb.proc.log).unwrap_or_default();
    assert!(
        !log().contains(" INFO "),
        "the file's `warn` filter applies: {}",
        log()
    );

    // Not yet an alias: `hello` is no service.
    let hello = channel("hello", &[lb.addr]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(call_n(&hello, 3).await.ok(), 0);

    std::fs::write(&file, EDITED).unwrap();
    let reloaded = sighup(&lb).await;
    assert!(
        reloaded.contains("\"log\"")
            && reloaded.contains("\"alias\"")
            && reloaded.contains("\"panic-threshold\""),
        "{reloaded}"
    );
    assert!(
        reloaded.contains("needs_restart=[\"max-streams\"]"),
        "{reloaded}"
    );
    assert!(
        lb.log_lines("WARN")
            .iter()
            .any(|l| l.contains("after a restart") && l.contains("max-streams")),
        "{:?}",
        lb.log_lines("WARN")
    );
    // The alias works now, on the same LB process and its running clients.
    assert!(wait_backends(&hello, 2, Duration::from_secs(10)).await);
    assert_eq!(call_n(&hello, 20).await.ok(), 20);
    assert_eq!(call_n(&direct, 20).await.ok(), 20);

    // A broken file on SIGHUP: reported, the running configuration kept.
    std::fs::write(&file, "[grpc]\nalias = [\"hello=greeter\"\n").unwrap();
    lb.proc.signal(libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || log()
            .contains("configuration not reloaded"))
        .await,
        "{}",
        log()
    );
    assert_eq!(call_n(&hello, 10).await.ok(), 10);

    // A reload with nothing changed applies nothing and warns of nothing.
    std::fs::write(&file, EDITED).unwrap();
    let warns = lb.log_lines("WARN").len();
    let last = sighup(&lb).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // max-streams still differs from what runs (1000): still named.
    assert!(last.contains("applied=[]"), "{last}");
    assert_eq!(
        lb.log_lines("WARN").len(),
        warns + 1,
        "one restart warning again"
    );
}

/// The configuration of the max-list-len test: a file registry and the
/// policy knobs given.
fn list_len_config(services: &std::path::Path, max_list_len: u32, panic: f64) -> String {
    format!(
        "[registry]\nregistry = [\"file://{}\"]\n[probes]\nhealth-checks = false\n\
         [policy]\nmax-list-len = {max_list_len}\npanic-threshold = {panic}\n",
        services.display()
    )
}

/// `max-list-len` needs a restart (zone views and subsets are sized with it
/// at start): a SIGHUP that changes it beside a policy knob applies the
/// knob, names `max-list-len` as needing a restart, and lists keep the
/// running length.
#[tokio::test]
async fn sighup_keeps_the_running_max_list_len_and_names_it_as_needing_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services.json");
    // Weights 3 and 5: 8 entries, or fewer when the list is capped.
    std::fs::write(
        &services,
        r#"{"greeter": [{"addr": "127.0.0.2:5001", "weight": 3}, {"addr": "127.0.0.3:5001", "weight": 5}]}"#,
    )
    .unwrap();
    let file = dir.path().join("lb.toml");
    std::fs::write(&file, list_len_config(&services, 4, 0.5)).unwrap();
    let lb = Lb::start(&["--config", file.to_str().unwrap()]).await;
    let entries = || {
        lb.backends("greeter")
            .iter()
            .map(|b| b["list_entries"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert!(wait_until(Duration::from_secs(10), || entries() > 0).await);
    assert!(entries() <= 4, "capped at start: {}", entries());

    std::fs::write(&file, list_len_config(&services, 100, 0.6)).unwrap();
    let reloaded = sighup(&lb).await;
    assert!(
        reloaded.contains("applied=[\"panic-threshold\"]")
            && reloaded.contains("needs_restart=[\"max-list-len\"]"),
        "{reloaded}"
    );
    // Lists were rebuilt with the new panic threshold: still the running
    // length, as the log says.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        entries() <= 4,
        "max-list-len changed on SIGHUP although the log says it needs a restart: {} entries",
        entries()
    );
}

/// The RouteConfiguration's cluster in an RDS response.
fn route_cluster(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Option<String> {
    use envoy_types::pb::envoy::config::route::v3::{
        route::Action, route_action::ClusterSpecifier, RouteConfiguration,
    };
    use prost::Message;
    let any = response.resources.first()?;
    let config = RouteConfiguration::decode(any.value.as_slice()).ok()?;
    let route = config.virtual_hosts.first()?.routes.first()?;
    match route.action.as_ref()? {
        Action::Route(r) => match r.cluster_specifier.as_ref()? {
            ClusterSpecifier::Cluster(c) => Some(c.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The next ADS response within `limit`, if any.
async fn next_response(
    responses: &mut tonic::Streaming<
        envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >,
    limit: Duration,
) -> Option<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse> {
    tokio::time::timeout(limit, responses.message())
        .await
        .ok()
        .and_then(|r| r.ok().flatten())
}

/// An alias changed by SIGHUP reaches streams already open: a BalanceLoad
/// stream for the alias moves to the new service's backends, and an ADS
/// stream subscribed to its route gets the new cluster, within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_alias_change_reaches_open_balanceload_and_ads_streams() {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DiscoveryRequest,
    };
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.toml");
    let config = |target: &str| {
        format!("[registry]\nregistry = [\"memory\"]\n[grpc]\nalias = [\"hello={target}\"]\n")
    };
    std::fs::write(&file, config("greeter")).unwrap();
    let lb = Lb::start(&["--config", file.to_str().unwrap()]).await;
    let registry = format!("lb://{}", lb.addr);
    let gs = greeters(2, &registry, &[]).await;
    let other = lb_tests::Greeter::start(&registry, &["--service", "other"]).await;
    let hello = channel("hello", &[lb.addr]);
    assert!(wait_backends(&hello, 2, Duration::from_secs(10)).await);
    let distinct = |ch: &lb_client::LbChannel| {
        let mut b = ch.ready_backends();
        b.sort();
        b.dedup();
        b
    };
    let mut want: Vec<_> = gs.iter().map(|g| g.addr).collect();
    want.sort();
    assert_eq!(distinct(&hello), want);
    let others = channel("other", &[lb.addr]);
    assert!(wait_backends(&others, 1, Duration::from_secs(10)).await);

    // An ADS client subscribed to the route of `hello`.
    let mut ads = AggregatedDiscoveryServiceClient::connect(format!("http://{}", lb.addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let request = |nonce: &str, version: &str| DiscoveryRequest {
        node: Some(Node {
            id: "alias-test".into(),
            ..Default::default()
        }),
        type_url: RDS.into(),
        resource_names: vec!["hello".into()],
        response_nonce: nonce.into(),
        version_info: version.into(),
        ..Default::default()
    };
    tx.send(request("", "")).await.unwrap();
    let mut responses = ads
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = next_response(&mut responses, Duration::from_secs(5))
        .await
        .expect("RDS answer");
    assert_eq!(route_cluster(&first).as_deref(), Some("greeter"));
    tx.send(request(&first.nonce, &first.version_info))
        .await
        .unwrap();

    std::fs::write(&file, config("other")).unwrap();
    lb.proc.signal(libc::SIGHUP);
    let t = std::time::Instant::now();
    let moved = next_response(&mut responses, Duration::from_secs(2)).await;
    assert_eq!(
        moved.as_ref().and_then(route_cluster).as_deref(),
        Some("other"),
        "the open ADS stream kept the old route: {moved:?}"
    );
    assert!(
        wait_until(
            Duration::from_secs(2).saturating_sub(t.elapsed()),
            || distinct(&hello) == vec![other.addr]
        )
        .await,
        "the open BalanceLoad stream kept the old service: {:?}",
        distinct(&hello)
    );
    assert_eq!(call_n(&hello, 10).await.ok(), 10);
    // Streams of names the change does not touch stay as they were.
    assert_eq!(distinct(&others), vec![other.addr]);
}
