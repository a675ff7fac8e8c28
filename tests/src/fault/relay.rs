//! A TCP relay on 127.0.0.1 that can freeze its connections: while blackholed it forwards
//! nothing in either direction, yet closes no socket — the client sees a peer that went
//! silent, as behind a dead switch, and only heartbeats can tell.
//!
//! Bytes read while frozen are dropped (as a lossy network would), so the sender never feels
//! back-pressure. A connection that was frozen stays frozen (a real partition does not give
//! back lost bytes; forwarding the rest would corrupt the AMQP stream): once the blackhole is
//! lifted only new connections pass. An end closed while frozen is not passed on either.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running relay; dropped = stopped (every socket closed).
pub struct Relay {
    pub port: u16,
    blackhole: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Relay {
    /// Listens on an ephemeral port of 127.0.0.1 and relays to `127.0.0.1:upstream`.
    pub async fn start(upstream: u16) -> std::io::Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (bh, acc, st) = (blackhole.clone(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                acc.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(connection(client, upstream, bh.clone(), st.clone()));
            }
        });
        Ok(Relay {
            port,
            blackhole,
            accepted,
            stop,
        })
    }

    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }

    /// Freezes every connection (`true`), or lets new connections pass again (`false`).
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn connection(
    client: TcpStream,
    upstream: u16,
    blackhole: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let frozen = Arc::new(AtomicBool::new(false));
    // A connection accepted during a blackhole never reaches the broker.
    let server = if blackhole.load(Ordering::SeqCst) {
        frozen.store(true, Ordering::SeqCst);
        None
    } else {
        TcpStream::connect(("127.0.0.1", upstream)).await.ok()
    };
    let (client_read, client_write) = client.into_split();
    match server {
        None => {
            // Swallow whatever the client sends; close only when the relay stops or the client
            // goes away.
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = discard(client_read) => {}
            }
            drop(client_write);
        }
        Some(server) => {
            let (server_read, server_write) = server.into_split();
            let up = pipe(client_read, server_write, blackhole.clone(), frozen.clone());
            let down = pipe(server_read, client_write, blackhole, frozen);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = async { tokio::join!(up, down) } => {}
            }
        }
    }
}

async fn discard(mut from: OwnedReadHalf) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Copies `from` to `to` until EOF, dropping bytes once the connection is frozen.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if blackhole.load(Ordering::SeqCst) {
            frozen.store(true, Ordering::SeqCst);
        }
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    if frozen.load(Ordering::SeqCst) {
        // Pass no FIN on: hold the other side open until the relay stops.
        std::future::pending::<()>().await;
    }
    let _ = to.shutdown().await;
}
