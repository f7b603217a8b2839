//! The CLI's config file of named contexts, the way kubectl's kubeconfig
//! and nomad's environments work: each context names an api URL, a token
//! file, a CA and a connect timeout; `current-context` says which one
//! applies when `--context` does not.
//!
//! Design notes: the file is YAML (`config.yaml`, read with serde_norway,
//! which the CLI already uses for `-o yaml`), not TOML: no TOML parser is
//! among the workspace's dependencies. Each setting comes from the first
//! of: its flag, its environment variable, the context, the default — so
//! a context never overrides what a user typed or exported. The token is
//! never in the file itself, only the path of a file holding it, and that
//! file must be its owner's only (0600): a token others can read is
//! refused, not used. Relative paths in a context are relative to the
//! config file's directory, as kubeconfig's are.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::CliError;

/// The api URL when neither flag, variable nor context names one.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:50051";

/// Seconds connecting to the api may take when neither flag, variable nor
/// context says (`FLOTILLA_CONNECT_TIMEOUT_SECONDS`).
pub const DEFAULT_CONNECT_TIMEOUT_SECONDS: u64 = 5;

/// The connect timeouts accepted, in seconds, wherever they are set.
pub const CONNECT_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 1..=300;
/// One named context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub api_url: Option<String>,
    /// A file holding the API token (mode 0600).
    pub token_file: Option<PathBuf>,
    /// CA bundle for an `https://` api URL: a PEM file or the PEM itself.
    pub ca: Option<String>,
    /// Seconds connecting to the api may take (1-300).
    pub connect_timeout_seconds: Option<u64>,
}

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(rename = "current-context", default)]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// Where the config file is: `FLOTILLA_CONFIG`, else
/// `$XDG_CONFIG_HOME/flotilla/config.yaml`, else
/// `~/.config/flotilla/config.yaml`. `None` without any of them.
pub fn path_from(
    flotilla_config: Option<&str>,
    xdg_config_home: Option<&str>,
    home: Option<&str>,
) -> Option<PathBuf> {
    let set = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(flotilla_config)
        .or_else(|| set(xdg_config_home).map(|d| d.join("flotilla/config.yaml")))
        .or_else(|| set(home).map(|h| h.join(".config/flotilla/config.yaml")))
}

/// [`path_from`] this process's environment.
pub fn path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var(k).ok();
    path_from(
        var("FLOTILLA_CONFIG").as_deref(),
        var("XDG_CONFIG_HOME").as_deref(),
        var("HOME").as_deref(),
    )
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> CliError {
    CliError::Invalid(format!("config file {}: {what}", path.display()))
}

/// The config file at `path`; `None` when there is none.
pub fn load(path: &Path) -> Result<Option<ConfigFile>, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(invalid(path, e)),
    };
    if text.trim().is_empty() {
        return Ok(Some(ConfigFile::default()));
    }
    serde_norway::from_str(&text)
        .map(Some)
        .map_err(|e| invalid(path, e))
}

/// The connection settings after precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub api_url: String,
    pub token: Option<String>,
    pub api_ca: Option<String>,
    /// How long connecting to the api may take before it counts as unreachable.
    pub connect_timeout: Duration,
    /// The context that applied, if any.
    pub context: Option<String>,
}

/// What flags and environment variables gave (clap merges the two).
#[derive(Debug, Clone, Default)]
pub struct Given<'a> {
    pub api_url: Option<&'a str>,
    pub token: Option<&'a str>,
    pub api_ca: Option<&'a str>,
    /// Seconds, already checked against [`CONNECT_TIMEOUT_RANGE`] by clap.
    pub connect_timeout_seconds: Option<u64>,
    pub context: Option<&'a str>,
}

/// Applies precedence: flag or variable, then the context (`--context`,
/// else the file's `current-context`), then the default. A `--context`
/// the file does not have is refused naming the ones it has.
pub fn resolve(
    given: &Given<'_>,
    file: Option<(&Path, &ConfigFile)>,
) -> Result<Resolved, CliError> {
    let chosen = given
        .context
        .or_else(|| file.and_then(|(_, f)| f.current_context.as_deref()));
    let context = match (chosen, file) {
        (None, _) => None,
        (Some(name), Some((path, f))) => match f.contexts.get(name) {
            Some(c) => Some((name, path, c)),
            None => return Err(unknown_context(name, path, f)),
        },
        (Some(name), None) => {
            return Err(CliError::Invalid(format!(
                "context {name:?}: there is no config file ({})",
                path().map_or("set FLOTILLA_CONFIG or HOME".into(), |p| p
                    .display()
                    .to_string())
            )));
        }
    };
    let from_context =
        |pick: fn(&Context) -> Option<&String>| context.and_then(|(_, _, c)| pick(c).cloned());
    let token = match given.token.filter(|t| !t.is_empty()) {
        Some(t) => Some(t.to_owned()),
        None => match context.and_then(|(_, path, c)| Some((path, c.token_file.as_ref()?))) {
            Some((path, file)) => Some(read_token(&relative_to(path, file))?),
            None => None,
        },
    };
    let connect_timeout_seconds = match given.connect_timeout_seconds {
        Some(s) => s,
        None => match context
            .and_then(|(name, path, c)| Some((name, path, c.connect_timeout_seconds?)))
        {
            Some((name, path, s)) if !CONNECT_TIMEOUT_RANGE.contains(&s) => {
                return Err(invalid(
                    path,
                    format!(
                        "context {name:?}: connect_timeout_seconds must be {}-{}, not {s}",
                        CONNECT_TIMEOUT_RANGE.start(),
                        CONNECT_TIMEOUT_RANGE.end()
                    ),
                ));
            }
            Some((_, _, s)) => s,
            None => DEFAULT_CONNECT_TIMEOUT_SECONDS,
        },
    };
    Ok(Resolved {
        api_url: given
            .api_url
            .map(str::to_owned)
            .or_else(|| from_context(|c| c.api_url.as_ref()))
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned()),
        token,
        api_ca: given
            .api_ca
            .map(str::to_owned)
            .or_else(|| from_context(|c| c.ca.as_ref())),
        connect_timeout: Duration::from_secs(connect_timeout_seconds),
        context: context.map(|(name, _, _)| name.to_owned()),
    })
}

fn unknown_context(name: &str, path: &Path, f: &ConfigFile) -> CliError {
    let known: Vec<&str> = f.contexts.keys().map(String::as_str).collect();
    invalid(
        path,
        format!(
            "no context {name:?}; it has {}",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ),
    )
}

/// `file` as written in the config at `config`: `~/` is the home
/// directory, a relative path is relative to the config file's directory.
pub fn relative_to(config: &Path, file: &Path) -> PathBuf {
    if let Ok(rest) = file.strip_prefix("~")
        && let Some(home) = std::env::var_os("HOME")
    {
        return PathBuf::from(home).join(rest);
    }
    if file.is_absolute() {
        file.to_owned()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(file)
    }
}

/// The token in `file`, refused when others may read the file.
pub fn read_token(file: &Path) -> Result<String, CliError> {
    let meta = std::fs::metadata(file)
        .map_err(|e| CliError::Invalid(format!("token file {}: {e}", file.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CliError::Invalid(format!(
                "token file {} can be read by others (mode {mode:04o}); refusing to use it\n\
                 hint: chmod 600 {}",
                file.display(),
                file.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let token = std::fs::read_to_string(file)
        .map_err(|e| CliError::Invalid(format!("token file {}: {e}", file.display())))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(CliError::Invalid(format!(
            "token file {} is empty",
            file.display()
        )));
    }
    Ok(token.to_owned())
}

/// `flotilla config …`: the file itself, no api needed.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// List the contexts of the config file; `*` marks the current one.
    GetContexts,
    /// Make NAME the current context (written to the config file).
    UseContext { name: String },
    /// Print the config file's path and the current context.
    CurrentContext,
}

fn need_path() -> Result<PathBuf, CliError> {
    path()
        .ok_or_else(|| CliError::Invalid("no config file path: set FLOTILLA_CONFIG or HOME".into()))
}

pub fn run(command: ConfigCommand) -> Result<(), CliError> {
    let path = need_path()?;
    let file = load(&path)?;
    match command {
        ConfigCommand::GetContexts => {
            let file = file.unwrap_or_default();
            print!("{}", contexts_table(&file));
            if file.contexts.is_empty() {
                eprintln!("no contexts in {}", path.display());
            }
            Ok(())
        }
        ConfigCommand::CurrentContext => {
            match file.and_then(|f| f.current_context) {
                Some(name) => println!("{name}"),
                None => eprintln!("no current context in {}", path.display()),
            }
            Ok(())
        }
        ConfigCommand::UseContext { name } => {
            let file = file.ok_or_else(|| invalid(&path, "does not exist"))?;
            if !file.contexts.contains_key(&name) {
                return Err(unknown_context(&name, &path, &file));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| invalid(&path, e))?;
            std::fs::write(&path, with_current_context(&text, &name)?)
                .map_err(|e| invalid(&path, e))?;
            eprintln!("switched to context {name:?} ({})", path.display());
            Ok(())
        }
    }
}

/// The file's text with `current-context` set to `name`, every other key
/// kept (comments are not: the file is written back from its values).
pub fn with_current_context(text: &str, name: &str) -> Result<String, CliError> {
    let mut doc: serde_norway::Value = if text.trim().is_empty() {
        serde_norway::Value::Mapping(Default::default())
    } else {
        serde_norway::from_str(text).map_err(|e| CliError::Invalid(e.to_string()))?
    };
    let map = doc
        .as_mapping_mut()
        .ok_or_else(|| CliError::Invalid("config file: not a mapping".into()))?;
    map.insert("current-context".into(), name.into());
    serde_norway::to_string(&doc).map_err(|e| CliError::Invalid(e.to_string()))
}

pub fn contexts_table(file: &ConfigFile) -> String {
    let rows: Vec<Vec<String>> = file
        .contexts
        .iter()
        .map(|(name, c)| {
            let current = file.current_context.as_deref() == Some(name.as_str());
            vec![
                if current { "*" } else { "" }.to_owned(),
                name.clone(),
                c.api_url.clone().unwrap_or_else(|| "-".into()),
                c.token_file
                    .as_ref()
                    .map_or("-".into(), |p| p.display().to_string()),
                c.ca.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    crate::output::table(&["CURRENT", "NAME", "API URL", "TOKEN FILE", "CA"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
current-context: prod
contexts:
  prod:
    api_url: https://flotilla.example:50051
    token_file: prod.token
    ca: /etc/flotilla/ca.pem
    connect_timeout_seconds: 20
  local:
    api_url: http://127.0.0.1:50051
";

    fn token_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "secret-token\n").expect("write");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        p
    }

    #[test]
    fn the_path_is_flotilla_config_then_xdg_then_home() {
        assert_eq!(
            path_from(Some("/c/f.yaml"), Some("/x"), Some("/h")),
            Some(PathBuf::from("/c/f.yaml"))
        );
        assert_eq!(
            path_from(None, Some("/x"), Some("/h")),
            Some(PathBuf::from("/x/flotilla/config.yaml"))
        );
        assert_eq!(
            path_from(Some(""), Some(""), Some("/h")),
            Some(PathBuf::from("/h/.config/flotilla/config.yaml"))
        );
        assert_eq!(path_from(None, None, None), None);
    }

    #[test]
    fn a_flag_or_variable_wins_over_the_context_which_wins_over_the_default() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("config.yaml");
        token_file(dir.path(), "prod.token", 0o600);
        let file: ConfigFile = serde_norway::from_str(FILE).expect("parse");
        let at = Some((path.as_path(), &file));

        let current = resolve(&Given::default(), at).expect("current context");
        assert_eq!(current.api_url, "https://flotilla.example:50051");
        assert_eq!(current.token.as_deref(), Some("secret-token"));
        assert_eq!(current.api_ca.as_deref(), Some("/etc/flotilla/ca.pem"));
        assert_eq!(current.connect_timeout, Duration::from_secs(20));
        assert_eq!(current.context.as_deref(), Some("prod"));

        let given = Given {
            api_url: Some("http://10.0.0.1:1"),
            token: Some("typed"),
            connect_timeout_seconds: Some(2),
            ..Default::default()
        };
        let flags = resolve(&given, at).expect("flags");
        assert_eq!(flags.api_url, "http://10.0.0.1:1");
        assert_eq!(flags.token.as_deref(), Some("typed"));
        assert_eq!(flags.api_ca.as_deref(), Some("/etc/flotilla/ca.pem"));
        assert_eq!(flags.connect_timeout, Duration::from_secs(2));

        let local = resolve(
            &Given {
                context: Some("local"),
                ..Default::default()
            },
            at,
        )
        .expect("--context local");
        assert_eq!(local.api_url, "http://127.0.0.1:50051");
        assert_eq!(local.token, None);
        assert_eq!(
            local.connect_timeout,
            Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_SECONDS)
        );

        let none = resolve(&Given::default(), None).expect("no file");
        assert_eq!(none.api_url, DEFAULT_API_URL);
        assert_eq!(none.context, None);

        let err = resolve(
            &Given {
                context: Some("staging"),
                ..Default::default()
            },
            at,
        )
        .expect_err("unknown context");
        assert!(err.to_string().contains("local, prod"), "{err}");
        assert_eq!(err.exit_code(), crate::exit::INVALID);
    }

    #[test]
    fn a_context_connect_timeout_out_of_range_is_refused_naming_it() {
        let path = Path::new("/c/config.yaml");
        for bad in [0, 301] {
            let file: ConfigFile = serde_norway::from_str(&format!(
                "current-context: slow\ncontexts:\n  slow:\n    connect_timeout_seconds: {bad}\n"
            ))
            .expect("parse");
            let err = resolve(&Given::default(), Some((path, &file))).expect_err("refused");
            let text = err.to_string();
            assert!(text.contains("/c/config.yaml"), "{text}");
            assert!(text.contains("\"slow\""), "{text}");
            assert!(
                text.contains(&format!("connect_timeout_seconds must be 1-300, not {bad}")),
                "{text}"
            );
            assert_eq!(err.exit_code(), crate::exit::INVALID);
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_token_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let open = token_file(dir.path(), "open.token", 0o644);
        let err = read_token(&open).expect_err("world-readable");
        assert!(err.to_string().contains("mode 0644"), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let closed = token_file(dir.path(), "closed.token", 0o600);
        assert_eq!(read_token(&closed).expect("0600"), "secret-token");
    }

    #[test]
    fn use_context_rewrites_only_the_current_context() {
        let text = with_current_context(FILE, "local").expect("rewrite");
        let file: ConfigFile = serde_norway::from_str(&text).expect("parse");
        assert_eq!(file.current_context.as_deref(), Some("local"));
        assert_eq!(file.contexts.len(), 2);
        assert_eq!(
            file.contexts["prod"].token_file.as_deref(),
            Some(Path::new("prod.token"))
        );
        let table = contexts_table(&file);
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("*") && l.contains("local")),
            "{table}"
        );
    }

    #[test]
    fn unknown_keys_are_refused_naming_them() {
        let err = serde_norway::from_str::<ConfigFile>("contexts:\n  a:\n    url: x\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("url"), "{err}");
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        assert_eq!(
            relative_to(Path::new("/c/config.yaml"), Path::new("t.token")),
            PathBuf::from("/c/t.token")
        );
        assert_eq!(
            relative_to(Path::new("/c/config.yaml"), Path::new("/abs/t")),
            PathBuf::from("/abs/t")
        );
    }
}
