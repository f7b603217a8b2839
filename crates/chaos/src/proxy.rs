//! A TCP fault proxy: one link between a service and what it talks to
//! (scheduler-1 → PostgreSQL, provider-adapter → the simulated cloud,
//! terminator-1 → NATS) that the chaos can cut and heal, as a network
//! partition would.
//!
//! Design notes: a real partition answers nothing. Packets are dropped, so
//! an open connection goes silent in both directions (neither a reset nor a
//! close reaches either end), and a new connection's handshake goes
//! unanswered; each side only learns of it from its own timeouts, and if
//! the partition heals before they fire, TCP delivers what was held as if
//! nothing happened. Refusing connections (an RST) would be a different,
//! kinder fault: an immediate, informative answer, the signature of a
//! crashed server, which the kill -9s already cover. So while the link is
//! cut, open connections move no byte (what was read in the instant of the
//! cut is held, not delivered), and new ones are accepted and held without
//! an upstream connection (on loopback the kernel completes the handshake,
//! but the client's first request, or its wait for the server's greeting,
//! hangs until its own timeout — the closest a userland proxy gets to an
//! unanswered SYN). On `heal` every held connection goes on: the late
//! delivery of a request its sender has given up on is exactly what the
//! fencing of leases must survive.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One proxied link; dropping it closes the listener and every connection.
pub struct FaultProxy {
    name: String,
    addr: SocketAddr,
    /// `true` while the link is cut.
    cut: watch::Sender<bool>,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("cut", &*self.cut.borrow())
            .finish()
    }
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`
    /// (connected per connection, so an upstream that restarts is reached
    /// again by the next connection).
    pub async fn start(name: &str, upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(false);
        let connections = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            cut.subscribe(),
            connections.clone(),
            stop.clone(),
        ));
        Ok(FaultProxy {
            name: name.to_owned(),
            addr,
            cut,
            connections,
            stop,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the service is pointed instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far (the link is in use when it grows).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Partitions the link: from now on no byte moves on any connection,
    /// open or new, until [`FaultProxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Ends the partition: held connections go on where they stopped.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cut: watch::Receiver<bool>,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors or similar: the next accept may work.
            tokio::task::yield_now().await;
            continue;
        };
        connections.fetch_add(1, Ordering::Relaxed);
        let (cut, stop) = (cut.clone(), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = relay(client, upstream, cut) => {}
            }
        });
    }
}

/// One connection: held while the link is cut, then connected upstream,
/// then pumped both ways until either side closes.
async fn relay(client: TcpStream, upstream: SocketAddr, mut cut: watch::Receiver<bool>) {
    if !wait_open(&mut cut).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        // Upstream down (restarting): the client sees its connection close,
        // as it would connecting to the upstream directly.
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pump(client_read, server_write, cut.clone()),
        pump(server_read, client_write, cut),
    );
}

/// Copies one direction, moving nothing while the link is cut.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_open(&mut cut).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            // Reading is cancel-safe: stop at once when the cut falls.
            () = wait_cut(&mut cut) => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read just as the cut fell: held until the link heals.
        if !wait_open(&mut cut).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// Waits until the link is not cut; `false` when the proxy is gone.
async fn wait_open(cut: &mut watch::Receiver<bool>) -> bool {
    cut.wait_for(|is_cut| !is_cut).await.is_ok()
}

/// Waits until the link is cut (forever once the proxy is gone: the
/// connection task is cancelled then anyway).
async fn wait_cut(cut: &mut watch::Receiver<bool>) {
    if cut.wait_for(|is_cut| *is_cut).await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).await.unwrap();
        got
    }

    /// How long a cut link is watched for a byte that must not come. A
    /// busy machine can only make a byte later, never earlier, so this
    /// cannot pass by luck.
    const SILENCE: Duration = Duration::from_millis(300);
    /// Bound on waits that must succeed.
    const PATIENCE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn a_cut_connection_gets_no_bytes_and_goes_on_after_heal() {
        let proxy = FaultProxy::start("test", echo_server().await)
            .await
            .unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut s, b"before").await, b"before");

        proxy.cut();
        s.write_all(b"during").await.unwrap();
        let mut buf = [0u8; 6];
        let silent = tokio::time::timeout(SILENCE, s.read(&mut buf)).await;
        assert!(silent.is_err(), "a byte crossed a cut link: {silent:?}");

        proxy.heal();
        // What was sent during the partition is delivered late, as TCP would.
        tokio::time::timeout(PATIENCE, s.read_exact(&mut buf))
            .await
            .expect("held bytes delivered after heal")
            .unwrap();
        assert_eq!(&buf, b"during");
        assert_eq!(round_trip(&mut s, b"after").await, b"after");
    }

    #[tokio::test]
    async fn a_connection_made_while_cut_hangs_and_after_heal_new_ones_work() {
        let proxy = FaultProxy::start("test", echo_server().await)
            .await
            .unwrap();
        proxy.cut();
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        let silent = tokio::time::timeout(SILENCE, held.read(&mut buf)).await;
        assert!(silent.is_err(), "a connection made while cut was answered");

        proxy.heal();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let answered = tokio::time::timeout(PATIENCE, round_trip(&mut fresh, b"fresh")).await;
        assert_eq!(answered.expect("answered after heal"), b"fresh");
        tokio::time::timeout(PATIENCE, held.read_exact(&mut buf))
            .await
            .expect("the held connection goes on after heal")
            .unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(proxy.connections(), 2);
    }

    #[tokio::test]
    async fn an_upstream_that_is_down_closes_the_client_connection() {
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let proxy = FaultProxy::start("test", gone).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
            .await
            .expect("closed, not held");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
}
