//! A provider stack for tests: the simulated cloud with a real
//! provider-adapter in front of it, served over gRPC on loopback, and the
//! service token its callers authenticate with.

use std::sync::Arc;

use clap::Parser;
use flotilla_core::token::HashedToken;
use flotilla_proto::client::{AdapterClient, ServiceToken, adapter_client};
use flotilla_provider_adapter::{Access, AdapterArgs, registry, serve};
use flotilla_sim_provider::{Faults, SimConfig, SimHandle};
use flotilla_telemetry::CancellationToken;
use tonic::transport::Channel;

/// The service token every test adapter accepts (name `tests`); a service
/// run as its binary runs gets it as `--provider-adapter-token`.
pub const SERVICE_TOKEN: &str = "service-token-for-tests";

/// What a test adapter serves: callers holding [`SERVICE_TOKEN`], plaintext.
pub fn test_access() -> Access {
    Access::tokens(vec![HashedToken::from_plain("tests", SERVICE_TOKEN)])
}

/// A client of the adapter at `url` (plaintext) holding [`SERVICE_TOKEN`].
pub async fn connect_adapter(url: &str) -> AdapterClient {
    let channel = Channel::from_shared(url.to_owned())
        .expect("adapter url")
        .connect()
        .await
        .expect("adapter reachable");
    adapter_client(
        channel,
        ServiceToken::new(SERVICE_TOKEN).expect("ascii token"),
    )
}

pub struct ProviderStack {
    pub sim: SimHandle,
    pub client: AdapterClient,
    /// The adapter's gRPC address, for a service run as its binary runs
    /// (`--provider-adapter-url`, with `--provider-adapter-token`
    /// [`SERVICE_TOKEN`]).
    pub url: String,
    stop: CancellationToken,
}

impl Drop for ProviderStack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Faults with every state change immediate.
pub fn instant() -> Faults {
    Faults {
        start_delay_ms: 0,
        stop_delay_ms: 0,
        destroy_delay_ms: 0,
        destroyed_linger_ms: 0,
        ..Faults::default()
    }
}

/// The simulated cloud as Fly documents itself, fast: every rule and every
/// lingering state of `Faults::default()` (a destroyed machine shows
/// `destroyed` for 2 s before its 404, a volume stays bound 1.5 s after its
/// machine's destroy, rate limits), with state changes shortened to tens of
/// milliseconds. Terminator and watchdog tests run against this, so what
/// they prove holds where the provider lingers, not only where it is instant.
pub fn documented() -> Faults {
    Faults {
        start_delay_ms: 20,
        stop_delay_ms: 20,
        destroy_delay_ms: 10,
        ..Faults::default()
    }
}

/// Starts the simulator with `faults` and an adapter for it (provider kind
/// `sim`, no retries inside the adapter, limits out of the way) whose
/// extra flags are `extra`.
pub async fn provider_stack(faults: Faults, extra: &[&str]) -> ProviderStack {
    let sim = flotilla_sim_provider::start(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await
    .expect("simulator starts");
    let mut argv = vec![
        "provider-adapter",
        "--sim-api-base-url",
        sim.url(),
        "--sim-api-token",
        sim.token(),
        "--provider-retry-max-attempts",
        "0",
        "--provider-rate-limit-per-second",
        "100000",
        "--provider-rate-limit-burst",
        "100000",
        "--circuit-breaker-failure-threshold",
        "1000000",
        "--provider-start-timeout-seconds",
        "5",
    ];
    argv.extend_from_slice(extra);
    let args = AdapterArgs::try_parse_from(argv).expect("adapter flags");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(serve(
        Arc::new(registry(&args).expect("registry")),
        test_access(),
        listener,
        stop.clone(),
    ));
    let url = format!("http://{addr}");
    let client = connect_adapter(&url).await;
    ProviderStack {
        sim,
        client,
        url,
        stop,
    }
}
