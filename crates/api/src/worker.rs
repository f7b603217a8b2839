//! The `WorkerService` the agent on each machine calls: registration, boot
//! phase reports that move the instance towards `ready`, and heartbeats.
//!
//! Design notes: a phase report is level-like. The agent may resend it
//! (after a timeout, a reconnect, a restart), so a report for a phase the
//! instance already reached or passed answers OK and writes nothing. A
//! report moves the row only along the transition table, from whatever
//! state it is in now, so a worker may skip phases it does not have
//! (booting → ready) but can never pull an instance out of teardown.
//! The transition is guarded by the row's version; when another writer
//! (the scheduler, the watchdog) moved it in between, the report is
//! decided again once against the fresh row.

use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_proto::v1::worker_service_server::WorkerService;
use flotilla_store::instance::{Transition, instance_transition};
use flotilla_store::worker::{worker_get, worker_heartbeat, worker_registered};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::correlation_of;
use flotilla_telemetry::propagation::current_trace_headers;
use sqlx::PgConnection;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use tonic::{Request, Response, Status};

use crate::auth::authenticate_worker;
use crate::auth::token_hash;
use crate::error::store_status;
use crate::heartbeat::HeartbeatBatcher;
use crate::{ApiState, validate};

/// The actor of transitions reported by agents.
pub const ACTOR: &str = "worker";
const MAX_GPUS: usize = 16;

#[derive(Debug, Clone)]
pub struct WorkerApi {
    state: ApiState,
    heartbeats: HeartbeatBatcher,
}

impl WorkerApi {
    pub fn new(state: ApiState) -> Self {
        let heartbeats = HeartbeatBatcher::spawn_with(
            state.pool.clone(),
            state.limits.worker_token_cache,
            state.limits.heartbeat_mark_every,
        );
        WorkerApi { state, heartbeats }
    }

    async fn conn(&self) -> Result<PoolConnection<Postgres>, Status> {
        self.state
            .pool
            .acquire()
            .await
            .map_err(|e| store_status(e.into()))
    }
}

/// What a phase report does to an instance in `current`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseStep {
    /// Already at or past that phase: nothing to write.
    AlreadyThere,
    /// The table allows the move.
    Move,
    /// The table forbids it.
    Refused,
}

/// Position among the boot phases; `None` outside them.
fn boot_rank(s: InstanceState) -> Option<u8> {
    match s {
        InstanceState::Booting => Some(0),
        InstanceState::Installing => Some(1),
        InstanceState::Starting => Some(2),
        InstanceState::Ready => Some(3),
        _ => None,
    }
}

pub fn phase_step(current: InstanceState, target: InstanceState) -> PhaseStep {
    if let (Some(now), Some(wanted)) = (boot_rank(current), boot_rank(target))
        && now >= wanted
    {
        return PhaseStep::AlreadyThere;
    }
    if current.can_transition_to(target) {
        PhaseStep::Move
    } else {
        PhaseStep::Refused
    }
}

fn phase_state(phase: i32) -> Result<InstanceState, Status> {
    match v1::WorkerPhase::try_from(phase) {
        Ok(v1::WorkerPhase::Installing) => Ok(InstanceState::Installing),
        Ok(v1::WorkerPhase::Starting) => Ok(InstanceState::Starting),
        Ok(v1::WorkerPhase::Ready) => Ok(InstanceState::Ready),
        Ok(v1::WorkerPhase::Unspecified) | Err(_) => Err(invalid_field(
            "phase",
            "must be INSTALLING, STARTING or READY",
        )),
    }
}

/// Applies one phase report, re-reading once on a version conflict.
/// Returns whether the instance is cordoned.
async fn report(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    id: InstanceId,
    target: InstanceState,
    message: Option<&str>,
    mut current: (InstanceState, i64, bool),
    mark_every: std::time::Duration,
) -> Result<bool, Status> {
    let mut retried = false;
    loop {
        let (state, version, cordoned) = current;
        // A worker can report before the scheduler has recorded that its
        // machine started (the start call returns after the process is up).
        // Its token was issued for the machine being started, so the report
        // proves the start: take the instance through `booting` first.
        let via_booting = state == InstanceState::Provisioning;
        let from = if via_booting {
            InstanceState::Booting
        } else {
            state
        };
        match phase_step(from, target) {
            PhaseStep::AlreadyThere => return Ok(cordoned),
            PhaseStep::Refused => {
                return Err(Status::failed_precondition(format!(
                    "phase: instance {id} is {state}; it cannot become {target}"
                )));
            }
            PhaseStep::Move => {}
        }
        let mut tx = sqlx::Acquire::begin(&mut *conn)
            .await
            .map_err(|e| store_status(e.into()))?;
        let mut version = version;
        if via_booting {
            let booted = Transition {
                id,
                from: InstanceState::Provisioning,
                to: InstanceState::Booting,
                expected_version: version,
                error: None,
                reason: Some("the worker reported before the start was recorded"),
            };
            match instance_transition(&mut tx, ctx, &booted).await {
                Ok(row) => version = row.version,
                Err(StoreError::Conflict(_)) if !retried => {
                    drop(tx);
                    retried = true;
                    let fresh = worker_get(conn, id)
                        .await
                        .map_err(store_status)?
                        .ok_or_else(|| {
                            Status::not_found(format!("instance {id} does not exist"))
                        })?;
                    current = (fresh.state, fresh.version, fresh.cordoned);
                    continue;
                }
                Err(e) => return Err(store_status(e)),
            }
        }
        let transition = Transition {
            id,
            from,
            to: target,
            expected_version: version,
            error: None,
            reason: message,
        };
        match instance_transition(&mut tx, ctx, &transition).await {
            Ok(row) => {
                // The report itself proves the worker alive.
                worker_heartbeat(&mut tx, id, None, mark_every)
                    .await
                    .map_err(store_status)?;
                tx.commit().await.map_err(|e| store_status(e.into()))?;
                if row.state == InstanceState::Ready {
                    flotilla_telemetry::metrics::instance_ready(
                        &row.pool,
                        row.seconds_requested_to_state(),
                    );
                }
                return Ok(row.cordoned);
            }
            Err(StoreError::Conflict(_)) if !retried => {
                drop(tx);
                retried = true;
                let fresh = worker_get(conn, id)
                    .await
                    .map_err(store_status)?
                    .ok_or_else(|| Status::not_found(format!("instance {id} does not exist")))?;
                current = (fresh.state, fresh.version, fresh.cordoned);
            }
            Err(e) => return Err(store_status(e)),
        }
    }
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let req = request.get_ref();
        let id = validate::instance_id("instance_id", &req.instance_id)?;
        validate::max_chars("agent_version", &req.agent_version, 64)?;
        validate::max_chars("hostname", &req.hostname, 255)?;
        let mut conn = self.conn().await?;
        let view = authenticate_worker(&mut conn, request.metadata(), id).await?;
        worker_registered(&mut conn, id, self.state.limits.heartbeat_interval_ms)
            .await
            .map_err(crate::error::store_status)?;
        tracing::info!(instance_id = %id, agent_version = %req.agent_version, hostname = %req.hostname, "agent registered");
        Ok(Response::new(v1::RegisterResponse {
            heartbeat_interval_ms: self.state.limits.heartbeat_interval_ms,
            cordoned: view.cordoned,
        }))
    }

    async fn report_phase(
        &self,
        request: Request<v1::ReportPhaseRequest>,
    ) -> Result<Response<v1::ReportPhaseResponse>, Status> {
        let req = request.get_ref();
        let id = validate::instance_id("instance_id", &req.instance_id)?;
        let target = phase_state(req.phase)?;
        validate::max_chars("message", &req.message, 1024)?;
        let message = (!req.message.is_empty()).then_some(req.message.as_str());
        let mut conn = self.conn().await?;
        let view = authenticate_worker(&mut conn, request.metadata(), id).await?;
        let ctx = WriteCtx::new(ACTOR)
            .with_correlation(correlation_of(request.metadata()))
            .with_trace_headers(current_trace_headers());
        let current = (view.state, view.version, view.cordoned);
        let cordoned = report(
            &mut conn,
            &ctx,
            id,
            target,
            message,
            current,
            self.state.limits.heartbeat_mark_every,
        )
        .await?;
        Ok(Response::new(v1::ReportPhaseResponse { cordoned }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let req = request.get_ref();
        let id = validate::instance_id("instance_id", &req.instance_id)?;
        if req.gpus.len() > MAX_GPUS {
            return Err(invalid_field("gpus", format!("at most {MAX_GPUS} entries")));
        }
        // The hot path: a token verified recently needs no database read.
        let hash = crate::auth::bearer(request.metadata()).map(token_hash);
        let cached = hash.is_some_and(|h| self.heartbeats.token_known(id, &h));
        if !cached {
            let mut conn = self.conn().await?;
            authenticate_worker(&mut conn, request.metadata(), id).await?;
            if let Some(h) = hash {
                self.heartbeats.remember_token(id, h);
            }
        }
        let view = self
            .heartbeats
            .beat(id, req.idle, req.sequence)
            .await?
            .ok_or_else(|| Status::not_found(format!("instance {id} does not exist")))?;
        Ok(Response::new(v1::HeartbeatResponse {
            cordoned: view.cordoned,
            heartbeat_interval_ms: self.state.limits.heartbeat_interval_ms,
            shutdown: told_to_exit(&view),
        }))
    }
}

/// Whether a heartbeat answer tells the worker to exit. Not while a
/// terminating instance is `ready` or `draining`: the drain ends on an idle
/// heartbeat written after the cordon, and a worker that exited on being
/// told to would never send it, holding the drain to its deadline. From
/// `stopping` on (and for an instance that never was ready) it may go.
fn told_to_exit(view: &flotilla_store::worker::WorkerView) -> bool {
    view.desired_state == DesiredState::Terminated
        && !matches!(view.state, InstanceState::Ready | InstanceState::Draining)
}

#[cfg(test)]
mod tests {
    use InstanceState::*;

    use super::*;

    #[test]
    fn a_phase_already_reached_or_passed_is_already_there() {
        assert_eq!(phase_step(Ready, Ready), PhaseStep::AlreadyThere);
        assert_eq!(phase_step(Ready, Installing), PhaseStep::AlreadyThere);
        assert_eq!(phase_step(Starting, Installing), PhaseStep::AlreadyThere);
    }

    #[test]
    fn a_phase_ahead_moves_when_the_table_allows_it_even_skipping() {
        assert_eq!(phase_step(Booting, Installing), PhaseStep::Move);
        assert_eq!(phase_step(Booting, Ready), PhaseStep::Move);
        assert_eq!(phase_step(Installing, Ready), PhaseStep::Move);
    }

    #[test]
    fn a_phase_outside_the_boot_path_is_refused() {
        for s in [
            Requested,
            Provisioning,
            Draining,
            Stopping,
            Terminated,
            Lost,
        ] {
            assert_eq!(phase_step(s, Ready), PhaseStep::Refused, "{s}");
        }
        assert_eq!(phase_step(StartupFailed, Ready), PhaseStep::Refused);
    }

    #[test]
    fn only_the_three_phases_are_accepted() {
        assert_eq!(phase_state(v1::WorkerPhase::Ready as i32).ok(), Some(Ready));
        assert!(phase_state(0).is_err());
        assert!(phase_state(42).is_err());
    }
}
