use clap::Parser;
use flotilla_cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    flotilla_cli::main_with(Cli::parse()).await
}
