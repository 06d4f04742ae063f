//! A fault-injecting TCP proxy in front of a real `redis-server`, written with tokio (no external
//! program): tests point their client at [`FaultProxy::url`] and switch its [`Mode`] at any time.
//!
//! - [`Mode::Pass`] forwards bytes both ways.
//! - [`Mode::Delay`] holds every chunk, in both directions, for the given time.
//! - [`Mode::Blackhole`] keeps reading but forwards and answers nothing, like a partition. Bytes
//!   it swallowed cannot be delivered later, so a connection that lost bytes is reset when the
//!   mode leaves `Blackhole` (as TCP gives up on a partitioned connection); otherwise a
//!   pipelining client would match later replies to the swallowed commands.
//! - [`Mode::Reset`] resets every open connection at once and every new one on accept.
//! - [`Mode::LoseNextReply`] forwards the next client→server chunk, waits until Redis starts to
//!   answer it (so the command certainly landed), then resets the client's connection before the
//!   reply reaches it. One-shot: the mode goes back to `Pass` once it fired.
//!
//! Resets are real RSTs (`SO_LINGER` 0, via tokio's `set_zero_linger`). Dropping the proxy
//! aborts its tasks and closes every connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the proxy does to traffic. See the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Delay(Duration),
    Blackhole,
    Reset,
    LoseNextReply,
}

/// Counters, readable while the proxy runs.
#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicUsize,
    forwarded: AtomicUsize,
    resets: AtomicUsize,
    replies_lost: AtomicUsize,
}

pub struct FaultProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    counters: Arc<Counters>,
    /// Owns the per-connection tasks (in a `JoinSet`), so aborting it aborts them all.
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 on a free port and forwards to `upstream`. Needs a Tokio runtime.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        std_listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = std_listener.local_addr().expect("proxy address");
        let listener = TcpListener::from_std(std_listener).expect("tokio listener (inside a runtime?)");
        let mode = Arc::new(watch::Sender::new(Mode::Pass));
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, mode.clone(), counters.clone()));
        FaultProxy {
            addr,
            mode,
            counters,
            accept,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.addr.port())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Connections accepted so far (including those reset on accept).
    pub fn accepted(&self) -> usize {
        self.counters.accepted.load(Ordering::SeqCst)
    }

    /// Chunks forwarded so far, both directions.
    pub fn forwarded(&self) -> usize {
        self.counters.forwarded.load(Ordering::SeqCst)
    }

    /// Connections reset so far (by `Reset`, `LoseNextReply` or after a blackhole).
    pub fn resets(&self) -> usize {
        self.counters.resets.load(Ordering::SeqCst)
    }

    /// How many times `LoseNextReply` fired.
    pub fn replies_lost(&self) -> usize {
        self.counters.replies_lost.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    counters: Arc<Counters>,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::SeqCst);
        while conns.try_join_next().is_some() {}
        conns.spawn(serve(client, upstream, mode.clone(), counters.clone()));
    }
}

/// Drops `stream` with an RST instead of a FIN.
fn reset(stream: TcpStream, counters: &Counters) {
    let _ = stream.set_zero_linger();
    counters.resets.fetch_add(1, Ordering::SeqCst);
}

/// Why a connection's pump stopped.
enum End {
    Closed,
    Reset,
}

async fn serve(mut client: TcpStream, upstream: SocketAddr, mode: Arc<watch::Sender<Mode>>, counters: Arc<Counters>) {
    if *mode.borrow() == Mode::Reset {
        return reset(client, &counters);
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return reset(client, &counters);
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let poisoned = AtomicBool::new(false);
    let end = tokio::select! {
        end = pump(&mut client, &mut server, &mode, &counters, &poisoned) => end,
        () = reset_signal(mode.subscribe(), &poisoned) => End::Reset,
    };
    if let End::Reset = end {
        reset(client, &counters);
        let _ = server.set_zero_linger();
    }
}

/// Resolves when this connection must be reset: the mode is `Reset`, or the connection lost
/// bytes to a blackhole that has since ended.
async fn reset_signal(mut rx: watch::Receiver<Mode>, poisoned: &AtomicBool) {
    loop {
        let mode = *rx.borrow_and_update();
        if mode == Mode::Reset || (mode != Mode::Blackhole && poisoned.load(Ordering::SeqCst)) {
            return;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

async fn pump(
    client: &mut TcpStream,
    server: &mut TcpStream,
    mode: &watch::Sender<Mode>,
    counters: &Counters,
    poisoned: &AtomicBool,
) -> End {
    let (mut client_rd, mut client_wr) = client.split();
    let (mut server_rd, mut server_wr) = server.split();
    let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    loop {
        tokio::select! {
            read = client_rd.read(&mut up) => {
                let Ok(n @ 1..) = read else { return End::Closed };
                let now = *mode.borrow();
                match now {
                    Mode::Blackhole => { poisoned.store(true, Ordering::SeqCst); continue; }
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                    _ => {}
                }
                // Take the one-shot fault atomically, so only one chunk (of one connection) fires it.
                let lose = mode.send_if_modified(|m| {
                    let fire = *m == Mode::LoseNextReply;
                    if fire {
                        *m = Mode::Pass;
                    }
                    fire
                });
                if server_wr.write_all(&up[..n]).await.is_err() {
                    return End::Closed;
                }
                counters.forwarded.fetch_add(1, Ordering::SeqCst);
                if lose {
                    // Wait for Redis to start answering: the command has been applied.
                    let _ = tokio::time::timeout(Duration::from_secs(1), server_rd.read(&mut down)).await;
                    counters.replies_lost.fetch_add(1, Ordering::SeqCst);
                    return End::Reset;
                }
            }
            read = server_rd.read(&mut down) => {
                let Ok(n @ 1..) = read else { return End::Closed };
                let now = *mode.borrow();
                match now {
                    Mode::Blackhole => { poisoned.store(true, Ordering::SeqCst); continue; }
                    Mode::Delay(d) => tokio::time::sleep(d).await,
                    _ => {}
                }
                if client_wr.write_all(&down[..n]).await.is_err() {
                    return End::Closed;
                }
                counters.forwarded.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}
