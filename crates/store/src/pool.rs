//! Pools: groups of identical workers with a desired capacity and per-pool
//! timeouts. Deleting one is [`crate::pool_delete`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flotilla_core::disruption::{Budget, IdleAction};
use flotilla_core::price::PriceTable;
use flotilla_proto::v1;
use sqlx::PgConnection;
use sqlx::types::Json;

use crate::{Result, StoreError, to_timestamp};

/// Columns of the row struct, in one place for every `SELECT`/`RETURNING`.
macro_rules! pool_columns {
    () => {
        "name, provider, instance_type, region, image, desired_capacity, \
    volume_size_gb, booting_timeout_seconds, installing_timeout_seconds, \
    starting_timeout_seconds, draining_timeout_seconds, price_per_hour_micros, labels, version, \
    created_at, updated_at, health_check_url, paused_at, paused_reason, pause_probe_after, \
    pause_probe_instance, deleting_since, spend_cap_per_hour_micros, spend_capped_since, \
    disruption_budget, max_lifetime_seconds, idle_timeout_seconds, idle_action, \
    warm_size, (SELECT count(*) FROM instances w WHERE w.pool = pools.name AND w.state = 'warm') \
    AS warm_count"
    };
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PoolRow {
    pub name: String,
    pub provider: String,
    pub instance_type: String,
    pub region: String,
    pub image: String,
    pub desired_capacity: i32,
    pub volume_size_gb: i32,
    pub booting_timeout_seconds: Option<i32>,
    pub installing_timeout_seconds: Option<i32>,
    pub starting_timeout_seconds: Option<i32>,
    pub draining_timeout_seconds: Option<i32>,
    pub price_per_hour_micros: i64,
    pub labels: Json<BTreeMap<String, String>>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Where workers answer an active health check ('' for none); see
    /// [`crate::health`].
    pub health_check_url: String,
    /// Set while the pool is paused: no new machines are created for it
    /// (see [`crate::pool_pause`]).
    pub paused_at: Option<DateTime<Utc>>,
    pub paused_reason: Option<String>,
    /// When one probe instance of the paused pool may go through (`None`:
    /// no probe; an operator's pause waits for an operator).
    pub pause_probe_after: Option<DateTime<Utc>>,
    /// The probe instance under way.
    pub pause_probe_instance: Option<uuid::Uuid>,
    /// Set while the pool is being deleted: no new instances, no capacity
    /// kept; see [`crate::pool_delete`].
    pub deleting_since: Option<DateTime<Utc>>,
    /// Most the pool's live instances may cost per hour (micros); 0: no
    /// cap. See [`crate::spend`].
    pub spend_cap_per_hour_micros: i64,
    /// Set while pool capacity is held below the desired count by the cap.
    pub spend_capped_since: Option<DateTime<Utc>>,
    /// Most instances voluntarily disrupted at once: a count or a
    /// percentage (see [`flotilla_core::disruption::Budget`]).
    pub disruption_budget: String,
    /// After this long an instance is replaced (0: never).
    pub max_lifetime_seconds: i32,
    /// After reporting idle this long an instance above the desired
    /// capacity is drained and terminated (0: never).
    pub idle_timeout_seconds: i32,
    /// What idle stop does: `terminate`, or `stop` (back to warm stock).
    pub idle_action: String,
    /// Machines the pool keeps created and not started (see
    /// [`crate::warm`]); 0: none.
    pub warm_size: i32,
    /// Instances of the pool in state `warm` when the row was read (not a
    /// column: counted by the query that read it).
    pub warm_count: i64,
}

impl PoolRow {
    /// Where the pool's machines live, as provider calls name it.
    pub fn target(&self) -> Option<v1::ProviderTarget> {
        Some(v1::ProviderTarget {
            provider: self.provider.clone(),
            pool: self.name.clone(),
            region: self.region.clone(),
        })
    }

    /// What the pool's idle stop does (the schema's CHECK keeps the
    /// column one of the two).
    pub fn idle_action(&self) -> IdleAction {
        self.idle_action.parse().unwrap_or_default()
    }

    /// The pool's disruption budget; the schema's CHECK keeps the column
    /// parseable, and a row that is not gets the default rather than none.
    pub fn budget(&self) -> Budget {
        self.disruption_budget.parse().unwrap_or_else(|e| {
            tracing::warn!(pool = %self.name, "{e}; using the default budget");
            Budget::DEFAULT
        })
    }

    /// What one machine of the pool costs per hour: its own price, else
    /// the table's for its instance type, else 0.
    pub fn unit_price(&self, prices: &PriceTable) -> i64 {
        prices.unit_price(self.price_per_hour_micros, &self.instance_type)
    }

    /// The pool as the API shows it. Its current spend rate is not a
    /// column: the caller adds it (`spend_per_hour_micros`, see
    /// [`crate::spend::spend_live_counts`]).
    pub fn to_proto(&self) -> v1::Pool {
        let secs = |v: Option<i32>| v.map_or(0, |s| s.max(0) as u32);
        v1::Pool {
            name: self.name.clone(),
            provider: self.provider.clone(),
            instance_type: self.instance_type.clone(),
            region: self.region.clone(),
            desired_capacity: self.desired_capacity.max(0) as u32,
            timeouts: Some(v1::PoolTimeouts {
                booting_seconds: secs(self.booting_timeout_seconds),
                installing_seconds: secs(self.installing_timeout_seconds),
                starting_seconds: secs(self.starting_timeout_seconds),
                draining_seconds: secs(self.draining_timeout_seconds),
            }),
            labels: self.labels.0.clone().into_iter().collect(),
            image: self.image.clone(),
            volume_size_gb: self.volume_size_gb.max(0) as u32,
            price_per_hour_micros: self.price_per_hour_micros.max(0) as u64,
            version: self.version as u64,
            created_at: Some(to_timestamp(self.created_at)),
            health_check_url: self.health_check_url.clone(),
            paused_at: self.paused_at.map(to_timestamp),
            paused_reason: self.paused_reason.clone().unwrap_or_default(),
            pause_probe_after: self.pause_probe_after.map(to_timestamp),
            pause_probe_instance_id: self
                .pause_probe_instance
                .map(|u| u.to_string())
                .unwrap_or_default(),
            deleting_since: self.deleting_since.map(to_timestamp),
            recent_events: Vec::new(),
            spend_cap_per_hour_micros: self.spend_cap_per_hour_micros.max(0) as u64,
            spend_per_hour_micros: 0,
            spend_capped_since: self.spend_capped_since.map(to_timestamp),
            disruption_budget: self.disruption_budget.clone(),
            max_lifetime_seconds: self.max_lifetime_seconds.max(0) as u32,
            idle_timeout_seconds: self.idle_timeout_seconds.max(0) as u32,
            idle_action: self.idle_action.clone(),
            disrupted: 0,
            warm_size: self.warm_size.max(0) as u32,
            warm_count: self.warm_count.clamp(0, u32::MAX as i64) as u32,
        }
    }
}

/// A pool to create; validated by the caller (the API) before it gets here,
/// and again by the schema's CHECK constraints.
#[derive(Debug, Clone, Default)]
pub struct NewPool {
    pub name: String,
    pub provider: String,
    pub instance_type: String,
    pub region: String,
    pub image: String,
    pub desired_capacity: i32,
    pub volume_size_gb: i32,
    pub booting_timeout_seconds: Option<i32>,
    pub installing_timeout_seconds: Option<i32>,
    pub starting_timeout_seconds: Option<i32>,
    pub draining_timeout_seconds: Option<i32>,
    pub price_per_hour_micros: i64,
    pub labels: BTreeMap<String, String>,
    pub health_check_url: String,
    /// 0: no cap.
    pub spend_cap_per_hour_micros: i64,
    /// `None`: the default budget.
    pub disruption_budget: Option<Budget>,
    /// 0: never.
    pub max_lifetime_seconds: i32,
    /// 0: never.
    pub idle_timeout_seconds: i32,
    /// `None`: `terminate`.
    pub idle_action: Option<IdleAction>,
    /// 0: no warm stock.
    pub warm_size: i32,
}

/// Creates a pool; [`StoreError::Duplicate`] when the name is taken.
pub async fn pool_create(conn: &mut PgConnection, p: &NewPool) -> Result<PoolRow> {
    Ok(sqlx::query_as(concat!(
        "INSERT INTO pools (name, provider, instance_type, region, image, desired_capacity,
             volume_size_gb, booting_timeout_seconds, installing_timeout_seconds,
             starting_timeout_seconds, draining_timeout_seconds, price_per_hour_micros, labels,
             health_check_url, spend_cap_per_hour_micros, disruption_budget,
             max_lifetime_seconds, idle_timeout_seconds, warm_size, idle_action)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
             $18, $19, $20)
         RETURNING ",
        pool_columns!()
    ))
    .bind(&p.name)
    .bind(&p.provider)
    .bind(&p.instance_type)
    .bind(&p.region)
    .bind(&p.image)
    .bind(p.desired_capacity)
    .bind(p.volume_size_gb)
    .bind(p.booting_timeout_seconds)
    .bind(p.installing_timeout_seconds)
    .bind(p.starting_timeout_seconds)
    .bind(p.draining_timeout_seconds)
    .bind(p.price_per_hour_micros)
    .bind(Json(&p.labels))
    .bind(&p.health_check_url)
    .bind(p.spend_cap_per_hour_micros)
    .bind(p.disruption_budget.unwrap_or_default().to_string())
    .bind(p.max_lifetime_seconds)
    .bind(p.idle_timeout_seconds)
    .bind(p.warm_size)
    .bind(p.idle_action.unwrap_or_default().as_str())
    .fetch_one(conn)
    .await?)
}

pub async fn pool_get(conn: &mut PgConnection, name: &str) -> Result<Option<PoolRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        pool_columns!(),
        " FROM pools WHERE name = $1"
    ))
    .bind(name)
    .fetch_optional(conn)
    .await?)
}

pub async fn pool_list(conn: &mut PgConnection) -> Result<Vec<PoolRow>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        pool_columns!(),
        " FROM pools ORDER BY name"
    ))
    .fetch_all(conn)
    .await?)
}

/// Sets the desired capacity; when `expected_version` is given the write
/// applies only at that version ([`StoreError::Conflict`] otherwise).
pub async fn pool_set_desired_capacity(
    conn: &mut PgConnection,
    name: &str,
    desired: i32,
    expected_version: Option<i64>,
) -> Result<PoolRow> {
    let row: Option<PoolRow> = sqlx::query_as(concat!(
        "UPDATE pools SET desired_capacity = $2, version = version + 1, updated_at = now()
         WHERE name = $1 AND ($3::bigint IS NULL OR version = $3) RETURNING ",
        pool_columns!()
    ))
    .bind(name)
    .bind(desired)
    .bind(expected_version)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => match pool_get(conn, name).await? {
            Some(p) => Err(StoreError::Conflict(format!(
                "pool {name} is at version {}, expected {expected_version:?}",
                p.version
            ))),
            None => Err(StoreError::NotFound(format!("pool {name}"))),
        },
    }
}

/// Per-pool phase deadlines to store; `None` means "use the service default".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolTimeoutsUpdate {
    pub booting_seconds: Option<i32>,
    pub installing_seconds: Option<i32>,
    pub starting_seconds: Option<i32>,
    pub draining_seconds: Option<i32>,
}

/// A partial update of a pool: each `Some` replaces the stored value.
#[derive(Debug, Clone, Default)]
pub struct PoolUpdate {
    pub desired_capacity: Option<i32>,
    /// Replaces all four deadlines at once, as the API's `PoolTimeouts` message does.
    pub timeouts: Option<PoolTimeoutsUpdate>,
    pub price_per_hour_micros: Option<i64>,
    /// '' turns active health checks off.
    pub health_check_url: Option<String>,
    /// 0 removes the cap.
    pub spend_cap_per_hour_micros: Option<i64>,
    pub disruption_budget: Option<Budget>,
    /// 0 turns expiry off.
    pub max_lifetime_seconds: Option<i32>,
    /// 0 turns idle stop off.
    pub idle_timeout_seconds: Option<i32>,
    pub idle_action: Option<IdleAction>,
    /// 0 lets the whole warm stock go.
    pub warm_size: Option<i32>,
}

/// The pool after an update, and its desired capacity before it, so the
/// caller can tell whether capacity changed (and wake the scheduler).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PoolUpdated {
    #[sqlx(flatten)]
    pub pool: PoolRow,
    pub previous_capacity: i32,
}

/// Applies `u`; when `expected_version` is given the write applies only at
/// that version ([`StoreError::Conflict`] otherwise, [`StoreError::NotFound`]
/// for an unknown pool). Bumps the version.
pub async fn pool_update(
    conn: &mut PgConnection,
    name: &str,
    u: &PoolUpdate,
    expected_version: Option<i64>,
) -> Result<PoolUpdated> {
    let t = u.timeouts.unwrap_or_default();
    // The CTE reads the old capacity under the row lock the UPDATE takes
    // anyway, so "previous" is the value this write replaced.
    let row: Option<PoolUpdated> = sqlx::query_as(concat!(
        "WITH old AS (
             SELECT name AS old_name, desired_capacity AS previous_capacity
             FROM pools WHERE name = $1 FOR UPDATE
         )
         UPDATE pools SET
             desired_capacity = COALESCE($2::int, desired_capacity),
             booting_timeout_seconds = CASE WHEN $3::bool THEN $4::int ELSE booting_timeout_seconds END,
             installing_timeout_seconds = CASE WHEN $3::bool THEN $5::int ELSE installing_timeout_seconds END,
             starting_timeout_seconds = CASE WHEN $3::bool THEN $6::int ELSE starting_timeout_seconds END,
             draining_timeout_seconds = CASE WHEN $3::bool THEN $7::int ELSE draining_timeout_seconds END,
             price_per_hour_micros = COALESCE($8::bigint, price_per_hour_micros),
             health_check_url = COALESCE($10::text, health_check_url),
             spend_cap_per_hour_micros = COALESCE($11::bigint, spend_cap_per_hour_micros),
             disruption_budget = COALESCE($12::text, disruption_budget),
             max_lifetime_seconds = COALESCE($13::int, max_lifetime_seconds),
             idle_timeout_seconds = COALESCE($14::int, idle_timeout_seconds),
             warm_size = COALESCE($15::int, warm_size),
             idle_action = COALESCE($16::text, idle_action),
             version = version + 1, updated_at = now()
         FROM old
         WHERE name = old.old_name AND ($9::bigint IS NULL OR version = $9)
         RETURNING previous_capacity, ",
        pool_columns!()
    ))
    .bind(name)
    .bind(u.desired_capacity)
    .bind(u.timeouts.is_some())
    .bind(t.booting_seconds)
    .bind(t.installing_seconds)
    .bind(t.starting_seconds)
    .bind(t.draining_seconds)
    .bind(u.price_per_hour_micros)
    .bind(expected_version)
    .bind(u.health_check_url.as_deref())
    .bind(u.spend_cap_per_hour_micros)
    .bind(u.disruption_budget.map(|b| b.to_string()))
    .bind(u.max_lifetime_seconds)
    .bind(u.idle_timeout_seconds)
    .bind(u.warm_size)
    .bind(u.idle_action.map(IdleAction::as_str))
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => match pool_get(conn, name).await? {
            Some(p) => Err(StoreError::Conflict(format!(
                "pool {name} is at version {}, expected {}",
                p.version,
                expected_version.unwrap_or_default()
            ))),
            None => Err(StoreError::NotFound(format!("pool {name}"))),
        },
    }
}
