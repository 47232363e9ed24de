//! Running a playwright-core script in headless Chromium from a test: checks
//! that node, Chromium and `tests/browser/node_modules` are there (a test
//! fails, never skips, when they are missing), runs the script with a
//! guard timeout and asserts it printed its pass line.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// What to run when the browser set-up is missing.
pub const INSTALL: &str = "run `bash .ci/install-browser.sh` (as root) to install Chromium and the npm packages";

/// Runs `node <script> <args…>` from the repository root; panics with its
/// output unless it exits 0 having printed `passed`. Returns its stdout.
pub async fn run_script(script: &str, args: &[String], passed: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let node_ok = std::process::Command::new("node").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(node_ok, "`node` is not on PATH: {INSTALL}");
    let playwright = root.join("tests/browser/node_modules/playwright-core");
    assert!(playwright.is_dir(), "{} is missing: {INSTALL}", playwright.display());
    let chromium = std::env::var("CHROMIUM_PATH").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(Path::new(&chromium).is_file(), "no Chromium at {chromium}: {INSTALL}");

    let run = tokio::process::Command::new("node")
        .arg(script)
        .args(args)
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    // Scripts stop themselves well before; this only guards against a hung node.
    let out = tokio::time::timeout(Duration::from_secs(200), run)
        .await
        .unwrap_or_else(|_| panic!("node {script} did not finish within 200 s"))
        .expect("could not start node");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(passed),
        "browser test failed ({}); if Chromium or playwright-core is missing, {INSTALL}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status,
    );
    stdout
}

/// Runs `node --experimental-websocket <script> <args…>` (switchboard.js in
/// Node's own WebSocket, no browser) from the repository root; panics with
/// its output unless it exits 0 having printed `passed` within 90 s.
/// Returns its stdout.
pub async fn run_node(script: &str, args: &[String], passed: &str) -> String {
    let run = tokio::process::Command::new("node")
        .arg("--experimental-websocket")
        .arg(script)
        .args(args)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .unwrap_or_else(|_| panic!("node {script} did not finish within 90 s"))
        .expect("`node` must be on PATH");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(passed),
        "node {script} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
    stdout
}

/// Where the browser tests save their screenshots (the scripts print each
/// path): `target/tmp/browser-screenshots/`.
pub fn screenshot_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots")
}

/// An app server in a runtime of its own, so that killing it drops every
/// socket at once without a close frame, as a killed process would (the
/// browsers see 1006).
pub struct Node {
    runtime: Option<tokio::runtime::Runtime>,
}

impl Node {
    /// Serves the router `make` builds on `addr` (port 0: a free one),
    /// retrying while the old listener of a killed node is being dropped.
    pub fn start(addr: std::net::SocketAddr, make: fn() -> axum::Router) -> (std::net::SocketAddr, Node) {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let router = runtime.block_on(async { make() });
        let listener = runtime.block_on(async {
            for _ in 0..500 {
                match tokio::net::TcpListener::bind(addr).await {
                    Ok(l) => return l,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
            panic!("cannot bind {addr} again");
        });
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move {
            let app = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            axum::serve(listener, app).await.expect("serve");
        });
        (addr, Node { runtime: Some(runtime) })
    }
}

/// Dropping a node kills it (also when a failing test unwinds).
impl Drop for Node {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A test's levers on a [`Node`], served on a port of their own (the node
/// may be down): `GET /kill` and `GET /start`. Returns their base URL.
pub async fn levers(addr: std::net::SocketAddr, node: Node, make: fn() -> axum::Router) -> String {
    use axum::{extract::State, routing::get};
    type Slot = std::sync::Arc<std::sync::Mutex<Option<Node>>>;
    /// The running node (if any), its address, and how to build its app.
    type Levers = (Slot, std::net::SocketAddr, fn() -> axum::Router);
    let slot: Slot = std::sync::Arc::new(std::sync::Mutex::new(Some(node)));
    async fn kill(State((slot, _, _)): State<Levers>) -> &'static str {
        let node = slot.lock().unwrap().take();
        // Dropping a runtime blocks: not on this runtime's workers.
        tokio::task::spawn_blocking(move || drop(node)).await.unwrap();
        "killed"
    }
    async fn start(State((slot, addr, make)): State<Levers>) -> &'static str {
        let node = tokio::task::spawn_blocking(move || Node::start(addr, make).1).await.unwrap();
        assert!(slot.lock().unwrap().replace(node).is_none(), "/start while running");
        "started"
    }
    let router =
        axum::Router::new().route("/kill", get(kill)).route("/start", get(start)).with_state((slot, addr, make));
    let control = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", control.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(control, router).await.unwrap() });
    url
}
