//! `Terminate` and `Drain`: resolve a selector (ids, a pool, labels) to
//! instances and record what is wanted; the terminator does the work.
//!
//! Design notes: both only write intent — the desired state (and `force`),
//! or the cordon — with an audit row carrying the caller and the reason,
//! and (for terminate) a `CMD.terminate` in the same transaction. Unknown
//! ids are reported and nothing is written for them; instances already
//! terminated or already on their way are reported unchanged, so retries
//! and broad selectors cause no error storm.

use std::collections::BTreeMap;

use flotilla_core::{DesiredState, InstanceState};
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_store::WriteCtx;
use flotilla_store::fleet::{
    Selected, fleet_cordon, fleet_request_terminate, fleet_select, fleet_select_ids,
};
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::pool_get;
use prost::Message;
use tonic::Status;
use uuid::Uuid;

use crate::ApiState;
use crate::error::{pool_not_found, store_status};
use crate::validate;

/// Most instances one selector may match.
const MAX_SELECTED: i64 = 10_000;
const MAX_REASON: usize = 1024;

/// What a selector resolved to.
struct Resolved {
    found: Vec<Selected>,
    unknown: Vec<String>,
}

async fn resolve(state: &ApiState, sel: Option<&v1::InstanceSelector>) -> Result<Resolved, Status> {
    let sel = sel.ok_or_else(|| invalid_field("selector", "is required"))?;
    let by_ids = !sel.instance_ids.is_empty();
    if by_ids && (!sel.pool.is_empty() || !sel.labels.is_empty()) {
        return Err(invalid_field(
            "selector",
            "instance_ids cannot be combined with pool or labels",
        ));
    }
    if !by_ids && sel.pool.is_empty() && sel.labels.is_empty() {
        return Err(invalid_field(
            "selector",
            "name instance_ids, a pool, or labels",
        ));
    }
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| store_status(e.into()))?;
    if by_ids {
        if sel.instance_ids.len() > validate::MAX_IDS {
            return Err(invalid_field(
                "selector.instance_ids",
                format!("at most {} ids", validate::MAX_IDS),
            ));
        }
        let mut ids = Vec::with_capacity(sel.instance_ids.len());
        for (i, s) in sel.instance_ids.iter().enumerate() {
            ids.push(validate::instance_id(&format!("selector.instance_ids[{i}]"), s)?.0);
        }
        ids.sort();
        ids.dedup();
        let found = fleet_select_ids(&mut conn, &ids)
            .await
            .map_err(store_status)?;
        let unknown = ids
            .iter()
            .filter(|id| !found.iter().any(|f| f.id == **id))
            .map(Uuid::to_string)
            .collect();
        return Ok(Resolved { found, unknown });
    }
    let pool = if sel.pool.is_empty() {
        None
    } else {
        validate::name("selector.pool", &sel.pool)?;
        if pool_get(&mut conn, &sel.pool)
            .await
            .map_err(store_status)?
            .is_none()
        {
            return Err(pool_not_found(&sel.pool));
        }
        Some(sel.pool.as_str())
    };
    let labels: BTreeMap<String, String> = validate::labels("selector.labels", &sel.labels)?
        .into_iter()
        .collect();
    let found = fleet_select(&mut conn, pool, &labels, MAX_SELECTED + 1)
        .await
        .map_err(store_status)?;
    if found.len() as i64 > MAX_SELECTED {
        return Err(invalid_field(
            "selector",
            format!("matches more than {MAX_SELECTED} instances; narrow it"),
        ));
    }
    Ok(Resolved {
        found,
        unknown: Vec::new(),
    })
}

fn reason(r: &str, default: &str) -> Result<String, Status> {
    if r.chars().count() > MAX_REASON {
        return Err(invalid_field(
            "reason",
            format!("longer than {MAX_REASON} chars"),
        ));
    }
    // PostgreSQL text cannot hold NUL: stored as is, it would fail the
    // transaction and answer INTERNAL (found by the api fuzz test).
    if r.contains('\0') {
        return Err(invalid_field("reason", "NUL characters are not allowed"));
    }
    Ok(if r.is_empty() {
        default.to_owned()
    } else {
        r.to_owned()
    })
}

pub async fn terminate(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::TerminateRequest,
) -> Result<v1::TerminateResponse, Status> {
    let why = reason(&req.reason, "terminate requested")?;
    let resolved = resolve(state, req.selector.as_ref()).await?;
    let (accepted, unchanged): (Vec<&Selected>, Vec<&Selected>) =
        resolved.found.iter().partition(|s| {
            s.state != InstanceState::Terminated
                && (s.desired_state == DesiredState::Running || (req.force && !s.force_terminate))
        });
    let ids: Vec<Uuid> = accepted.iter().map(|s| s.id).collect();
    if !ids.is_empty() {
        let mut tx = state
            .pool
            .begin()
            .await
            .map_err(|e| store_status(e.into()))?;
        fleet_request_terminate(&mut tx, &ctx, &ids, req.force, &why)
            .await
            .map_err(store_status)?;
        for chunk in ids.chunks(validate::MAX_IDS) {
            let cmd = v1::TerminateCommand {
                instance_ids: chunk.iter().map(Uuid::to_string).collect(),
                force: req.force,
                reason: why.clone(),
            };
            outbox_insert(
                &mut tx,
                &ctx,
                flotilla_bus::subjects::TERMINATE,
                &cmd.encode_to_vec(),
            )
            .await
            .map_err(store_status)?;
        }
        tx.commit().await.map_err(|e| store_status(e.into()))?;
    }
    Ok(v1::TerminateResponse {
        accepted_ids: ids.iter().map(Uuid::to_string).collect(),
        unchanged_ids: unchanged.iter().map(|s| s.id.to_string()).collect(),
        unknown_ids: resolved.unknown,
    })
}

pub async fn drain(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::DrainRequest,
) -> Result<v1::DrainResponse, Status> {
    let why = reason(&req.reason, "drain requested")?;
    let resolved = resolve(state, req.selector.as_ref()).await?;
    let (accepted, unchanged): (Vec<&Selected>, Vec<&Selected>) = resolved
        .found
        .iter()
        .partition(|s| s.state != InstanceState::Terminated && !s.cordoned);
    let ids: Vec<Uuid> = accepted.iter().map(|s| s.id).collect();
    if !ids.is_empty() {
        let mut tx = state
            .pool
            .begin()
            .await
            .map_err(|e| store_status(e.into()))?;
        fleet_cordon(&mut tx, &ctx, &ids, &why)
            .await
            .map_err(store_status)?;
        tx.commit().await.map_err(|e| store_status(e.into()))?;
    }
    Ok(v1::DrainResponse {
        accepted_ids: ids.iter().map(Uuid::to_string).collect(),
        unchanged_ids: unchanged.iter().map(|s| s.id.to_string()).collect(),
        unknown_ids: resolved.unknown,
    })
}
