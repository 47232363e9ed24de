//! A collaborative todo board on a synced room (`docs/sync.md`).
//!
//! Open the printed URL in two browser windows: add, edit, check, reorder
//! and delete items; every change shows at once in the window that made it
//! (marked "saving…" until the server confirms it) and in the others a
//! moment later. A change the server refuses (an edit of an item someone
//! else deleted meanwhile, a text over 200 characters, more than 100 items)
//! is rolled back and the page says why. Offline changes wait and are sent
//! after the reconnect. `?board=NAME` picks another board.
//!
//! ```text
//! cargo run --example todo                                          # http://127.0.0.1:3000/
//! cargo run --example todo --features redis -- --redis redis://127.0.0.1:6379 --addr 127.0.0.1:3001
//! ```
//!
//! With `--redis URL` (feature `redis`) boards live in Redis
//! (`RedisSnapshots`) and instances share them through `RedisBackplane`: a
//! restart loses nothing, and several instances serve one board.
//! `tests/todo.rs` drives this app in headless Chromium.

mod app;
#[path = "../common/cli.rs"]
mod cli;

const USAGE: cli::Usage = cli::Usage {
    program: "todo",
    about: "a collaborative todo board on a synced room: open http://ADDR/ in two browsers.",
    flags: " [--redis URL]",
    details: "  --redis URL        keep boards in Redis and share them with other instances\n                     (needs the `redis` feature)\n  RUST_LOG=LEVEL     log filter for stderr (default warn)\n",
};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    USAGE.help_if_asked(&args);
    let redis = match args.iter().position(|a| a == "--redis") {
        Some(i) if i + 1 < args.len() => {
            let url = args.remove(i + 1);
            args.remove(i);
            Some(url)
        }
        Some(_) => USAGE.fail("--redis needs a URL"),
        None => None,
    };
    let addr = cli::addr_from(&USAGE, args);
    cli::init_logging();
    let (router, hub) = match redis {
        None => app::app(),
        Some(url) => on_redis(&url).await,
    };
    cli::serve_app("todo", addr, router, hub).await
}

#[cfg(feature = "redis")]
async fn on_redis(url: &str) -> (axum::Router, switchboard::Hub) {
    match app::app_on_redis(url).await {
        Ok(app) => {
            println!("todo keeping boards in {url}");
            app
        }
        Err(e) => {
            eprintln!("todo: cannot use Redis at {url}: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(not(feature = "redis"))]
async fn on_redis(url: &str) -> (axum::Router, switchboard::Hub) {
    eprintln!(
        "todo: --redis {url} needs the `redis` feature: cargo run --example todo --features redis -- --redis {url}"
    );
    std::process::exit(2);
}
