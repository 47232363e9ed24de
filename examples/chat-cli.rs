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
//! - `/quit` (or end of input): close and exit.
//!
//! Stop the server and start it again: the client reconnects with jittered
//! backoff (the status line shows the attempt and the wait), rejoins its
//! rooms, and sends what you typed meanwhile (held in the bounded offline
//! buffer).

use serde::Deserialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use switchboard::client::{Client, PresenceView, Room, RoomEvent, Status};
use tokio::io::{AsyncBufReadExt, BufReader};

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

const USAGE: &str = "usage: chat-cli --name NAME [--url ws://127.0.0.1:3000/ws] [--room lobby]";

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

/// Prints a room's stream and its presence changes until it ends.
fn follow(room: Arc<Room>) {
    let name = room.name().to_owned();
    let stream = room.clone();
    tokio::spawn(async move {
        while let Some(item) = stream.recv().await {
            match item {
                RoomEvent::Event(e) if e.event == "message" => match e.decode::<Message>() {
                    Ok(m) => println!("[{name}] {}: {}", m.from, m.text),
                    Err(_) => println!("[{name}] (unreadable message)"),
                },
                RoomEvent::Event(_) => {} // `members` lists: presence shows the same
                RoomEvent::Rejoined { recovered: false } => {
                    println!("[{name}] -- rejoined; messages sent while you were away are not shown")
                }
                RoomEvent::Rejoined { recovered: true } => println!("[{name}] -- rejoined, catching up"),
                RoomEvent::Lagged { dropped } => {
                    println!("[{name}] -- {dropped} messages skipped (reading too slowly)")
                }
                other => println!("[{name}] -- {other:?}"),
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
                println!("[{name}] {who} is here");
            }
            for who in before.keys().filter(|k| !now.contains_key(*k)) {
                println!("[{name}] {who} left");
            }
            before = now;
        }
    });
}

/// Keys present and whether any of their connections is typing.
fn online(v: &PresenceView) -> BTreeMap<String, bool> {
    v.members.iter().map(|(k, metas)| (k.clone(), metas.iter().any(|m| m.ephemeral.get("typing").is_some()))).collect()
}

#[tokio::main]
async fn main() {
    let args = args();
    let url = format!("{}?name={}", args.url, encode(args.name.trim()));
    let client = Client::builder(url).connect().unwrap_or_else(|e| usage(&e.to_string()));

    let mut status = client.status();
    tokio::spawn(async move {
        while status.changed().await.is_ok() {
            match &*status.borrow_and_update() {
                Status::Connected { .. } => eprintln!("-- connected"),
                Status::Reconnecting { attempt, retry_in, reason } => {
                    eprintln!("-- {reason}; reconnecting in {:.1} s (attempt {})", retry_in.as_secs_f64(), attempt + 1)
                }
                Status::Closed { reason } => {
                    eprintln!("-- closed: {reason}");
                    std::process::exit(1);
                }
                _ => {}
            }
        }
    });

    let mut rooms: BTreeMap<String, Arc<Room>> = BTreeMap::new();
    let mut current = args.room.clone();
    match client.join(&current).await {
        Ok(room) => {
            let room = Arc::new(room);
            follow(room.clone());
            rooms.insert(current.clone(), room);
            println!("-- in {current}; type to chat, /join ROOM, /switch ROOM, /leave, /who, /quit");
        }
        Err(e) => eprintln!("-- cannot join {current}: {e}"),
    }

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim();
        let (cmd, arg) = line.split_once(' ').map_or((line, ""), |(c, a)| (c, a.trim()));
        match cmd {
            "" => {}
            "/quit" => break,
            "/join" | "/switch" if !arg.is_empty() => {
                if !rooms.contains_key(arg) {
                    if cmd == "/switch" {
                        println!("-- not in {arg}; /join it");
                        continue;
                    }
                    match client.join(arg).await {
                        Ok(room) => {
                            let room = Arc::new(room);
                            follow(room.clone());
                            rooms.insert(arg.to_owned(), room);
                        }
                        Err(e) => {
                            println!("-- cannot join {arg}: {e}");
                            continue;
                        }
                    }
                }
                current = arg.to_owned();
                println!("-- now in {current}");
            }
            "/leave" => match rooms.remove(&current) {
                Some(room) => {
                    if let Err(e) = room.leave().await {
                        println!("-- leaving {current}: {e}");
                    }
                    println!("-- left {current}");
                    current = rooms.keys().next().cloned().unwrap_or_default();
                }
                None => println!("-- not in a room"),
            },
            "/who" => match rooms.get(&current) {
                Some(room) => {
                    let who = online(&room.presence().borrow());
                    let list: Vec<String> = who
                        .iter()
                        .map(|(k, typing)| if *typing { format!("{k} (typing)") } else { k.clone() })
                        .collect();
                    println!("-- in {current}: {}", list.join(", "));
                }
                None => println!("-- not in a room"),
            },
            c if c.starts_with('/') => println!("-- unknown command {c}"),
            _ => match rooms.get(&current) {
                // Buffered while offline, sent after the rejoin; the reply
                // is only awaited in the background.
                Some(room) => {
                    let room = room.clone();
                    let text = line.to_owned();
                    tokio::spawn(async move {
                        if let Err(e) = room.call::<_, serde_json::Value>("message", &json!({ "text": text })).await {
                            println!("-- not sent: {e}");
                        }
                    });
                }
                None => println!("-- join a room first"),
            },
        }
    }
    client.close().await;
}
