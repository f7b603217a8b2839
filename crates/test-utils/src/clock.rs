//! Time passing for rows, without waiting for it: a test of a deadline of a
//! minute sets the deadline to a minute and moves the rows' clocks back
//! past it, instead of setting it to a second and sleeping "a bit more
//! than a second" (which a busy machine turns into a flake either way: the
//! deadline passes before the "not yet" check, or not before the "now"
//! check). The code under test compares these columns with the database's
//! `now()`, so to it the rows look exactly as old as they would after the
//! wait.

use std::time::Duration;

use sqlx::PgPool;

/// Every timestamp of the `ids` instances moves `by` into the past: the
/// time in their state, their last heartbeat, their suspicion, their lease,
/// their next attempt, when they were created and updated. To the loops it
/// is as if `by` had passed for these rows (and for nothing else: pools,
/// health checks and the action log keep their times).
pub async fn age_instances(db: &PgPool, ids: &[uuid::Uuid], by: Duration) {
    sqlx::query(
        "UPDATE instances SET
             state_entered_at = state_entered_at - make_interval(secs => $2),
             next_attempt_at = next_attempt_at - make_interval(secs => $2),
             last_heartbeat = last_heartbeat - make_interval(secs => $2),
             heartbeat_mark = heartbeat_mark - make_interval(secs => $2),
             suspect_since = suspect_since - make_interval(secs => $2),
             idle_since = idle_since - make_interval(secs => $2),
             missing_since = missing_since - make_interval(secs => $2),
             lease_until = lease_until - make_interval(secs => $2),
             created_at = created_at - make_interval(secs => $2),
             updated_at = updated_at - make_interval(secs => $2)
         WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(by.as_secs_f64())
    .execute(db)
    .await
    .expect("age instances");
}

/// The leases `owner` holds run out now, as they would once their time had
/// passed: `lease_until` moves to the database's present, `lease_owner`
/// stays. For tests where a dead replica's long lease ending is the
/// premise, not the subject (tests of a lease running out on its own use
/// a short lease and [`crate::wait::leases_run_out`]).
pub async fn run_out_leases(db: &PgPool, owner: &str) {
    sqlx::query(
        "UPDATE instances SET lease_until = now() - interval '1 millisecond'
         WHERE lease_owner = $1 AND lease_until >= now()",
    )
    .bind(owner)
    .execute(db)
    .await
    .expect("run out leases");
}
