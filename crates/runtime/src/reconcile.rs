//! The per-instance reconcile driver, written once for every loop that
//! claims instances and steps each: claim due rows with a lease, load
//! their pools once, run a step per row with bounded concurrency (each in
//! the trace of the request stored on its row), and tally what happened into the
//! activation's status.
//!
//! Its rules, the same for every loop:
//! - one row's failure never stops the others;
//! - a step that fails on the database gives its lease back at once (the
//!   usual cause is a lost version race with the worker's own report;
//!   keeping the lease would hide the row for the whole lease);
//! - a row whose pool is missing keeps its lease until it expires, so a
//!   deleted pool costs one error per lease, not one per tick;
//! - pool lookups that fail are recorded as errors of their pool;
//! - every lease is renewed while its step runs, and each step gets the
//!   [`Fence`] it checks before a provider call (see [`crate::lease`]);
//! - a step that runs past the batch's `step_timeout` is dropped and its
//!   lease given back: a call that hangs (a connection a partition killed)
//!   would otherwise keep its row renewed, and the whole batch waiting,
//!   for as long as it hangs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use flotilla_core::CorrelationId;
use flotilla_core::{Classify, ErrorClass, InstanceId};
use flotilla_store::instance::{ClaimQuery, InstanceRow, instance_claim_due, instance_release};
use flotilla_store::pool::{PoolRow, pool_get};
use flotilla_store::{PgPool, StoreError};
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::origin::Origin;
use futures::StreamExt;

use crate::lease::{Fence, Leases};

/// What one step did with its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The instance moved forward.
    Advanced,
    /// Nothing to do yet; the step requeued the row or gave its lease back.
    Waiting,
    /// Someone else (the worker's own report, another replica) already did it.
    AlreadyDone,
    /// The step failed and recorded when it is tried again.
    Retrying(ErrorClass, String),
    /// The step failed for good and handed the instance on (to termination).
    Failed(String),
    /// The step stopped without writing anything more (a test crash point,
    /// or a lease found lost): the row is left as it is for whoever holds
    /// it next.
    Abandoned,
}

/// What the driver claims and how many rows it steps at once.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub claim: ClaimQuery<'a>,
    pub concurrency: usize,
    /// The span each step runs in (a child of the row's origin).
    pub span: &'static str,
    /// Longest one step may run; see the module docs.
    pub step_timeout: std::time::Duration,
}

/// Claims a batch and steps every row of it; see the module docs.
pub async fn reconcile<F, Fut>(db: &PgPool, batch: Batch<'_>, step: F) -> ActivationStatus
where
    F: Fn(InstanceRow, Arc<PoolRow>, Fence) -> Fut,
    Fut: Future<Output = Result<Step, StoreError>>,
{
    let mut status = ActivationStatus::default();
    let sent = tokio::time::Instant::now();
    let claimed = match instance_claim_due(db, &batch.claim).await {
        Ok(rows) => rows,
        Err(e) => {
            status.error(e.class(), "claim", e);
            return status;
        }
    };
    status.found = claimed.len() as u64;
    let claimed_n = claimed.len();
    let ids: Vec<InstanceId> = claimed.iter().map(|r| r.id).collect();
    let leases = Leases::new(&ids, sent, batch.claim.lease);
    let pools = pools_of(db, &claimed, &mut status).await;
    // Before any step takes one: renewals must not wait behind the steps.
    let renew_conn = if claimed.is_empty() {
        None
    } else {
        match db.acquire().await {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "no connection to renew leases; they hold for one lease");
                None
            }
        }
    };
    let renewing = CancellationToken::new();
    let steps = futures::stream::iter(claimed)
        .map(|row| {
            // No answer at all (the connection for the lookups failed)
            // is a database failure too.
            let pool = pools.get(&row.pool).cloned().unwrap_or(PoolLookup::Failed);
            let (step, leases) = (&step, &leases);
            let fence = leases.fence(row.id);
            async move {
                let id = row.id;
                let mut timed_out = false;
                // `Err(None)`: the pool could not be read; already recorded.
                let result = match pool {
                    PoolLookup::Found(pool) => {
                        let f = fence.clone();
                        let origin = row.origin.as_ref().map(|o| Origin {
                            trace_headers: o.trace_headers.clone(),
                            correlation_id: CorrelationId::parse(&o.correlation_id)
                                .unwrap_or_default(),
                        });
                        let item = id.to_string();
                        let stepped =
                            flotilla_telemetry::origin::within(batch.span, &item, origin, async {
                                step(row, pool, f).await.map_err(Some)
                            });
                        match tokio::time::timeout(batch.step_timeout, stepped).await {
                            Ok(result) => result,
                            Err(_) => {
                                timed_out = true;
                                tracing::warn!(
                                    instance_id = %id,
                                    timeout = ?batch.step_timeout,
                                    "step timed out; dropped and its lease given back"
                                );
                                Ok(Step::Retrying(
                                    ErrorClass::Retryable,
                                    format!(
                                        "step did not finish within {:?}; dropped, its lease \
                                         given back",
                                        batch.step_timeout
                                    ),
                                ))
                            }
                        }
                    }
                    PoolLookup::Missing => Ok(Step::Retrying(
                        ErrorClass::Permanent,
                        format!("pool {} not found", row.pool),
                    )),
                    PoolLookup::Failed => Err(None),
                };
                // A failed step gives its lease back only while it is ours.
                let held = fence.held();
                leases.done(id);
                (id, held, timed_out, result)
            }
        })
        .buffer_unordered(batch.concurrency.max(1))
        .collect::<Vec<_>>();
    let steps = async {
        let results = steps.await;
        renewing.cancel();
        results
    };
    let (results, ()) = tokio::join!(
        steps,
        leases.renew_until(renew_conn, batch.claim.owner, renewing.clone())
    );
    for (id, held, timed_out, result) in results {
        if timed_out && held {
            release(db, id, batch.claim.owner).await;
        }
        match result {
            Ok(Step::Advanced) => status.acted += 1,
            Ok(Step::Waiting) | Ok(Step::Abandoned) => {}
            Ok(Step::AlreadyDone) => status.already_done += 1,
            Ok(Step::Retrying(class, e)) => status.error(class, id, e),
            Ok(Step::Failed(e)) => {
                status.acted += 1;
                status.error(ErrorClass::Permanent, id, e);
            }
            Err(e) => {
                if held {
                    release(db, id, batch.claim.owner).await;
                }
                if let Some(e) = e {
                    status.error(e.class(), id, e);
                }
            }
        }
    }
    status.more_if_full(claimed_n, batch.claim.limit);
    status
}

/// A claimed row's pool, as the driver found it.
#[derive(Debug, Clone)]
enum PoolLookup {
    Found(Arc<PoolRow>),
    Missing,
    /// The lookup failed on the database (recorded once, as the pool's error).
    Failed,
}

/// Each claimed row's pool, read once per pool.
async fn pools_of(
    db: &PgPool,
    rows: &[InstanceRow],
    status: &mut ActivationStatus,
) -> HashMap<String, PoolLookup> {
    let mut pools = HashMap::new();
    if rows.is_empty() {
        return pools;
    }
    let mut conn = match db.acquire().await {
        Ok(c) => c,
        Err(e) => {
            let e = StoreError::from(e);
            status.error(e.class(), "pools", e);
            return pools;
        }
    };
    for row in rows {
        if pools.contains_key(&row.pool) {
            continue;
        }
        let lookup = match pool_get(&mut conn, &row.pool).await {
            Ok(Some(p)) => PoolLookup::Found(Arc::new(p)),
            Ok(None) => PoolLookup::Missing,
            Err(e) => {
                status.error(e.class(), &row.pool, e);
                PoolLookup::Failed
            }
        };
        pools.insert(row.pool.clone(), lookup);
    }
    pools
}

/// Gives back the lease of a row whose step ended in a database error.
pub async fn release(db: &PgPool, id: InstanceId, owner: &str) {
    let released = match db.acquire().await {
        Ok(mut conn) => instance_release(&mut conn, id, owner).await.map(|_| ()),
        Err(e) => Err(e.into()),
    };
    if let Err(e) = released {
        tracing::warn!(instance_id = %id, error = %e, "could not release a lease; it will expire");
    }
}
