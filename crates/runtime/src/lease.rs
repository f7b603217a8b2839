//! Leases held while a step works, renewed by their holder, and the fence
//! every step checks before it calls a provider.
//!
//! A claim leases a row for a short time (about 15 s by default) and bumps
//! its version; the driver renews the leases of the rows whose steps are
//! still running, every third of the lease. The holder's own clock decides
//! whether it may still act: a [`Fence`] is held until the last renewal
//! the database confirmed, plus the lease, minus a margin for the
//! database's round trip. Its deadline is measured from when the claim or
//! renewal was *sent*, so it is never later than the database's.
//!
//! A replica that stops — `SIGSTOP`, a long GC-like pause, a partition
//! from PostgreSQL — stops renewing; once it resumes, its next fence check
//! fails and the step writes and calls nothing more. Writes it had already
//! started are refused by the version the claim bumped when another
//! replica has claimed the row since.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_core::InstanceId;
use flotilla_store::instance::instance_renew_leases;
use flotilla_telemetry::CancellationToken;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tokio::time::Instant;

/// The lease was lost: the step must stop without writing or calling a
/// provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("lease lost: another replica may hold this instance now")]
pub struct LeaseLost;

/// A step's right to act on its row.
#[derive(Debug, Clone)]
pub struct Fence {
    id: InstanceId,
    deadlines: Arc<Mutex<HashMap<InstanceId, Instant>>>,
}

impl Fence {
    /// A fence that never expires, for steps run outside the driver (tests
    /// that step one row by hand, tools).
    pub fn unbounded(id: InstanceId) -> Fence {
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        Fence {
            id,
            deadlines: Arc::new(Mutex::new(HashMap::from([(id, far)]))),
        }
    }

    /// `Ok` while the lease is held; check it before every provider call.
    pub fn check(&self) -> Result<(), LeaseLost> {
        let deadlines = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
        match deadlines.get(&self.id) {
            Some(until) if Instant::now() < *until => Ok(()),
            _ => {
                metrics::counter!("flotilla_lease_lost_total").increment(1);
                Err(LeaseLost)
            }
        }
    }

    pub fn held(&self) -> bool {
        self.check().is_ok()
    }
}

/// The leases of one claimed batch, renewed while its steps run.
#[derive(Debug)]
pub(crate) struct Leases {
    deadlines: Arc<Mutex<HashMap<InstanceId, Instant>>>,
    lease: Duration,
}

impl Leases {
    /// How much earlier than the database's expiry the holder stops acting.
    fn margin(lease: Duration) -> Duration {
        (lease / 10).min(Duration::from_secs(2))
    }

    /// The batch's leases as claimed at `sent` (when the claim was sent).
    pub(crate) fn new(ids: &[InstanceId], sent: Instant, lease: Duration) -> Leases {
        let until = sent + lease.saturating_sub(Self::margin(lease));
        Leases {
            deadlines: Arc::new(Mutex::new(ids.iter().map(|id| (*id, until)).collect())),
            lease,
        }
    }

    pub(crate) fn fence(&self, id: InstanceId) -> Fence {
        Fence {
            id,
            deadlines: self.deadlines.clone(),
        }
    }

    /// The row's step ended: no more renewals for it.
    pub(crate) fn done(&self, id: InstanceId) {
        self.deadlines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Renews the leases of the steps still running, every third of the
    /// lease, until `stop`, on a connection of its own: taken before the
    /// steps start, so steps holding every pooled connection cannot starve
    /// the renewals of their own leases. A renewal that fails (or no
    /// connection) leaves the deadlines as they were: the steps notice at
    /// their next check.
    pub(crate) async fn renew_until(
        &self,
        conn: Option<PoolConnection<Postgres>>,
        owner: &str,
        stop: CancellationToken,
    ) {
        let Some(mut conn) = conn else {
            stop.cancelled().await;
            return;
        };
        let every = self.lease / 3;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let ids: Vec<InstanceId> = self
                .deadlines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied()
                .collect();
            if ids.is_empty() {
                continue;
            }
            let sent = Instant::now();
            match instance_renew_leases(&mut conn, &ids, owner, self.lease).await {
                Ok(renewed) => {
                    let until = sent + self.lease.saturating_sub(Self::margin(self.lease));
                    let mut deadlines = self.deadlines.lock().unwrap_or_else(|p| p.into_inner());
                    for id in renewed {
                        if let Some(d) = deadlines.get_mut(&id) {
                            *d = until;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, rows = ids.len(), "could not renew leases")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_fence_is_held_until_the_lease_minus_its_margin_from_when_the_claim_was_sent() {
        let id = InstanceId::new();
        let sent = Instant::now();
        let leases = Leases::new(&[id], sent, Duration::from_secs(15));
        let fence = leases.fence(id);
        assert!(fence.held());
        tokio::time::sleep(Duration::from_millis(13_400)).await;
        assert!(fence.held(), "15 s lease, 1.5 s margin");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(fence.check(), Err(LeaseLost));
        leases.done(id);
        assert_eq!(
            fence.check(),
            Err(LeaseLost),
            "a finished step holds nothing"
        );
        assert!(Fence::unbounded(id).held());
    }
}
