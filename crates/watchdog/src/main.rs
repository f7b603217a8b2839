#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_telemetry::service::main(
        "watchdog",
        |a: &flotilla_watchdog::WatchdogArgs| &a.telemetry,
        flotilla_watchdog::run,
    )
    .await
}
