#[tokio::main]
async fn main() -> anyhow::Result<()> {
    flotilla_telemetry::service::main(
        "provider-adapter",
        |a: &flotilla_provider_adapter::AdapterArgs| &a.telemetry,
        flotilla_provider_adapter::run,
    )
    .await
}
