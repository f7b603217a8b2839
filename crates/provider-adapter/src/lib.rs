//! The `provider-adapter` service: the only component that holds cloud
//! credentials. It serves the gRPC `Provider` API over the providers it is
//! configured for, each behind its rate limiter, retries and breaker, to
//! callers holding a service token only, over TLS when given a certificate.

pub mod auth;
pub mod config;
pub mod service;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use flotilla_core::token::HashedToken;
use flotilla_proto::v1::provider_server::ProviderServer;
use flotilla_provider::docker::{DockerConfig, DockerProvider};
use flotilla_provider::fly::{FlyConfig, FlyProvider};
use flotilla_provider::local::{LocalConfig, LocalProvider};
use flotilla_provider::registry::{AnyProvider, Registry};
use flotilla_provider::scaleway::{ScalewayConfig, ScalewayProvider};
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::grpc_server::GrpcServer;
use tokio::net::TcpListener;
use tonic::transport::ServerTlsConfig;

pub use auth::ServiceAuth;
pub use config::AdapterArgs;
pub use service::ProviderService;

/// Builds the registry of every provider the arguments configure.
pub fn registry(args: &AdapterArgs) -> anyhow::Result<Registry> {
    let mut registry = Registry::new(args.guard.guard());
    if !args.fly.fly_api_token.is_empty() || !args.fly.fly_app_name.is_empty() {
        anyhow::ensure!(
            !args.fly.fly_api_token.is_empty() && !args.fly.fly_app_name.is_empty(),
            "Fly needs both FLY_API_TOKEN and FLY_APP_NAME"
        );
        registry.insert(AnyProvider::Fly(FlyProvider::new(FlyConfig {
            base_url: args.fly.fly_api_base_url.clone(),
            token: args.fly.fly_api_token.expose().to_owned(),
            app: args.fly.fly_app_name.clone(),
            control_plane_id: args.control_plane_id.clone(),
            request_timeout: args.guard.request_timeout(),
            connect_timeout: args.http.connect_timeout(),
            start_timeout: args.guard.start_timeout(),
            kind: "fly",
        })?));
    }
    if !args.sim.sim_api_base_url.is_empty() {
        registry.insert(AnyProvider::Fly(FlyProvider::new(FlyConfig {
            base_url: args.sim.sim_api_base_url.clone(),
            token: args.sim.sim_api_token.expose().to_owned(),
            app: args.sim.sim_app_name.clone(),
            control_plane_id: args.control_plane_id.clone(),
            request_timeout: args.guard.request_timeout(),
            connect_timeout: args.http.connect_timeout(),
            start_timeout: args.guard.start_timeout(),
            kind: "sim",
        })?));
    }
    let scw = &args.scaleway;
    if !scw.scw_secret_key.is_empty() || !scw.scw_project_id.is_empty() {
        anyhow::ensure!(
            !scw.scw_secret_key.is_empty() && !scw.scw_project_id.is_empty(),
            "Scaleway needs both SCW_SECRET_KEY and SCW_PROJECT_ID"
        );
        let mut config = ScalewayConfig::new(
            scw.scw_zone.clone(),
            scw.scw_project_id.clone(),
            scw.scw_secret_key.expose(),
            args.control_plane_id.clone(),
        );
        config.base_url = scw.scw_api_url.clone();
        config.request_timeout = args.guard.request_timeout();
        config.connect_timeout = args.http.connect_timeout();
        config.private_network_id =
            Some(scw.scw_private_network_id.clone()).filter(|pn| !pn.is_empty());
        config.root_detach_timeout = Duration::from_secs(scw.scw_root_detach_timeout_seconds);
        registry.insert(AnyProvider::Scaleway(ScalewayProvider::new(config)?));
    }
    if args.local.local_provider_enabled {
        registry.insert(AnyProvider::Local(LocalProvider::open(LocalConfig {
            state_dir: args.local.local_state_dir.clone(),
            control_plane_id: args.control_plane_id.clone(),
            stop_grace_default: Duration::from_secs(10),
        })?));
    }
    if args.docker.docker_provider_enabled {
        let mut config = DockerConfig::new(args.control_plane_id.clone());
        config.host = args.docker.docker_host.clone();
        config.network = args.docker.docker_network.clone();
        config.request_timeout = args.guard.request_timeout();
        registry.insert(AnyProvider::Docker(DockerProvider::new(config)?));
    }
    anyhow::ensure!(
        !registry.kinds().is_empty(),
        "no provider configured: set FLY_API_TOKEN and FLY_APP_NAME, SIM_API_BASE_URL, \
         SCW_SECRET_KEY and SCW_PROJECT_ID, LOCAL_PROVIDER_ENABLED=true or \
         DOCKER_PROVIDER_ENABLED=true"
    );
    Ok(registry)
}

/// Checks that every configured account answers for what it names: for
/// Fly (and the sim), that the app exists; for Docker, that the engine
/// answers and DOCKER_NETWORK exists. A mistyped FLY_APP_NAME is then
/// a clear error at start, not a fleet whose machines all look gone.
pub async fn check_accounts(registry: &Registry) -> anyhow::Result<()> {
    for kind in registry.kinds() {
        let Some(guarded) = registry.get(&kind, "") else {
            continue;
        };
        if let AnyProvider::Fly(fly) = guarded.inner() {
            fly.check_app()
                .await
                .map_err(|e| anyhow::anyhow!("provider {kind} is not ready: {e}"))?;
        }
        if let AnyProvider::Docker(docker) = guarded.inner() {
            docker
                .check()
                .await
                .map_err(|e| anyhow::anyhow!("provider {kind} is not ready: {e}"))?;
        }
    }
    Ok(())
}

/// How often readiness is checked again while an account does not answer.
const READINESS_RETRY: Duration = Duration::from_secs(10);

/// Whom the adapter serves and how: the accepted service tokens, TLS when
/// a certificate is given, and an optional plaintext health-only listener.
#[derive(Debug)]
pub struct Access {
    pub tokens: Arc<[HashedToken]>,
    pub tls: Option<ServerTlsConfig>,
    pub health: Option<TcpListener>,
}

impl Access {
    /// Plaintext, no health-only listener, callers holding one of `tokens`.
    pub fn tokens(tokens: Vec<HashedToken>) -> Access {
        Access {
            tokens: tokens.into(),
            tls: None,
            health: None,
        }
    }
}

/// Serves the Provider API (with health and reflection) on `listener` until
/// `shutdown`, to callers holding one of `access.tokens`; health turns
/// NOT_SERVING first so load balancers drain. Health says SERVING only
/// once [`check_accounts`] passed; until then it is NOT_SERVING, the
/// reason is logged, and the check is repeated.
pub async fn serve(
    registry: Arc<Registry>,
    access: Access,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let service = ProviderServer::with_interceptor(
        ProviderService::new(registry.clone()),
        ServiceAuth::new(access.tokens),
    );
    let server = GrpcServer::new("provider-adapter", flotilla_proto::v1::FILE_DESCRIPTOR_SET)
        .timeout(Duration::from_secs(120))
        .tls(access.tls)
        .health_listener(access.health)
        .add_service(service);
    let reporter = server.health();
    reporter
        .set_not_serving::<ProviderServer<ProviderService>>()
        .await;
    {
        let (reporter, registry, shutdown) = (reporter.clone(), registry.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                match check_accounts(&registry).await {
                    Ok(()) => {
                        if !shutdown.is_cancelled() {
                            reporter
                                .set_serving::<ProviderServer<ProviderService>>()
                                .await;
                        }
                        return;
                    }
                    Err(e) => tracing::error!(error = %e, "provider-adapter not ready"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(READINESS_RETRY) => {}
                }
            }
        });
    }
    server
        .serve(listener, async move {
            shutdown.cancelled().await;
            reporter
                .set_not_serving::<ProviderServer<ProviderService>>()
                .await;
        })
        .await?;
    Ok(())
}

/// Checks what can be checked before serving: Scaleway's zone and project
/// answer with these credentials. A wrong one stops the adapter with an
/// error naming it, instead of 404s read later as vanished machines.
pub async fn check_providers(registry: &Registry) -> anyhow::Result<()> {
    if let Some(p) = registry.get("scaleway", "")
        && let AnyProvider::Scaleway(scw) = p.inner()
    {
        scw.check().await?;
    }
    Ok(())
}

/// Runs the service as the binary does: telemetry already initialised.
pub async fn run(args: AdapterArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tokens = args.service_tokens()?;
    let tls = args.tls()?;
    if tls.is_none() {
        tracing::warn!(
            "PROVIDER_ADAPTER_TLS_CERT/PROVIDER_ADAPTER_TLS_KEY are not set: the adapter serves \
             plaintext, fit for loopback only"
        );
    }
    let registry = Arc::new(registry(&args)?);
    tracing::info!(providers = ?registry.kinds(), "providers configured");
    check_providers(&registry).await?;
    if let Some(addr) = args.telemetry.metrics_socket()? {
        flotilla_telemetry::metrics::serve(addr, shutdown.clone()).await?;
    }
    let listener = TcpListener::bind(&args.listen).await?;
    let health = match args.provider_adapter_health_listen.as_str() {
        "" => None,
        addr => Some(TcpListener::bind(addr).await?),
    };
    let access = Access {
        tokens: tokens.into(),
        tls,
        health,
    };
    serve(registry, access, listener, shutdown).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use flotilla_sim_provider::{SimConfig, start};

    use super::*;

    #[tokio::test]
    async fn readiness_fails_with_a_clear_error_while_the_fly_app_is_missing() {
        let sim = start(SimConfig::default()).await.expect("sim");
        let args = |app: &str| {
            AdapterArgs::try_parse_from([
                "provider-adapter",
                "--sim-api-base-url",
                sim.url(),
                "--sim-app-name",
                app,
            ])
            .expect("flags")
        };
        let typo = registry(&args("flotila")).expect("registry");
        let err = check_accounts(&typo).await.expect_err("not ready");
        let text = err.to_string();
        assert!(
            text.contains("sim")
                && text.contains("\"flotila\" is missing")
                && text.contains("FLY_APP_NAME"),
            "{text}"
        );
        check_accounts(&registry(&args("flotilla")).expect("registry"))
            .await
            .expect("ready");
    }
}
