//! What tests of connect timeouts share, built only for tests (the
//! `test-support` feature, enabled by dev-dependencies).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// An address whose TCP connects hang: a listener that never accepts, its
/// accept queue filled, so the kernel drops further SYNs unanswered. Keep
/// the listener and the held connections alive while the address is used.
pub fn hanging_address() -> (TcpListener, Vec<TcpStream>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    while let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
        held.push(s);
        assert!(held.len() < 100_000, "the accept queue never filled");
    }
    (listener, held, addr)
}
