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

/// Where the browser tests save their screenshots (the scripts print each
/// path): `target/tmp/browser-screenshots/`.
pub fn screenshot_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-screenshots")
}
