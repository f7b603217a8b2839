//! Database connection exhaustion: a holder that opens connections to the
//! private PostgreSQL until the server refuses one, keeps them for a while,
//! then lets go — what a neighbour with a leaking pool, or a connection
//! storm after a deploy, does to an installation.
//!
//! Design notes: connections are opened a few at a time (a wave), so the
//! server fills in about a second rather than one fork at a time, and the
//! first refusal ends the filling: from then on every service that needs a
//! new connection is refused as well ("too many clients already"), while
//! the connections its pool already holds keep working. While it holds,
//! the holder keeps asking for more, so a slot a killed replica gives up
//! is taken before that replica starts again. The services
//! connect as a superuser, so the slots PostgreSQL reserves for superusers
//! are taken too.

use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Connections opened at once while filling the server.
const WAVE: usize = 16;
/// How often a full server is asked for the slots others gave up, and
/// how many at once (each ask is a backend forked and refused: a few a
/// tick keep the server's load small).
const TOP_UP_EVERY: Duration = Duration::from_millis(50);
const TOP_UP_WAVE: usize = 2;
/// How long one connect may take before the server counts as full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What one exhaustion did.
#[derive(Debug, Clone)]
pub struct HogReport {
    /// Connections held at the release (slots other clients gave up
    /// meanwhile included).
    pub held: usize,
    /// How long the server took to fill.
    pub filled_in: Duration,
    /// Why the filling stopped: the server's refusal, or the cap.
    pub stopped_by: String,
}

/// A holder at work in the background: it fills the server, then holds
/// every connection until [`ConnectionHog::release`].
pub struct ConnectionHog {
    release: oneshot::Sender<()>,
    task: JoinHandle<HogReport>,
    /// `true` once the server refused a connection (or the cap was hit).
    full: watch::Receiver<bool>,
}

impl ConnectionHog {
    /// Starts opening connections to `url` until one is refused (or `cap`
    /// are held); they are held until the release.
    pub fn start(url: &str, cap: usize) -> ConnectionHog {
        let (release, released) = oneshot::channel::<()>();
        let (filled, full) = watch::channel(false);
        let url = url.to_owned();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let (mut held, stopped_by) = fill(&url, cap, WAVE).await;
            let filled_in = started.elapsed();
            filled.send_replace(true);
            // Full is not the end: a slot another client gives up (a
            // replica killed, a pool shrinking) is taken as well, as a
            // leaking neighbour would, until the release (a dropped sender
            // releases too).
            let mut released = std::pin::pin!(released);
            loop {
                tokio::select! {
                    _ = &mut released => break,
                    () = tokio::time::sleep(TOP_UP_EVERY) => {
                        let (more, _) =
                            fill(&url, cap.saturating_sub(held.len()), TOP_UP_WAVE).await;
                        held.extend(more);
                    }
                }
            }
            let report = HogReport {
                held: held.len(),
                filled_in,
                stopped_by,
            };
            for conn in held {
                let _ = conn.close().await;
            }
            report
        });
        ConnectionHog {
            release,
            task,
            full,
        }
    }

    /// Waits until the server is full, at most `limit`; whether it is.
    pub async fn wait_full(&self, limit: Duration) -> bool {
        let mut full = self.full.clone();
        matches!(
            tokio::time::timeout(limit, full.wait_for(|f| *f)).await,
            Ok(Ok(_))
        )
    }

    /// Closes every held connection (once the filling is done) and says
    /// what was held.
    pub async fn release(self) -> HogReport {
        let _ = self.release.send(());
        match self.task.await {
            Ok(report) => report,
            Err(e) => HogReport {
                held: 0,
                filled_in: Duration::ZERO,
                stopped_by: format!("the holder failed: {e}"),
            },
        }
    }
}

/// Opens connections `wave` at a time until one is refused or `cap` are
/// open: the connections, and why it stopped.
async fn fill(url: &str, cap: usize, wave: usize) -> (Vec<PgConnection>, String) {
    let mut held = Vec::new();
    loop {
        if held.len() >= cap {
            return (held, format!("the cap of {cap}"));
        }
        let wave = (cap - held.len()).min(wave);
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..wave {
            let url = url.to_owned();
            tasks.spawn(async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(&url)).await {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
                }
            });
        }
        let mut refused = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(conn)) => held.push(conn),
                Ok(Err(e)) => refused = Some(e),
                Err(e) => refused = Some(e.to_string()),
            }
        }
        if let Some(stopped_by) = refused {
            return (held, stopped_by);
        }
    }
}
