//! Helpers for tests that start their own servers (`redis-server`,
//! `nats-server`): a clear failure when a binary is missing, free ports.

use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Checks once per binary that `name` runs (`--version`); panics with one
/// clear message, naming how to install it, when it is missing.
pub fn require_binary(name: &'static str, install: &str) -> &'static str {
    static CHECKED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if !checked.contains(&name) {
        let found = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{name} was not found on PATH: these tests start their own server. \
             Install it ({install}; `.ci/test` does this) and run again."
        );
        checked.push(name);
    }
    name
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}
