//! What can go wrong for a CLI user, each with its exit code and a message
//! that says what to do next.
//!
//! Design notes: gRPC statuses and transport errors become [`CliError`] in
//! exactly one place ([`CliError::from_status`]), and [`CliError::exit_code`]
//! matches without a wildcard arm, so a new kind of failure must be given
//! its own code before the CLI compiles. Scripts branch on the codes; they
//! are part of the CLI's contract and listed in `flotilla --help`.

use tonic::{Code, Status};

/// Exit codes, stable for scripts.
pub mod exit {
    /// A command-line error or a field the api refused (INVALID_ARGUMENT).
    pub const INVALID: u8 = 2;
    /// The api could not be reached or is not serving.
    pub const UNREACHABLE: u8 = 3;
    /// The token is missing, wrong, or not allowed to do this.
    pub const AUTH: u8 = 4;
    /// The instance or pool does not exist.
    pub const NOT_FOUND: u8 = 5;
    /// The call was accepted but the goal was not reached: an instance
    /// failed, or the wait timed out.
    pub const INCOMPLETE: u8 = 6;
    /// The change conflicts with the current state (exists already,
    /// changed concurrently, not allowed in this state: deleting a pool
    /// with live instances, provisioning into a pool being deleted).
    pub const CONFLICT: u8 = 7;
    /// Anything else (an internal error at the api, an unexpected answer).
    pub const OTHER: u8 = 1;
    /// Interrupted (Ctrl-C) while waiting; what was accepted goes on. 128
    /// + SIGINT, as shells report a process that SIGINT ended.
    pub const INTERRUPTED: u8 = 130;

    /// Every code with the words the README's exit-code paragraph uses for
    /// it (checked by a test, so the README cannot drift from the code).
    pub const TABLE: &[(u8, &str)] = &[
        (0, "success"),
        (OTHER, "unexpected"),
        (INVALID, "invalid arguments"),
        (UNREACHABLE, "api unreachable"),
        (AUTH, "missing or wrong token"),
        (NOT_FOUND, "no such instance or"),
        (
            INCOMPLETE,
            "accepted but not every instance reached the goal",
        ),
        (CONFLICT, "conflict with the current state"),
        (INTERRUPTED, "interrupted"),
    ];
}

/// The text `--help` shows about exit codes.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  unexpected error (internal error at the api)
  2  invalid arguments, or a field the api refused (the message names it)
  3  api unreachable or not serving
  4  missing, wrong or insufficient API token
  5  no such instance or pool
  6  accepted, but not every instance reached the goal (failed or timed out)
  7  conflict with the current state (already exists, changed concurrently,
     a pool that still has live instances or is being deleted, an uncordon
     of an instance that is not cordoned or is being terminated)
  130  interrupted (Ctrl-C) while waiting; what the api accepted goes on";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(
        "cannot reach the Flotilla api at {url}: {detail}\n\
         hint: is it running? Start a local one with scripts/quickstart.sh, or point \
         --api-url / FLOTILLA_API_URL at yours"
    )]
    Unreachable { url: String, detail: String },
    /// No answer within the request timeout: the api is hung or overloaded.
    #[error(
        "the Flotilla api at {url} did not answer in time ({detail})\n\
         hint: it may be hung or overloaded; raise --request-timeout \
         (FLOTILLA_REQUEST_TIMEOUT_SECONDS) if its calls are just slow"
    )]
    TimedOut { url: String, detail: String },
    #[error(
        "the api refused the API token ({detail})\n\
         hint: pass --token or set FLOTILLA_API_TOKEN to a token whose sha256 is in the api's \
         API_TOKENS (the quickstart writes its token to .flotilla/env)"
    )]
    Unauthenticated { detail: String },
    #[error(
        "no API token given\n\
         hint: pass --token or set FLOTILLA_API_TOKEN (after the quickstart: . .flotilla/env)"
    )]
    MissingToken,
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The api names the field first (`count: must be 1 to 1000`).
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("{0}")]
    Incomplete(String),
    /// Ctrl-C while waiting: says what goes on and how to follow it.
    #[error("{0}")]
    Interrupted(String),
    #[error("the api answered {code:?}: {message}")]
    Other { code: Code, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// The one mapping of an api answer to what the user is told.
    pub fn from_status(url: &str, s: &Status) -> CliError {
        let message = s.message().to_owned();
        match s.code() {
            Code::Unavailable => CliError::Unreachable {
                url: url.to_owned(),
                detail: if message.is_empty() {
                    "unavailable".into()
                } else {
                    message
                },
            },
            // tonic's client-side timeout answers CANCELLED "Timeout expired".
            Code::DeadlineExceeded => CliError::TimedOut {
                url: url.to_owned(),
                detail: message,
            },
            Code::Cancelled if message.contains("Timeout expired") => CliError::TimedOut {
                url: url.to_owned(),
                detail: message,
            },
            Code::Unauthenticated => CliError::Unauthenticated { detail: message },
            Code::PermissionDenied => CliError::PermissionDenied(message),
            Code::InvalidArgument | Code::OutOfRange => CliError::Invalid(message),
            Code::NotFound => CliError::NotFound(message),
            Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => {
                CliError::Conflict(message)
            }
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::ResourceExhausted
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => CliError::Other {
                code: s.code(),
                message,
            },
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } | CliError::TimedOut { .. } => exit::UNREACHABLE,
            CliError::Unauthenticated { .. }
            | CliError::MissingToken
            | CliError::PermissionDenied(_) => exit::AUTH,
            CliError::Invalid(_) => exit::INVALID,
            CliError::NotFound(_) => exit::NOT_FOUND,
            CliError::Conflict(_) => exit::CONFLICT,
            CliError::Incomplete(_) => exit::INCOMPLETE,
            CliError::Interrupted(_) => exit::INTERRUPTED,
            CliError::Other { .. } | CliError::Io(_) => exit::OTHER,
        }
    }
}

/// A transport error with its causes, which hold the useful part
/// ("Connection refused").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_kind_has_its_own_exit_code() {
        let url = "http://127.0.0.1:1";
        let cases = [
            (Status::unavailable("down"), exit::UNREACHABLE),
            (Status::deadline_exceeded("slow"), exit::UNREACHABLE),
            (Status::cancelled("Timeout expired"), exit::UNREACHABLE),
            (Status::cancelled("the caller went away"), exit::OTHER),
            (Status::unauthenticated("bad token"), exit::AUTH),
            (Status::permission_denied("no"), exit::AUTH),
            (
                Status::invalid_argument("count: must be 1 to 1000"),
                exit::INVALID,
            ),
            (Status::not_found("pool x does not exist"), exit::NOT_FOUND),
            (Status::already_exists("pool: exists"), exit::CONFLICT),
            (Status::aborted("changed concurrently"), exit::CONFLICT),
            (
                Status::failed_precondition("pool gpu has 3 live instances"),
                exit::CONFLICT,
            ),
            (Status::internal("internal error"), exit::OTHER),
        ];
        for (status, code) in cases {
            assert_eq!(
                CliError::from_status(url, &status).exit_code(),
                code,
                "{status:?}"
            );
        }
        let codes = [
            exit::OTHER,
            exit::INVALID,
            exit::UNREACHABLE,
            exit::AUTH,
            exit::NOT_FOUND,
            exit::INCOMPLETE,
            exit::CONFLICT,
            exit::INTERRUPTED,
        ];
        let distinct: std::collections::HashSet<_> = codes.iter().collect();
        assert_eq!(distinct.len(), codes.len(), "exit codes are distinct");
    }

    #[test]
    fn the_readme_and_help_list_the_exit_code_table() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("Exit codes, for scripts:")
            .expect("README exit codes");
        let paragraph: String = readme[start..]
            .split("\n\n")
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        for (code, words) in exit::TABLE {
            assert!(
                paragraph.contains(&format!("{code} {words}")),
                "README says `{code} {words}`: {paragraph}"
            );
            assert!(
                EXIT_CODES_HELP.contains(&format!("\n  {code}  ")),
                "--help lists {code}"
            );
        }
    }

    #[test]
    fn messages_say_what_to_do() {
        let e = CliError::from_status("http://x", &Status::unauthenticated("missing or invalid"));
        assert!(e.to_string().contains("FLOTILLA_API_TOKEN"), "{e}");
        let e = CliError::from_status("http://x:1", &Status::unavailable(""));
        assert!(e.to_string().contains("http://x:1"), "{e}");
        assert!(e.to_string().contains("quickstart"), "{e}");
        let e = CliError::from_status("http://x", &Status::cancelled("Timeout expired"));
        assert!(e.to_string().contains("--request-timeout"), "{e}");
        assert!(e.to_string().contains("did not answer in time"), "{e}");
        let e = CliError::from_status("http://x", &Status::invalid_argument("count: must be 1"));
        assert!(e.to_string().contains("count: must be 1"), "{e}");
    }
}
