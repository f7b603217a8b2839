//! The `/v1` routes: Fly's Machines API paths and bodies, the bearer-token
//! check, and the per-request faults (latency, injected errors) applied
//! before a handler acts.

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::cloud::{MachineFilter, Sim};
use crate::error::ApiError;
use crate::faults::{Injected, Operation, chance};
use crate::model::{
    CreateMachineRequest, CreateVolumeRequest, MachineState, StartResponse, StopRequest,
};
use crate::schema;

pub(crate) fn routes() -> Router<Sim> {
    Router::new()
        .route("/v1/apps/{app}", get(get_app))
        .route(
            "/v1/apps/{app}/machines",
            get(list_machines).post(create_machine),
        )
        .route(
            "/v1/apps/{app}/machines/{id}",
            get(get_machine).delete(destroy_machine),
        )
        .route("/v1/apps/{app}/machines/{id}/start", post(start_machine))
        .route("/v1/apps/{app}/machines/{id}/stop", post(stop_machine))
        .route(
            "/v1/apps/{app}/machines/{id}/suspend",
            post(suspend_machine),
        )
        .route("/v1/apps/{app}/machines/{id}/wait", get(wait_machine))
        .route(
            "/v1/apps/{app}/volumes",
            get(list_volumes).post(create_volume),
        )
        .route(
            "/v1/apps/{app}/volumes/{id}",
            get(get_volume).delete(destroy_volume),
        )
}

type AppPath = Result<Path<String>, PathRejection>;
type ItemPath = Result<Path<(String, String)>, PathRejection>;

/// Fly's `wait` accepts 1 to 60 seconds and defaults to 60.
const WAIT_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=60;

/// Runs one API call: latency, auth and injected errors first, then `work`
/// unless one of them answered; counts the answer either way.
async fn guarded(
    sim: &Sim,
    op: Operation,
    headers: &HeaderMap,
    work: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    guarded_machine(sim, op, headers, None, work).await
}

/// [`guarded`] for a call on one machine, which Fly's per-machine rate
/// limits apply to (after the token check, before anything else).
async fn guarded_machine(
    sim: &Sim,
    op: Operation,
    headers: &HeaderMap,
    machine: Option<(String, String)>,
    work: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    let _in_flight = sim.call_started();
    let admitted = match admit(sim, op, headers).await {
        Ok(()) => match &machine {
            Some((app, id)) => sim.rate_limit(app, id, op),
            None => Ok(()),
        },
        Err(refused) => Err(refused),
    };
    let response = match admitted {
        Ok(()) => work.await.unwrap_or_else(IntoResponse::into_response),
        Err(refused) => refused.into_response(),
    };
    sim.record(op, response.status().as_u16());
    response
}

fn ids(path: &ItemPath) -> Option<(String, String)> {
    path.as_ref().ok().map(|Path(ids)| ids.clone())
}

async fn admit(sim: &Sim, op: Operation, headers: &HeaderMap) -> Result<(), ApiError> {
    let faults = sim.current_faults();
    let latency = faults.roll_latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !sim.authorized(bearer) {
        return Err(ApiError::Unauthorized);
    }
    match faults.roll_error(op) {
        None => Ok(()),
        Some(Injected::RateLimited { retry_after_secs }) => {
            Err(ApiError::RateLimited { retry_after_secs })
        }
        Some(Injected::Internal) => Err(ApiError::Internal),
        Some(Injected::Unavailable) => Err(ApiError::Unavailable),
        Some(Injected::Timeout(hold)) => {
            tokio::time::sleep(hold).await;
            Err(ApiError::GatewayTimeout)
        }
    }
}

/// Bodies are parsed here rather than by axum's `Json` so that any content
/// type is accepted and every bad body is a JSON 400: first checked against
/// the published schema's field names and types, then read.
fn parse_json<T: DeserializeOwned>(
    body: &Bytes,
    fields: &'static [(&'static str, schema::Kind)],
) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| ApiError::bad_json(&err))?;
    schema::check(&value, fields)?;
    serde_json::from_value(value).map_err(|err| ApiError::bad_json(&err))
}

async fn get_app(State(sim): State<Sim>, path: AppPath, headers: HeaderMap) -> Response {
    guarded(&sim, Operation::AppGet, &headers, async {
        let Path(app) = path?;
        Ok(Json(sim.get_app(&app)?).into_response())
    })
    .await
}

fn ok() -> Response {
    Json(json!({ "ok": true })).into_response()
}

async fn create_machine(
    State(sim): State<Sim>,
    path: AppPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    guarded(&sim, Operation::Create, &headers, async {
        let Path(app) = path?;
        let request: CreateMachineRequest = parse_json(&body, schema::CREATE_MACHINE)?;
        // A create takes its time before the machine exists (see
        // `Faults::published_typical` for the figure and its source).
        let delay = sim.current_faults().create_delay_ms;
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let machine = sim.create_machine(&app, request)?;
        // The "created but never recorded" failure: the machine exists and
        // runs, but the caller is told it failed.
        if chance(sim.current_faults().create_succeeds_but_errors_rate) {
            return Err(ApiError::Internal);
        }
        Ok(Json(machine).into_response())
    })
    .await
}

async fn list_machines(
    State(sim): State<Sim>,
    path: AppPath,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    guarded(&sim, Operation::List, &headers, async {
        let Path(app) = path?;
        let Query(pairs) = query?;
        let mut filter = MachineFilter::default();
        for (key, value) in pairs {
            if key == "region" {
                filter.region = Some(value);
            } else if let Some(meta_key) = key.strip_prefix("metadata.") {
                filter.metadata.push((meta_key.to_owned(), value));
            }
        }
        Ok(Json(sim.list_machines(&app, &filter)?).into_response())
    })
    .await
}

async fn get_machine(State(sim): State<Sim>, path: ItemPath, headers: HeaderMap) -> Response {
    guarded_machine(&sim, Operation::Get, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        let machine = sim.get_machine(&app, &id)?;
        if chance(sim.current_faults().get_not_found_rate) {
            return Err(ApiError::machine_not_found());
        }
        Ok(Json(machine).into_response())
    })
    .await
}

async fn start_machine(State(sim): State<Sim>, path: ItemPath, headers: HeaderMap) -> Response {
    guarded_machine(&sim, Operation::Start, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        let previous_state = sim.start_machine(&app, &id)?;
        let answer = StartResponse {
            previous_state,
            migrated: false,
            new_host: String::new(),
        };
        Ok(Json(answer).into_response())
    })
    .await
}

async fn stop_machine(
    State(sim): State<Sim>,
    path: ItemPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    guarded_machine(&sim, Operation::Stop, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        // The body is optional; when given it must still be well formed.
        if !body.is_empty() {
            let _: StopRequest = parse_json(&body, schema::STOP)?;
        }
        sim.stop_machine(&app, &id)?;
        Ok(ok())
    })
    .await
}

async fn suspend_machine(State(sim): State<Sim>, path: ItemPath, headers: HeaderMap) -> Response {
    guarded_machine(&sim, Operation::Suspend, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        sim.suspend_machine(&app, &id)?;
        Ok(ok())
    })
    .await
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    state: Option<String>,
    timeout: Option<String>,
    /// The machine version waited on (OpenAPI `Machines_wait`, query
    /// parameter `instance_id`).
    instance_id: Option<String>,
    /// fly-go's newer spelling of the same parameter (`flaps/
    /// flaps_machines_wait.go` at commit 22d6e51, query `version`).
    version: Option<String>,
}

async fn wait_machine(
    State(sim): State<Sim>,
    path: ItemPath,
    query: Result<Query<WaitQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    guarded_machine(&sim, Operation::Wait, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        let Query(query) = query?;
        let target = match query.state.as_deref() {
            None => MachineState::Started,
            Some(name) => name
                .parse()
                .ok()
                .filter(|state| MachineState::WAITABLE.contains(state))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid state {name:?}: must be started, stopped, suspended or destroyed"
                    ))
                })?,
        };
        let secs = match query.timeout.as_deref() {
            None => *WAIT_TIMEOUT_SECS.end(),
            Some(raw) => raw
                .parse()
                .ok()
                .filter(|secs| WAIT_TIMEOUT_SECS.contains(secs))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid timeout {raw:?}: must be whole seconds between 1 and 60"
                    ))
                })?,
        };
        let instance_id = query
            .instance_id
            .as_deref()
            .or(query.version.as_deref())
            .filter(|v| !v.is_empty());
        // Fly docs, "Wait for a Machine to reach a specified state"
        // (https://fly.io/docs/machines/api/machines-resource/): "instance_id:
        // 26-character Machine version ID. Required when waiting for Machine
        // to be in stopped state"; Fly answers 400 "instance_id required when
        // waiting for stopped machine" without it.
        if target == MachineState::Stopped && instance_id.is_none() {
            return Err(ApiError::BadRequest(
                "instance_id required when waiting for stopped machine".to_owned(),
            ));
        }
        sim.wait_for_state(&app, &id, target, instance_id, Duration::from_secs(secs))
            .await?;
        Ok(ok())
    })
    .await
}

#[derive(Debug, Deserialize)]
struct DestroyQuery {
    #[serde(default)]
    force: bool,
}

async fn destroy_machine(
    State(sim): State<Sim>,
    path: ItemPath,
    query: Result<Query<DestroyQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    guarded_machine(&sim, Operation::Delete, &headers, ids(&path), async {
        let Path((app, id)) = path?;
        let Query(query) = query?;
        sim.destroy_machine(&app, &id, query.force)?;
        Ok(ok())
    })
    .await
}

async fn create_volume(
    State(sim): State<Sim>,
    path: AppPath,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    guarded(&sim, Operation::VolumeCreate, &headers, async {
        let Path(app) = path?;
        let request: CreateVolumeRequest = parse_json(&body, schema::CREATE_VOLUME)?;
        Ok(Json(sim.create_volume(&app, request)?).into_response())
    })
    .await
}

async fn list_volumes(State(sim): State<Sim>, path: AppPath, headers: HeaderMap) -> Response {
    guarded(&sim, Operation::VolumeList, &headers, async {
        let Path(app) = path?;
        Ok(Json(sim.list_volumes(&app)?).into_response())
    })
    .await
}

async fn get_volume(State(sim): State<Sim>, path: ItemPath, headers: HeaderMap) -> Response {
    guarded(&sim, Operation::VolumeGet, &headers, async {
        let Path((app, id)) = path?;
        Ok(Json(sim.get_volume(&app, &id)?).into_response())
    })
    .await
}

async fn destroy_volume(State(sim): State<Sim>, path: ItemPath, headers: HeaderMap) -> Response {
    guarded(&sim, Operation::VolumeDelete, &headers, async {
        let Path((app, id)) = path?;
        Ok(Json(sim.destroy_volume(&app, &id)?).into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use crate::model::MachineConfig;
    use crate::{Faults, SimConfig};

    use super::*;

    #[tokio::test]
    async fn a_lying_get_answers_404_for_a_machine_that_exists_while_listings_show_it() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let handle = crate::start(SimConfig {
            faults: Faults {
                get_not_found_rate: 1.0,
                ..Faults::instant()
            },
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let machine = handle
            .sim()
            .create_machine(
                crate::DEFAULT_APP,
                CreateMachineRequest {
                    config: MachineConfig {
                        image: Some("img".into()),
                        ..MachineConfig::default()
                    },
                    ..CreateMachineRequest::default()
                },
            )
            .unwrap();
        let http = reqwest::Client::new();
        let base = format!("{}/v1/apps/{}/machines", handle.url(), crate::DEFAULT_APP);
        let get = || {
            http.get(format!("{base}/{}", machine.id))
                .bearer_auth(handle.token())
                .send()
        };
        let answer = get().await.unwrap();
        assert_eq!(answer.status(), 404);
        let body: serde_json::Value = answer.json().await.unwrap();
        assert_eq!(body["error"], "machine not found", "the body of a real 404");
        let listed: serde_json::Value = http
            .get(&base)
            .bearer_auth(handle.token())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            listed[0]["id"],
            machine.id.as_str(),
            "listings tell the truth"
        );
        let truth = handle.sim().machine(&machine.id).unwrap();
        assert_eq!(truth.machine.state, MachineState::Started);

        handle
            .sim()
            .set_faults(Faults {
                get_not_found_rate: 0.0,
                ..Faults::instant()
            })
            .unwrap();
        assert_eq!(get().await.unwrap().status(), 200);
    }
}
