//! Running the example programs as a user does: the binaries that
//! `cargo test --all-features` builds next to the tests
//! (`target/debug/examples/`). Run alone, build them first:
//! `cargo build --examples --all-features`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// The built binary of example `name`; fails when it is missing or older
/// than the example's source (a stale binary would test old code).
pub fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe().expect("test binary path");
    let bin = deps.parent().and_then(|d| d.parent()).expect("target dir").join("examples").join(name);
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "{} is not built: run `cargo build --examples --all-features` (or the whole `cargo test`)",
            bin.display()
        )
    });
    // The example's own files (`NAME.rs`, or every file of `NAME/`), and the
    // shared `common/cli.rs` when it includes it.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join(name))
        .map(|dir| dir.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_else(|_| vec![root.join(format!("{name}.rs"))]);
    if sources.iter().any(|s| std::fs::read_to_string(s).is_ok_and(|t| t.contains("common/cli.rs"))) {
        sources.push(root.join("common/cli.rs"));
    }
    for src in sources {
        let changed = std::fs::metadata(&src).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        assert!(
            changed <= built,
            "{} is older than {}: run `cargo build --examples --all-features`",
            bin.display(),
            src.display()
        );
    }
    bin
}

/// Runs example `name` with `args` to its end; returns (exit code, stdout,
/// stderr). Fails if it runs longer than `limit`.
pub async fn run(name: &str, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(binary(name));
    cmd.args(args).envs(env.iter().copied()).stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{name} {args:?} still runs after {limit:?}"))
        .expect("spawn the example");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// An example server running in the background, killed on drop.
pub struct Running {
    pub child: Child,
    /// Lines of stdout and stderr, as they come (stderr lines start with
    /// `!`).
    pub lines: mpsc::UnboundedReceiver<String>,
    /// Everything read so far, for failure messages.
    pub seen: Vec<String>,
}

impl Running {
    /// Starts example `name` and waits for the line containing `ready`.
    pub async fn start(name: &str, args: &[&str], env: &[(&str, &str)], ready: &str) -> (Running, String) {
        let mut running = Running::spawn(name, args, env);
        let line = running.line_with(ready).await;
        (running, line)
    }

    /// Starts example `name` with a pipe for its input (`child.stdin`).
    pub fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Running {
        let mut child = Command::new(binary(name))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the example");
        let (tx, rx) = mpsc::unbounded_channel();
        forward(child.stdout.take().expect("stdout"), "", tx.clone());
        forward(child.stderr.take().expect("stderr"), "!", tx);
        Running { child, lines: rx, seen: Vec::new() }
    }

    /// Writes `line` and a newline to the program's input.
    pub async fn type_line(&mut self, line: &str) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(format!("{line}\n").as_bytes()).await.expect("write to the program");
    }

    /// The next line containing `what` (earlier lines are kept in `seen`).
    pub async fn line_with(&mut self, what: &str) -> String {
        loop {
            match tokio::time::timeout(super::WAIT, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Ok(None) => panic!("the program ended before printing {what:?}: {:#?}", self.seen),
                Err(_) => panic!("no line with {what:?} in time: {:#?}", self.seen),
            }
        }
    }

    /// Sends `signal` (e.g. `SIGTERM`) to the program.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("still running") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("kill");
    }

    /// Waits for the program to exit; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let status = tokio::time::timeout(super::WAIT, self.child.wait()).await.expect("the program did not exit");
        status.expect("wait").code()
    }
}

fn forward(pipe: impl AsyncRead + Unpin + Send + 'static, prefix: &'static str, tx: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(format!("{prefix}{line}")).is_err() {
                return;
            }
        }
    });
}

/// The `HOST:PORT` in a "listening on ws://HOST:PORT/" line.
pub fn listening_addr(line: &str) -> std::net::SocketAddr {
    let start = line.find("://").map(|i| i + 3).unwrap_or_else(|| panic!("no URL in {line:?}"));
    let rest = &line[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    rest[..end].parse().unwrap_or_else(|e| panic!("{e}: {line:?}"))
}
