//! A TCP proxy between a client and the daemon that can break a connection on cue:
//! after the next request reached the daemon (its answer is swallowed), or before it does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What happens to the next client → daemon chunk (a request) on any connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Pass everything.
    None = 0,
    /// Forward the request, then swallow what the daemon sends for `hold` and close the
    /// connection: the request reached the daemon, its answer never reaches the client.
    DropAnswer = 1,
    /// Swallow the request and close the connection: it never reached the daemon.
    DropRequest = 2,
}

pub struct Proxy {
    pub addr: SocketAddr,
    fault: Arc<AtomicU8>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    /// Connections broken by a fault.
    pub broken: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// How long the daemon's answer is swallowed before the connection is closed: long enough
/// for the request to be durable and answered.
const HOLD: Duration = Duration::from_millis(400);

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fault = Arc::new(AtomicU8::new(Fault::None as u8));
        let accepted = Arc::new(AtomicU64::new(0));
        let broken = Arc::new(AtomicU64::new(0));
        let (f, a, b) = (fault.clone(), accepted.clone(), broken.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let (f, b) = (f.clone(), b.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pump(client, server, f, b).await;
                    }
                });
            }
        });
        Proxy { addr, fault, accepted, broken, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Arms a fault for the next request chunk (one connection, once).
    pub fn arm(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    pub fn broken(&self) -> u64 {
        self.broken.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut client: TcpStream,
    mut server: TcpStream,
    fault: Arc<AtomicU8>,
    broken: Arc<AtomicU64>,
) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut cr, mut cw) = client.split();
    let (mut sr, mut sw) = server.split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    // Set when the daemon's bytes are to be swallowed until this instant, then closed.
    let mut swallow_until: Option<tokio::time::Instant> = None;
    loop {
        let hold = async {
            match swallow_until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            n = cr.read(&mut up) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                // Only a chunk big enough to carry a request (HEADERS + DATA) trips the
                // fault; pings (17 bytes), window updates (13) and
                // settings acks (9) do not.
                let armed = n >= 40 && swallow_until.is_none();
                let f = if armed {
                    fault.compare_exchange(1, 0, Ordering::SeqCst, Ordering::SeqCst).map(|_| 1)
                        .or_else(|_| fault.compare_exchange(2, 0, Ordering::SeqCst, Ordering::SeqCst).map(|_| 2))
                        .unwrap_or(0)
                } else { 0 };
                match f {
                    2 => {
                        broken.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    1 => {
                        if sw.write_all(&up[..n]).await.is_err() { return; }
                        swallow_until = Some(tokio::time::Instant::now() + HOLD);
                    }
                    _ => {
                        if sw.write_all(&up[..n]).await.is_err() { return; }
                    }
                }
            }
            n = sr.read(&mut down) => {
                let Ok(n) = n else { return };
                if n == 0 { return; }
                if swallow_until.is_none() && cw.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
            _ = hold => {
                broken.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
    }
}
