//! Boot supervision: a machine that does not reach `ready` within its
//! pool's phase deadline is `startup_failed`; it is restarted a bounded
//! number of times, then handed to termination (the pool's capacity loop
//! creates a replacement).
//!
//! Design notes: progress through booting → installing → starting → ready
//! is written by the api from what the worker reports; this loop only
//! handles the silence. Deadlines are per pool (defaults from the
//! environment) and evaluated in SQL, so the scan is one indexed query.

use flotilla_core::{Classify, DesiredState, InstanceState};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_runtime::Fence;
use flotilla_runtime::reconcile::{Batch, Step, reconcile};
use flotilla_store::instance::{
    ClaimQuery, InstanceRow, Transition, instance_claim_overdue_boot, instance_record_failure,
    instance_release, instance_set_desired_at_version, instance_times_entered, instance_transition,
};
use flotilla_store::pool::PoolRow;
use flotilla_store::pool_pause::{FailureKind, pool_record_failure};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use sqlx::Acquire;

use crate::Scheduler;

impl Scheduler {
    /// One activation: overdue boot phases → `startup_failed`; then
    /// `startup_failed` instances restarted or handed to termination.
    #[tracing::instrument(skip_all, name = "scheduler.boot")]
    pub async fn boot_once(&self) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let ctx = WriteCtx::new("scheduler");
        let mut fullest = 0;
        match instance_claim_overdue_boot(
            &self.db,
            self.tuning.boot_deadlines(),
            &self.owner,
            self.tuning.lease(),
            self.tuning.scheduler_batch,
        )
        .await
        {
            Ok(rows) => {
                status.found += rows.len() as u64;
                fullest = fullest.max(rows.len());
                for row in rows {
                    match self.mark_startup_failed(&ctx, &row).await {
                        Ok(()) => status.acted += 1,
                        Err(e) => {
                            self.release_after_error(row.id).await;
                            status.error(e.class(), row.id, e)
                        }
                    }
                }
            }
            Err(e) => status.error(e.class(), "claim overdue", e),
        }
        let restarts = reconcile(
            &self.db,
            Batch {
                claim: ClaimQuery {
                    states: &[InstanceState::StartupFailed],
                    desired: Some(DesiredState::Running),
                    pool: None,
                    owner: &self.owner,
                    lease: self.tuning.lease(),
                    limit: self.tuning.scheduler_batch,
                },
                concurrency: self.tuning.provision_concurrency_per_lane(),
                span: "scheduler.recover_startup",
                step_timeout: self.tuning.step_timeout(),
            },
            |row, pool, fence| {
                let ctx = ctx.clone();
                async move { self.recover_startup(&ctx, row, &pool, &fence).await }
            },
        )
        .await;
        status.found += restarts.found;
        status.acted += restarts.acted;
        status.already_done += restarts.already_done;
        status.errors.extend(restarts.errors);
        if restarts.more {
            fullest = fullest.max(self.tuning.scheduler_batch.max(0) as usize);
        }
        status.more_if_full(fullest, self.tuning.scheduler_batch);
        status
    }

    async fn mark_startup_failed(
        &self,
        ctx: &WriteCtx,
        row: &InstanceRow,
    ) -> Result<(), StoreError> {
        let mut conn = self.db.acquire().await?;
        let error = format!(
            "no progress from {} within the pool's deadline (entered at {})",
            row.state, row.state_entered_at
        );
        // The instance's failure and its pool's failure count commit
        // together: the failure that trips the pause pauses it.
        let mut tx = conn.begin().await?;
        instance_transition(
            &mut tx,
            ctx,
            &Transition {
                id: row.id,
                from: row.state,
                to: InstanceState::StartupFailed,
                expected_version: row.version,
                error: Some(&error),
                reason: Some("boot phase deadline"),
            },
        )
        .await?;
        instance_release(&mut tx, row.id, &self.owner).await?;
        let outcome = pool_record_failure(
            &mut tx,
            ctx,
            &row.pool,
            row.id,
            FailureKind::StartupFailed,
            &error,
            &self.tuning.pause_policy(),
        )
        .await?;
        tx.commit().await?;
        crate::report_pool_failure(&row.pool, &outcome);
        tracing::warn!(instance_id = %row.id, %error, "startup failed");
        Ok(())
    }

    /// Restarts the machine (stop, wait stopped, start) and goes back to
    /// `booting`, unless the instance has failed too often or its pool is
    /// paused (a paused pool spends nothing more on machines that do not
    /// start; the replacement waits with the pool).
    async fn recover_startup(
        &self,
        ctx: &WriteCtx,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Step, StoreError> {
        let mut conn = self.db.acquire().await?;
        let failures =
            instance_times_entered(&mut conn, row.id, InstanceState::StartupFailed).await?;
        let Some(machine_id) = row
            .provider_machine_id
            .clone()
            .filter(|_| failures <= self.tuning.startup_max_retries && pool.paused_at.is_none())
        else {
            // One transaction: a crash between the two would leave a row
            // no loop claims (desired terminated, leased until expiry is
            // fine, but a release without the desired state is not).
            let mut tx = conn.begin().await?;
            instance_set_desired_at_version(&mut tx, row.id, row.version, DesiredState::Terminated)
                .await?;
            instance_release(&mut tx, row.id, &self.owner).await?;
            tx.commit().await?;
            let paused = pool.paused_at.is_some();
            tracing::warn!(instance_id = %row.id, failures, paused, "startup failed too often, or its pool is paused; terminating");
            return Ok(Step::Advanced);
        };
        let target = pool.target();
        let cid = ctx.correlation_id.clone();
        let mut client = self.provider.clone();
        let restarted = async {
            fence.check().map_err(|_| Restart::LeaseLost)?;
            client
                .stop_machine(outgoing(
                    v1::StopMachineRequest {
                        target: target.clone(),
                        machine_id: machine_id.clone(),
                        grace: Some(prost_types::Duration {
                            seconds: self.tuning.startup_restart_stop_grace_seconds.min(60) as i64,
                            nanos: 0,
                        }),
                        suspend: false,
                    },
                    &cid,
                ))
                .await?;
            client
                .wait_machine(outgoing(
                    v1::WaitMachineRequest {
                        target: target.clone(),
                        machine_id: machine_id.clone(),
                        state: v1::MachineState::Stopped as i32,
                        timeout: Some(prost_types::Duration {
                            seconds: self
                                .tuning
                                .startup_restart_stop_timeout_seconds
                                .clamp(1, 60) as i64,
                            nanos: 0,
                        }),
                    },
                    &cid,
                ))
                .await?;
            fence.check().map_err(|_| Restart::LeaseLost)?;
            client
                .start_machine(outgoing(
                    v1::MachineRef {
                        target: target.clone(),
                        machine_id: machine_id.clone(),
                    },
                    &cid,
                ))
                .await?;
            Ok::<_, Restart>(())
        }
        .await;
        match restarted {
            Err(Restart::LeaseLost) => Ok(Step::Abandoned),
            Ok(()) => {
                let mut tx = conn.begin().await?;
                instance_transition(
                    &mut tx,
                    ctx,
                    &Transition {
                        id: row.id,
                        from: InstanceState::StartupFailed,
                        to: InstanceState::Booting,
                        expected_version: row.version,
                        error: None,
                        reason: Some("machine restarted after a startup failure"),
                    },
                )
                .await?;
                instance_release(&mut tx, row.id, &self.owner).await?;
                tx.commit().await?;
                Ok(Step::Advanced)
            }
            Err(Restart::Call(s)) => {
                let e = status_to_provider_error(&s);
                let message = e.to_string();
                let mut tx = conn.begin().await?;
                instance_record_failure(
                    &mut tx,
                    ctx,
                    &row,
                    &message,
                    e.class(),
                    &self.tuning.error_policy(),
                    e.retry_after(),
                )
                .await?;
                let outcome = pool_record_failure(
                    &mut tx,
                    ctx,
                    &row.pool,
                    row.id,
                    FailureKind::RestartFailed,
                    &message,
                    &self.tuning.pause_policy(),
                )
                .await?;
                tx.commit().await?;
                crate::report_pool_failure(&row.pool, &outcome);
                Ok(Step::Retrying(e.class(), message))
            }
        }
    }
}

/// Why a restart stopped.
enum Restart {
    /// The lease ran out before a provider call: nothing more is done.
    LeaseLost,
    Call(tonic::Status),
}

impl From<tonic::Status> for Restart {
    fn from(s: tonic::Status) -> Self {
        Restart::Call(s)
    }
}
