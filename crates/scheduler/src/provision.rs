//! Provisioning: `requested` → `provisioning` → (create, record, start) → `booting`.
//!
//! Design notes: each step commits before the next provider call, so a crash
//! at any boundary leaves a row that says what may exist:
//! - the intent (`provisioning`) is committed before any provider call;
//! - before each create, the hash of the new machine's worker token is
//!   committed (`instance_prepare_create`); a row found in `provisioning`
//!   without a machine id therefore may have a machine at the provider, so
//!   every attempt after the first looks it up by its ownership tag and
//!   adopts it instead of creating a second one; since listings lag behind
//!   creates, a listing that shows nothing is believed only once the
//!   create it may have missed is `PROVISION_LISTING_SETTLE_SECONDS` old;
//! - the machine id is recorded the moment the create returns;
//! - a start that fails — by error or by a machine that never shows
//!   `started` — leaves the row in `provisioning` with `next_attempt_at` set
//!   by backoff, so the next tick retries it: no window in which the
//!   instance claims to be booting while nothing runs.
//!
//! Attempts are bounded; exhausted (or a permanent error) → `provisioning_failed`
//! with desired state `terminated`, which hands the machine to the terminator.
//!
//! Warm stock (desired state `warm`, see `flotilla_store::warm`) takes the
//! same steps up to the start, and ends in `warm` instead of starting. A
//! warm instance taken by `Provision` comes back as `provisioning` with its
//! machine recorded, so all that is left for it is the start: the provider
//! sees a start, never a second create.

use std::collections::HashMap;

use flotilla_core::{Classify, DesiredState, ErrorClass, InstanceState, ProviderError};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_runtime::reconcile::{Batch, Step, reconcile};
use flotilla_runtime::{Fence, LeaseLost};
use flotilla_store::instance::{
    ClaimQuery, InstanceRow, Transition, instance_create_may_have_been_sent, instance_defer,
    instance_forget_machine, instance_get, instance_prepare_create,
    instance_record_adopted_machine, instance_record_failure, instance_record_machine,
    instance_release, instance_set_desired, instance_transition,
};
use flotilla_store::pool::PoolRow;
use flotilla_store::pool_pause::{
    Admission, FailureKind, instance_hold_for_pause, pool_admit, pool_record_failure,
};
use flotilla_store::volume::{volume_of_instance, volume_record_adopted, volume_record_created};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::propagation::current_trace_headers;
use sha2::{Digest, Sha256};
use sqlx::{Acquire, PgConnection};

use crate::Scheduler;

/// A step boundary at which tests make the scheduler "die": the step stops
/// there, writes nothing more and keeps its lease, like a killed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    AfterIntent,
    /// The data volume exists at the provider but is not recorded.
    AfterVolumeCreate,
    AfterCreate,
    AfterRecord,
    AfterStart,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("crashed at {0:?} (test fault)")]
    Crashed(CrashPoint),
    /// The lease ran out (this replica was paused, partitioned or slow):
    /// the step stops, another replica may hold the row.
    #[error(transparent)]
    LeaseLost(#[from] LeaseLost),
}

/// What one instance's step came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stepped {
    /// Moved on (to `booting`, or `terminated` for a cancelled request).
    Advanced,
    /// Failed; retried at `next_attempt_at`.
    Retrying(ErrorClass, String),
    /// Gave up: `provisioning_failed`, handed to termination.
    Failed(String),
    /// Waits without counting an attempt: its pool is paused (it waits as
    /// `requested`), or a create it may have sent is not listed yet.
    Held(String),
}

pub(crate) fn new_worker_token() -> (String, Vec<u8>) {
    let bytes: [u8; 32] = rand::random();
    let token = hex::encode(bytes);
    let hash = Sha256::digest(token.as_bytes()).to_vec();
    (token, hash)
}

impl Scheduler {
    fn crash(&self, at: CrashPoint) -> Result<(), StepError> {
        if self.crash_after == Some(at) {
            Err(StepError::Crashed(at))
        } else {
            Ok(())
        }
    }

    /// The write context of the current step: the correlation id of the
    /// command that asked for this instance when this process received it.
    fn ctx(&self) -> WriteCtx {
        WriteCtx::new("scheduler")
            .with_correlation(flotilla_telemetry::origin::correlation().unwrap_or_default())
            .with_trace_headers(current_trace_headers())
    }

    /// One activation: claims due `requested`/`provisioning` instances and
    /// steps each; one instance's failure never stops the others.
    #[tracing::instrument(skip_all, name = "scheduler.provision")]
    pub async fn provision_once(&self) -> ActivationStatus {
        let batch = Batch {
            claim: ClaimQuery {
                states: InstanceState::PROVISION_PHASES,
                desired: None,
                pool: None,
                owner: &self.owner,
                lease: self.tuning.lease(),
                limit: self.tuning.scheduler_batch,
            },
            concurrency: self.tuning.provision_concurrency_per_lane(),
            span: "scheduler.provision_instance",
            step_timeout: self.tuning.step_timeout(),
        };
        reconcile(&self.db, batch, |row, pool, fence| async move {
            match self.provision_instance(row, &pool, &fence).await {
                Ok(Stepped::Advanced) => Ok(Step::Advanced),
                Ok(Stepped::Retrying(class, e)) => Ok(Step::Retrying(class, e)),
                Ok(Stepped::Failed(e)) => Ok(Step::Failed(e)),
                Ok(Stepped::Held(_)) => Ok(Step::Waiting),
                Err(StepError::Crashed(_)) | Err(StepError::LeaseLost(_)) => Ok(Step::Abandoned),
                Err(StepError::Store(e)) => Err(e),
            }
        })
        .await
    }

    /// Takes one claimed instance as far as it can go now.
    #[tracing::instrument(skip_all, fields(instance_id = %row.id, state = %row.state))]
    pub async fn provision_instance(
        &self,
        row: InstanceRow,
        pool: &PoolRow,
        fence: &Fence,
    ) -> Result<Stepped, StepError> {
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        let ctx = self.ctx();
        let mut row = row;

        if row.desired_state == DesiredState::Terminated {
            if row.state == InstanceState::Requested {
                // Nothing was ever asked of the provider: nothing to clean up.
                instance_transition(
                    &mut conn,
                    &ctx,
                    &Transition {
                        id: row.id,
                        from: InstanceState::Requested,
                        to: InstanceState::Terminated,
                        expected_version: row.version,
                        error: None,
                        reason: Some("cancelled before provisioning"),
                    },
                )
                .await?;
                return Ok(Stepped::Advanced);
            }
            // A machine may exist: the terminator owns it from here.
            instance_release(&mut conn, row.id, &self.owner).await?;
            return Ok(Stepped::Advanced);
        }

        let fresh = row.state == InstanceState::Requested;
        if fresh {
            // A paused pool gets no new machines: the instance waits where
            // it is, saying why and how the wait ends.
            match pool_admit(&mut conn, &ctx, &pool.name, row.id).await? {
                Admission::Open => {}
                Admission::Probe => {
                    tracing::warn!(pool = %pool.name, "pool paused: this instance goes through as its probe");
                }
                Admission::Held(hold) => {
                    let message = hold.message(&pool.name);
                    let now = chrono::Utc::now();
                    let recheck = now
                        + chrono::Duration::from_std(self.tuning.pause_recheck())
                            .unwrap_or(chrono::Duration::seconds(30));
                    // Due again when the cool-off ends, or after a recheck
                    // interval while a probe decides (a resume makes it
                    // due at once).
                    let retry_at = hold
                        .probe_after
                        .filter(|at| *at > now && hold.probe_instance.is_none())
                        .unwrap_or(recheck);
                    instance_hold_for_pause(&mut conn, row.id, row.version, &message, retry_at)
                        .await?;
                    tracing::debug!(pool = %pool.name, %retry_at, "pool paused; instance held");
                    return Ok(Stepped::Held(message));
                }
            }
            row = instance_transition(
                &mut conn,
                &ctx,
                &Transition {
                    id: row.id,
                    from: InstanceState::Requested,
                    to: InstanceState::Provisioning,
                    expected_version: row.version,
                    error: None,
                    reason: None,
                },
            )
            .await?;
            self.crash(CrashPoint::AfterIntent)?;
        }

        let machine_id = match row.provider_machine_id.clone() {
            Some(id) => id,
            None => {
                let adopted = if fresh {
                    None
                } else {
                    fence.check()?;
                    match self.find_machine(pool, &row).await {
                        Ok(found) => found,
                        Err(e) => return self.fail(&mut conn, row, e).await,
                    }
                };
                if adopted.is_none()
                    && !fresh
                    && let Some(message) = self.listing_not_settled(&mut conn, &row).await?
                {
                    return Ok(Stepped::Held(message));
                }
                let was_adopted = adopted.is_some();
                let id = match adopted {
                    Some(id) => {
                        tracing::info!(machine_id = %id, "adopting a machine an earlier attempt created");
                        // The create (or its user-data call) may have failed
                        // after the machine existed: it may have no
                        // environment, and its token is not known here
                        // (only its hash is). A fresh token is applied
                        // first, then its hash committed; a crash in between
                        // leaves an unstarted machine the next attempt
                        // prepares again.
                        let (token, hash) = new_worker_token();
                        fence.check()?;
                        match self.prepare_machine(pool, &row, &id, token).await {
                            Ok(true) => {
                                row =
                                    instance_prepare_create(&mut conn, row.id, row.version, &hash)
                                        .await?;
                            }
                            // The provider keeps the environment given at
                            // create, whose token hash is already recorded.
                            Ok(false) => {}
                            Err(e) => return self.fail(&mut conn, row, e).await,
                        }
                        id
                    }
                    None => {
                        // The data volume first, recorded the moment it
                        // exists, so the machine can mount it and a crash
                        // leaves nothing untracked.
                        fence.check()?;
                        let volumes = match self.ensure_volume(&mut conn, pool, &row, fresh).await?
                        {
                            Ok(v) => v,
                            Err(e) => return self.fail(&mut conn, row, e).await,
                        };
                        let (token, hash) = new_worker_token();
                        row =
                            instance_prepare_create(&mut conn, row.id, row.version, &hash).await?;
                        fence.check()?;
                        match self.create_machine(pool, &row, token, volumes).await {
                            Ok(id) => id,
                            Err(e) => return self.fail(&mut conn, row, e).await,
                        }
                    }
                };
                self.crash(CrashPoint::AfterCreate)?;
                row = if was_adopted {
                    instance_record_adopted_machine(&mut conn, &ctx, row.id, row.version, &id)
                        .await?
                } else {
                    instance_record_machine(&mut conn, row.id, row.version, &id).await?
                };
                self.crash(CrashPoint::AfterRecord)?;
                id
            }
        };

        if row.desired_state == DesiredState::Warm {
            // Warm stock: created and recorded, deliberately not started
            // (see `flotilla_store::warm`); `Provision` takes it later.
            let held = instance_transition(
                &mut conn,
                &ctx,
                &Transition {
                    id: row.id,
                    from: InstanceState::Provisioning,
                    to: InstanceState::Warm,
                    expected_version: row.version,
                    error: None,
                    reason: Some("held in warm stock: created, not started"),
                },
            )
            .await?;
            instance_release(&mut conn, held.id, &self.owner).await?;
            metrics::counter!("flotilla_scheduler_warm_machines_created_total").increment(1);
            return Ok(Stepped::Advanced);
        }

        fence.check()?;
        match self.start_machine(pool, &machine_id).await {
            Ok(()) => {}
            Err(ProviderError::NotFound(e)) => {
                // The machine is gone (deleted behind our back): forget it so
                // the next attempt creates a new one.
                row = instance_forget_machine(&mut conn, row.id, row.version).await?;
                return self.fail(&mut conn, row, ProviderError::NotFound(e)).await;
            }
            Err(e) => return self.fail(&mut conn, row, e).await,
        }
        self.crash(CrashPoint::AfterStart)?;
        let booted = instance_transition(
            &mut conn,
            &ctx,
            &Transition {
                id: row.id,
                from: InstanceState::Provisioning,
                to: InstanceState::Booting,
                expected_version: row.version,
                error: None,
                reason: None,
            },
        )
        .await;
        match booted {
            Ok(_) => {}
            // The worker reported first and the api recorded the start: the
            // step is done, by someone else.
            Err(StoreError::Conflict(_))
                if instance_get(&mut conn, row.id)
                    .await?
                    .is_some_and(|r| InstanceState::LIVE.contains(&r.state)) => {}
            Err(e) => return Err(e.into()),
        }
        instance_release(&mut conn, row.id, &self.owner).await?;
        metrics::counter!("flotilla_scheduler_machines_started_total").increment(1);
        Ok(Stepped::Advanced)
    }

    /// The pool's data volume for this instance (none when the pool asks
    /// for no volume): the one already recorded, else one an earlier
    /// attempt created but did not record (found by its ownership tag),
    /// else a new one. The outer error stops the step, the inner (the
    /// provider's) (recorded on the row as a failed attempt).
    async fn ensure_volume(
        &self,
        conn: &mut sqlx::PgConnection,
        pool: &PoolRow,
        row: &InstanceRow,
        fresh: bool,
    ) -> Result<Result<Vec<String>, ProviderError>, StepError> {
        if pool.volume_size_gb <= 0 {
            return Ok(Ok(Vec::new()));
        }
        if let Some(v) = volume_of_instance(conn, row.id).await? {
            return Ok(Ok(v.provider_volume_id.into_iter().collect()));
        }
        let adopted = if fresh {
            None
        } else {
            match self.find_volume(pool, row).await {
                Ok(found) => found,
                Err(e) => return Ok(Err(e)),
            }
        };
        let was_adopted = adopted.is_some();
        let id = match adopted {
            Some(id) => {
                tracing::info!(volume_id = %id, "adopting a volume an earlier attempt created");
                id
            }
            None => {
                let created = self
                    .provider
                    .clone()
                    .create_volume(outgoing(
                        v1::CreateVolumeRequest {
                            target: pool.target(),
                            instance_id: row.id.to_string(),
                            name: row.name.clone(),
                            size_gb: pool.volume_size_gb as u32,
                            tags: HashMap::new(),
                        },
                        &self.ctx().correlation_id,
                    ))
                    .await;
                match created {
                    Ok(v) => v.into_inner().id,
                    Err(s) => return Ok(Err(status_to_provider_error(&s))),
                }
            }
        };
        self.crash(CrashPoint::AfterVolumeCreate)?;
        if was_adopted {
            volume_record_adopted(conn, &self.ctx(), row.id, &id, pool.volume_size_gb).await?;
        } else {
            volume_record_created(conn, row.id, &id, pool.volume_size_gb).await?;
        }
        Ok(Ok(vec![id]))
    }

    /// A live volume carrying this instance's ownership tag, if any.
    async fn find_volume(
        &self,
        pool: &PoolRow,
        row: &InstanceRow,
    ) -> Result<Option<String>, ProviderError> {
        let want = row.id.to_string();
        let mut page_token = String::new();
        loop {
            let page = self
                .provider
                .clone()
                .list_volumes(outgoing(
                    v1::ListVolumesRequest {
                        target: pool.target(),
                        page_size: 0,
                        page_token: page_token.clone(),
                    },
                    &self.ctx().correlation_id,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s))?
                .into_inner();
            if let Some(v) = page.volumes.into_iter().find(|v| {
                v.tags
                    .get(flotilla_core::tags::TAG_INSTANCE)
                    .map(String::as_str)
                    == Some(&want)
                    // A Scaleway server's root volume carries the instance
                    // tag too; it is never the data volume.
                    && !v.tags.contains_key(flotilla_core::tags::TAG_VOLUME_ROLE)
                    && v.state != v1::VolumeState::Destroying as i32
                    && v.state != v1::VolumeState::Destroyed as i32
            }) {
                return Ok(Some(v.id));
            }
            if page.next_page_token.is_empty() {
                return Ok(None);
            }
            page_token = page.next_page_token;
        }
    }

    /// Listings lag behind creates (Fly documents no consistency between
    /// its list and get endpoints): a listing's silence proves no machine
    /// only for creates older than `PROVISION_LISTING_SETTLE_SECONDS`. When
    /// an earlier attempt may have sent a create and the row's last write
    /// (at or after that create) is younger, the attempt is put off until
    /// then — no attempt counted — and the listing asked again, instead of
    /// a second machine created. `Some(reason)` when deferred.
    async fn listing_not_settled(
        &self,
        conn: &mut PgConnection,
        row: &InstanceRow,
    ) -> Result<Option<String>, StepError> {
        let settle = chrono::Duration::from_std(self.tuning.listing_settle())
            .unwrap_or(chrono::Duration::zero());
        let settled_at = row.updated_at + settle;
        if settled_at <= chrono::Utc::now()
            || !instance_create_may_have_been_sent(conn, row.id).await?
        {
            return Ok(None);
        }
        let message = format!(
            "a create may have been sent (last write {}) and the listing shows no machine \
             yet; asking it again at {settled_at} before creating another",
            row.updated_at
        );
        instance_defer(conn, row.id, row.version, settled_at, &message).await?;
        tracing::info!(instance_id = %row.id, %settled_at, "listing not settled; adoption deferred");
        metrics::counter!("flotilla_scheduler_adoption_deferred_total").increment(1);
        Ok(Some(message))
    }

    async fn find_machine(
        &self,
        pool: &PoolRow,
        row: &InstanceRow,
    ) -> Result<Option<String>, ProviderError> {
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
            .map_err(|s| status_to_provider_error(&s))?
            .into_inner()
            .machines;
        let mut live: Vec<_> = found
            .into_iter()
            .filter(|m| m.state != v1::MachineState::Destroyed as i32)
            .collect();
        live.sort_by_key(|m| m.created_at.map(|t| (t.seconds, t.nanos)));
        if live.len() > 1 {
            // Never expected; the orphan scan deletes the ones not recorded.
            tracing::error!(
                count = live.len(),
                "several machines carry this instance's tag"
            );
        }
        Ok(live.into_iter().next().map(|m| m.id))
    }

    /// What a worker needs to register: its instance id and token, and
    /// where the api is.
    fn worker_env(&self, row: &InstanceRow, token: String) -> HashMap<String, String> {
        let mut env = HashMap::from([
            ("FLOTILLA_INSTANCE_ID".to_owned(), row.id.to_string()),
            ("FLOTILLA_WORKER_TOKEN".to_owned(), token),
            ("FLOTILLA_API_URL".to_owned(), self.worker_api_url.clone()),
            ("FLOTILLA_POOL".to_owned(), row.pool.clone()),
        ]);
        // The CA is public; a worker has no file of it, so it travels as PEM.
        if let Some(ca) = self.tuning.worker_api_ca.as_ref().filter(|c| !c.is_empty()) {
            env.insert("FLOTILLA_API_CA".to_owned(), ca.clone());
        }
        env
    }

    /// (Re)applies the worker environment to an adopted machine; whether
    /// the provider applied it (see `PrepareMachine`).
    async fn prepare_machine(
        &self,
        pool: &PoolRow,
        row: &InstanceRow,
        id: &str,
        token: String,
    ) -> Result<bool, ProviderError> {
        let req = v1::PrepareMachineRequest {
            target: pool.target(),
            machine_id: id.to_owned(),
            env: self.worker_env(row, token),
        };
        Ok(self
            .provider
            .clone()
            .prepare_machine(outgoing(req, &self.ctx().correlation_id))
            .await
            .map_err(|s| status_to_provider_error(&s))?
            .into_inner()
            .applied)
    }

    async fn create_machine(
        &self,
        pool: &PoolRow,
        row: &InstanceRow,
        token: String,
        volume_ids: Vec<String>,
    ) -> Result<String, ProviderError> {
        let env = self.worker_env(row, token);
        let req = v1::CreateMachineRequest {
            target: pool.target(),
            instance_id: row.id.to_string(),
            name: row.name.clone(),
            instance_type: pool.instance_type.clone(),
            image: pool.image.clone(),
            env,
            tags: HashMap::new(),
            volume_ids,
            start: false,
        };
        let m = self
            .provider
            .clone()
            .create_machine(outgoing(req, &self.ctx().correlation_id))
            .await
            .map_err(|s| status_to_provider_error(&s))?
            .into_inner();
        metrics::counter!("flotilla_scheduler_machines_created_total").increment(1);
        Ok(m.id)
    }

    /// Starts the machine and succeeds only once it is started. A refusal
    /// because it is already running (a retry after a crash past the start)
    /// counts as started when the provider shows it so.
    async fn start_machine(&self, pool: &PoolRow, id: &str) -> Result<(), ProviderError> {
        let mref = v1::MachineRef {
            target: pool.target(),
            machine_id: id.to_owned(),
        };
        let cid = self.ctx().correlation_id;
        match self
            .provider
            .clone()
            .start_machine(outgoing(mref.clone(), &cid))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) => {
                let e = status_to_provider_error(&s);
                if let ProviderError::FailedPrecondition(_) = e {
                    let m = self
                        .provider
                        .clone()
                        .get_machine(outgoing(mref, &cid))
                        .await
                        .map_err(|s| status_to_provider_error(&s))?
                        .into_inner();
                    if m.state == v1::MachineState::Started as i32 {
                        return Ok(());
                    }
                }
                Err(e)
            }
        }
    }

    /// Records a failed attempt: retried later with backoff, or — attempts
    /// exhausted or the error permanent — `provisioning_failed`, handed to
    /// termination.
    async fn fail(
        &self,
        conn: &mut PgConnection,
        row: InstanceRow,
        e: ProviderError,
    ) -> Result<Stepped, StepError> {
        let class = e.class();
        let attempts = row.attempts + 1;
        let message = e.to_string();
        if class == ErrorClass::Permanent || attempts >= self.tuning.provision_max_attempts {
            // The instance's failure and its pool's failure count commit
            // together: the failure that trips the pause pauses it.
            let mut tx = conn.begin().await.map_err(StoreError::from)?;
            let ctx = self.ctx();
            let failed = instance_transition(
                &mut tx,
                &ctx,
                &Transition {
                    id: row.id,
                    from: InstanceState::Provisioning,
                    to: InstanceState::ProvisioningFailed,
                    expected_version: row.version,
                    error: Some(&message),
                    reason: Some("provisioning attempts exhausted"),
                },
            )
            .await?;
            instance_set_desired(&mut tx, failed.id, DesiredState::Terminated, false).await?;
            instance_release(&mut tx, failed.id, &self.owner).await?;
            let outcome = pool_record_failure(
                &mut tx,
                &ctx,
                &failed.pool,
                failed.id,
                FailureKind::ProvisioningFailed,
                &message,
                &self.tuning.pause_policy(),
            )
            .await?;
            tx.commit().await.map_err(StoreError::from)?;
            crate::report_pool_failure(&failed.pool, &outcome);
            tracing::warn!(attempts, error = %message, "provisioning failed; handed to termination");
            return Ok(Stepped::Failed(message));
        }
        let updated = instance_record_failure(
            conn,
            &self.ctx(),
            &row,
            &message,
            class,
            &self.tuning.error_policy(),
            e.retry_after(),
        )
        .await?;
        tracing::info!(attempts, next_attempt_at = %updated.next_attempt_at, error = %message,
            "provisioning step failed; will retry");
        metrics::counter!("flotilla_scheduler_retries_total", "class" => class.as_str())
            .increment(1);
        Ok(Stepped::Retrying(class, message))
    }
}
