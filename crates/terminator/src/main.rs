#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_telemetry::service::main(
        "terminator",
        |a: &flotilla_terminator::TerminatorArgs| &a.telemetry,
        flotilla_terminator::run,
    )
    .await
}
