use clap::Parser;
use flotilla_scheduler::{SchedulerArgs, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = SchedulerArgs::parse();
    let telemetry = flotilla_telemetry::init("scheduler", &args.telemetry)?;
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let result = run(args, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %e, "scheduler failed");
    }
    telemetry.shutdown();
    result
}
