//! Spend caps: what a pool's live instances cost per hour, and the room
//! its cap leaves for new ones.
//!
//! Design notes: a pool's spend rate is the number of its live instances
//! (every state but terminated and abandoned: a failed instance's machine
//! may still run and bill), warm stock left out (below), times the price of one of its machines
//! ([`PoolRow::unit_price`]); all of a pool's machines have its instance
//! type. It is computed, never stored, so it cannot drift. A writer of new
//! instances asks [`spend_room`] inside the transaction that inserts
//! them: for a capped pool it locks the pool row (`FOR NO KEY UPDATE`,
//! which waits for another such writer and for a pool update, but not
//! for the `FOR KEY SHARE` every instance insert takes) before counting,
//! so two writers racing on one pool count each other's instances and
//! cannot together pass the cap. An uncapped pool takes no lock, so its
//! writers do not queue behind each other; a cap set while such a write
//! is under way applies from the next one.
//!
//! Warm stock (see [`crate::warm`]) is priced at its stopped price, which
//! the price table has as 0: a warm machine was never started, and both
//! providers bill a stopped machine for its storage only (Fly's pricing
//! page, fly.io/docs/about/pricing, bills Machines per second while they
//! run and a stopped Machine for its root file system; Scaleway's
//! docs-content `instances/how-to/use-standby-mode` says powering an
//! Instance off is how to stop being charged for it). An instance held warm, or on its
//! way to being warm (desired state `warm`), or a warm one being let go
//! (state `warm`), is not counted. A warm machine taken by `Provision`
//! counts from that transaction on, so the take is checked against the cap
//! like a cold instance; and the refill never holds more warm machines
//! than the cap would let the pool start ([`crate::warm`]).

use std::collections::HashMap;

use flotilla_core::InstanceState;
use flotilla_core::price::{PriceTable, format_amount};
use sqlx::PgConnection;

use crate::pool::PoolRow;
use crate::pool_pause::pool_event;
use crate::{Result, StoreError, WriteCtx};

/// Leaves warm stock out of a spend count (see the module docs).
macro_rules! not_warm {
    () => {
        "state <> 'warm' AND desired_state <> 'warm'"
    };
}

/// A pool's spend as a writer of new instances sees it under the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendRoom {
    /// What the pool's live instances cost per hour now (micros).
    pub rate: i64,
    /// What one more machine of the pool costs per hour (micros).
    pub unit_price: i64,
    /// The pool's cap (micros); `None`: no cap.
    pub cap: Option<i64>,
}

impl SpendRoom {
    /// No cap, nothing counted: everything fits.
    pub const UNCAPPED: SpendRoom = SpendRoom {
        rate: 0,
        unit_price: 0,
        cap: None,
    };

    /// What `n` more machines cost per hour.
    pub fn cost_of(&self, n: i64) -> i64 {
        self.unit_price.saturating_mul(n)
    }

    /// How many of `n` more machines fit under the cap (all of them
    /// without a cap, or when they are free).
    pub fn fitting(&self, n: i64) -> i64 {
        match self.cap {
            None => n,
            Some(_) if self.unit_price <= 0 => n,
            Some(cap) => ((cap - self.rate).max(0) / self.unit_price).min(n),
        }
    }

    /// Whether all of `n` more machines fit.
    pub fn admits(&self, n: i64) -> bool {
        self.fitting(n) >= n
    }

    /// Why `n` more machines of `pool` are refused, with the figures.
    pub fn refusal(&self, pool: &str, n: i64) -> String {
        format!(
            "pool {pool} spend cap: {n} more instance{} would cost {}/h on top of the current \
             {}/h, over the cap of {}/h; raise it with `flotilla pools set {pool} --spend-cap`, \
             or terminate instances first",
            if n == 1 { "" } else { "s" },
            format_amount(self.cost_of(n)),
            format_amount(self.rate),
            format_amount(self.cap.unwrap_or_default()),
        )
    }
}

/// The room `pool`'s cap leaves, read in the caller's transaction; for a
/// capped pool the row stays locked until that transaction ends, so the
/// caller's insert is counted by the next writer. [`StoreError::NotFound`]
/// for an unknown pool.
pub async fn spend_room(
    conn: &mut PgConnection,
    pool: &str,
    prices: &PriceTable,
) -> Result<SpendRoom> {
    let cap: Option<i64> =
        sqlx::query_scalar("SELECT spend_cap_per_hour_micros FROM pools WHERE name = $1")
            .bind(pool)
            .fetch_optional(&mut *conn)
            .await?;
    let Some(cap) = cap else {
        return Err(StoreError::NotFound(format!("pool {pool}")));
    };
    // Read again under the lock: the cap and the price may have changed
    // while this writer waited for the one before it.
    let row: Option<(i64, i64, String)> = sqlx::query_as(if cap > 0 {
        "SELECT spend_cap_per_hour_micros, price_per_hour_micros, instance_type
         FROM pools WHERE name = $1 FOR NO KEY UPDATE"
    } else {
        "SELECT spend_cap_per_hour_micros, price_per_hour_micros, instance_type
         FROM pools WHERE name = $1"
    })
    .bind(pool)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((cap, own_price, instance_type)) = row else {
        return Err(StoreError::NotFound(format!("pool {pool}")));
    };
    let unit_price = prices.unit_price(own_price, &instance_type);
    let live: i64 = sqlx::query_scalar(concat!(
        "SELECT count(*) FROM instances WHERE pool = $1 AND state <> ALL($2) AND ",
        not_warm!()
    ))
    .bind(pool)
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .fetch_one(&mut *conn)
    .await?;
    Ok(SpendRoom {
        rate: unit_price.saturating_mul(live),
        unit_price,
        cap: (cap > 0).then_some(cap),
    })
}

/// Live (not terminated or abandoned) instances of each pool that has
/// any, or of `only` that pool.
pub async fn spend_live_counts(
    conn: &mut PgConnection,
    only: Option<&str>,
) -> Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(concat!(
        "SELECT pool, count(*) FROM instances
             WHERE state <> ALL($1) AND ($2::text IS NULL OR pool = $2) AND ",
        not_warm!(),
        " GROUP BY pool"
    ))
    .bind(InstanceState::strs(InstanceState::TERMINAL))
    .bind(only)
    .fetch_all(conn)
    .await?;
    Ok(rows.into_iter().collect())
}

/// What `pool`'s live instances cost per hour, given their count.
pub fn spend_rate(pool: &PoolRow, prices: &PriceTable, live: i64) -> i64 {
    pool.unit_price(prices).saturating_mul(live)
}

/// Records whether pool capacity is held below the desired count by the
/// spend cap: when that starts and ends (`spend_capped_since`, and a
/// `pool_events` row each time). Answers `true` only to the writer that
/// changed it, so an episode is reported once, whichever replica sees it
/// and however many ticks it lasts.
pub async fn spend_mark_capped(
    conn: &mut PgConnection,
    ctx: &WriteCtx,
    pool: &str,
    capped: bool,
    reason: &str,
) -> Result<bool> {
    let changed = sqlx::query(if capped {
        "UPDATE pools SET spend_capped_since = now()
         WHERE name = $1 AND spend_capped_since IS NULL"
    } else {
        "UPDATE pools SET spend_capped_since = NULL
         WHERE name = $1 AND spend_capped_since IS NOT NULL"
    })
    .bind(pool)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if changed {
        let action = if capped {
            "spend_capped"
        } else {
            "spend_cap_cleared"
        };
        pool_event(conn, ctx, pool, action, None, reason).await?;
    }
    Ok(changed)
}
