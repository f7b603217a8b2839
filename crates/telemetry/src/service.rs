//! Every service binary's `main`, written once: parse the settings, set up
//! telemetry for the service, turn SIGTERM/Ctrl-C into the shutdown token,
//! run, log a failure, flush telemetry.

use std::future::Future;

use flotilla_core::config::TelemetryArgs;
use tokio_util::sync::CancellationToken;

/// The binary's `main`: settings from flags and environment, telemetry for
/// `name`, the shutdown token on SIGTERM/Ctrl-C, then `run`.
pub async fn main<A, F, Fut>(
    name: &'static str,
    telemetry: fn(&A) -> &TelemetryArgs,
    run: F,
) -> anyhow::Result<()>
where
    A: clap::Parser,
    F: FnOnce(A, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let args = A::parse();
    let guard = crate::init(name, telemetry(&args))?;
    let shutdown = crate::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(service = name, error = %e, "service failed");
    }
    guard.shutdown();
    result
}
