use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    flotilla_agent::cli().await
}
