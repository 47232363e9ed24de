//! What every server example shares: the `--addr` flag and stopping on
//! Ctrl-C or SIGTERM. Included with `#[path = "../common/cli.rs"] mod cli;`.

use std::net::SocketAddr;

/// `--addr HOST:PORT` (or `--addr=HOST:PORT`), default `127.0.0.1:3000`.
/// Exits with a usage line on anything else.
#[allow(dead_code)] // `chat` takes a flag of its own and calls `addr_from`
pub fn addr_arg(program: &str) -> SocketAddr {
    addr_from(program, "", std::env::args().skip(1))
}

/// [`addr_arg`] over `args` (what is left after a program took its own
/// flags); `more` is appended to the usage line.
pub fn addr_from(program: &str, more: &str, args: impl Iterator<Item = String>) -> SocketAddr {
    match parse_addr(args) {
        Ok(a) => a,
        Err(msg) => usage(program, more, &msg),
    }
}

/// Prints `msg` and the usage line, and exits with status 2.
pub fn usage(program: &str, more: &str, msg: &str) -> ! {
    eprintln!("{program}: {msg}\nusage: {program} [--addr HOST:PORT]{more}   (default 127.0.0.1:3000)");
    std::process::exit(2);
}

fn parse_addr(mut args: impl Iterator<Item = String>) -> Result<SocketAddr, String> {
    let mut addr = None;
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--addr") {
            Some("") => args.next().ok_or("--addr needs a value")?,
            Some(v) if v.starts_with('=') => v[1..].to_owned(),
            _ => return Err(format!("unknown argument `{arg}`")),
        };
        addr = Some(value.parse().map_err(|e| format!("--addr {value}: {e}"))?);
    }
    Ok(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3000))))
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
