//! The orphan scan, both directions, per provider and region.
//!
//! Design notes: one paginated listing of machines (and of volumes) per
//! scan, never a GET per instance. Provider → database: a machine carrying
//! Flotilla's tag whose instance the database does not have, has as
//! terminal (terminated, or abandoned by an operator), or records with
//! another machine, is an orphan once older than `ORPHAN_GRACE_SECONDS`
//! (younger ones may be mid-provisioning) and is deleted; one whose
//! instance is still provisioning without a machine id is adopted. For a
//! machine of an abandoned instance the grace also counts from the
//! abandonment: the operator gave the instance up believing its provider
//! gone, so a machine still listed is only deleted by a scan a grace period
//! later that lists it again, never on the listing of the moment the
//! operator acted. Its volumes likewise, tracked ones included (unless kept
//! on purpose, `delete_on_terminate` false). Listings cover the providers
//! and regions of the pools, and of deleted pools that held abandoned
//! instances. The database side of this direction is read after the
//! listing, so a machine created and recorded while the listing ran is
//! owned, not an orphan. Database → provider: an instance that should have
//! a running machine, recorded before the listing started, whose machine
//! the listing does not show, is a suspect; [`crate::lost`] decides whether
//! it is `lost`. Volumes likewise. In dry run the scan only reports.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use flotilla_core::tags::{TAG_INSTANCE, TAG_POOL};
use flotilla_core::{Classify, InstanceId, InstanceState, ProviderError};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_store::StoreError;
use flotilla_store::instance::instance_record_adopted_machine;
use flotilla_store::watchdog::{
    Known, KnownVolume, watchdog_known, watchdog_known_volumes, watchdog_live_with_machine,
    watchdog_log_orphan_deleted, watchdog_scan_targets,
};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use flotilla_telemetry::metrics::VolumeDelete;
use uuid::Uuid;

use crate::Watchdog;

/// What one scan found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrphanReport {
    pub orphan_machines: Vec<String>,
    /// Instance type of each orphan machine (same order), for its cost.
    pub orphan_machine_types: Vec<String>,
    /// The pool each orphan machine's tag names (same order; the scanned
    /// pool when it has no tag), for its cost.
    pub orphan_machine_pools: Vec<String>,
    pub deleted_machines: Vec<String>,
    pub adopted_machines: Vec<String>,
    /// Instances declared `lost` (in dry run: that would be).
    pub lost_instances: Vec<InstanceId>,
    /// Live instances whose machine the listing did not show (suspects).
    pub missing_instances: Vec<InstanceId>,
    /// Pools whose lost verdicts the storm guard held.
    pub held_pools: Vec<String>,
    /// Listings that were empty while the database held live machines.
    pub empty_listings: u64,
    pub orphan_volumes: Vec<String>,
    pub deleted_volumes: Vec<String>,
    pub volume_delete_failures: u64,
}

fn age(created: Option<&prost_types::Timestamp>) -> Option<chrono::Duration> {
    let t = created?;
    let at = DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32)?;
    Some(Utc::now() - at)
}

impl Watchdog {
    fn grace(&self) -> chrono::Duration {
        chrono::Duration::from_std(self.tuning.orphan_grace()).unwrap_or_default()
    }

    fn grace_passed(&self, created: Option<&prost_types::Timestamp>) -> bool {
        // Unknown age: never delete on a guess.
        age(created).is_some_and(|a| a >= self.grace())
    }

    /// Whether a resource of an instance in `state` since `since` has waited
    /// out the grace since it was abandoned (true for any other state).
    fn abandoned_long_enough(&self, state: InstanceState, since: DateTime<Utc>) -> bool {
        state != InstanceState::Abandoned || Utc::now() - since >= self.grace()
    }

    #[tracing::instrument(skip_all, name = "watchdog.orphans")]
    pub async fn orphans_once(&self) -> (ActivationStatus, OrphanReport) {
        let mut status = ActivationStatus::default();
        let mut report = OrphanReport::default();
        let targets = match self.db.acquire().await {
            Ok(mut conn) => watchdog_scan_targets(&mut conn).await,
            Err(e) => Err(StoreError::from(e)),
        };
        let targets = match targets {
            Ok(t) => t,
            Err(e) => {
                status.error(e.class(), "pools", e);
                return (status, report);
            }
        };
        for (provider, region, pool) in targets {
            let target = v1::ProviderTarget {
                provider,
                pool,
                region,
            };
            if let Err(e) = self.scan_machines(&target, &mut report, &mut status).await {
                status.error(
                    e.class(),
                    format!("{}/{}", target.provider, target.region),
                    e,
                );
            }
            if self.tuning.volume_reconciliation_enabled
                && let Err(e) = self.scan_volumes(&target, &mut report, &mut status).await
            {
                status.error(
                    e.class(),
                    format!("{}/{} volumes", target.provider, target.region),
                    e,
                );
            }
        }
        metrics::gauge!("flotilla_watchdog_orphan_machines")
            .set(report.orphan_machines.len() as f64);
        metrics::gauge!("flotilla_watchdog_orphan_volumes").set(report.orphan_volumes.len() as f64);
        (status, report)
    }

    async fn list_machines(
        &self,
        target: &v1::ProviderTarget,
    ) -> Result<Vec<v1::Machine>, ProviderError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .provider
                .clone()
                .list_machines(outgoing(
                    v1::ListMachinesRequest {
                        target: Some(target.clone()),
                        page_size: 1000,
                        page_token: token.clone(),
                        instance_id: String::new(),
                    },
                    &self.ctx().correlation_id,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s))?
                .into_inner();
            all.extend(page.machines);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            token = page.next_page_token;
        }
    }

    async fn scan_machines(
        &self,
        target: &v1::ProviderTarget,
        report: &mut OrphanReport,
        status: &mut ActivationStatus,
    ) -> Result<(), ScanError> {
        let started = Utc::now();
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        // Read the live side first: anything recorded before the listing
        // starts must show in it. The owned side is read after it. The rows
        // carry the database's clock, `started` this host's: the margin
        // (ORPHAN_SCAN_CLOCK_SKEW_SECONDS) keeps a skew between the two
        // from making a machine recorded during the listing a suspect.
        let skew = chrono::Duration::from_std(self.tuning.orphan_clock_skew()).unwrap_or_default();
        let live =
            watchdog_live_with_machine(&mut conn, &target.provider, &target.region, started - skew)
                .await?;
        let machines: Vec<v1::Machine> = self
            .list_machines(target)
            .await?
            .into_iter()
            .filter(|m| m.state != v1::MachineState::Destroyed as i32)
            .collect();
        status.found += machines.len() as u64;
        let tagged: Vec<(Uuid, &v1::Machine)> = machines
            .iter()
            .filter_map(|m| {
                m.tags
                    .get(TAG_INSTANCE)
                    .and_then(|t| t.parse().ok())
                    .map(|id| (id, m))
            })
            .collect();
        let ids: Vec<Uuid> = tagged.iter().map(|(id, _)| *id).collect();
        let known: HashMap<Uuid, Known> = watchdog_known(&mut conn, &ids)
            .await?
            .into_iter()
            .map(|k| (k.id, k))
            .collect();
        for (id, m) in &tagged {
            let owner = known.get(id);
            let orphan = match owner {
                None => true,
                Some(k) if k.state.is_terminal() => true,
                Some(k) => k
                    .provider_machine_id
                    .as_deref()
                    .is_some_and(|mine| mine != m.id),
            };
            if let Some(k) = owner
                && k.state == InstanceState::Provisioning
                && k.provider_machine_id.is_none()
                && k.lease_until.is_none_or(|l| l < Utc::now())
            {
                // The create's answer was lost; the row can take it now.
                if !self.tuning.watchdog_dry_run {
                    match instance_record_adopted_machine(
                        &mut conn,
                        &self.ctx(),
                        InstanceId(*id),
                        k.version,
                        &m.id,
                    )
                    .await
                    {
                        Ok(_) => report.adopted_machines.push(m.id.clone()),
                        Err(e) => status.error(e.class(), id, e),
                    }
                }
                continue;
            }
            if !orphan
                || !self.grace_passed(m.created_at.as_ref())
                || owner.is_some_and(|k| !self.abandoned_long_enough(k.state, k.state_entered_at))
            {
                continue;
            }
            report.orphan_machines.push(m.id.clone());
            report.orphan_machine_types.push(m.instance_type.clone());
            report.orphan_machine_pools.push(
                m.tags
                    .get(TAG_POOL)
                    .cloned()
                    .unwrap_or_else(|| target.pool.clone()),
            );
            if self.tuning.watchdog_dry_run {
                tracing::warn!(machine_id = %m.id, instance_id = %id, "dry run: would delete orphan machine");
                continue;
            }
            match self
                .provider
                .clone()
                .delete_machine(outgoing(
                    v1::DeleteMachineRequest {
                        target: Some(target.clone()),
                        machine_id: m.id.clone(),
                        force: true,
                    },
                    &self.ctx().correlation_id,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s))
            {
                Ok(_) | Err(ProviderError::NotFound(_)) => {
                    tracing::warn!(machine_id = %m.id, instance_id = %id, "orphan machine deleted");
                    report.deleted_machines.push(m.id.clone());
                    status.acted += 1;
                    if let Some(k) = owner {
                        let why = orphan_reason(k.state, k.provider_machine_id.as_deref());
                        let reason = format!("machine {} deleted by the orphan scan: {why}", m.id);
                        self.log_orphan_deleted(&mut conn, k.id, &reason, status)
                            .await;
                    }
                }
                Err(e) => status.error(e.class(), &m.id, e),
            }
        }
        // Database → provider: machines that may have vanished.
        self.scan_lost(&mut conn, target, live, &machines, report, status)
            .await
    }

    async fn scan_volumes(
        &self,
        target: &v1::ProviderTarget,
        report: &mut OrphanReport,
        status: &mut ActivationStatus,
    ) -> Result<(), ScanError> {
        let mut conn = self.db.acquire().await.map_err(StoreError::from)?;
        let mut volumes = Vec::new();
        let mut token = String::new();
        loop {
            let page = self
                .provider
                .clone()
                .list_volumes(outgoing(
                    v1::ListVolumesRequest {
                        target: Some(target.clone()),
                        page_size: 1000,
                        page_token: token.clone(),
                    },
                    &self.ctx().correlation_id,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s))?
                .into_inner();
            volumes.extend(page.volumes);
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        let ids: Vec<String> = volumes.iter().map(|v| v.id.clone()).collect();
        let tracked: HashMap<String, KnownVolume> = watchdog_known_volumes(&mut conn, &ids)
            .await?
            .into_iter()
            .map(|k| (k.provider_volume_id.clone(), k))
            .collect();
        let owners: Vec<Uuid> = volumes
            .iter()
            .filter_map(|v| v.tags.get(TAG_INSTANCE).and_then(|t| t.parse().ok()))
            .collect();
        let known: HashMap<Uuid, Known> = watchdog_known(&mut conn, &owners)
            .await?
            .into_iter()
            .map(|k| (k.id, k))
            .collect();
        for v in volumes {
            if v.state == v1::VolumeState::Destroyed as i32 {
                continue;
            }
            // A tracked volume is its instance's to delete, unless that
            // instance was abandoned: then nothing else ever will.
            if let Some(t) = tracked.get(&v.id) {
                let abandoned = t.state == InstanceState::Abandoned && t.delete_on_terminate;
                if !abandoned || !self.abandoned_long_enough(t.state, t.state_entered_at) {
                    continue;
                }
            }
            let owner = v
                .tags
                .get(TAG_INSTANCE)
                .and_then(|t| t.parse::<Uuid>().ok())
                .and_then(|o| known.get(&o));
            let owner_live = owner.is_some_and(|k| !k.state.is_terminal());
            if owner_live
                || !self.grace_passed(v.created_at.as_ref())
                || owner.is_some_and(|k| !self.abandoned_long_enough(k.state, k.state_entered_at))
            {
                continue;
            }
            report.orphan_volumes.push(v.id.clone());
            if self.tuning.watchdog_dry_run {
                tracing::warn!(volume_id = %v.id, "dry run: would delete orphan volume");
                continue;
            }
            let started = std::time::Instant::now();
            let deleted = self
                .provider
                .clone()
                .delete_volume(outgoing(
                    v1::VolumeRef {
                        target: Some(target.clone()),
                        volume_id: v.id.clone(),
                    },
                    &self.ctx().correlation_id,
                ))
                .await
                .map_err(|s| status_to_provider_error(&s));
            let outcome = match &deleted {
                Ok(_) => VolumeDelete::Deleted,
                Err(ProviderError::NotFound(_)) => VolumeDelete::AlreadyGone,
                Err(_) => VolumeDelete::Failed,
            };
            outcome.record(crate::SERVICE, started.elapsed());
            match deleted {
                Ok(_) | Err(ProviderError::NotFound(_)) => {
                    tracing::warn!(volume_id = %v.id, "orphan volume deleted");
                    report.deleted_volumes.push(v.id.clone());
                    status.acted += 1;
                    // The instance it was recorded for, else the one its
                    // tag names, keeps the delete in its history.
                    let of = tracked
                        .get(&v.id)
                        .map(|t| (t.instance_id, t.state))
                        .or(owner.map(|k| (k.id, k.state)));
                    if let Some((instance, state)) = of {
                        let reason = format!(
                            "volume {} deleted by the orphan scan: {}",
                            v.id,
                            orphan_reason(state, None)
                        );
                        self.log_orphan_deleted(&mut conn, instance, &reason, status)
                            .await;
                    }
                }
                Err(e) => {
                    // Retried by the next scan; counted so a stuck one shows.
                    report.volume_delete_failures += 1;
                    metrics::counter!("flotilla_watchdog_volume_delete_failures_total")
                        .increment(1);
                    status.error(e.class(), &v.id, e);
                }
            }
        }
        Ok(())
    }
}

/// Why a resource tagged with an instance the database knows is an orphan.
fn orphan_reason(state: InstanceState, recorded_machine: Option<&str>) -> String {
    match (state, recorded_machine) {
        (InstanceState::Abandoned, _) => {
            "its instance was abandoned (and the grace since has passed)".to_owned()
        }
        (s, _) if s.is_terminal() => format!("its instance is {s}"),
        (_, Some(mine)) => format!("its instance's machine is {mine}, not this one"),
        (s, None) => format!("its instance ({s}) does not own it"),
    }
}

impl Watchdog {
    /// Keeps an orphan delete in the history of the instance whose tag the
    /// resource carried (once per resource). The provider already deleted
    /// it: a failed write is counted as the scan's error, never undoes or
    /// repeats the delete.
    async fn log_orphan_deleted(
        &self,
        conn: &mut sqlx::PgConnection,
        instance: Uuid,
        reason: &str,
        status: &mut ActivationStatus,
    ) {
        if let Err(e) = watchdog_log_orphan_deleted(conn, &self.ctx(), instance, reason).await {
            status.error(e.class(), instance, e);
        }
    }
}

/// A scan step that could not complete.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
}

impl Classify for ScanError {
    fn class(&self) -> flotilla_core::ErrorClass {
        match self {
            ScanError::Store(e) => e.class(),
            ScanError::Provider(e) => e.class(),
        }
    }
}
