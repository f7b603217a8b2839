//! Instance rows: creation, the guarded state transition, work claiming and
//! the per-step retry bookkeeping.
//!
//! Design notes: a transition is one conditional `UPDATE … WHERE state = $from
//! AND version = $v` plus its action log and its `EVT.instance.<state>`
//! outbox row, inside one (nested) transaction. The caller learns whether it
//! applied: a stale version is [`StoreError::Conflict`], never a silent
//! overwrite. Claims are leases taken with `FOR UPDATE SKIP LOCKED`, because
//! the work they cover (provider calls) is too long to hold a transaction
//! open; the version check still guards every write made under a lease.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_core::subjects;
use flotilla_core::{DesiredState, InstanceId, InstanceState, check_transition};
use flotilla_proto::v1;
use prost::Message;
use sqlx::types::Json;
use sqlx::{Acquire, PgConnection, PgPool};
use uuid::Uuid;

pub use crate::instance_columns;
use crate::outbox::outbox_insert_many;
use crate::{Result, StoreError, WriteCtx, to_timestamp};

/// Columns of the row struct, in one place for every `SELECT`/`RETURNING`.
#[macro_export]
#[doc(hidden)]
macro_rules! instance_columns {
    () => {
        "id, pool, name, provider, provider_machine_id, state, desired_state, \
    version, attempts, next_attempt_at, last_error, state_entered_at, last_heartbeat, cordoned, \
    force_terminate, needs_attention, labels, idempotency_key, lease_owner, lease_until, \
    created_at, updated_at, worker_idle, suspect_since, stuck_recoveries, origin, \
    terminate_requested_at, disruption, idle_since, warm_taken_at"
    };
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstanceRow {
    #[sqlx(try_from = "Uuid")]
    pub id: InstanceId,
    pub pool: String,
    pub name: String,
    pub provider: String,
    pub provider_machine_id: Option<String>,
    #[sqlx(try_from = "String")]
    pub state: InstanceState,
    #[sqlx(try_from = "String")]
    pub desired_state: DesiredState,
    pub version: i64,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub state_entered_at: DateTime<Utc>,
    pub last_heartbeat: Option<DateTime<Utc>>,
    pub cordoned: bool,
    pub force_terminate: bool,
    pub needs_attention: bool,
    pub labels: Json<BTreeMap<String, String>>,
    pub idempotency_key: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The worker's last heartbeat said it runs no work item.
    pub worker_idle: bool,
    /// When the watchdog found this ready worker silent (cleared by a heartbeat).
    pub suspect_since: Option<DateTime<Utc>>,
    /// Times the watchdog found this instance stuck in its current state.
    pub stuck_recoveries: i32,
    /// The trace and correlation id of the last request about it.
    pub origin: Option<Json<RowOrigin>>,
    /// When its desired state first became `terminated` (rows asked
    /// before the column existed have none).
    pub terminate_requested_at: Option<DateTime<Utc>>,
    /// Why pool capacity is taking it away, when it is (see
    /// [`crate::disruption`]); the column's spelling of
    /// [`flotilla_core::disruption::Disruption`].
    pub disruption: Option<String>,
    /// Since when its worker has reported idle without a break.
    pub idle_since: Option<DateTime<Utc>>,
    /// When `Provision` took it from its pool's warm stock (see
    /// [`crate::warm`]): its request time.
    pub warm_taken_at: Option<DateTime<Utc>>,
}

/// The trace context and correlation id of a request, as stored on the
/// rows it asked for: loops continue that trace from the row.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RowOrigin {
    /// `traceparent` / `tracestate` of the request's span.
    pub trace_headers: Vec<(String, String)>,
    pub correlation_id: String,
}

impl RowOrigin {
    /// The origin of what `ctx` writes.
    pub fn of(ctx: &WriteCtx) -> RowOrigin {
        RowOrigin {
            trace_headers: ctx.trace_headers.clone(),
            correlation_id: ctx.correlation_id.as_str().to_owned(),
        }
    }
}

/// Seconds from `from` to `to`, never negative.
fn seconds_between(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    ((to - from).num_milliseconds().max(0) as f64) / 1000.0
}

impl InstanceRow {
    /// Seconds from the instance's request (its row's creation, or when
    /// `Provision` took it from warm stock) to its entering the state it
    /// is in: for a row just moved to `ready`, its time to ready. Both are
    /// the database's clock.
    pub fn seconds_requested_to_state(&self) -> f64 {
        seconds_between(
            self.warm_taken_at.unwrap_or(self.created_at),
            self.state_entered_at,
        )
    }

    /// Seconds from the first terminate request to its entering the state
    /// it is in: for a row just moved to `terminated`, its time to
    /// terminate. `None` when no request time is recorded.
    pub fn seconds_terminate_requested_to_state(&self) -> Option<f64> {
        self.terminate_requested_at
            .map(|at| seconds_between(at, self.state_entered_at))
    }

    pub fn to_proto(&self) -> v1::Instance {
        v1::Instance {
            id: self.id.to_string(),
            pool: self.pool.clone(),
            name: self.name.clone(),
            provider: self.provider.clone(),
            provider_machine_id: self.provider_machine_id.clone().unwrap_or_default(),
            state: v1::InstanceState::from(self.state) as i32,
            desired_state: v1::DesiredState::from(self.desired_state) as i32,
            version: self.version as u64,
            attempts: self.attempts.max(0) as u32,
            last_error: self.last_error.clone().unwrap_or_default(),
            state_entered_at: Some(to_timestamp(self.state_entered_at)),
            last_heartbeat: self.last_heartbeat.map(to_timestamp),
            labels: self.labels.0.clone().into_iter().collect(),
            created_at: Some(to_timestamp(self.created_at)),
            cordoned: self.cordoned,
            needs_attention: self.needs_attention,
            next_attempt_at: Some(to_timestamp(self.next_attempt_at)),
            disruption: self.disruption.clone().unwrap_or_default(),
            idle_since: self.idle_since.map(to_timestamp),
        }
    }
}

/// An instance to create in state `requested`.
#[derive(Debug, Clone)]
pub struct NewInstance {
    pub id: InstanceId,
    pub pool: String,
    pub name: String,
    pub provider: String,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    /// Hash of the worker token issued for this instance.
    pub worker_token_hash: Option<Vec<u8>>,
}

/// One requested state change.
#[derive(Debug, Clone)]
pub struct Transition<'a> {
    pub id: InstanceId,
    pub from: InstanceState,
    pub to: InstanceState,
    /// The version the caller read; the write applies only if it is unchanged.
    pub expected_version: i64,
    pub error: Option<&'a str>,
    pub reason: Option<&'a str>,
}

pub(crate) fn instance_event(
    row: &InstanceRow,
    from: Option<InstanceState>,
    log_id: i64,
    at: DateTime<Utc>,
    ctx: &WriteCtx,
    reason: Option<&str>,
) -> v1::InstanceEvent {
    v1::InstanceEvent {
        event_id: log_id as u64,
        instance_id: row.id.to_string(),
        pool: row.pool.clone(),
        from_state: from.map_or(v1::InstanceState::Unspecified, v1::InstanceState::from) as i32,
        to_state: v1::InstanceState::from(row.state) as i32,
        version: row.version as u64,
        at: Some(to_timestamp(at)),
        actor: ctx.actor.clone(),
        correlation_id: ctx.correlation_id.as_str().to_owned(),
        error: row.last_error.clone().unwrap_or_default(),
        reason: reason.unwrap_or_default().to_owned(),
        provider_machine_id: row.provider_machine_id.clone().unwrap_or_default(),
        stream_sequence: 0,
        action: String::new(),
    }
}

/// Locks the pools that new instances join (`FOR KEY SHARE`, the lock the
/// foreign key it replaces took) until the caller's transaction ends, and
/// refuses a pool that does not exist ([`StoreError::NotFound`]) or is
/// being deleted ([`StoreError::Refused`]). A deletion waits for the lock,
/// so it sees these instances (see [`crate::pool_delete`]).
async fn lock_pools_taking_instances(conn: &mut PgConnection, pools: &[&str]) -> Result<()> {
    let mut names = pools.to_vec();
    names.sort_unstable();
    names.dedup();
    let found: Vec<(String, bool)> = sqlx::query_as(
        "SELECT name, deleting_since IS NOT NULL FROM pools
         WHERE name = ANY($1) ORDER BY name FOR KEY SHARE",
    )
    .bind(&names)
    .fetch_all(conn)
    .await?;
    for name in names {
        match found.iter().find(|(n, _)| n == name) {
            None => return Err(StoreError::NotFound(format!("pool {name}"))),
            Some((_, true)) => {
                return Err(StoreError::Refused(crate::pool_delete::deleting_refusal(
                    name,
                )));
            }
            Some((_, false)) => {}
        }
    }
    Ok(())
}

/// Inserts instances in state `requested`, each with its action log and
/// `EVT.instance.requested` event, in one (nested) transaction. Refused for
/// a pool that does not exist or is being deleted.
pub async fn instance_insert_requested(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    new: &[NewInstance],
) -> Result<Vec<InstanceRow>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await?;
    let ids: Vec<Uuid> = new.iter().map(|n| n.id.0).collect();
    let pools: Vec<&str> = new.iter().map(|n| n.pool.as_str()).collect();
    lock_pools_taking_instances(&mut tx, &pools).await?;
    let names: Vec<&str> = new.iter().map(|n| n.name.as_str()).collect();
    let providers: Vec<&str> = new.iter().map(|n| n.provider.as_str()).collect();
    let labels: Vec<Json<&BTreeMap<String, String>>> =
        new.iter().map(|n| Json(&n.labels)).collect();
    let keys: Vec<Option<&str>> = new.iter().map(|n| n.idempotency_key.as_deref()).collect();
    let tokens: Vec<Option<&[u8]>> = new.iter().map(|n| n.worker_token_hash.as_deref()).collect();
    let rows: Vec<InstanceRow> = sqlx::query_as(concat!("INSERT INTO instances (id, pool, name, provider, state, labels, idempotency_key, worker_token_hash, origin)
         SELECT id, pool, name, provider, 'requested', labels, key, token, $8
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::bytea[])
           AS t(id, pool, name, provider, labels, key, token)
         RETURNING ", instance_columns!()))
    .bind(&ids)
    .bind(&pools)
    .bind(&names)
    .bind(&providers)
    .bind(&labels)
    .bind(&keys)
    .bind(&tokens)
    .bind(Json(RowOrigin::of(ctx)))
    .fetch_all(&mut *tx)
    .await?;

    let logs: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
        "INSERT INTO action_logs (instance_id, from_state, to_state, actor, correlation_id)
         SELECT id, NULL, 'requested', $2, $3 FROM UNNEST($1::uuid[]) WITH ORDINALITY AS t(id, n)
         ORDER BY n
         RETURNING id, instance_id, at",
    )
    .bind(&ids)
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .fetch_all(&mut *tx)
    .await?;
    let by_id: BTreeMap<Uuid, (i64, DateTime<Utc>)> = logs
        .into_iter()
        .map(|(log, id, at)| (id, (log, at)))
        .collect();

    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        let (log_id, at) = by_id
            .get(&row.id.0)
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("no action log for {}", row.id)))?;
        let event = instance_event(row, None, log_id, at, ctx, None);
        events.push((subjects::instance_event(row.state), event.encode_to_vec()));
    }
    outbox_insert_many(&mut tx, ctx, &events).await?;
    tx.commit().await?;
    Ok(rows)
}

/// Most instance ids in one `CMD.provision` (the contract's limit).
pub const IDS_PER_PROVISION_COMMAND: usize = 1000;

/// Inserts instances in state `requested` (as [`instance_insert_requested`])
/// together with the `CMD.provision` commands that ask the scheduler for
/// them, in one (nested) transaction: every writer of new instances (the
/// api, pool capacity, the watchdog's replacements) commits both or
/// neither. The commands name the instances pool by pool, in their order,
/// at most [`IDS_PER_PROVISION_COMMAND`] each.
pub async fn instance_insert_with_provision(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    new: &[NewInstance],
) -> Result<Vec<InstanceRow>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = conn.begin().await?;
    let rows = instance_insert_requested(&mut tx, ctx, new).await?;
    outbox_insert_many(&mut tx, ctx, &provision_commands(new)).await?;
    tx.commit().await?;
    Ok(rows)
}

/// `(CMD.provision, ProvisionCommand)` outbox messages for `new`.
fn provision_commands(new: &[NewInstance]) -> Vec<(String, Vec<u8>)> {
    let mut by_pool: Vec<(&str, Vec<String>)> = Vec::new();
    for n in new {
        let i = match by_pool.iter().position(|(pool, _)| *pool == n.pool) {
            Some(i) => i,
            None => {
                by_pool.push((&n.pool, Vec::new()));
                by_pool.len() - 1
            }
        };
        by_pool[i].1.push(n.id.to_string());
    }
    by_pool
        .iter()
        .flat_map(|(pool, ids)| {
            ids.chunks(IDS_PER_PROVISION_COMMAND).map(|chunk| {
                let cmd = v1::ProvisionCommand {
                    instance_ids: chunk.to_vec(),
                    pool: (*pool).to_owned(),
                };
                (subjects::PROVISION.to_owned(), cmd.encode_to_vec())
            })
        })
        .collect()
}

/// Applies one transition if the table allows it and the row is still at
/// `expected_version` in state `from`. Writes the action log and the event
/// in the same transaction. Resets the step's attempt bookkeeping.
pub async fn instance_transition(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    t: &Transition<'_>,
) -> Result<InstanceRow> {
    check_transition(t.from, t.to)?;
    let mut tx = conn.begin().await?;
    let row: Option<InstanceRow> = sqlx::query_as(concat!(
        "UPDATE instances SET state = $3, version = version + 1, attempts = 0, stuck_recoveries = 0,
             next_attempt_at = now(), last_error = $5, state_entered_at = now(), updated_at = now()
         WHERE id = $1 AND state = $2 AND version = $4
         RETURNING ",
        instance_columns!()
    ))
    .bind(t.id.0)
    .bind(t.from.as_str())
    .bind(t.to.as_str())
    .bind(t.expected_version)
    .bind(t.error)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        drop(tx);
        return Err(stale_or_missing(conn, t.id, t.expected_version).await);
    };
    let (log_id, at): (i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO action_logs (instance_id, from_state, to_state, actor, correlation_id, error, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id, at",
    )
    .bind(t.id.0)
    .bind(t.from.as_str())
    .bind(t.to.as_str())
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(t.error)
    .bind(t.reason)
    .fetch_one(&mut *tx)
    .await?;
    let event = instance_event(&row, Some(t.from), log_id, at, ctx, t.reason);
    outbox_insert_many(
        &mut tx,
        ctx,
        &[(subjects::instance_event(row.state), event.encode_to_vec())],
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// What [`instance_abandon`] did.
#[derive(Debug, Clone)]
pub enum Abandon {
    /// The instance was given up from state `from`.
    Abandoned {
        row: Box<InstanceRow>,
        from: InstanceState,
    },
    /// It was terminal already (`terminated`, or abandoned before):
    /// nothing was written.
    AlreadyTerminal(Box<InstanceRow>),
}

/// Gives an instance up for good, from any state that is not terminal and
/// without any provider call: it becomes `abandoned` through the
/// transition table, with its action log (who, `reason`, and the last
/// error it was stuck on) and event. It also has its lease taken away, so
/// a step still holding one fails its next renewal and calls no provider,
/// while its version bump refuses that step's writes; its desired state
/// becomes `terminated`, so an agent still running there is told to stop;
/// and its operator flag is cleared: nothing is left to retry. No loop
/// claims an abandoned instance (no loop group has it), and the table has
/// no exit from it. [`StoreError::NotFound`] for an unknown id.
pub async fn instance_abandon(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    id: InstanceId,
    reason: &str,
) -> Result<Abandon> {
    let mut tx = conn.begin().await?;
    let row = instance_lock(&mut tx, id).await?;
    if row.state.is_terminal() {
        return Ok(Abandon::AlreadyTerminal(Box::new(row)));
    }
    instance_transition(
        &mut tx,
        ctx,
        &Transition {
            id,
            from: row.state,
            to: InstanceState::Abandoned,
            expected_version: row.version,
            error: row.last_error.as_deref(),
            reason: Some(reason),
        },
    )
    .await?;
    let abandoned: InstanceRow = sqlx::query_as(concat!(
        "UPDATE instances SET desired_state = 'terminated', lease_owner = NULL, lease_until = NULL,
             needs_attention = false, suspect_since = NULL, missing_since = NULL, updated_at = now()
         WHERE id = $1 RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Abandon::Abandoned {
        row: Box::new(abandoned),
        from: row.state,
    })
}

/// Why a conditional write matched nothing.
/// The instance's row, locked for the rest of the transaction; NotFound
/// when there is none.
pub(crate) async fn instance_lock(conn: &mut PgConnection, id: InstanceId) -> Result<InstanceRow> {
    let row: Option<InstanceRow> = sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.0)
    .fetch_optional(&mut *conn)
    .await?;
    row.ok_or_else(|| StoreError::NotFound(format!("instance {id}")))
}

async fn stale_or_missing(conn: &mut PgConnection, id: InstanceId, expected: i64) -> StoreError {
    match sqlx::query_as::<_, (String, i64)>("SELECT state, version FROM instances WHERE id = $1")
        .bind(id.0)
        .fetch_optional(conn)
        .await
    {
        Ok(Some((state, version))) => StoreError::Conflict(format!(
            "instance {id} is {state} at version {version}, expected version {expected}"
        )),
        Ok(None) => StoreError::NotFound(format!("instance {id}")),
        Err(e) => e.into(),
    }
}

pub async fn instance_get(conn: &mut PgConnection, id: InstanceId) -> Result<Option<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances WHERE id = $1"
    ))
    .bind(id.0)
    .fetch_optional(conn)
    .await?)
}

/// Filters for [`instance_list`]; pages are keyed by id (time-ordered).
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub pool: Option<String>,
    pub states: Vec<InstanceState>,
    pub labels: BTreeMap<String, String>,
    /// Only cordoned (`Some(true)`) or only uncordoned instances.
    pub cordoned: Option<bool>,
    pub after: Option<InstanceId>,
    pub limit: i64,
}

pub async fn instance_list(conn: &mut PgConnection, f: &ListFilter) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        instance_columns!(),
        " FROM instances
         WHERE ($1::text IS NULL OR pool = $1)
           AND (cardinality($2::text[]) = 0 OR state = ANY($2))
           AND labels @> $3
           AND ($4::uuid IS NULL OR id > $4)
           AND ($6::bool IS NULL OR cordoned = $6)
         ORDER BY id LIMIT $5"
    ))
    .bind(f.pool.as_deref())
    .bind(InstanceState::strs(&f.states))
    .bind(Json(&f.labels))
    .bind(f.after.map(|a| a.0))
    .bind(f.limit)
    .bind(f.cordoned)
    .fetch_all(conn)
    .await?)
}

/// What a loop wants to claim.
#[derive(Debug, Clone, Copy)]
pub struct ClaimQuery<'a> {
    pub states: &'a [InstanceState],
    pub desired: Option<DesiredState>,
    pub pool: Option<&'a str>,
    /// Identifies the claiming replica (host, pid, loop).
    pub owner: &'a str,
    /// Longer than the work the claim covers; an expired lease is free to take.
    pub lease: Duration,
    pub limit: i64,
}

/// Leases up to `limit` due rows (next attempt reached, lease free or
/// expired), oldest due first. Concurrent claimers never get the same row.
///
/// A claim bumps the row's version: this is the fence. Every write of a
/// step is conditioned on the version its claim returned, so a replica
/// whose lease expired and was claimed by another — paused, partitioned,
/// slow — has each later write refused instead of overwriting.
pub async fn instance_claim_due(pool: &PgPool, q: &ClaimQuery<'_>) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "WITH due AS (
             SELECT id AS due_id FROM instances
             WHERE state = ANY($1)
               AND ($2::text IS NULL OR desired_state = $2)
               AND ($3::text IS NULL OR pool = $3)
               AND next_attempt_at <= now()
               AND (lease_until IS NULL OR lease_until < now())
             ORDER BY next_attempt_at
             LIMIT $4
             FOR UPDATE SKIP LOCKED
         )
         UPDATE instances
         SET lease_owner = $5, lease_until = now() + make_interval(secs => $6),
             version = version + 1
         FROM due WHERE id = due.due_id
         RETURNING ",
        instance_columns!()
    ))
    .bind(InstanceState::strs(q.states))
    .bind(q.desired.map(DesiredState::as_str))
    .bind(q.pool)
    .bind(q.limit)
    .bind(q.owner)
    .bind(q.lease.as_secs_f64())
    .fetch_all(pool)
    .await?)
}

/// Extends the leases `owner` still holds among `ids` by `lease` from now
/// and returns the ids it extended. A lease that expired is not renewed
/// (another replica may have claimed the row): its holder has lost it.
pub async fn instance_renew_leases(
    conn: &mut PgConnection,
    ids: &[InstanceId],
    owner: &str,
    lease: Duration,
) -> Result<Vec<InstanceId>> {
    let ids: Vec<Uuid> = ids.iter().map(|i| i.0).collect();
    let renewed: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE instances SET lease_until = now() + make_interval(secs => $3)
         WHERE id = ANY($1) AND lease_owner = $2 AND lease_until > now()
         RETURNING id",
    )
    .bind(&ids)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .fetch_all(conn)
    .await?;
    Ok(renewed.into_iter().map(InstanceId).collect())
}

/// Gives a lease back (only if `owner` still holds it).
pub async fn instance_release(
    conn: &mut PgConnection,
    id: InstanceId,
    owner: &str,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE instances SET lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id.0)
    .bind(owner)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Gives back every lease of a replica (graceful shutdown).
pub async fn instance_release_owner(conn: &mut PgConnection, owner: &str) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE instances SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = $1",
    )
    .bind(owner)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Records the provider machine id the moment a create returns, before any
/// further step, so a crash afterwards cannot orphan the machine.
pub async fn instance_record_machine(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
    machine_id: &str,
) -> Result<InstanceRow> {
    let row = sqlx::query_as(concat!(
        "UPDATE instances SET provider_machine_id = $3, version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(expected_version)
    .bind(machine_id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, expected_version).await),
    }
}

/// Records a machine an earlier attempt created, found by its ownership
/// tag, as the instance's (as [`instance_record_machine`]), with a
/// `machine_adopted` row in the instance's history naming who found it,
/// in one (nested) transaction.
pub async fn instance_record_adopted_machine(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    id: InstanceId,
    expected_version: i64,
    machine_id: &str,
) -> Result<InstanceRow> {
    let mut tx = conn.begin().await?;
    let row = instance_record_machine(&mut tx, id, expected_version, machine_id).await?;
    crate::action_log::action_log_request(
        &mut tx,
        ctx,
        &[id.0],
        crate::action_log::Request::MachineAdopted,
        &format!(
            "machine {machine_id} found by its ownership tag (the answer to the create that \
             made it was lost); recorded instead of creating another"
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// Records a failed attempt at the current step without changing state:
/// the row stays where it is and a later tick retries it when `policy`
/// says. The lease is given back. The row needs an operator's attention
/// once the policy says so (it is still retried).
///
/// The attempt is also written to the instance's history (`step_retried`:
/// attempt number, error class, the error, when it is tried again) by the
/// same statement, so the audit log and the row cannot disagree.
pub async fn instance_record_failure(
    conn: &mut PgConnection,
    ctx: &crate::WriteCtx,
    row: &InstanceRow,
    error: &str,
    class: flotilla_core::ErrorClass,
    policy: &flotilla_core::backoff::ErrorPolicy,
    retry_after: Option<std::time::Duration>,
) -> Result<InstanceRow> {
    let (id, version) = (row.id, row.version);
    let attempts = row.attempts.max(0) as u32 + 1;
    let next = policy.after_failure(attempts, retry_after, rand::random());
    let retry_at = Utc::now()
        + chrono::Duration::from_std(next.delay).unwrap_or(chrono::Duration::seconds(60));
    let reason = format!(
        "attempt {attempts} of {} failed ({}); next try at {}{}",
        row.state,
        class.as_str(),
        retry_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        if next.needs_attention {
            "; needs attention"
        } else {
            ""
        }
    );
    let row = sqlx::query_as(concat!(
        "WITH updated AS (
             UPDATE instances SET attempts = attempts + 1, last_error = $3, next_attempt_at = $4,
                 needs_attention = needs_attention OR $5,
                 version = version + 1, lease_owner = NULL, lease_until = NULL, updated_at = now()
             WHERE id = $1 AND version = $2 RETURNING *
         ), logged AS (
             INSERT INTO action_logs (instance_id, action, actor, correlation_id, error, reason)
             SELECT id, 'step_retried', $6, $7, $3, $8 FROM updated
         )
         SELECT ",
        instance_columns!(),
        " FROM updated"
    ))
    .bind(id.0)
    .bind(version)
    .bind(error)
    .bind(retry_at)
    .bind(next.needs_attention)
    .bind(&ctx.actor)
    .bind(ctx.correlation_id.as_str())
    .bind(&reason)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, version).await),
    }
}

/// Clears the operator flag once a later step of the instance succeeded
/// (the failure it flagged is over). Returns whether it was set.
pub async fn instance_clear_attention(conn: &mut PgConnection, id: InstanceId) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE instances SET needs_attention = false, updated_at = now()
         WHERE id = $1 AND needs_attention",
    )
    .bind(id.0)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Counts of instances by pool and state (for metrics and capacity), of
/// the states that are not terminal.
pub async fn instance_count_by_pool_state(
    conn: &mut PgConnection,
) -> Result<Vec<(String, InstanceState, i64)>> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT pool, state, count(*) FROM instances WHERE state <> ALL($1) GROUP BY 1, 2",
    )
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(p, s, n)| {
            s.parse::<InstanceState>()
                .map(|s| (p, s, n))
                .map_err(|e| StoreError::Corrupt(e.to_string()))
        })
        .collect()
}

/// Records that a create is about to be attempted, with the hash of the
/// worker token the new machine will carry. Committed before the provider
/// call, so a crash afterwards is known: a later attempt looks for a
/// machine by its tag before creating another.
pub async fn instance_prepare_create(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
    worker_token_hash: &[u8],
) -> Result<InstanceRow> {
    let row = sqlx::query_as(concat!(
        "UPDATE instances SET worker_token_hash = $3, version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 AND state = 'provisioning'
           AND provider_machine_id IS NULL RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(expected_version)
    .bind(worker_token_hash)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, expected_version).await),
    }
}

/// Whether a create may have been sent for this instance: the hash of the
/// worker token is committed before every create
/// ([`instance_prepare_create`]), and only then.
pub async fn instance_create_may_have_been_sent(
    conn: &mut PgConnection,
    id: InstanceId,
) -> Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT worker_token_hash IS NOT NULL FROM instances WHERE id = $1")
            .bind(id.0)
            .fetch_optional(conn)
            .await?
            .unwrap_or(false),
    )
}

/// Puts a provisioning row's next attempt off until `at` and gives its
/// lease back, without counting an attempt and without touching
/// `updated_at`: a wait measured from the row's last write must not
/// restart itself.
pub async fn instance_defer(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
    at: DateTime<Utc>,
    reason: &str,
) -> Result<InstanceRow> {
    let row = sqlx::query_as(concat!(
        "UPDATE instances SET next_attempt_at = $3, last_error = $4, version = version + 1,
             lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND version = $2 AND state = 'provisioning' RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(expected_version)
    .bind(at)
    .bind(reason)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, expected_version).await),
    }
}

/// Forgets a machine the provider says does not exist (404 on start), so
/// the next attempt creates one. Only while still provisioning.
pub async fn instance_forget_machine(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
) -> Result<InstanceRow> {
    let row = sqlx::query_as(concat!(
        "UPDATE instances SET provider_machine_id = NULL, version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 AND state = 'provisioning' RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(expected_version)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, expected_version).await),
    }
}

/// Sets the desired state (and `force`), bumping the version; returns the
/// row, or `None` when the instance does not exist. The first time it
/// becomes `terminated` is kept (`terminate_requested_at`), as by every
/// writer of that desired state.
pub async fn instance_set_desired(
    conn: &mut PgConnection,
    id: InstanceId,
    desired: DesiredState,
    force: bool,
) -> Result<Option<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "UPDATE instances SET desired_state = $2, force_terminate = force_terminate OR $3,
             terminate_requested_at = CASE WHEN $2 = 'terminated'
                 THEN COALESCE(terminate_requested_at, now()) ELSE terminate_requested_at END,
             next_attempt_at = now(), version = version + 1, updated_at = now()
         WHERE id = $1 RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(desired.as_str())
    .bind(force)
    .fetch_optional(conn)
    .await?)
}

/// Sets the desired state of a row a step holds, only at the version its
/// claim returned (the step's fence), bumping the version.
pub async fn instance_set_desired_at_version(
    conn: &mut PgConnection,
    id: InstanceId,
    expected_version: i64,
    desired: DesiredState,
) -> Result<InstanceRow> {
    let row = sqlx::query_as(concat!(
        "UPDATE instances SET desired_state = $3, next_attempt_at = now(),
             terminate_requested_at = CASE WHEN $3 = 'terminated'
                 THEN COALESCE(terminate_requested_at, now()) ELSE terminate_requested_at END,
             version = version + 1, updated_at = now()
         WHERE id = $1 AND version = $2 RETURNING ",
        instance_columns!()
    ))
    .bind(id.0)
    .bind(expected_version)
    .bind(desired.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => Err(stale_or_missing(conn, id, expected_version).await),
    }
}

/// Per-pool boot phase deadlines, with the service defaults for pools that
/// set none.
#[derive(Debug, Clone, Copy)]
pub struct BootDeadlines {
    pub booting: Duration,
    pub installing: Duration,
    pub starting: Duration,
}

/// Leases instances that stayed in a boot phase past their pool's deadline.
pub async fn instance_claim_overdue_boot(
    pool: &PgPool,
    defaults: BootDeadlines,
    owner: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<InstanceRow>> {
    Ok(sqlx::query_as(concat!(
        "WITH due AS (
             SELECT i.id AS due_id FROM instances i JOIN pools p ON p.name = i.pool
             WHERE i.state = ANY($7)
               AND (i.lease_until IS NULL OR i.lease_until < now())
               AND i.state_entered_at + make_interval(secs => CASE i.state
                     WHEN 'booting' THEN COALESCE(p.booting_timeout_seconds, $1)
                     WHEN 'installing' THEN COALESCE(p.installing_timeout_seconds, $2)
                     ELSE COALESCE(p.starting_timeout_seconds, $3) END) < now()
             ORDER BY i.state_entered_at
             LIMIT $4
             FOR UPDATE OF i SKIP LOCKED
         )
         UPDATE instances
         SET lease_owner = $5, lease_until = now() + make_interval(secs => $6),
             version = version + 1
         FROM due WHERE id = due.due_id
         RETURNING ",
        instance_columns!()
    ))
    .bind(defaults.booting.as_secs_f64())
    .bind(defaults.installing.as_secs_f64())
    .bind(defaults.starting.as_secs_f64())
    .bind(limit)
    .bind(owner)
    .bind(lease.as_secs_f64())
    .bind(InstanceState::strs(InstanceState::BOOT_PHASES))
    .fetch_all(pool)
    .await?)
}

/// How many times an instance has entered `state` (from its action log).
pub async fn instance_times_entered(
    conn: &mut PgConnection,
    id: InstanceId,
    state: InstanceState,
) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM action_logs WHERE instance_id = $1 AND to_state = $2",
    )
    .bind(id.0)
    .bind(state.as_str())
    .fetch_one(conn)
    .await?)
}

/// Cordons the instance: no new work is dispatched to it, and the worker
/// learns it from its next heartbeat. Idempotent.
pub async fn instance_cordon(conn: &mut PgConnection, id: InstanceId) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE instances SET cordoned = true, updated_at = now() WHERE id = $1 AND NOT cordoned",
    )
    .bind(id.0)
    .execute(conn)
    .await?
    .rows_affected()
        == 1)
}

/// Schedules the next look at an instance without counting a failure
/// (waiting on a drain or a stop is not an error). Gives the lease back.
pub async fn instance_requeue(
    conn: &mut PgConnection,
    id: InstanceId,
    owner: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    sqlx::query(
        "UPDATE instances SET next_attempt_at = $3, lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND lease_owner = $2",
    )
    .bind(id.0)
    .bind(owner)
    .bind(at)
    .execute(conn)
    .await?;
    Ok(())
}
