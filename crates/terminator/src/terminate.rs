//! The termination sequence: cordon → drain → stop → wait stopped → delete
//! machine → delete volumes → `terminated`.
//!
//! Design notes: each activation claims instances whose desired state is
//! `terminated` and takes each as far as it can go now, one committed step
//! at a time, so a crash between steps resumes where it stopped. Waiting
//! (a drain, a stop that has not settled) requeues the instance without
//! counting a failure. A refusal (Fly's 412 on deleting a machine that still
//! runs, a volume still bound to a machine being destroyed) is retryable:
//! the row stays where it is with `next_attempt_at` set, and the loop goes
//! on with the others. `terminated` is written only once the provider
//! confirmed the machine gone (404, or `destroyed`) and every volume marked
//! `delete_on_terminate` deleted. Nothing is ever given up: after
//! `TERMINATE_ALERT_AFTER_ATTEMPTS` the row is flagged for an operator and
//! still retried.

use std::time::Duration;

use flotilla_core::{Classify, DesiredState, ErrorClass, InstanceState, ProviderError};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_runtime::Fence;
use flotilla_runtime::reconcile::{Batch, Step, reconcile};
use flotilla_store::instance::{
    ClaimQuery, InstanceRow, Transition, instance_clear_attention, instance_cordon,
    instance_record_failure, instance_release, instance_requeue, instance_transition,
};
use flotilla_store::pool::PoolRow;
use flotilla_store::volume::{volume_mark_deleted, volume_pending_delete, volume_record_failure};
use flotilla_store::warm::warm_return;
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::metrics::VolumeDelete;
use flotilla_telemetry::propagation::current_trace_headers;
use sqlx::PgConnection;

use crate::{SERVICE, Terminator};

use InstanceState as S;

/// States the terminator takes down (`requested` ones are cancelled by the
/// scheduler, which never called the provider for them).
pub const TAKEN_DOWN: &[InstanceState] = &[
    S::Provisioning,
    S::Booting,
    S::Installing,
    S::Starting,
    S::Ready,
    S::Draining,
    S::Stopping,
    S::Stopped,
    S::Deleting,
    S::ProvisioningFailed,
    S::StartupFailed,
    S::WorkerDead,
    S::Lost,
    S::Warm,
];

/// States an idle instance of a pool whose idle action is `stop` passes
/// through on its way back to warm stock (desired state `warm`): drained
/// and stopped like a termination, then `stopped` → `warm` instead of
/// deleted.
pub const RETURNED_TO_WARM: &[InstanceState] = &[S::Ready, S::Draining, S::Stopping, S::Stopped];

/// How far one instance got in this activation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider confirmed everything gone; the row says `terminated`.
    Terminated,
    /// The machine is stopped and the row back in its pool's warm stock.
    Returned,
    /// Waiting on the worker or the provider; looked at again soon.
    Waiting,
    /// A step failed or was refused; retried with backoff.
    Retrying(ErrorClass, String),
    /// The lease ran out (this replica was paused, partitioned or slow):
    /// nothing more was written or asked of the provider.
    Abandoned,
}

/// What one step did.
enum Next {
    /// The row moved on; take the next step now.
    Continue(Box<InstanceRow>),
    Done(Outcome),
}

impl Terminator {
    /// The write context of the current step: the correlation id of the
    /// command that asked for this termination when this process received it.
    fn ctx(&self) -> WriteCtx {
        WriteCtx::new("terminator")
            .with_correlation(flotilla_telemetry::origin::correlation().unwrap_or_default())
            .with_trace_headers(current_trace_headers())
    }

    #[tracing::instrument(skip_all, name = "terminator.terminate")]
    pub async fn terminate_once(&self) -> ActivationStatus {
        let mut status = self
            .take_down_batch(TAKEN_DOWN, DesiredState::Terminated, "terminator.take_down")
            .await;
        // Idle instances going back to warm stock take the same drain and
        // stop; only their last step differs.
        let returned = self
            .take_down_batch(
                RETURNED_TO_WARM,
                DesiredState::Warm,
                "terminator.return_to_warm",
            )
            .await;
        status.found += returned.found;
        status.acted += returned.acted;
        status.already_done += returned.already_done;
        status.errors.extend(returned.errors);
        status.more |= returned.more;
        status
    }

    async fn take_down_batch(
        &self,
        states: &[InstanceState],
        desired: DesiredState,
        span: &'static str,
    ) -> ActivationStatus {
        let batch = Batch {
            claim: ClaimQuery {
                states,
                desired: Some(desired),
                pool: None,
                owner: &self.owner,
                lease: self.tuning.lease(),
                limit: self.tuning.terminator_batch,
            },
            concurrency: self.tuning.terminator_provider_concurrency,
            span,
            step_timeout: self.tuning.step_timeout(),
        };
        reconcile(&self.db, batch, |row, pool, fence| async move {
            Ok(match self.take_down(row, &pool, &fence).await? {
                Outcome::Terminated | Outcome::Returned => Step::Advanced,
                Outcome::Waiting => Step::Waiting,
                Outcome::Retrying(class, e) => Step::Retrying(class, e),
                Outcome::Abandoned => Step::Abandoned,
            })
        })
        .await
    }

    /// Takes one claimed instance as far as it can go now.
    #[tracing::instrument(skip_all, fields(instance_id = %row.id))]
    pub async fn take_down(
        &self,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Outcome, StoreError> {
        let mut conn = self.db.acquire().await?;
        let mut row = row;
        // Each state has at most one step before it either moves on or waits;
        // the bound only guards against a bug looping forever.
        for _ in 0..8 {
            if fence.check().is_err() {
                return Ok(Outcome::Abandoned);
            }
            match self.step(&mut conn, row, pool, fence).await? {
                Next::Continue(next) => row = *next,
                Next::Done(outcome) => return Ok(outcome),
            }
        }
        instance_release(&mut conn, row.id, &self.owner).await?;
        Ok(Outcome::Waiting)
    }

    async fn step(
        &self,
        conn: &mut PgConnection,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Next, StoreError> {
        let force = row.force_terminate;
        match row.state {
            S::Stopped if row.desired_state == DesiredState::Warm => {
                let back = warm_return(conn, &self.ctx(), &row).await?;
                instance_release(conn, back.id, &self.owner).await?;
                tracing::info!(instance_id = %row.id, pool = %row.pool, "idle instance stopped and returned to warm stock");
                metrics::counter!("flotilla_terminator_returned_to_warm_total").increment(1);
                Ok(Next::Done(Outcome::Returned))
            }
            S::Provisioning | S::ProvisioningFailed | S::Lost | S::Stopped => {
                self.move_to(conn, &row, S::Deleting, None).await
            }
            // Warm stock let go: never started, so nothing to drain or
            // stop (and Fly's refusal to delete a started machine cannot
            // apply).
            S::Warm => {
                self.move_to(
                    conn,
                    &row,
                    S::Deleting,
                    Some("warm machine let go: never started"),
                )
                .await
            }
            S::Booting | S::Installing | S::Starting | S::StartupFailed | S::WorkerDead => {
                let to = if force { S::Deleting } else { S::Stopping };
                self.move_to(conn, &row, to, None).await
            }
            S::Ready => {
                instance_cordon(conn, row.id).await?;
                if force {
                    self.move_to(
                        conn,
                        &row,
                        S::Deleting,
                        Some("forced: cordoned, drain skipped"),
                    )
                    .await
                } else {
                    self.move_to(conn, &row, S::Draining, Some("cordoned"))
                        .await
                }
            }
            S::Draining => {
                if force {
                    return self.move_to(conn, &row, S::Deleting, Some("forced")).await;
                }
                let idle_since_cordon = row.worker_idle
                    && row
                        .last_heartbeat
                        .is_some_and(|at| at > row.state_entered_at);
                let deadline = pool
                    .draining_timeout_seconds
                    .map(|s| Duration::from_secs(s.max(0) as u64))
                    .unwrap_or(Duration::from_secs(self.tuning.drain_timeout_seconds));
                let waited = (chrono::Utc::now() - row.state_entered_at)
                    .to_std()
                    .unwrap_or_default();
                if idle_since_cordon {
                    self.move_to(conn, &row, S::Stopping, Some("worker idle"))
                        .await
                } else if waited >= deadline {
                    self.move_to(conn, &row, S::Stopping, Some("drain deadline passed"))
                        .await
                } else {
                    let next = deadline.saturating_sub(waited).min(self.tuning.poll());
                    self.requeue(conn, &row, next).await
                }
            }
            // Force works in every state: a stop that does not settle (or
            // was never asked for) gives way to a forced delete.
            S::Stopping if force => self.move_to(conn, &row, S::Deleting, Some("forced")).await,
            S::Stopping => self.stop(conn, row, pool, fence).await,
            S::Deleting => self.delete(conn, row, pool, fence).await,
            // Not taken down here (the claim never returns them): a
            // requested one is the scheduler's to cancel, an abandoned one
            // no loop's to touch.
            S::Requested | S::Terminated | S::Abandoned => {
                instance_release(conn, row.id, &self.owner).await?;
                Ok(Next::Done(Outcome::Waiting))
            }
        }
    }

    async fn move_to(
        &self,
        conn: &mut PgConnection,
        row: &InstanceRow,
        to: InstanceState,
        reason: Option<&str>,
    ) -> Result<Next, StoreError> {
        let next = instance_transition(
            conn,
            &self.ctx(),
            &Transition {
                id: row.id,
                from: row.state,
                to,
                expected_version: row.version,
                error: None,
                reason,
            },
        )
        .await?;
        Ok(Next::Continue(Box::new(
            self.step_succeeded(conn, next).await?,
        )))
    }

    /// A step went through: a flag raised by the failures before it is over.
    async fn step_succeeded(
        &self,
        conn: &mut PgConnection,
        mut row: InstanceRow,
    ) -> Result<InstanceRow, StoreError> {
        if row.needs_attention && instance_clear_attention(conn, row.id).await? {
            tracing::info!(instance_id = %row.id, "termination moving again; flag cleared");
            row.needs_attention = false;
        }
        Ok(row)
    }

    async fn requeue(
        &self,
        conn: &mut PgConnection,
        row: &InstanceRow,
        after: Duration,
    ) -> Result<Next, StoreError> {
        let at = chrono::Utc::now() + chrono::Duration::from_std(after).unwrap_or_default();
        instance_requeue(conn, row.id, &self.owner, at).await?;
        Ok(Next::Done(Outcome::Waiting))
    }

    /// A failed or refused step: retried with backoff, flagged after the
    /// alert threshold, never abandoned.
    async fn retry(
        &self,
        conn: &mut PgConnection,
        row: &InstanceRow,
        e: ProviderError,
    ) -> Result<Next, StoreError> {
        let attempts = row.attempts + 1;
        let message = e.to_string();
        let updated = instance_record_failure(
            conn,
            &self.ctx(),
            row,
            &message,
            e.class(),
            &self.tuning.error_policy(),
            e.retry_after(),
        )
        .await?;
        if updated.needs_attention && !row.needs_attention {
            tracing::error!(
                instance_id = %row.id, attempts, error = %message,
                "termination keeps failing; an operator should look (still retrying)"
            );
        }
        metrics::counter!(
            "flotilla_terminator_attempts_total",
            "step" => row.state.as_str(), "outcome" => e.kind()
        )
        .increment(1);
        Ok(Next::Done(Outcome::Retrying(e.class(), message)))
    }

    /// Stop, then wait (bounded) for the provider to report it stopped.
    async fn stop(
        &self,
        conn: &mut PgConnection,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Next, StoreError> {
        let Some(machine_id) = row.provider_machine_id.clone() else {
            return self
                .move_to(conn, &row, S::Deleting, Some("no machine recorded"))
                .await;
        };
        let cid = self.ctx().correlation_id;
        let mut client = self.provider.clone();
        if fence.check().is_err() {
            return Ok(Next::Done(Outcome::Abandoned));
        }
        let stopped = client
            .stop_machine(outgoing(
                v1::StopMachineRequest {
                    target: pool.target(),
                    machine_id: machine_id.clone(),
                    grace: Some(prost_types::Duration {
                        seconds: self.tuning.stop_grace_seconds,
                        nanos: 0,
                    }),
                    suspend: false,
                },
                &cid,
            ))
            .await;
        match stopped.map_err(|s| status_to_provider_error(&s)) {
            Ok(_) => {}
            Err(ProviderError::NotFound(_)) => {
                return self
                    .move_to(conn, &row, S::Deleting, Some("machine already gone"))
                    .await;
            }
            Err(e) => return self.retry(conn, &row, e).await,
        }
        let waited = client
            .wait_machine(outgoing(
                v1::WaitMachineRequest {
                    target: pool.target(),
                    machine_id: machine_id.clone(),
                    state: v1::MachineState::Stopped as i32,
                    timeout: Some(prost_types::Duration {
                        seconds: self.tuning.provider_wait_seconds.max(1),
                        nanos: 0,
                    }),
                },
                &cid,
            ))
            .await
            .map_err(|s| status_to_provider_error(&s));
        match waited {
            Ok(_) => self.move_to(conn, &row, S::Stopped, None).await,
            Err(ProviderError::NotFound(_)) => {
                self.move_to(conn, &row, S::Deleting, Some("machine already gone"))
                    .await
            }
            Err(ProviderError::DeadlineExceeded(_)) => {
                // Not settled yet, or settled in a state a stop-wait never
                // sees (failed): ask what it is.
                match self.machine_state(pool, &machine_id).await {
                    Ok(Some(state)) if settled(state) => {
                        self.move_to(conn, &row, S::Stopped, None).await
                    }
                    Ok(None) => {
                        self.move_to(conn, &row, S::Deleting, Some("machine already gone"))
                            .await
                    }
                    Ok(Some(_)) => self.requeue(conn, &row, self.tuning.poll()).await,
                    Err(e) => self.retry(conn, &row, e).await,
                }
            }
            Err(e) => self.retry(conn, &row, e).await,
        }
    }

    /// `None` when the provider says the machine does not exist.
    async fn machine_state(
        &self,
        pool: &PoolRow,
        machine_id: &str,
    ) -> Result<Option<v1::MachineState>, ProviderError> {
        match self
            .provider
            .clone()
            .get_machine(outgoing(
                v1::MachineRef {
                    target: pool.target(),
                    machine_id: machine_id.to_owned(),
                },
                &self.ctx().correlation_id,
            ))
            .await
        {
            Ok(m) => Ok(Some(
                v1::MachineState::try_from(m.into_inner().state)
                    .unwrap_or(v1::MachineState::Unspecified),
            )),
            Err(s) => match status_to_provider_error(&s) {
                ProviderError::NotFound(_) => Ok(None),
                e => Err(e),
            },
        }
    }

    /// Machines this instance may own at the provider: the recorded one, or —
    /// when none was recorded (a crash between create and record) — any
    /// carrying its tag.
    async fn machines_of(
        &self,
        row: &InstanceRow,
        pool: &PoolRow,
    ) -> Result<Vec<String>, ProviderError> {
        if let Some(id) = &row.provider_machine_id {
            return Ok(vec![id.clone()]);
        }
        let found = self
            .provider
            .clone()
            .list_machines(outgoing(
                v1::ListMachinesRequest {
                    target: pool.target(),
                    page_size: 0,
                    page_token: String::new(),
                    instance_id: row.id.to_string(),
                },
                &self.ctx().correlation_id,
            ))
            .await
            .map_err(|s| status_to_provider_error(&s))?;
        Ok(found
            .into_inner()
            .machines
            .into_iter()
            .filter(|m| m.state != v1::MachineState::Destroyed as i32)
            .map(|m| m.id)
            .collect())
    }

    /// Deletes the machine(s), confirms they are gone, deletes the volumes,
    /// and only then writes `terminated`.
    async fn delete(
        &self,
        conn: &mut PgConnection,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Next, StoreError> {
        let machines = match self.machines_of(&row, pool).await {
            Ok(m) => m,
            Err(e) => return self.retry(conn, &row, e).await,
        };
        let cid = self.ctx().correlation_id;
        let mut client = self.provider.clone();
        for machine_id in &machines {
            // Look first: on a retry (a volume still bound, a refused
            // delete) or a requeue while the destroy settles, a machine the
            // provider shows `destroyed` is not deleted again. A 404 is not
            // enough to skip the delete: a gateway or an application-level
            // error can answer it for a machine that runs, and believing it
            // would write `terminated` over a machine left behind. The
            // delete itself is the second look (its own 404 means gone).
            match self.machine_state(pool, machine_id).await {
                Ok(Some(v1::MachineState::Destroyed)) => continue,
                Ok(_) => {}
                Err(e) => return self.retry(conn, &row, e).await,
            }
            if fence.check().is_err() {
                return Ok(Next::Done(Outcome::Abandoned));
            }
            let deleted = client
                .delete_machine(outgoing(
                    v1::DeleteMachineRequest {
                        target: pool.target(),
                        machine_id: machine_id.clone(),
                        force: row.force_terminate,
                    },
                    &cid,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s));
            match deleted {
                Ok(_) | Err(ProviderError::NotFound(_)) => {}
                Err(e @ ProviderError::FailedPrecondition(_)) => {
                    // Still running (restarted behind our back, or a stop
                    // that did not hold): ask it to stop again so the next
                    // attempt can delete it.
                    let _ = client
                        .stop_machine(outgoing(
                            v1::StopMachineRequest {
                                target: pool.target(),
                                machine_id: machine_id.clone(),
                                grace: None,
                                suspend: false,
                            },
                            &cid,
                        ))
                        .await;
                    return self.retry(conn, &row, e).await;
                }
                Err(e) => return self.retry(conn, &row, e).await,
            }
            // Accepted is not gone: confirm before saying so.
            match self.machine_state(pool, machine_id).await {
                Ok(None) | Ok(Some(v1::MachineState::Destroyed)) => {}
                Ok(Some(_)) => return self.requeue(conn, &row, self.tuning.poll()).await,
                Err(e) => return self.retry(conn, &row, e).await,
            }
        }
        let volumes = volume_pending_delete(conn, row.id).await?;
        let mut blocked = None;
        for v in volumes {
            let Some(provider_id) = v.provider_volume_id.clone() else {
                volume_mark_deleted(conn, v.id).await?;
                continue;
            };
            if fence.check().is_err() {
                return Ok(Next::Done(Outcome::Abandoned));
            }
            let started = std::time::Instant::now();
            let deleted = client
                .delete_volume(outgoing(
                    v1::VolumeRef {
                        target: pool.target(),
                        volume_id: provider_id,
                    },
                    &cid,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s));
            let outcome = match &deleted {
                Ok(_) => VolumeDelete::Deleted,
                Err(ProviderError::NotFound(_)) => VolumeDelete::AlreadyGone,
                Err(_) => VolumeDelete::Failed,
            };
            outcome.record(SERVICE, started.elapsed());
            match deleted {
                Ok(_) | Err(ProviderError::NotFound(_)) => volume_mark_deleted(conn, v.id).await?,
                Err(e) => {
                    volume_record_failure(conn, v.id, &e.to_string()).await?;
                    metrics::counter!("flotilla_terminator_volume_delete_failures_total", "outcome" => e.kind())
                        .increment(1);
                    blocked.get_or_insert(e);
                }
            }
        }
        if let Some(e) = blocked {
            return self.retry(conn, &row, e).await;
        }
        let done = instance_transition(
            conn,
            &self.ctx(),
            &Transition {
                id: row.id,
                from: S::Deleting,
                to: S::Terminated,
                expected_version: row.version,
                error: None,
                reason: Some("provider confirmed machine and volumes gone"),
            },
        )
        .await?;
        let done = self.step_succeeded(conn, done).await?;
        instance_release(conn, row.id, &self.owner).await?;
        metrics::counter!("flotilla_terminator_terminated_total", "pool" => row.pool.clone())
            .increment(1);
        if let Some(took) = done.seconds_terminate_requested_to_state() {
            metrics::histogram!("flotilla_instance_termination_seconds", "pool" => row.pool.clone())
                .record(took);
        }
        Ok(Next::Done(Outcome::Terminated))
    }
}

/// Provider states in which the machine no longer runs.
fn settled(state: v1::MachineState) -> bool {
    matches!(
        state,
        v1::MachineState::Stopped
            | v1::MachineState::Suspended
            | v1::MachineState::Failed
            | v1::MachineState::Created
            | v1::MachineState::Destroyed
    )
}
