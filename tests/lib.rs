//! End-to-end tests live in this package's test targets; the library holds
//! the in-process wiring several of them start the same way.

use std::net::SocketAddr;

use flotilla_api::{ApiState, ApiToken, Limits, serve};
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_bus::{Bus, OutboxRelay};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{TestDb, TestNats};

/// The api of a test, served on loopback.
pub struct TestApi {
    pub addr: SocketAddr,
    /// The bus it publishes on (streams created), for the other services.
    pub bus: Bus,
}

/// Creates the streams in `nats`'s namespace, then serves the api on
/// `db` with `token` and `limits`, and runs its outbox relay, until `stop`.
pub async fn start_api(
    db: &TestDb,
    nats: &TestNats,
    token: ApiToken,
    limits: Limits,
    stop: &CancellationToken,
) -> TestApi {
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).expect("ns"),
        BusConfig::default(),
    );
    bus.ensure_streams().await.expect("streams");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(
        ApiState {
            pool: db.pool.clone(),
            bus: bus.clone(),
            tokens: vec![token].into(),
            limits,
            provider: None,
        },
        listener,
        stop.clone(),
    ));
    let relay = OutboxRelay::new(db.pool.clone(), bus.clone());
    tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });
    TestApi { addr, bus }
}
