//! The `agent` binary, rebuilt inside the end-to-end package so its tests
//! can start real agent processes.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    flotilla_agent::cli().await
}
