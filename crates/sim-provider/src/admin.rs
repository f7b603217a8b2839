//! The `/_sim` routes: ground truth, fault control and reset over HTTP, for
//! benchmarks and tools that run the sim as a separate process. They need
//! no token and are never subject to injected faults.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;

use crate::cloud::{Sim, WorkerProbe};
use crate::error::ApiError;
use crate::faults::Faults;

pub(crate) fn routes() -> Router<Sim> {
    Router::new()
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .route("/_sim/apps", get(apps))
        .route("/_sim/apps/{app}", put(add_app).delete(delete_app))
        .route("/_sim/machines", get(machines))
        .route("/_sim/volumes", get(volumes))
        .route("/_sim/machines/{id}/kill", post(kill))
        .route("/_sim/machines/{id}/health", put(set_health))
        .route("/_sim/workers/{id}/healthz", get(worker_healthz))
        .route("/_sim/stats", get(stats))
        .route("/_sim/reset", post(reset))
}

async fn get_faults(State(sim): State<Sim>) -> Response {
    Json(sim.faults()).into_response()
}

/// Replaces the whole fault set; fields left out take their defaults.
async fn put_faults(State(sim): State<Sim>, body: Bytes) -> Result<Response, ApiError> {
    let faults: Faults = serde_json::from_slice(&body).map_err(|err| ApiError::bad_json(&err))?;
    sim.set_faults(faults)
        .map_err(|err| ApiError::BadRequest(err.to_string()))?;
    Ok(Json(sim.faults()).into_response())
}

async fn apps(State(sim): State<Sim>) -> Response {
    Json(sim.apps()).into_response()
}

/// Makes an app exist (idempotent).
async fn add_app(State(sim): State<Sim>, Path(app): Path<String>) -> Response {
    sim.add_app(&app);
    Json(json!({ "ok": true })).into_response()
}

/// Deletes an app and everything in it.
async fn delete_app(State(sim): State<Sim>, Path(app): Path<String>) -> Result<Response, ApiError> {
    if !sim.delete_app(&app) {
        return Err(ApiError::NotFound { what: "app" });
    }
    Ok(Json(json!({ "ok": true })).into_response())
}

async fn machines(State(sim): State<Sim>) -> Response {
    Json(sim.machines()).into_response()
}

async fn volumes(State(sim): State<Sim>) -> Response {
    Json(sim.volumes()).into_response()
}

async fn kill(State(sim): State<Sim>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let killed = sim.kill(&id).ok_or(ApiError::machine_not_found())?;
    Ok(Json(killed).into_response())
}

#[derive(serde::Deserialize)]
struct HealthBody {
    healthy: bool,
}

/// Makes a machine's worker answer its health endpoint as healthy or not.
async fn set_health(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let b: HealthBody = serde_json::from_slice(&body).map_err(|err| ApiError::bad_json(&err))?;
    sim.machine(&id).ok_or(ApiError::machine_not_found())?;
    sim.set_worker_healthy(&id, b.healthy);
    Ok(Json(json!({ "ok": true })).into_response())
}

/// The health endpoint of the worker a machine runs, as a pool's health
/// check URL would reach it on a real machine.
async fn worker_healthz(State(sim): State<Sim>, Path(id): Path<String>) -> Response {
    match sim.probe_worker(&id) {
        WorkerProbe::Up => (StatusCode::OK, "ok").into_response(),
        WorkerProbe::Down => (StatusCode::SERVICE_UNAVAILABLE, "not up").into_response(),
        WorkerProbe::Unknown => (StatusCode::NOT_FOUND, "no such machine").into_response(),
    }
}

async fn stats(State(sim): State<Sim>) -> Response {
    Json(sim.stats()).into_response()
}

async fn reset(State(sim): State<Sim>) -> Response {
    sim.reset();
    Json(json!({ "ok": true })).into_response()
}
