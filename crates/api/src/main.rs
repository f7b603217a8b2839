use clap::Parser;
use flotilla_api::{ApiArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = ApiArgs::parse();
    let telemetry = flotilla_telemetry::init("api", &args.telemetry)?;
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "api failed");
    }
    telemetry.shutdown();
    result
}
