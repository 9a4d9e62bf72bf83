//! The proxy's own TCP relay, used whenever Envoy does not serve the port:
//! accept, connect to the container, copy bytes both ways until each side
//! is done, as docker-proxy does. Stopping the relay closes the listening
//! socket at once; connections already relayed run on until they end.

use crate::proxy::say::say;
use std::io;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The connections relayed so far, and a wake-up for whoever reports them,
/// so that a proxy with nothing to relay never wakes to look.
#[derive(Default)]
pub struct Relayed {
    count: AtomicU64,
    changed: Notify,
}

impl Relayed {
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn add_one(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Resolves after the count changed (at once if it changed since the
    /// last call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// A running accept loop.
pub struct Relay {
    accept: JoinHandle<()>,
}

impl Relay {
    /// Starts accepting on `listener`; `relayed` counts the connections.
    pub fn start(
        listener: StdTcpListener,
        backend: SocketAddr,
        relayed: Arc<Relayed>,
    ) -> io::Result<Relay> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let accept = tokio::spawn(accept_loop(listener, backend, relayed));
        Ok(Relay { accept })
    }

    /// Stops accepting and closes the socket. Connections still queued in
    /// the kernel move to the other members of the reuse-port group.
    pub fn stop(self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: TcpListener, backend: SocketAddr, relayed: Arc<Relayed>) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                relayed.add_one();
                tokio::spawn(relay_one(client, backend));
            }
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                say(&format!("accept: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay_one(mut client: TcpStream, backend: SocketAddr) {
    let mut upstream = match TcpStream::connect(backend).await {
        Ok(s) => s,
        // The container is not listening (yet): the client sees the
        // connection closed, as with docker-proxy.
        Err(_) => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn relays_both_ways_counts_and_keeps_connections_after_stop() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let baddr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = backend.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    loop {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        s.write_all(&buf[..n]).await.unwrap();
                    }
                });
            }
        });
        let front = StdTcpListener::bind("127.0.0.1:0").unwrap();
        let faddr = front.local_addr().unwrap();
        let count = Arc::new(Relayed::default());
        let relay = Relay::start(front, baddr, count.clone()).unwrap();
        let mut c = TcpStream::connect(faddr).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(count.get(), 1);
        // The change was announced.
        count.changed().await;
        relay.stop();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The relayed connection lives on; the port is closed.
        c.write_all(b"more").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more");
        assert!(TcpStream::connect(faddr).await.is_err());
    }
}
