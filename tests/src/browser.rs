//! Headless Chromium, for the tests that look at the dashboard as an
//! operator would: the DOM after the page's scripts ran, or a screenshot.

use std::path::PathBuf;
use std::time::Duration;

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM_BIN") {
        return PathBuf::from(p);
    }
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    found.unwrap_or_else(|| {
        panic!("chromium not found: install Debian's `chromium` (scripts/setup does) or set CHROMIUM_BIN")
    })
}

/// Renders the page in headless Chromium; returns the DOM after its scripts ran.
pub async fn render(url: &str, screenshot: Option<&std::path::Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,800",
        "--virtual-time-budget=4000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        cmd.arg(url).kill_on_drop(true).output(),
    )
    .await
    .expect("chromium timed out")
    .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
