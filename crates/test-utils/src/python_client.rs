//! A real third-party gRPC client for tests: Python grpcio with
//! grpcio-reflection, driving `scripts/reflection_client.py`, which knows
//! Flotilla's services only through server reflection (v1alpha).
//!
//! The client lives in a virtualenv `scripts/python-client.sh` makes under
//! the target directory (`scripts/test.sh` runs it first; the helper runs
//! it again, once per test process, which is quick once it exists). If
//! Python or the packages cannot be had, a test outside CI is skipped with a note, and in CI
//! (`CI=true`) it fails: CI must never pass by skipping it.

use std::path::{Path, PathBuf};

use tokio::process::Command;
use tokio::sync::OnceCell;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The venv's python, installing it once per test process when missing.
async fn python() -> Result<PathBuf, String> {
    static PYTHON: OnceCell<Result<PathBuf, String>> = OnceCell::const_new();
    PYTHON
        .get_or_init(|| async {
            // Quick when the venv is there with the same pins; it holds a
            // lock, so a venv half made by another test process is waited for.
            let out = Command::new("bash")
                .arg(workspace().join("scripts/python-client.sh"))
                .output()
                .await
                .map_err(|e| format!("cannot run scripts/python-client.sh: {e}"))?;
            let python = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if !out.status.success() || !python.exists() {
                return Err(format!(
                    "scripts/python-client.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(python)
        })
        .await
        .clone()
}

/// Runs the reflection client with `spec` (see the script's docs) and
/// returns its JSON answer; `None` when the client is unavailable outside
/// CI (the test then returns early). Panics in CI when it is unavailable,
/// and whenever the client itself fails.
pub async fn reflection_client(spec: &serde_json::Value) -> Option<serde_json::Value> {
    let python = match python().await {
        Ok(p) => p,
        Err(why) if !in_ci() => {
            eprintln!("SKIPPED: the Python gRPC client is not available here: {why}");
            return None;
        }
        Err(why) => panic!("CI=true but the Python gRPC client is not available: {why}"),
    };
    let out = Command::new(python)
        .arg(workspace().join("scripts/reflection_client.py"))
        .arg(spec.to_string())
        .output()
        .await
        .expect("run the reflection client");
    assert!(
        out.status.success(),
        "the reflection client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("the client prints JSON"))
}
