use clap::Parser;
use flotilla_provider_adapter::{AdapterArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = AdapterArgs::parse();
    let telemetry = flotilla_telemetry::init("provider-adapter", &args.telemetry)?;
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "provider-adapter failed");
    }
    telemetry.shutdown();
    result
}
