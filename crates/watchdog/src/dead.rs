//! Dead workers: a `ready` worker silent for the heartbeat timeout becomes
//! suspect, and so does a worker without the agent (ready by its health
//! check, never heartbeated) whose health checks have failed
//! `WORKER_PROBE_FAILURES` times in a row over at least
//! `WORKER_PROBE_FAILURE_WINDOW_SECONDS`; a second signal from the provider
//! confirms it (`worker_dead`, or `lost` when the machine is gone), and it
//! is replaced and terminated. Both kinds go through the same confirmation
//! and storm guard.
//!
//! Design notes: the provider's word is the second signal. A machine that
//! no longer runs confirms at once; a machine that still runs (a hung or
//! paused worker) is given `WORKER_DEAD_CONFIRM_SECONDS` more, so a worker
//! paused and resumed within that time is never replaced. A machine in
//! passing (creating, restarting, updating, replacing, migrated, a state
//! nobody documented) is not yet known: it is looked at again every tick
//! for `WATCHDOG_TRANSIENT_GRACE_SECONDS` after the worker became suspect,
//! and only then counts as not running. A heartbeat
//! clears suspicion. Before any remediation the storm guard looks at the
//! pool: if more than `WATCHDOG_STORM_FRACTION` of its ready workers are
//! suspect at once, it holds (flag, metric, log, and a `dead_verdict_held`
//! row in each held instance's history, once per hold and suspicion)
//! instead of replacing the fleet on a network blip, and resumes when the
//! share drops.

use std::collections::BTreeMap;

use flotilla_core::{Classify, DesiredState, InstanceId, InstanceState, ProviderError};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_store::instance::{
    InstanceRow, NewInstance, Transition, instance_insert_with_provision, instance_release,
    instance_set_desired, instance_transition,
};
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::pool_get;
use flotilla_store::watchdog::{
    HeldVerdict, watchdog_claim_probe_failing, watchdog_claim_silent,
    watchdog_clear_recovered_probed, watchdog_log_held, watchdog_mark_suspect,
    watchdog_pool_suspicion, watchdog_set_storm_hold,
};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::propagation::current_trace_headers;
use prost::Message;
use sqlx::{Acquire, PgConnection};

use crate::Watchdog;

/// Label capacity puts on the instances it manages (it replaces those itself).
use flotilla_core::disruption::MANAGED_LABEL as MANAGED;
/// Label on a replacement, naming the instance it replaces.
pub use flotilla_core::disruption::REPLACES_LABEL;
use flotilla_core::disruption::{Disruption, replacement_name};

impl Watchdog {
    pub(crate) fn ctx(&self) -> WriteCtx {
        WriteCtx::new("watchdog").with_trace_headers(current_trace_headers())
    }

    #[tracing::instrument(skip_all, name = "watchdog.dead_workers")]
    pub async fn dead_workers_once(&self) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let timeout = self.tuning.heartbeat_timeout();
        match self.db.acquire().await {
            Ok(mut conn) => {
                if let Err(e) =
                    watchdog_clear_recovered_probed(&mut conn, timeout, self.tuning.probe_death())
                        .await
                {
                    status.error(e.class(), "clear recovered", e);
                }
            }
            Err(e) => {
                let e = StoreError::from(e);
                status.error(e.class(), "db", e);
                return status;
            }
        }
        let silent = match watchdog_claim_silent(
            &self.db,
            timeout,
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
        let failing = match watchdog_claim_probe_failing(
            &self.db,
            self.tuning.probe_death(),
            &self.owner,
            self.tuning.lease(),
            self.tuning.watchdog_batch,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                status.error(e.class(), "claim failing probes", e);
                Vec::new()
            }
        };
        status.found = (silent.len() + failing.len()) as u64;
        let mut by_pool: BTreeMap<String, Vec<(InstanceRow, Why)>> = BTreeMap::new();
        for (row, why) in silent
            .into_iter()
            .map(|r| (r, Why::Silent))
            .chain(failing.into_iter().map(|r| (r, Why::ProbesFailing)))
        {
            by_pool
                .entry(row.pool.clone())
                .or_default()
                .push((row, why));
        }
        for (pool, rows) in by_pool {
            if let Err(e) = self.handle_pool(&pool, rows, &mut status).await {
                status.error(e.class(), &pool, e);
            }
        }
        status
    }

    async fn handle_pool(
        &self,
        pool: &str,
        rows: Vec<(InstanceRow, Why)>,
        status: &mut ActivationStatus,
    ) -> Result<(), StoreError> {
        let mut conn = self.db.acquire().await?;
        let mut suspects = Vec::with_capacity(rows.len());
        for (row, why) in rows {
            let since = watchdog_mark_suspect(&mut conn, row.id).await?;
            suspects.push((row, why, since));
        }
        let (suspect, ready) = watchdog_pool_suspicion(&mut conn, pool).await?;
        let share = if ready > 0 {
            suspect as f64 / ready as f64
        } else {
            0.0
        };
        metrics::gauge!("flotilla_watchdog_suspect_share", "pool" => pool.to_owned()).set(share);
        let storm = ready >= self.tuning.watchdog_storm_min_instances
            && share > self.tuning.watchdog_storm_fraction;
        if storm {
            let mut tx = conn.begin().await?;
            let began = watchdog_set_storm_hold(&mut tx, pool, true).await?;
            if began {
                tracing::error!(
                    pool,
                    suspect,
                    ready,
                    "storm guard: too many silent workers at once; holding remediation"
                );
            }
            // Into the history of each held instance once per hold and
            // suspicion: all of them when the hold begins, later only the
            // newly suspect (the claim read `suspect_since` before this
            // tick marked it), never once per tick.
            let newly: Vec<uuid::Uuid> = suspects
                .iter()
                .filter(|(row, _, _)| began || row.suspect_since.is_none())
                .map(|(row, _, _)| row.id.0)
                .collect();
            if !newly.is_empty() {
                let reason = format!(
                    "storm guard: {suspect} of {ready} ready workers of pool {pool} suspect at once \
                     (silent or failing health checks); dead verdict held"
                );
                watchdog_log_held(&mut tx, &self.ctx(), &newly, HeldVerdict::Dead, &reason).await?;
            }
            tx.commit().await?;
            metrics::gauge!("flotilla_watchdog_storm_hold", "pool" => pool.to_owned()).set(1.0);
            for (row, _, _) in &suspects {
                instance_release(&mut conn, row.id, &self.owner).await?;
            }
            status.already_done += suspects.len() as u64;
            return Ok(());
        }
        if watchdog_set_storm_hold(&mut conn, pool, false).await? {
            tracing::warn!(pool, suspect, ready, "storm guard released");
        }
        metrics::gauge!("flotilla_watchdog_storm_hold", "pool" => pool.to_owned()).set(0.0);
        let Some(pool_row) = pool_get(&mut conn, pool).await? else {
            return Err(StoreError::NotFound(format!("pool {pool}")));
        };
        for (row, why, since) in suspects {
            match self.confirm(&pool_row, &row, since).await {
                Ok(Some(to)) => {
                    let reason = match (to, why) {
                        (InstanceState::Lost, _) => "machine absent at the provider",
                        (_, Why::Silent) => "no heartbeat and the provider confirms",
                        (_, Why::ProbesFailing) => {
                            "health checks failing and the provider confirms"
                        }
                    };
                    self.declare(&mut conn, &row, to, reason).await?;
                    let latency =
                        chrono::Utc::now() - row.last_heartbeat.unwrap_or(row.state_entered_at);
                    metrics::histogram!("flotilla_watchdog_detection_seconds")
                        .record(latency.num_milliseconds().max(0) as f64 / 1000.0);
                    status.acted += 1;
                }
                Ok(None) => {
                    instance_release(&mut conn, row.id, &self.owner).await?;
                }
                Err(e) => {
                    instance_release(&mut conn, row.id, &self.owner).await?;
                    status.error(e.class(), row.id, e);
                }
            }
        }
        Ok(())
    }

    /// The provider's verdict on a suspect: `Some(state)` to move it to,
    /// or `None` to keep waiting.
    async fn confirm(
        &self,
        pool: &flotilla_store::pool::PoolRow,
        row: &InstanceRow,
        suspect_since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<InstanceState>, ProviderError> {
        let Some(machine_id) = &row.provider_machine_id else {
            return Ok(Some(InstanceState::WorkerDead));
        };
        let got = self
            .provider
            .clone()
            .get_machine(outgoing(
                v1::MachineRef {
                    target: pool.target(),
                    machine_id: machine_id.clone(),
                },
                &self.ctx().correlation_id,
            ))
            .await;
        let state = match got {
            Ok(m) => m.into_inner().state,
            Err(s) => match status_to_provider_error(&s) {
                ProviderError::NotFound(_) => return Ok(Some(InstanceState::Lost)),
                e => return Err(e),
            },
        };
        let suspected_for = (chrono::Utc::now() - suspect_since)
            .to_std()
            .unwrap_or_default();
        let seen = Seen::of(state);
        let verdict = verdict(
            seen,
            suspected_for,
            self.tuning.confirm_grace(),
            self.tuning.transient_grace(),
        );
        if seen == Seen::Transient && verdict.is_none() {
            tracing::info!(
                instance_id = %row.id,
                machine_id,
                state = v1::MachineState::try_from(state).map_or("undocumented", |s| s.as_str_name()),
                ?suspected_for,
                "suspect's machine is in passing; looking again later"
            );
        }
        Ok(verdict)
    }

    /// Moves the instance to `to` and, when recovery is on, hands it to
    /// termination and asks for a replacement — in one transaction.
    pub(crate) async fn declare(
        &self,
        conn: &mut PgConnection,
        row: &InstanceRow,
        to: InstanceState,
        reason: &str,
    ) -> Result<(), StoreError> {
        let ctx = self.ctx();
        let mut tx = conn.begin().await?;
        let moved = instance_transition(
            &mut tx,
            &ctx,
            &Transition {
                id: row.id,
                from: row.state,
                to,
                expected_version: row.version,
                error: Some(reason),
                reason: Some(reason),
            },
        )
        .await?;
        if self.tuning.worker_dead_recovery_enabled {
            instance_set_desired(&mut tx, moved.id, DesiredState::Terminated, false).await?;
            let cmd = v1::TerminateCommand {
                instance_ids: vec![moved.id.to_string()],
                force: false,
                reason: reason.to_owned(),
            };
            outbox_insert(
                &mut tx,
                &ctx,
                flotilla_bus::subjects::TERMINATE,
                &cmd.encode_to_vec(),
            )
            .await?;
            let managed = moved.labels.0.get(MANAGED.0).map(String::as_str) == Some(MANAGED.1);
            // An instance already asked to go away (scaled down, its pool
            // being deleted) is not replaced, nor is one past its max
            // lifetime: its replacement is on the way already.
            let expiring = row.disruption.as_deref() == Some(Disruption::Expiring.as_str());
            let wanted = row.desired_state == DesiredState::Running && !expiring;
            if !managed && wanted {
                // Capacity replaces what it manages; an explicitly requested
                // instance is replaced here, with the same labels.
                let mut labels: BTreeMap<String, String> = moved.labels.0.clone();
                labels.insert(REPLACES_LABEL.to_owned(), moved.id.to_string());
                let new = NewInstance {
                    id: InstanceId::new(),
                    pool: moved.pool.clone(),
                    name: replacement_name(
                        &moved.name,
                        moved.labels.0.contains_key(REPLACES_LABEL),
                    ),
                    provider: moved.provider.clone(),
                    labels,
                    idempotency_key: None,
                    worker_token_hash: None,
                };
                instance_insert_with_provision(&mut tx, &ctx, &[new]).await?;
            }
        }
        instance_release(&mut tx, moved.id, &self.owner).await?;
        tx.commit().await?;
        tracing::warn!(instance_id = %row.id, to = %to, reason, "worker declared gone");
        metrics::counter!("flotilla_watchdog_declared_total", "to" => to.as_str()).increment(1);
        Ok(())
    }
}

/// Why a worker is suspect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// No heartbeat within the timeout.
    Silent,
    /// A worker without the agent whose health checks keep failing.
    ProbesFailing,
}

/// What the provider's answer says about a suspect's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Started or starting: the worker is hung or paused, not gone.
    Running,
    /// On its way between settled states, or a state nobody documented
    /// (including one this build does not know the number of): not yet
    /// known, never evidence of death.
    Transient,
    /// Settled and not running: stopped, suspended, failed, launch failed,
    /// created and never started.
    NotRunning,
    /// Destroyed.
    Gone,
}

impl Seen {
    pub(crate) fn of(state: i32) -> Seen {
        use v1::MachineState as S;
        let Ok(state) = S::try_from(state) else {
            return Seen::Transient;
        };
        match state {
            S::Started | S::Starting => Seen::Running,
            S::Destroyed => Seen::Gone,
            S::Stopped | S::Suspended | S::Failed | S::LaunchFailed | S::Created => {
                Seen::NotRunning
            }
            S::Stopping
            | S::Suspending
            | S::Destroying
            | S::Replacing
            | S::Creating
            | S::Restarting
            | S::Updating
            | S::Replaced
            | S::Migrated
            | S::Unknown
            | S::Unspecified => Seen::Transient,
        }
    }
}

/// The verdict on a suspect from what its machine is and how long it has
/// been suspect: `Some(state)` to move it to, `None` to look again on a
/// later tick. A machine in passing is waited out for `transient_grace`
/// and then counts as not running, so a machine stuck "updating" forever
/// is still replaced, and the storm guard (checked before this) still
/// holds when a whole pool reports it at once.
pub(crate) fn verdict(
    seen: Seen,
    suspected_for: std::time::Duration,
    confirm_grace: std::time::Duration,
    transient_grace: std::time::Duration,
) -> Option<InstanceState> {
    match seen {
        Seen::Gone => Some(InstanceState::Lost),
        Seen::NotRunning => Some(InstanceState::WorkerDead),
        Seen::Running => (suspected_for >= confirm_grace).then_some(InstanceState::WorkerDead),
        Seen::Transient => (suspected_for >= transient_grace).then_some(InstanceState::WorkerDead),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CONFIRM: Duration = Duration::from_secs(30);
    const TRANSIENT: Duration = Duration::from_secs(120);

    fn at(seen: Seen, secs: u64) -> Option<InstanceState> {
        verdict(seen, Duration::from_secs(secs), CONFIRM, TRANSIENT)
    }

    #[test]
    fn every_documented_state_has_its_meaning_and_unknown_ones_are_in_passing() {
        use v1::MachineState as S;
        for s in [S::Started, S::Starting] {
            assert_eq!(Seen::of(s as i32), Seen::Running, "{s:?}");
        }
        for s in [
            S::Stopped,
            S::Suspended,
            S::Failed,
            S::LaunchFailed,
            S::Created,
        ] {
            assert_eq!(Seen::of(s as i32), Seen::NotRunning, "{s:?}");
        }
        assert_eq!(Seen::of(S::Destroyed as i32), Seen::Gone);
        for s in [
            S::Creating,
            S::Restarting,
            S::Updating,
            S::Replacing,
            S::Replaced,
            S::Migrated,
            S::Stopping,
            S::Suspending,
            S::Destroying,
            S::Unknown,
            S::Unspecified,
        ] {
            assert_eq!(Seen::of(s as i32), Seen::Transient, "{s:?}");
        }
        // A number a newer adapter may send that this build does not know.
        assert_eq!(Seen::of(999), Seen::Transient);
    }

    #[test]
    fn a_machine_in_passing_is_waited_out_for_the_transient_grace_only() {
        assert_eq!(at(Seen::Transient, 0), None);
        assert_eq!(at(Seen::Transient, 119), None, "not dead within the grace");
        assert_eq!(at(Seen::Transient, 120), Some(InstanceState::WorkerDead));
        // Settled states keep their meaning at once.
        assert_eq!(at(Seen::NotRunning, 0), Some(InstanceState::WorkerDead));
        assert_eq!(at(Seen::Gone, 0), Some(InstanceState::Lost));
        assert_eq!(at(Seen::Running, 29), None);
        assert_eq!(at(Seen::Running, 30), Some(InstanceState::WorkerDead));
    }
}
