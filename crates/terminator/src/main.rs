use clap::Parser;
use flotilla_terminator::{TerminatorArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = TerminatorArgs::parse();
    let telemetry = flotilla_telemetry::init("terminator", &args.telemetry)?;
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "terminator failed");
    }
    telemetry.shutdown();
    result
}
