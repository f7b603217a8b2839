use clap::Parser;
use flotilla_watchdog::{WatchdogArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = WatchdogArgs::parse();
    let telemetry = flotilla_telemetry::init("watchdog", &args.telemetry)?;
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "watchdog failed");
    }
    telemetry.shutdown();
    result
}
