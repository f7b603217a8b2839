#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_telemetry::service::main(
        "scheduler",
        |a: &flotilla_scheduler::SchedulerArgs| &a.telemetry,
        flotilla_scheduler::run,
    )
    .await
}
