//! A TCP fault proxy for the faulty-network tests (issue 18): it listens on
//! loopback, forwards every connection to a target, and on command makes
//! the network between them fail the ways real ones do:
//!
//! - **stall** one direction or both: the proxy stops reading, so bytes pile
//!   up in the kernel's buffers and the sender's writes soon block, while
//!   both sockets stay open (a network that stalls rather than breaks);
//!   [`resume`](FaultProxy::resume) lets what piled up flow again;
//! - **half-open**: everything that arrives is read and thrown away, and
//!   nothing is ever closed, not even when one side closes (a peer that
//!   vanished without a word, a NAT that forgot the flow);
//! - **cut**: both sockets end at once, with a reset (RST) or an orderly
//!   close (FIN);
//! - **shape** one direction or both: added **latency** (each chunk read is
//!   written no earlier than its arrival plus the latency, in order, so a
//!   round trip through a proxy with latency L takes at least 2 L) and a
//!   **bandwidth** cap in bytes a second (a token bucket holding a tenth of
//!   a second's worth, at least 1 KiB). A shaped direction holds at most
//!   [`SHAPED_QUEUE`] bytes read and not yet written; beyond that it stops
//!   reading, so a slow link pushes back on its sender as a real one does.
//!
//! A command on the proxy applies to every open connection and, except a
//! cut, to every later one (a stalled network also stalls new connections,
//! whose handshakes then hang); [`Link`] applies one to a single
//! connection. `buffers` makes the proxy's own socket buffers small, so a
//! stall fills up after a few KiB rather than megabytes.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// What a direction of a connection does with what arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forward it.
    Pass,
    /// Do not read it: it waits in the kernel's buffers, then the sender blocks.
    Stall,
    /// Read it and throw it away; never close (half-open).
    Drop,
}

/// How a cut ends the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// A reset: both peers see `ECONNRESET` (linger 0).
    Reset,
    /// An orderly close: both peers read the end of the stream.
    Fin,
}

/// Which directions a command applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting client to the target.
    Up,
    /// From the target to the client.
    Down,
    Both,
}

/// How a direction that passes bytes shapes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shape {
    /// Added to each chunk's delivery time.
    pub latency: std::time::Duration,
    /// Bytes a second; `None`: as fast as the sockets go.
    pub bandwidth: Option<u64>,
}

impl Shape {
    pub fn latency(latency: std::time::Duration) -> Shape {
        Shape { latency, bandwidth: None }
    }

    pub fn bandwidth(bytes_per_second: u64) -> Shape {
        Shape { latency: std::time::Duration::ZERO, bandwidth: Some(bytes_per_second) }
    }
}

/// The most bytes a shaped direction holds read and not yet written.
pub const SHAPED_QUEUE: usize = 64 * 1024;

/// The state of one connection (or the default for new ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    up: Flow,
    down: Flow,
    cut: Option<Cut>,
    up_shape: Shape,
    down_shape: Shape,
}

impl State {
    const PASS: State = State {
        up: Flow::Pass,
        down: Flow::Pass,
        cut: None,
        up_shape: Shape { latency: std::time::Duration::ZERO, bandwidth: None },
        down_shape: Shape { latency: std::time::Duration::ZERO, bandwidth: None },
    };

    fn shaped(mut self, dir: Dir, shape: Shape) -> State {
        if matches!(dir, Dir::Up | Dir::Both) {
            self.up_shape = shape;
        }
        if matches!(dir, Dir::Down | Dir::Both) {
            self.down_shape = shape;
        }
        self
    }

    /// Passing everything, keeping the shapes.
    fn passing(self) -> State {
        State { up: Flow::Pass, down: Flow::Pass, cut: None, ..self }
    }

    fn with(mut self, dir: Dir, flow: Flow) -> State {
        if matches!(dir, Dir::Up | Dir::Both) {
            self.up = flow;
        }
        if matches!(dir, Dir::Down | Dir::Both) {
            self.down = flow;
        }
        self
    }
}

/// One proxied connection.
pub struct Link {
    state: watch::Sender<State>,
    /// Everything the client sent, up to [`SNIFF_BYTES`] (for picking a
    /// connection by what it said, e.g. the Redis one that subscribed).
    sent: Mutex<Vec<u8>>,
}

/// How much of what a client sends a [`Link`] remembers.
const SNIFF_BYTES: usize = 4096;

impl Link {
    pub fn stall(&self, dir: Dir) {
        self.state.send_modify(|s| *s = s.with(dir, Flow::Stall));
    }

    pub fn half_open(&self) {
        self.state.send_modify(|s| *s = s.with(Dir::Both, Flow::Drop));
    }

    pub fn resume(&self) {
        self.state.send_modify(|s| *s = s.with(Dir::Both, Flow::Pass));
    }

    pub fn shape(&self, dir: Dir, shape: Shape) {
        self.state.send_modify(|s| *s = s.shaped(dir, shape));
    }

    pub fn cut(&self, how: Cut) {
        self.state.send_modify(|s| s.cut = Some(how));
    }

    /// Whether the client's first bytes contain `needle` (ASCII case ignored).
    pub fn sent(&self, needle: &[u8]) -> bool {
        self.sent.lock().unwrap().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
    }

    /// Whether both directions drop what they read.
    pub fn is_half_open(&self) -> bool {
        let s = *self.state.borrow();
        s.up == Flow::Drop && s.down == Flow::Drop
    }

    /// Whether both of its pumps have ended (the connection is gone).
    pub fn is_closed(&self) -> bool {
        self.state.receiver_count() == 0
    }
}

/// The proxy: see the module docs.
pub struct FaultProxy {
    pub addr: SocketAddr,
    links: Arc<Mutex<Vec<Arc<Link>>>>,
    /// The state new connections start in.
    default: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// A proxy to `target` with the system's socket buffers.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        FaultProxy::start_with(target, None).await
    }

    /// A proxy to `target` whose own sockets have `buffers` bytes of send and
    /// receive buffer (the kernel may round it up).
    pub async fn start_with(target: SocketAddr, buffers: Option<u32>) -> FaultProxy {
        let socket = TcpSocket::new_v4().unwrap();
        if let Some(size) = buffers {
            // Accepted sockets inherit these.
            socket.set_recv_buffer_size(size).unwrap();
            socket.set_send_buffer_size(size).unwrap();
        }
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener: TcpListener = socket.listen(1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<Arc<Link>>>> = Arc::default();
        let default = Arc::new(Mutex::new(State::PASS));
        let (list, initial) = (links.clone(), default.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = connect(target, buffers).await else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let state = *initial.lock().unwrap();
                let link = Arc::new(Link { state: watch::Sender::new(state), sent: Mutex::default() });
                list.lock().unwrap().push(link.clone());
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, link.clone(), Dir::Up));
                tokio::spawn(pump(sr, cw, link, Dir::Down));
            }
        });
        FaultProxy { addr, links, default, task }
    }

    /// `ws://{addr}{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The connections made so far (closed ones included, in order).
    pub fn links(&self) -> Vec<Arc<Link>> {
        self.links.lock().unwrap().clone()
    }

    /// The connections still open.
    pub fn open_links(&self) -> usize {
        self.links().iter().filter(|l| !l.is_closed()).count()
    }

    fn set_all(&self, f: impl Fn(&Link), default: impl FnOnce(&mut State)) {
        default(&mut self.default.lock().unwrap());
        for link in self.links() {
            f(&link);
        }
    }

    /// Stalls `dir` of every connection, open or to come.
    pub fn stall(&self, dir: Dir) {
        self.set_all(|l| l.stall(dir), |s| *s = s.with(dir, Flow::Stall));
    }

    /// Makes every connection, open or to come, half-open.
    pub fn half_open(&self) {
        self.set_all(Link::half_open, |s| *s = s.with(Dir::Both, Flow::Drop));
    }

    /// Lets everything flow again (what a stall held back is delivered);
    /// shapes stay.
    pub fn resume(&self) {
        self.set_all(Link::resume, |s| *s = s.passing());
    }

    /// Shapes `dir` of every connection, open or to come
    /// (`Shape::default()`: unshaped again).
    pub fn shape(&self, dir: Dir, shape: Shape) {
        self.set_all(|l| l.shape(dir, shape), |s| *s = s.shaped(dir, shape));
    }

    /// Ends every open connection; later ones are not affected.
    pub fn cut(&self, how: Cut) {
        self.set_all(|l| l.cut(how), |_| {});
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        for link in self.links() {
            link.cut(Cut::Fin);
        }
    }
}

async fn connect(target: SocketAddr, buffers: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = buffers {
        socket.set_recv_buffer_size(size)?;
        socket.set_send_buffer_size(size)?;
    }
    socket.connect(target).await
}

/// A token bucket for a bandwidth cap.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// How many of `want` bytes may be written, and from when, at `rate`
    /// bytes a second: all that the bucket holds, or if it is empty, what
    /// it will hold once it has the smaller of `want` and its size.
    fn grant(&mut self, rate: u64, want: usize) -> (Instant, usize) {
        let rate = rate.max(1) as f64;
        let size = (rate / 10.0).max(1024.0);
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(size);
        self.at = now;
        if self.tokens >= 1.0 {
            return (now, want.min(self.tokens as usize));
        }
        let n = want.min(size as usize);
        let wait = (n as f64 - self.tokens) / rate;
        (now + std::time::Duration::from_secs_f64(wait), n)
    }

    fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// Moves one direction of a link, obeying its state.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>, dir: Dir) {
    let mut rx = link.state.subscribe();
    let flow = |s: &State| if dir == Dir::Up { (s.up, s.up_shape) } else { (s.down, s.down_shape) };
    let mut buf = vec![0u8; 16 * 1024];
    // Chunks read and not yet passed on, each with the time it may go and
    // how much of it went already; `queued`: their bytes not yet passed on.
    let mut queue: VecDeque<(Instant, Vec<u8>, usize)> = VecDeque::new();
    let mut queued = 0usize;
    let mut bucket = Bucket { tokens: 0.0, at: Instant::now() };
    let mut eof = false;
    loop {
        let state = *rx.borrow_and_update();
        if let Some(how) = state.cut {
            if how == Cut::Reset {
                // Linger 0 and no shutdown: the close sends RST, no FIN.
                // Each pump does it for the halves it owns.
                let _ = from.as_ref().set_zero_linger();
                to.forget();
            }
            return;
        }
        let (flow, shape) = flow(&state);
        let held = !queue.is_empty();
        match (flow, held, eof) {
            // Stalled, or half-open after the sender closed: keep the
            // sockets open, wait for a command.
            (Flow::Stall, _, _) | (Flow::Drop, false, true) => {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            }
            // The sender closed: pass the end on (dropping the write half
            // shuts it down) and stop; the other direction may go on (a
            // half-closed connection).
            (Flow::Pass, false, true) => return,
            (Flow::Drop, true, _) => {
                queue.clear();
                queued = 0;
                continue;
            }
            _ => {}
        }
        // Pass with something to write and/or room to read, or Drop with
        // nothing held and the sender still open: read (unless the queue
        // is full) and write (when the front chunk is due), whichever
        // comes first. `write` (not `write_all`) and `sleep_until` are
        // cancel-safe: a command that comes meanwhile loses nothing.
        let due = queue.front().map(|(at, chunk, done)| {
            let (from_bucket, n) = match shape.bandwidth {
                Some(rate) => bucket.grant(rate, chunk.len() - done),
                None => (Instant::now(), chunk.len() - done),
            };
            ((*at).max(from_bucket), n)
        });
        let can_read = !eof && (queued < SHAPED_QUEUE || flow == Flow::Drop);
        tokio::select! {
            r = async {
                let (at, n) = due.expect("guarded");
                tokio::time::sleep_until(at).await;
                let (_, chunk, done) = queue.front().expect("guarded");
                to.write(&chunk[*done..*done + n]).await
            }, if due.is_some() => match r {
                Ok(n) if n > 0 => {
                    if shape.bandwidth.is_some() {
                        bucket.spend(n);
                    }
                    queued -= n;
                    let front = queue.front_mut().expect("guarded");
                    front.2 += n;
                    if front.2 == front.1.len() {
                        queue.pop_front();
                    }
                }
                _ => return,
            },
            r = from.read(&mut buf), if can_read => match r {
                Ok(0) | Err(_) => eof = true,
                Ok(n) => {
                    if dir == Dir::Up {
                        let mut sent = link.sent.lock().unwrap();
                        let room = SNIFF_BYTES.saturating_sub(sent.len());
                        sent.extend_from_slice(&buf[..n.min(room)]);
                    }
                    if flow == Flow::Pass {
                        queue.push_back((Instant::now() + shape.latency, buf[..n].to_vec(), 0));
                        queued += n;
                    }
                }
            },
            changed = rx.changed() => if changed.is_err() { return },
        }
    }
}
