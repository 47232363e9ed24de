//! WebRTC video calls with switchboard as the signaling server.
//!
//! Open the page in two or more browsers (or tabs), type a name, the same
//! room, and "Start call": each page gets the camera, joins the room, and
//! calls every other peer in it. Offers, answers and ICE candidates travel
//! as direct sends through switchboard (a `signal` call in the room, relayed
//! by the server to the one peer it names); presence says who is in the
//! room; audio and video go peer to peer, never through this server.
//!
//! ```text
//! cargo run --example video-call                       # http://127.0.0.1:3000/
//! cargo run --example video-call -- --addr 0.0.0.0:8080
//! ```
//!
//! Browsers allow the camera only on `https://` or `http://localhost`
//! (and 127.0.0.1). Between machines you need TLS in front (a reverse
//! proxy) and, across NATs, STUN/TURN servers: see `docs/video-call.md`
//! for what switchboard does and what it leaves to the app.
//!
//! `tests/video_call.rs` runs two headless Chromium pages with fake camera
//! and microphone: both connect peer to peer and decode video frames, and a
//! page that reloads mid-call comes back into the call.

mod app;
#[path = "../common/cli.rs"]
mod cli;

const USAGE: cli::Usage = cli::Usage {
    program: "video-call",
    about: "WebRTC video calls signaled through switchboard: open http://ADDR/ in two browsers,\nsame room, \"Start call\". Media goes peer to peer (see docs/video-call.md).",
    flags: "",
    details: "  RUST_LOG=LEVEL     log filter for stderr (default warn)\n",
};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = cli::addr_arg(&USAGE);
    cli::init_logging();
    let (router, hub) = app::app();
    cli::serve_app("video-call", addr, router, hub).await
}
