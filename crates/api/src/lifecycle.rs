//! `Terminate` and `Drain`: resolve a selector (ids, a pool, labels) to
//! instances and record what is wanted; the terminator does the work.
//! `Uncordon` undoes a drain of one instance. And
//! the two ways out that end a life without the loops: `AbandonInstance`
//! and `DeletePool`.
//!
//! Design notes: terminate and drain only write intent — the desired state
//! (and `force`), or the cordon — with an audit row carrying the caller and
//! the reason, and in the same transaction a `CMD.terminate` (terminate)
//! or an `EVT.instance.cordoned` event (drain: the state does not change,
//! so no transition would tell a watcher). Unknown ids are reported and nothing is written for them;
//! instances already terminal or already on their way are reported
//! unchanged, so retries and broad selectors cause no error storm.
//!
//! Abandon is for an instance whose provider is gone for good: a step
//! there can never finish, and `terminate --force` still needs the
//! provider. It writes `abandoned` (terminal) without any provider call;
//! since the machine may still exist, the answer says so, and which
//! machine, and that the orphan scan deletes it if it carries Flotilla's
//! tags. Pool deletion is `flotilla_store::pool_delete`'s; this layer only
//! validates and answers.

use std::collections::BTreeMap;

use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_proto::status::invalid_field;
use flotilla_proto::v1;
use flotilla_store::StoreError;
use flotilla_store::WriteCtx;
use flotilla_store::fleet::{
    Selected, fleet_cordon, fleet_request_terminate, fleet_select, fleet_select_ids, fleet_uncordon,
};
use flotilla_store::instance::{Abandon, InstanceRow, instance_abandon};
use flotilla_store::outbox::outbox_insert;
use flotilla_store::pool::pool_get;
use flotilla_store::pool_delete::{PoolDeletion, pool_delete};
use flotilla_store::volume::volume_ids_left;
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
            !s.state.is_terminal()
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
        .partition(|s| !s.state.is_terminal() && !s.cordoned);
    let ids: Vec<Uuid> = accepted.iter().map(|s| s.id).collect();
    let mut unchanged: Vec<Uuid> = unchanged.iter().map(|s| s.id).collect();
    let cordoned = if ids.is_empty() {
        Vec::new()
    } else {
        let mut conn = state
            .pool
            .acquire()
            .await
            .map_err(|e| store_status(e.into()))?;
        fleet_cordon(&mut conn, &ctx, &ids, &why)
            .await
            .map_err(store_status)?
    };
    // Cordoned by someone else since they were selected: nothing changed.
    unchanged.extend(ids.iter().filter(|id| !cordoned.contains(id)));
    unchanged.sort();
    Ok(v1::DrainResponse {
        accepted_ids: cordoned.iter().map(Uuid::to_string).collect(),
        unchanged_ids: unchanged.iter().map(Uuid::to_string).collect(),
        unknown_ids: resolved.unknown,
    })
}

/// `Uncordon`: undoes a drain (see `flotilla_store::fleet::fleet_uncordon`).
pub async fn uncordon(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::UncordonRequest,
) -> Result<v1::UncordonResponse, Status> {
    let id: InstanceId = validate::instance_id("id", &req.id)?;
    let why = reason(&req.reason, "uncordon requested")?;
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| store_status(e.into()))?;
    let row = match fleet_uncordon(&mut conn, &ctx, id, &why).await {
        Ok(row) => row,
        Err(StoreError::NotFound(_)) => {
            return Err(Status::not_found(format!("instance {id} does not exist")));
        }
        Err(e) => return Err(store_status(e)),
    };
    tracing::info!(instance_id = %id, actor = %ctx.actor, reason = %why, "instance uncordoned");
    Ok(v1::UncordonResponse {
        instance: Some(row.to_proto()),
    })
}

/// What may be left at the provider of an abandoned instance (`row`, now
/// or earlier abandoned from `from`), with its volumes `volumes`: the
/// warning every answer to an abandon carries. Empty for a `terminated`
/// instance, of which the provider confirmed nothing is left.
pub fn abandon_warning(
    row: &InstanceRow,
    from: Option<InstanceState>,
    volumes: &[String],
) -> String {
    if row.state == InstanceState::Terminated {
        return String::new();
    }
    let id = row.id;
    let provider = &row.provider;
    let mut out = match (row.provider_machine_id.as_deref(), from) {
        (None, Some(InstanceState::Requested)) => {
            return format!(
                "no provider call was ever made for instance {id}: nothing of it exists at {provider}"
            );
        }
        (Some(machine), _) => format!(
            "machine {machine} of instance {id} may still exist at {provider} (and cost money): \
             abandoning made no provider call, and Flotilla will make none for this instance \
             again. If the machine carries Flotilla's tags (instance id {id}), the orphan scan \
             deletes it when it lists it one orphan grace period (ORPHAN_GRACE_SECONDS) after \
             now or later; if it does not, delete it at the provider yourself."
        ),
        (None, _) => format!(
            "no machine was recorded for instance {id}, but a create may have reached \
             {provider}: a machine it made carries Flotilla's tags (instance id {id}), and the \
             orphan scan deletes it when it lists it one orphan grace period \
             (ORPHAN_GRACE_SECONDS) after now or later."
        ),
    };
    if !volumes.is_empty() {
        out.push_str(&format!(
            " Its volumes may still exist too, and are deleted the same way: {}.",
            volumes.join(", ")
        ));
    }
    out
}

/// `AbandonInstance`: see the module docs.
pub async fn abandon(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::AbandonInstanceRequest,
) -> Result<v1::AbandonInstanceResponse, Status> {
    let id: InstanceId = validate::instance_id("id", &req.id)?;
    if req.reason.trim().is_empty() {
        return Err(invalid_field(
            "reason",
            "is required: say why the instance is given up (it is kept in its history)",
        ));
    }
    let why = reason(&req.reason, "")?;
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| store_status(e.into()))?;
    let (row, from) = match instance_abandon(&mut conn, &ctx, id, &why).await {
        Ok(Abandon::Abandoned { row, from }) => (row, Some(from)),
        Ok(Abandon::AlreadyTerminal(row)) => (row, None),
        Err(StoreError::NotFound(_)) => {
            return Err(Status::not_found(format!("instance {id} does not exist")));
        }
        Err(e) => return Err(store_status(e)),
    };
    let volumes = volume_ids_left(&mut conn, id).await.map_err(store_status)?;
    let warning = abandon_warning(&row, from, &volumes);
    match from {
        Some(from) => tracing::warn!(
            instance_id = %id, %from, actor = %ctx.actor, reason = %why,
            machine_id = row.provider_machine_id.as_deref().unwrap_or(""),
            "instance abandoned by an operator; its machine may still exist"
        ),
        None => {
            tracing::info!(instance_id = %id, state = %row.state, "abandon of an instance that was terminal already")
        }
    }
    Ok(v1::AbandonInstanceResponse {
        instance: Some(row.to_proto()),
        abandoned: from.is_some(),
        from_state: from.map_or(v1::InstanceState::Unspecified, v1::InstanceState::from) as i32,
        warning,
    })
}

/// `DeletePool`: see `flotilla_store::pool_delete`.
pub async fn delete_pool(
    state: &ApiState,
    ctx: WriteCtx,
    req: v1::DeletePoolRequest,
) -> Result<v1::DeletePoolResponse, Status> {
    validate::name("name", &req.name)?;
    let why = reason(&req.reason, "pool deleted")?;
    let mut conn = state
        .pool
        .acquire()
        .await
        .map_err(|e| store_status(e.into()))?;
    let deletion = match pool_delete(&mut conn, &ctx, &req.name, req.force, &why).await {
        Ok(d) => d,
        Err(StoreError::NotFound(_)) => return Err(pool_not_found(&req.name)),
        Err(e) => return Err(store_status(e)),
    };
    Ok(match deletion {
        PoolDeletion::Deleted => {
            tracing::warn!(pool = %req.name, actor = %ctx.actor, reason = %why, "pool deleted");
            v1::DeletePoolResponse {
                deleted: true,
                pool: None,
                live_instances: 0,
                terminating_ids: Vec::new(),
            }
        }
        PoolDeletion::Deleting {
            pool,
            live,
            requested,
        } => {
            tracing::warn!(pool = %req.name, actor = %ctx.actor, reason = %why, live, requested = requested.len(), "pool being deleted; its instances are terminating");
            v1::DeletePoolResponse {
                deleted: false,
                pool: Some(crate::fleet::pool_answer(
                    &pool,
                    &state.limits.prices,
                    live,
                    0,
                )),
                live_instances: u32::try_from(live).unwrap_or(u32::MAX),
                terminating_ids: requested.iter().map(Uuid::to_string).collect(),
            }
        }
    })
}
