//! `integration::axum::serve` when the process runs out of file descriptors
//! (issue #24: 19,989 idle connections took every descriptor and new users
//! timed out in the backlog). Alone in its test binary: it lowers the
//! process's descriptor limit.

mod support;

use support::*;
use switchboard::integration::axum::ServeConfig;
use switchboard::Hub;

#[tokio::test]
async fn out_of_file_descriptors_new_connections_get_a_clean_503() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let hub = Hub::builder().build();
    let addr = serve_safe(&hub, ServeConfig::default()).await;
    let page = b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert!(until_closed(addr, page).await.starts_with("HTTP/1.1 200"), "served before the exhaustion");

    // Leave the process a few dozen descriptors, then take every one.
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    setrlimit(Resource::RLIMIT_NOFILE, open + 32, hard).unwrap();
    let mut filler = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        filler.push(f);
    }
    // One for the client's socket: the server has none left to accept it,
    // but the descriptor it keeps in reserve lets it answer 503 and close.
    filler.pop();
    let refused = until_closed(addr, b"").await;
    assert!(refused.starts_with("HTTP/1.1 503") && refused.ends_with("server busy\n"), "{refused:?}");

    // Descriptors back: served again (the reserve was taken back too, so a
    // second exhaustion is refused the same way).
    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    let again = until_closed(addr, page).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again:?}");
}
