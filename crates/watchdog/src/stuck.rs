//! Stuck states: an instance that stays in a transitional state past its
//! timeout is nudged (its owning loop retries now), a bounded number of
//! times; then the watchdog escalates.
//!
//! Design notes: the loops that own these states (scheduler, terminator)
//! already retry with backoff; a stuck row means their retries are not
//! landing — a replica died holding work, a provider that never settles.
//! Nudging costs nothing and is safe (every step is idempotent). The
//! per-instance breaker is `stuck_recoveries`: past `STUCK_MAX_RETRIES`
//! nudges the watchdog stops nudging and escalates — `provisioning` fails
//! (and cleanup follows), `draining` moves on to stopping, `stopping` asks
//! for a forced delete, and `deleting` is flagged for an operator, because
//! a deletion is never given up. Boot phases have their own per-pool
//! deadlines in the scheduler and are not handled here.

use flotilla_core::{Classify, DesiredState, InstanceState};
use flotilla_store::StoreError;
use flotilla_store::instance::{Transition, instance_set_desired, instance_transition};
use flotilla_store::watchdog::{
    watchdog_claim_stuck, watchdog_flag, watchdog_force, watchdog_nudge,
};
use flotilla_telemetry::loops::ActivationStatus;

use crate::Watchdog;

impl Watchdog {
    #[tracing::instrument(skip_all, name = "watchdog.stuck")]
    pub async fn stuck_once(&self) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let stuck = match watchdog_claim_stuck(
            &self.db,
            self.tuning.stuck_timeouts(),
            &self.owner,
            self.tuning.lease(),
            self.tuning.watchdog_batch,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                status.error(e.class(), "claim", e);
                return status;
            }
        };
        status.found = stuck.len() as u64;
        for (row, recoveries) in stuck {
            match self.recover(&row, recoveries).await {
                Ok(()) => status.acted += 1,
                Err(e) => status.error(e.class(), row.id, e),
            }
            metrics::counter!("flotilla_watchdog_stuck_total", "state" => row.state.as_str())
                .increment(1);
        }
        status
    }

    async fn recover(
        &self,
        row: &flotilla_store::instance::InstanceRow,
        recoveries: i32,
    ) -> Result<(), StoreError> {
        let mut conn = self.db.acquire().await?;
        if recoveries <= self.tuning.stuck_max_retries {
            tracing::warn!(instance_id = %row.id, state = %row.state, recoveries, "instance stuck; retrying now");
            return watchdog_nudge(&mut conn, row.id, &self.owner).await;
        }
        let why = format!(
            "stuck in {} since {} after {} retries",
            row.state,
            row.state_entered_at,
            recoveries - 1
        );
        tracing::error!(instance_id = %row.id, %why, "escalating a stuck instance");
        match row.state {
            InstanceState::Provisioning => {
                let failed = instance_transition(
                    &mut conn,
                    &self.ctx(),
                    &Transition {
                        id: row.id,
                        from: InstanceState::Provisioning,
                        to: InstanceState::ProvisioningFailed,
                        expected_version: row.version,
                        error: Some(&why),
                        reason: Some("stuck"),
                    },
                )
                .await?;
                instance_set_desired(&mut conn, failed.id, DesiredState::Terminated, false).await?;
            }
            InstanceState::Draining => {
                instance_transition(
                    &mut conn,
                    &self.ctx(),
                    &Transition {
                        id: row.id,
                        from: InstanceState::Draining,
                        to: InstanceState::Stopping,
                        expected_version: row.version,
                        error: Some(&why),
                        reason: Some("stuck draining"),
                    },
                )
                .await?;
            }
            InstanceState::Stopping => watchdog_force(&mut conn, row.id).await?,
            _ => {}
        }
        // Whatever the escalation, an operator should know.
        watchdog_flag(&mut conn, row.id, &why).await?;
        watchdog_nudge(&mut conn, row.id, &self.owner).await
    }
}
