//! A terminal chat client for the `chat` example server, on
//! `switchboard::client`: it talks to the browser users of the same server.
//!
//! ```text
//! cargo run --example chat                                    # the server, http://127.0.0.1:3000/
//! cargo run --example chat-cli --features client -- --name ann
//! cargo run --example chat-cli --features client -- --name bob --url ws://127.0.0.1:3000/ws --room lobby
//! ```
//!
//! Type a line to send it to the current room. Commands:
//!
//! - `/join ROOM`: join ROOM (and make it current); `/switch ROOM` makes a
//!   joined room current; `/leave` leaves the current one;
//! - `/who`: who is online in the current room (presence);
//! - `/quit`, Ctrl-C or Ctrl-D (or the end of input): close and exit.
//!
//! What it does for you:
//!
//! - **Recent messages**: joining a room shows its last 50 messages (a
//!   `rewind` join), as the browser page does.
//! - **Started before the server**: it keeps trying (jittered backoff, the
//!   status line shows the attempt and the wait) and joins the room it was
//!   asked for once connected.
//! - **Outages**: stop the server and start it again: the client
//!   reconnects, rejoins its rooms (catching up on what it missed), and
//!   then sends the lines you typed meanwhile, in order. They wait in a
//!   bounded buffer of [`OFFLINE_LINES`] lines; a line that does not fit, or
//!   that fails, is reported with its text. After a connection that got
//!   its `hello`, the backoff starts over (the client's reset rule,
//!   `docs/client.md` §3), so a second outage right after a reconnect does
//!   not wait as long as the end of the first one.
//! - **A clean screen**: on a terminal it edits the line itself (raw mode),
//!   so a message that arrives while you type is printed above your
//!   half-typed line, which is drawn again below it. When input or output
//!   is not a terminal (pipes, scripts) it reads and writes plain lines.
//!
//! `tests/chat_cli.rs` drives this program through pipes and through a
//! pseudo-terminal against the real chat server.

use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use switchboard::client::{Client, ClientErrorKind, JoinOptions, PresenceView, Room, RoomEvent, Status};
use tokio::sync::{mpsc, watch};

/// Lines typed while offline (or before the room is joined) that wait to be
/// sent; one more is refused with a message naming it.
const OFFLINE_LINES: usize = 100;

/// How many recent messages a join shows.
const RECENT: u64 = 50;

const USAGE: &str = "usage: chat-cli --name NAME [--url ws://127.0.0.1:3000/ws] [--room lobby]";

#[derive(Deserialize)]
struct Message {
    from: String,
    text: String,
}

struct Args {
    url: String,
    name: String,
    room: String,
}

fn args() -> Args {
    let mut a = Args { url: "ws://127.0.0.1:3000/ws".into(), name: String::new(), room: "lobby".into() };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "-h" | "--help" => help(),
            "--url" => &mut a.url,
            "--name" => &mut a.name,
            "--room" => &mut a.room,
            _ => usage(&format!("unknown argument `{flag}`")),
        };
        *slot = it.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
    }
    if a.name.trim().is_empty() {
        usage("--name is required");
    }
    a
}

fn usage(msg: &str) -> ! {
    eprintln!("chat-cli: {msg}\n{USAGE}   (--help for more)");
    std::process::exit(2)
}

fn help() -> ! {
    println!(
        "chat-cli: a terminal client for the `chat` example server (its browser users see you).\n\n{USAGE}\n\n  \
         --name NAME   your name in the chat (required)\n  \
         --url URL     the server's WebSocket endpoint (default ws://127.0.0.1:3000/ws)\n  \
         --room ROOM   the room to join first (default lobby)\n  \
         -h, --help    print this help and exit\n\n\
         Type a line to send it; /join ROOM, /switch ROOM, /leave, /who, /quit."
    );
    std::process::exit(0)
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The screen: every line of output goes through `Screen::say`.

/// The terminal (or the plain output). On a terminal in raw mode a line is
/// printed above the one being typed: clear the input line, print, draw
/// the prompt and the half-typed text again.
struct Screen {
    raw: bool,
    /// What is typed so far (raw mode only).
    typed: Mutex<String>,
    /// The terminal's settings before raw mode, put back on exit.
    saved: Mutex<Option<nix::sys::termios::Termios>>,
    /// "connected" was said for the current connection.
    announced: AtomicBool,
    /// The user quit: the client's `Closed` status is expected.
    quitting: AtomicBool,
}

const PROMPT: &str = "> ";

impl Screen {
    fn new() -> Screen {
        let raw = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
        let screen = Screen {
            raw,
            typed: Mutex::default(),
            saved: Mutex::default(),
            announced: AtomicBool::new(false),
            quitting: AtomicBool::new(false),
        };
        if raw {
            use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
            let stdin = std::io::stdin();
            if let Ok(saved) = tcgetattr(&stdin) {
                let mut raw = saved.clone();
                cfmakeraw(&mut raw);
                if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_ok() {
                    *screen.saved.lock().unwrap() = Some(saved);
                }
            }
        }
        screen
    }

    fn say(&self, line: &str) {
        let mut out = std::io::stdout().lock();
        if self.raw {
            let typed = self.typed.lock().unwrap();
            let _ = write!(out, "\r\x1b[2K{}\r\n{PROMPT}{typed}", line.replace('\n', "\r\n"));
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    /// Says "connected" once per connection, whoever notices first (the
    /// status watcher, or a room joined or rejoined on the new connection),
    /// so it always comes before what the join prints.
    fn connected(&self) {
        if !self.announced.swap(true, Ordering::SeqCst) {
            self.say("-- connected");
        }
    }

    fn disconnected(&self, line: &str) {
        self.announced.store(false, Ordering::SeqCst);
        self.say(line);
    }

    /// Draws the prompt and the typed text again (raw mode).
    fn redraw(&self) {
        if self.raw {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "\r\x1b[2K{PROMPT}{}", self.typed.lock().unwrap());
            let _ = out.flush();
        }
    }

    /// Puts the terminal back as it was.
    fn restore(&self) {
        if let Some(saved) = self.saved.lock().unwrap().take() {
            let _ = write!(std::io::stdout(), "\r\x1b[2K");
            let _ = std::io::stdout().flush();
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &saved);
        }
    }

    fn exit(&self, code: i32) -> ! {
        self.restore();
        std::process::exit(code)
    }
}

/// Reads lines from stdin on a thread of its own: plain lines, or in raw
/// mode key by key with a small line editor (backspace, Ctrl-U; Ctrl-C or
/// Ctrl-D on an empty line quits). The end of input sends `/quit`.
fn read_input(screen: Arc<Screen>, lines: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        if !screen.raw {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if lines.blocking_send(line).is_err() {
                    return;
                }
            }
            let _ = lines.blocking_send("/quit".into());
            return;
        }
        screen.redraw();
        let mut pending = Vec::new(); // bytes of an unfinished UTF-8 character
        let mut escape = false; // inside an escape sequence (arrow keys, …): ignored
        let mut stdin = std::io::stdin().lock();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte) {
            let b = byte[0];
            if escape {
                escape = !(b.is_ascii_alphabetic() || b == b'~');
                continue;
            }
            match b {
                0x1b => escape = true,
                b'\r' | b'\n' => {
                    let line = std::mem::take(&mut *screen.typed.lock().unwrap());
                    screen.say(&format!("{PROMPT}{line}"));
                    if lines.blocking_send(line).is_err() {
                        return;
                    }
                }
                3 | 4 if screen.typed.lock().unwrap().is_empty() => break,
                0x7f | 8 => {
                    screen.typed.lock().unwrap().pop();
                    screen.redraw();
                }
                0x15 => {
                    screen.typed.lock().unwrap().clear();
                    screen.redraw();
                }
                b if b < 0x20 => {}
                b => {
                    pending.push(b);
                    match std::str::from_utf8(&pending) {
                        Ok(s) => {
                            screen.typed.lock().unwrap().push_str(s);
                            pending.clear();
                            screen.redraw();
                        }
                        Err(e) if e.error_len().is_some() || pending.len() >= 4 => pending.clear(),
                        Err(_) => {} // wait for the rest of the character
                    }
                }
            }
        }
        let _ = lines.blocking_send("/quit".into());
    });
}

// ---------------------------------------------------------------------------
// Rooms.

type Rooms = watch::Sender<BTreeMap<String, Arc<Room>>>;

/// Prints a room's stream and its presence changes until it ends.
fn follow(screen: Arc<Screen>, room: Arc<Room>) {
    let name = room.name().to_owned();
    let stream = room.clone();
    let out = screen.clone();
    tokio::spawn(async move {
        while let Some(item) = stream.recv().await {
            match item {
                RoomEvent::Event(e) if e.event == "message" => match e.decode::<Message>() {
                    Ok(m) => out.say(&format!("[{name}] {}: {}", m.from, m.text)),
                    Err(_) => out.say(&format!("[{name}] (unreadable message)")),
                },
                RoomEvent::Event(_) => {} // `members` lists: presence shows the same
                RoomEvent::Rejoined { recovered } => {
                    // The rejoin happens on a new connection: say so first.
                    out.connected();
                    if recovered {
                        out.say(&format!("[{name}] -- rejoined; catching up on what you missed"));
                    } else {
                        out.say(&format!("[{name}] -- rejoined; messages sent while you were away are not shown"));
                    }
                }
                RoomEvent::Lagged { dropped } => {
                    out.say(&format!("[{name}] -- {} skipped (reading too slowly)", plural(dropped, "message")))
                }
                RoomEvent::Gap(gap) if gap.recovering => {
                    out.say(&format!("[{name}] -- fell behind; fetching the missed messages again"))
                }
                RoomEvent::Gap(gap) => {
                    let n = gap.to.saturating_sub(gap.from) + 1;
                    let what = if gap.from == 0 { "some messages".to_owned() } else { plural(n, "message") };
                    out.say(&format!("[{name}] -- {what} could not be delivered and are not shown"))
                }
                RoomEvent::ServerLagged { dropped } => out.say(&format!(
                    "[{name}] -- the server skipped {} (this terminal read too slowly)",
                    plural(dropped, "message")
                )),
                // A newer kind of notice: nothing to show.
                _ => {}
            }
        }
    });
    let name = room.name().to_owned();
    let mut presence = room.presence();
    tokio::spawn(async move {
        let mut before = BTreeMap::new();
        while presence.changed().await.is_ok() {
            let now = online(&presence.borrow_and_update());
            for who in now.keys().filter(|k| !before.contains_key(*k)) {
                screen.say(&format!("[{name}] {who} is here"));
            }
            for who in before.keys().filter(|k| !now.contains_key(*k)) {
                screen.say(&format!("[{name}] {who} left"));
            }
            before = now;
        }
    });
}

/// "1 message", "3 messages".
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Names online (the display name from each meta, else the key) and whether
/// any of their connections is typing.
fn online(v: &PresenceView) -> BTreeMap<String, bool> {
    v.members
        .iter()
        .map(|(k, metas)| {
            let name = metas.iter().find_map(|m| m.meta.get("name").and_then(|n| n.as_str())).unwrap_or(k);
            (name.to_owned(), metas.iter().any(|m| m.ephemeral.get("typing").is_some()))
        })
        .collect()
}

/// Joins `name` with its recent messages, once the client is connected
/// (trying again after a reconnect while the server cannot be reached).
async fn join(client: &Client, screen: &Arc<Screen>, rooms: &Rooms, name: &str) -> bool {
    let mut status = client.status();
    loop {
        if status.wait_for(Status::is_connected).await.is_err() {
            return false;
        }
        match client.join_with(name, JoinOptions::default().rewind(RECENT)).await {
            Ok(room) => {
                let room = Arc::new(room);
                // The status watcher may not have run yet: "connected"
                // still comes first.
                screen.connected();
                screen.say(&format!(
                    "-- in {name}; recent messages first. Type to chat; /join, /switch, /leave, /who, /quit"
                ));
                follow(screen.clone(), room.clone());
                rooms.send_modify(|r| {
                    r.insert(name.to_owned(), room);
                });
                return true;
            }
            Err(e) if e.kind() == ClientErrorKind::Timeout => {} // try again
            Err(e) if matches!(e.kind(), ClientErrorKind::Disconnected | ClientErrorKind::Dropped) => {
                // The connection went away meanwhile: try on the next one.
                if status.borrow_and_update().is_connected() && status.changed().await.is_err() {
                    return false;
                }
            }
            Err(e) => {
                screen.say(&format!("-- cannot join {name}: {e}"));
                return false;
            }
        }
    }
}

/// Sends the queued lines in order, each once its room is joined and the
/// client is connected; says which line failed, if one does.
async fn send_lines(client: Client, screen: Arc<Screen>, rooms: Rooms, mut queue: mpsc::Receiver<(String, String)>) {
    let mut rooms_rx = rooms.subscribe();
    let mut status = client.status();
    while let Some((name, text)) = queue.recv().await {
        let room = match rooms_rx.wait_for(|r| r.contains_key(&name)).await {
            Ok(r) => r.get(&name).cloned(),
            Err(_) => return,
        };
        let Some(room) = room else { continue };
        if status.wait_for(Status::is_connected).await.is_err() {
            return;
        }
        match room.call::<_, serde_json::Value>("message", &json!({ "text": text })).await {
            Ok(_) => {}
            Err(e) if e.kind() == ClientErrorKind::Disconnected => screen.say(&format!(
                "-- maybe not sent to {name}: \u{201c}{text}\u{201d} (the connection dropped before the server answered)"
            )),
            Err(e) => screen.say(&format!("-- not sent to {name}: \u{201c}{text}\u{201d} ({e})")),
        }
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let url = format!("{}?name={}", args.url, encode(args.name.trim()));
    let client = Client::builder(url).connect().unwrap_or_else(|e| usage(&e.to_string()));
    let screen = Arc::new(Screen::new());

    let mut status = client.status();
    let out = screen.clone();
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            let now = status.borrow_and_update().clone();
            match now {
                Status::Connected { .. } => out.connected(),
                Status::Reconnecting { attempt, retry_in, reason } => out.disconnected(&format!(
                    "-- {reason}; reconnecting in {:.1} s (attempt {})",
                    retry_in.as_secs_f64(),
                    attempt + 1
                )),
                Status::Closed { .. } if out.quitting.load(Ordering::SeqCst) => {}
                Status::Closed { reason } => {
                    out.say(&format!("-- closed: {reason}"));
                    out.exit(1);
                }
                _ => {}
            }
        }
    });

    let (rooms, _) = watch::channel(BTreeMap::<String, Arc<Room>>::new());
    let (queue, queued) = mpsc::channel::<(String, String)>(OFFLINE_LINES);
    tokio::spawn(send_lines(client.clone(), screen.clone(), rooms.clone(), queued));
    let mut current = args.room.clone();
    {
        let (client, screen, rooms, name) = (client.clone(), screen.clone(), rooms.clone(), current.clone());
        tokio::spawn(async move { join(&client, &screen, &rooms, &name).await });
    }

    let (lines_tx, mut lines) = mpsc::channel::<String>(16);
    read_input(screen.clone(), lines_tx);
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        let (cmd, arg) = line.split_once(' ').map_or((line, ""), |(c, a)| (c, a.trim()));
        match cmd {
            "" => {}
            "/quit" => break,
            "/join" | "/switch" if !arg.is_empty() => {
                if !rooms.borrow().contains_key(arg) {
                    if cmd == "/switch" {
                        screen.say(&format!("-- not in {arg}; /join it"));
                        continue;
                    }
                    if !join(&client, &screen, &rooms, arg).await {
                        continue;
                    }
                }
                current = arg.to_owned();
                screen.say(&format!("-- now in {current}"));
            }
            "/leave" => {
                let room = rooms.borrow().get(&current).cloned();
                match room {
                    Some(room) => {
                        if let Err(e) = room.leave().await {
                            screen.say(&format!("-- leaving {current}: {e}"));
                        }
                        rooms.send_modify(|r| {
                            r.remove(&current);
                        });
                        screen.say(&format!("-- left {current}"));
                        current = rooms.borrow().keys().next().cloned().unwrap_or_default();
                    }
                    None => screen.say("-- not in a room"),
                }
            }
            "/who" => {
                let room = rooms.borrow().get(&current).cloned();
                match room {
                    Some(room) => {
                        let who = online(&room.presence().borrow());
                        let list: Vec<String> = who
                            .iter()
                            .map(|(k, typing)| if *typing { format!("{k} (typing)") } else { k.clone() })
                            .collect();
                        screen.say(&format!("-- in {current}: {}", list.join(", ")));
                    }
                    None => screen.say("-- not in a room"),
                }
            }
            c if c.starts_with('/') => screen.say(&format!("-- unknown command {c}")),
            _ if current.is_empty() => screen.say("-- join a room first (/join ROOM)"),
            // Queued: sent in order once connected and joined.
            _ => {
                if let Err(mpsc::error::TrySendError::Full((_, text))) =
                    queue.try_send((current.clone(), line.to_owned()))
                {
                    screen.say(&format!(
                        "-- not sent: \u{201c}{text}\u{201d} ({OFFLINE_LINES} lines are already waiting for the connection)"
                    ));
                }
            }
        }
    }
    screen.quitting.store(true, Ordering::SeqCst);
    client.close().await;
    screen.restore();
}
