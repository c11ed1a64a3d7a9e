//! Processes the harness starts: free ports, binaries of this workspace,
//! log files under `target/test-logs/`, and [`Proc`], stopped by PID on drop.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released), below the kernel's
/// ephemeral range (32768 and up): the outgoing connections of the
/// processes a test runs take their ports from that range, so one of them
/// cannot take this port between its release and the process binding it.
/// Successive calls walk the range from a random start, so two picks of one
/// test binary never collide either.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local addr")
        .port()
}

/// Directory of this workspace's built binaries (`target/<profile>`).
pub(crate) fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; fails loudly if it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} not found. Build the binaries first: `cargo build --workspace --bins` (scripts/test does this).",
        path.display()
    );
    path
}

/// Path of the etcd server binary; fails loudly with a fix-it message.
pub fn etcd_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ETCD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ETCD_BIN={} does not exist", p.display());
        return p;
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "etcd not found on PATH and ETCD_BIN is not set. Install it (Debian: `apt-get install etcd-server`), \
             set ETCD_BIN=/path/to/etcd, or run scripts/test, which installs it."
        )
    })
}

fn log_file(name: &str) -> (std::fs::File, PathBuf) {
    let dir = bin_dir().join("..").join("test-logs");
    std::fs::create_dir_all(&dir).expect("create test-logs dir");
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.log", std::process::id()));
    (std::fs::File::create(&path).expect("create log file"), path)
}

/// A child process stopped (SIGKILL) and reaped when dropped.
pub struct Proc {
    pub(crate) child: Option<Child>,
    /// Where its output goes.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    pub(crate) fn spawn(name: &str, mut cmd: Command, stdout_piped: bool) -> Proc {
        let (log, path) = log_file(name);
        cmd.stderr(log.try_clone().expect("clone log"));
        cmd.stdout(if stdout_piped {
            Stdio::piped()
        } else {
            Stdio::from(log)
        });
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            child: Some(child),
            log: path,
            name: name.to_string(),
        }
    }

    /// Takes the piped standard output of a process started with it piped.
    pub(crate) fn child_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut()?.stdout.take()
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
        }
    }

    /// SIGTERM, then wait up to `limit` for exit (SIGKILL after that).
    pub fn terminate(&mut self, limit: Duration) {
        if self.child.is_none() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child {
                if let Ok(Some(_)) = c.try_wait() {
                    self.child = None;
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} did not exit within {limit:?} of SIGTERM; killing",
            self.name
        );
        self.kill();
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(Some(_))),
            None => true,
        }
    }
}

/// Lines of a process's log shown when a test fails.
const LOG_TAIL_ON_FAILURE: usize = 25;

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what its processes said last: CI keeps the
        // test's output, not the log files.
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} lines of {} ({}) ---\n{}",
                tail.len(),
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

/// Runs `cmd` to its end: (exit status, stdout, stderr); -1 when killed
/// by a signal.
pub fn output(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A secret written to a file in a directory of its own, removed on drop
/// (`--admin-token-file` and the like).
pub struct SecretFile {
    dir: tempfile::TempDir,
}

impl SecretFile {
    /// Writes `secret` (with a line end, as editors leave one).
    pub fn new(secret: &str) -> SecretFile {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), format!("{secret}\n")).unwrap();
        SecretFile { dir }
    }

    /// Its path, as a flag value.
    pub fn path(&self) -> String {
        self.dir.path().join("secret").display().to_string()
    }
}

/// Workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Python interpreter with `grpcio` and `dnslib`: `$LB_TEST_PYTHON`, or
/// the `.venv` that `scripts/test` creates. Missing: a loud failure.
pub fn python() -> PathBuf {
    let python = std::env::var_os("LB_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    assert!(
        python.exists(),
        "{} not found: run scripts/test (it creates .venv with grpcio and dnslib), \
         or set LB_TEST_PYTHON to a Python that has them",
        python.display()
    );
    python
}
