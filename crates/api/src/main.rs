#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_telemetry::service::main(
        "api",
        |a: &flotilla_api::ApiArgs| &a.telemetry,
        flotilla_api::run,
    )
    .await
}
