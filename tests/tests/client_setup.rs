//! The README's client setup, run: the grpc-go block in the README is the
//! code of `tests/interop/go/grpclb_client` (checked line by line), and that
//! program, built against Debian's grpc-go 1.33, balances calls through a
//! real LB.

use std::time::Duration;

use lb_tests::stock::StockClient;
use lb_tests::{greeters, workspace, Lb};

/// The lines between `// readme:begin grpc-go` and `// readme:end` in the
/// Go client, one tab of indentation removed.
fn program_region() -> Vec<String> {
    let src = std::fs::read_to_string(workspace().join("tests/interop/go/grpclb_client/main.go"))
        .unwrap();
    let start = src.find("// readme:begin grpc-go").expect("begin marker");
    let body = &src[start..];
    let body = &body[body.find('\n').unwrap() + 1..body.find("// readme:end").expect("end marker")];
    body.lines()
        .map(|l| l.strip_prefix('\t').unwrap_or(l).to_string())
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[test]
fn the_readme_go_block_is_the_tested_program() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let start = readme.find("**Go (grpc-go)**").expect("the Go section");
    let block = &readme[start..];
    let block = &block[block.find("```go\n").unwrap() + 6..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<&str> = block.lines().collect();
    let region = program_region();
    let at = lines
        .iter()
        .position(|l| *l == region[0])
        .unwrap_or_else(|| panic!("README's Go block lacks {:?}:\n{block}", region[0]));
    assert_eq!(
        &lines[at..at + region.len()],
        region.as_slice(),
        "README and program differ"
    );
    // The imports the block lists are the program's.
    let program =
        std::fs::read_to_string(workspace().join("tests/interop/go/grpclb_client/main.go"))
            .unwrap();
    for import in lines.iter().filter(|l| l.contains("\"google.golang.org/")) {
        let path = import.split('"').nth(1).unwrap();
        assert!(
            program.contains(&format!("\"{path}\"")),
            "{path} is not imported by the program"
        );
    }
}

#[tokio::test]
async fn the_grpc_go_client_from_the_readme_balances_through_a_real_lb() {
    let lb = Lb::embedded(&[]).await;
    let gs = greeters(2, &format!("lb://{}", lb.addr), &[]).await;
    lb.wait_ready(Duration::from_secs(10)).await;
    let summary = StockClient::go(
        lb.addr,
        "greeter",
        Duration::from_secs(3),
        Duration::from_millis(20),
    )
    .finish(Duration::from_secs(60))
    .await;
    assert_eq!(
        summary["failures"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
    let per_backend = summary["per_backend"].as_object().unwrap();
    for g in &gs {
        let n = per_backend
            .iter()
            .find(|(k, _)| k.contains(&g.addr.to_string()))
            .map(|(_, v)| v.as_u64().unwrap())
            .unwrap_or(0);
        assert!(n > 20, "{} got {n} calls: {summary}", g.addr);
    }
}
