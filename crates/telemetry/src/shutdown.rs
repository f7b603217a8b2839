//! The shutdown signal: SIGTERM (what Kubernetes and `docker stop` send) or
//! Ctrl-C, turned into one cancellation token every task watches, and the
//! grace period a service gives its in-flight work before abandoning it.

use tokio_util::sync::CancellationToken;

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A token cancelled when the process is asked to stop.
pub fn token_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

/// Waits for every task in `tasks`. Once `shutdown` is cancelled they have
/// `grace` to finish what they hold; whatever is still running then is
/// aborted, so the caller can release its claims and return in time.
/// Returns how many tasks had to be aborted.
pub async fn join_within_grace(
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &CancellationToken,
    grace: std::time::Duration,
) -> usize {
    let timed_out = tokio::select! {
        _ = async { while tasks.join_next().await.is_some() {} } => false,
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        } => true,
    };
    if !timed_out {
        return 0;
    }
    let aborted = tasks.len();
    tracing::warn!(
        tasks = aborted,
        grace = ?grace,
        "work still running after the grace period; abandoning it for another replica"
    );
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    aborted
}
