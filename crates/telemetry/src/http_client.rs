//! The one way Flotilla builds HTTP clients: rustls over `ring` (the crypto
//! library sqlx and async-nats already link), installed once per process.
//!
//! It is process setup, like the tracing subscriber, and shared by the
//! provider layer (cloud APIs) and the scheduler (worker health checks),
//! so the scheduler needs no provider code to make an HTTP call. Behind the
//! `http-client` feature: binaries that make no HTTP call link no client.

use std::sync::Once;
use std::time::Duration;

static CRYPTO: Once = Once::new();

/// How long opening a connection (TCP and TLS) may take by default
/// (`HTTP_CONNECT_TIMEOUT_SECONDS`): an unreachable host fails this fast
/// instead of holding the call for its whole timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client builder with TLS ready, request and connect timeouts set (the
/// connect timeout never longer than the request's), and no proxy from the
/// environment (provider traffic goes direct).
pub fn client_builder(timeout: Duration, connect_timeout: Duration) -> reqwest::ClientBuilder {
    CRYPTO.call_once(|| {
        // Fails only when another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect_timeout.min(timeout))
        .no_proxy()
        .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hanging_address;

    #[test]
    fn the_builder_installs_the_crypto_provider_and_builds() {
        // The workspace's reqwest has no built-in crypto provider: without
        // the install, building a client fails.
        let client = client_builder(Duration::from_secs(1), DEFAULT_CONNECT_TIMEOUT).build();
        assert!(client.is_ok(), "{client:?}");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }

    #[tokio::test]
    async fn a_connect_that_hangs_fails_after_the_connect_timeout_given() {
        let (_listener, _held, addr) = hanging_address();
        let client = client_builder(Duration::from_secs(60), Duration::from_millis(300))
            .build()
            .expect("client");
        let answer = tokio::time::timeout(
            Duration::from_secs(4),
            client.get(format!("http://{addr}/")).send(),
        )
        .await
        .expect("the 300 ms connect timeout ended the call, not the 5 s default");
        let err = answer.expect_err("nothing answers");
        assert!(err.is_connect() || err.is_timeout(), "{err:?}");
    }
}
