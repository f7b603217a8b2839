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

/// A client builder with TLS ready, request and connect timeouts set, and
/// no proxy from the environment (provider traffic goes direct).
pub fn client_builder(timeout: Duration) -> reqwest::ClientBuilder {
    CRYPTO.call_once(|| {
        // Fails only when another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .no_proxy()
        .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builder_installs_the_crypto_provider_and_builds() {
        // The workspace's reqwest has no built-in crypto provider: without
        // the install, building a client fails.
        let client = client_builder(Duration::from_secs(1)).build();
        assert!(client.is_ok(), "{client:?}");
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
