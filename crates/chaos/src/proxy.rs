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
//!
//! `strand` is the other half of a network change: a client whose address
//! moves (a container reconnected to its network, a NAT entry expired)
//! keeps connections that will never move a byte again, while new ones
//! work at once. A client that only times its calls out, and never drops
//! the dead connection, stays cut off for good.

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
    link: watch::Sender<Link>,
    connections: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("link", &*self.link.borrow())
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
        let (link, _) = watch::channel(Link::default());
        let connections = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(
            listener,
            upstream,
            link.subscribe(),
            connections.clone(),
            stop.clone(),
        ));
        Ok(FaultProxy {
            name: name.to_owned(),
            addr,
            link,
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
        self.link.send_modify(|link| link.cut = true);
    }

    /// Ends the partition: held connections go on where they stopped.
    pub fn heal(&self) {
        self.link.send_modify(|link| link.cut = false);
    }

    /// Every connection open now goes silent for good, as if its client's
    /// address had changed under it; connections made from now on work
    /// (while the link is not cut).
    pub fn strand(&self) {
        let below = self.connections();
        self.link.send_modify(|link| link.stranded_below = below);
    }
}

/// What the chaos has done to the link.
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    /// While `true` no connection moves a byte.
    cut: bool,
    /// Connections numbered below this are stranded: silent for good.
    stranded_below: u64,
}

/// One connection's view of the link.
#[derive(Clone)]
struct Gate {
    link: watch::Receiver<Link>,
    /// The order in which the connection was accepted, from 0.
    number: u64,
}

impl Link {
    fn lets_through(&self, connection: u64) -> bool {
        !self.cut && connection >= self.stranded_below
    }
}

impl Gate {
    /// Waits until bytes may move; `false` when the proxy is gone.
    async fn wait_open(&mut self) -> bool {
        let number = self.number;
        self.link
            .wait_for(|link| link.lets_through(number))
            .await
            .is_ok()
    }

    /// Waits until bytes may not move (forever once the proxy is gone: the
    /// connection task is cancelled then anyway).
    async fn wait_closed(&mut self) {
        let number = self.number;
        let gone = self
            .link
            .wait_for(|link| !link.lets_through(number))
            .await
            .is_err();
        if gone {
            std::future::pending::<()>().await;
        }
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
    link: watch::Receiver<Link>,
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
        let gate = Gate {
            link: link.clone(),
            number: connections.fetch_add(1, Ordering::Relaxed),
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = relay(client, upstream, gate) => {}
            }
        });
    }
}

/// One connection: held while the link is cut, then connected upstream,
/// then pumped both ways until either side closes.
async fn relay(client: TcpStream, upstream: SocketAddr, mut gate: Gate) {
    if !gate.wait_open().await {
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
        pump(client_read, server_write, gate.clone()),
        pump(server_read, client_write, gate),
    );
}

/// Copies one direction, moving nothing while the link is cut.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut gate: Gate) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !gate.wait_open().await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => read,
            // Reading is cancel-safe: stop at once when the cut falls.
            () = gate.wait_closed() => continue,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read just as the cut fell: held until the link heals.
        if !gate.wait_open().await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
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
    async fn a_stranded_connection_stays_silent_while_new_ones_work() {
        let proxy = FaultProxy::start("test", echo_server().await)
            .await
            .unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut old, b"before").await, b"before");

        proxy.strand();
        old.write_all(b"lost").await.unwrap();
        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        let answered = tokio::time::timeout(PATIENCE, round_trip(&mut fresh, b"fresh")).await;
        assert_eq!(answered.expect("a new connection works"), b"fresh");
        // A cut and a heal do not bring a stranded connection back.
        proxy.cut();
        proxy.heal();
        let mut buf = [0u8; 4];
        let silent = tokio::time::timeout(SILENCE, old.read(&mut buf)).await;
        assert!(silent.is_err(), "a stranded connection moved a byte");
        assert_eq!(round_trip(&mut fresh, b"again").await, b"again");
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
