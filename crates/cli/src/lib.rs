//! The `flotilla` command line: what humans and scripts use to provision,
//! inspect, watch, terminate and drain instances and to manage pools, all
//! through the api's FleetService over gRPC.
//!
//! It owns presentation and exit codes, nothing else: every rule (limits,
//! validation, what a state means) is the api's, and its answers are shown
//! as they are, with a hint of what to do when a call fails.

pub mod client;
pub mod config;
pub mod error;
pub mod follow;
pub mod instances;
pub mod output;
pub mod pools;
pub mod wait;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub use error::{CliError, exit};
pub use output::Output;

use crate::client::Api;

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla command line: provision, list, watch, terminate, drain, uncordon and abandon instances; manage pools",
    after_help = error::EXIT_CODES_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Connection,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the api is and how to authenticate.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// gRPC address of the Flotilla api: `https://host:port` (TLS) or
    /// `http://host:port`, plaintext, which is refused beyond loopback
    /// unless FLOTILLA_ALLOW_PLAINTEXT (`host:port` means http://host:port).
    /// Unset: the context's `api_url`, else http://127.0.0.1:50051.
    #[arg(long, global = true, env = "FLOTILLA_API_URL")]
    pub api_url: Option<String>,
    /// API token (one whose sha256 is in the api's API_TOKENS). Prefer the
    /// environment variable (or a context's token file): a flag is visible
    /// to other users in `ps`.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_API_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// CA bundle trusted for an `https://` api URL: a PEM file, or the PEM
    /// itself; unset, the context's `ca`, else the system's roots.
    #[arg(long, global = true, env = "FLOTILLA_API_CA")]
    pub api_ca: Option<String>,
    /// The context of the config file (FLOTILLA_CONFIG, else
    /// $XDG_CONFIG_HOME/flotilla/config.yaml, else
    /// ~/.config/flotilla/config.yaml) whose api URL, token file and CA
    /// apply where no flag or variable sets them; unset, the file's
    /// `current-context`.
    #[arg(long, global = true, env = "FLOTILLA_CONTEXT")]
    pub context: Option<String>,
    /// Allow an `http://` api URL to an address other than loopback: the
    /// API token then crosses the network in plaintext.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ALLOW_PLAINTEXT",
        default_value_t = false,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub allow_plaintext: bool,
    /// Seconds one call to the api may take.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_REQUEST_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub request_timeout: u64,
    /// Seconds connecting to the api may take before it counts as
    /// unreachable (exit 3), 1-300. Unset: the context's
    /// `connect_timeout_seconds`, else 5.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_CONNECT_TIMEOUT_SECONDS",
        value_parser = clap::value_parser!(u64).range(1..=300)
    )]
    pub connect_timeout: Option<u64>,
}

impl Connection {
    /// The api URL, token and CA after precedence: flag, then variable
    /// (clap merges the two), then the config file's context, then the
    /// default. The file is read only when a setting is left to it.
    pub fn resolve(&self) -> Result<config::Resolved, CliError> {
        let given = config::Given {
            api_url: self.api_url.as_deref(),
            token: self.token.as_deref(),
            api_ca: self.api_ca.as_deref(),
            connect_timeout_seconds: self.connect_timeout,
            context: self.context.as_deref(),
        };
        let everything_given = given.context.is_none()
            && given.api_url.is_some()
            && given.token.is_some_and(|t| !t.is_empty());
        let file = match config::path() {
            Some(path) if !everything_given => config::load(&path)?.map(|f| (path, f)),
            _ => None,
        };
        config::resolve(&given, file.as_ref().map(|(p, f)| (p.as_path(), f)))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ask for new instances in a pool, and wait until they are ready.
    Provision(instances::ProvisionArgs),
    /// List instances (not terminated ones unless --all or --state says so).
    #[command(alias = "ls")]
    List(instances::ListArgs),
    /// Show one instance and its history (the audit log).
    Get(instances::GetArgs),
    /// Stream instance events live, reconnecting when the api restarts (Ctrl-C to stop).
    Watch(instances::WatchArgs),
    /// Take instances down: cordon, drain, stop, delete machine and volumes.
    Terminate(instances::TerminateArgs),
    /// Cordon and drain instances without terminating them: they take no
    /// new work and keep their state (`list` shows `ready,cordoned`; `list
    /// --cordoned` finds them).
    Drain(instances::DrainArgs),
    /// Undo a drain: the instance takes work again. Refused (exit 7) for
    /// one that is not cordoned or is being terminated.
    Uncordon(instances::UncordonArgs),
    /// Give an instance up without any provider call, for one whose provider
    /// is gone for good; its machine may be left (the orphan scan deletes it
    /// if it carries Flotilla's tags).
    Abandon(instances::AbandonArgs),
    /// List, show, create, resize and delete pools.
    #[command(subcommand)]
    Pools(pools::PoolsCommand),
    /// The config file's named contexts (api URL, token file, CA):
    /// get-contexts, use-context NAME, current-context.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// Print a shell completion script, e.g.
    /// `source <(flotilla completion bash)`, or
    /// `flotilla completion fish > ~/.config/fish/completions/flotilla.fish`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The completion script for `shell`; needs no api.
pub fn completion_script(shell: clap_complete::Shell) -> String {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "flotilla", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `key=value` (labels, selectors).
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

impl Cli {
    pub async fn run(self) -> Result<(), CliError> {
        match self.command {
            Command::Completion { shell } => {
                print!("{}", completion_script(shell));
                return Ok(());
            }
            Command::Config(c) => return config::run(c),
            _ => {}
        }
        let conn = self.conn.resolve()?;
        let tls = flotilla_telemetry::tls::ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "FLOTILLA_ALLOW_PLAINTEXT",
        )
        .with_ca(conn.api_ca.as_deref())
        .map_err(|e| CliError::Invalid(e.to_string()))?
        .allow_plaintext(self.conn.allow_plaintext);
        let api = Api::connect(
            &conn.api_url,
            &tls,
            conn.token.as_deref(),
            conn.connect_timeout,
            Duration::from_secs(self.conn.request_timeout.max(1)),
        )
        .await?;
        match self.command {
            Command::Provision(a) => instances::provision(&api, a).await,
            Command::List(a) => instances::list(&api, a).await,
            Command::Get(a) => instances::get(&api, a).await,
            Command::Watch(a) => instances::watch(&api, a).await,
            Command::Terminate(a) => instances::terminate(&api, a).await,
            Command::Drain(a) => instances::drain(&api, a).await,
            Command::Uncordon(a) => instances::uncordon(&api, a).await,
            Command::Abandon(a) => instances::abandon(&api, a).await,
            Command::Pools(c) => pools::run(&api, c).await,
            Command::Completion { .. } | Command::Config(_) => Ok(()),
        }
    }
}

/// Runs the command line and turns its outcome into the process exit code,
/// printing a failure on stderr.
pub async fn main_with(cli: Cli) -> ExitCode {
    match cli.run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn configuration_doc_lists_every_cli_setting() {
        flotilla_core::config::check_doc_section(
            "cli",
            &Cli::command(),
            &flotilla_core::config::shared_command(),
        );
    }

    #[test]
    fn terminate_needs_one_kind_of_target_and_provision_a_count_or_names() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
        };
        assert!(parse(&["terminate"]).is_err());
        assert!(parse(&["terminate", "id1", "--pool", "p"]).is_err());
        assert!(parse(&["terminate", "--pool", "p", "--selector", "a=b,c=d"]).is_ok());
        assert!(parse(&["drain", "id1", "id2"]).is_ok());
        assert!(parse(&["provision", "--pool", "p"]).is_err());
        assert!(parse(&["provision", "--pool", "p", "--count", "1", "--name", "a"]).is_err());
        assert!(parse(&["provision", "--pool", "p", "--name", "a,b"]).is_ok());
        assert!(parse(&["list", "--state", "ready,worker_dead"]).is_ok());
        assert!(parse(&["list", "--state", "abandoned"]).is_ok());
        let err = parse(&["list", "--state", "nope"]).expect_err("unknown state");
        assert!(
            err.to_string().contains("worker_dead"),
            "lists the states: {err}"
        );
        assert_eq!(err.exit_code(), i32::from(exit::INVALID));
    }

    #[test]
    fn abandon_needs_an_id_and_a_reason_and_pools_delete_a_name() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
        };
        let err = parse(&["abandon", "id1"]).expect_err("no reason");
        assert!(err.to_string().contains("--reason"), "{err}");
        assert_eq!(err.exit_code(), i32::from(exit::INVALID));
        assert!(parse(&["abandon", "--reason", "provider gone"]).is_err());
        match parse(&["abandon", "id1", "--reason", "fly app deleted"]).map(|c| c.command) {
            Ok(Command::Abandon(a)) => {
                assert_eq!(a.id, "id1");
                assert_eq!(a.reason, "fly app deleted");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["pools", "delete"]).is_err());
        for (args, force) in [
            (&["pools", "delete", "gpu"][..], false),
            (&["pools", "delete", "gpu", "--force"][..], true),
        ] {
            match parse(args).map(|c| c.command) {
                Ok(Command::Pools(pools::PoolsCommand::Delete(d))) => {
                    assert_eq!(d.name, "gpu");
                    assert_eq!(d.force, force);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn completion_scripts_name_the_subcommands_for_every_shell() {
        use clap_complete::Shell;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = completion_script(shell);
            for word in [
                "provision",
                "terminate",
                "abandon",
                "pools",
                "completion",
                "yaml",
            ] {
                assert!(script.contains(word), "{shell} script names {word}");
            }
        }
        assert!(Cli::try_parse_from(["flotilla", "completion", "zsh"]).is_ok());
        assert!(Cli::try_parse_from(["flotilla", "completion", "tcsh"]).is_err());
    }

    #[test]
    fn uncordon_takes_one_reference_and_config_names_its_context() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
        };
        match parse(&["uncordon", "web-1", "--reason", "done"]).map(|c| c.command) {
            Ok(Command::Uncordon(a)) => {
                assert_eq!(a.id, "web-1");
                assert_eq!(a.reason, "done");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["uncordon"]).is_err());
        assert!(parse(&["uncordon", "a", "b"]).is_err());
        assert!(parse(&["list", "--cordoned", "--pool", "demo"]).is_ok());
        match parse(&["--context", "prod", "config", "use-context", "local"]) {
            Ok(cli) => {
                assert_eq!(cli.conn.context.as_deref(), Some("prod"));
                assert!(matches!(
                    cli.command,
                    Command::Config(config::ConfigCommand::UseContext { ref name }) if name == "local"
                ));
            }
            Err(e) => panic!("{e}"),
        }
        assert!(parse(&["config", "get-contexts"]).is_ok());
        assert!(
            parse(&["list", "--context", "prod"]).is_ok(),
            "a global flag"
        );
    }

    #[test]
    fn the_connect_timeout_is_a_global_flag_refused_out_of_range() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
        };
        let cli = parse(&["list", "--connect-timeout", "2"]).expect("parse");
        assert_eq!(cli.conn.connect_timeout, Some(2));
        assert_eq!(parse(&["list"]).expect("parse").conn.connect_timeout, None);
        for bad in ["0", "301", "soon"] {
            let err = parse(&["--connect-timeout", bad, "list"])
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("--connect-timeout") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn labels_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_label("a="), Ok(("a".into(), String::new())));
        assert!(parse_label("=b").is_err());
        assert!(parse_label("ab").is_err());
    }
}
