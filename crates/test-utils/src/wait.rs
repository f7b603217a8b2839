//! Waiting for a condition with a deadline, instead of sleeping for a time
//! that must be "long enough": a test polls what it waits for every few
//! milliseconds and goes on the moment it holds, or fails after a generous
//! deadline with a message naming what it waited for. On an idle machine a
//! wait costs what the system takes; on a busy CI runner it stretches
//! instead of failing.
//!
//! The deadline is wall-clock time (`std::time::Instant`), so a test on
//! tokio's paused clock, where virtual time leaps ahead whenever the
//! runtime idles on I/O, still gets its full real deadline; the poll
//! interval is a `tokio::time::sleep`, which the paused clock skips.
//!
//! "Nothing happens" is not something to wait for: wait instead for a
//! positive sign that the thing which could have acted did run (a loop's
//! activation count, a later event, a metric), then check it did nothing.

use std::fmt::{Debug, Display};
use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::PgPool;

/// The default deadline of a wait: generous, because a shared CI runner can
/// be many times slower than a laptop. A passing wait never takes it.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(10);

/// Polls `check` until it returns true, or until `deadline` has passed:
/// whether it held. For a caller that gathers its own diagnostics when a
/// wait fails (the others panic with what they waited for).
pub async fn holds_within<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let until = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns true; panics after `deadline` naming
/// `what` was waited for.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_some(what, deadline, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Polls `check` until it returns `Some`, and returns the value; panics
/// after `deadline` naming `what` was waited for.
pub async fn eventually_some<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `check` until it returns `Ok`, and returns the value; panics after
/// `deadline` naming `what` was waited for and the last error seen (what
/// was still wrong), so a failure says how far it got.
pub async fn eventually_ok<T, E, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let until = Instant::now() + deadline;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(e) => e,
        };
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}; last seen: {last:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually_ok`] for tests that drive processes and block the thread:
/// polls `check` `every` so often (a check there is costly: it may run a
/// process), until it returns `Ok`; panics after `deadline` naming `what`
/// and showing the last error (which may be a whole log).
pub fn eventually_blocking<T, E: Display>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let until = Instant::now() + deadline;
    loop {
        let last = match check() {
            Ok(value) => return value,
            Err(e) => e,
        };
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}\n{last}"
        );
        std::thread::sleep(every);
    }
}

/// Waits until the database's clock is past the lease of every instance
/// `owner` holds (`lease_until`), reading the rows rather than sleeping
/// for the lease: the moment another replica may claim them. The rows keep
/// `lease_owner`; only the time has run out.
pub async fn leases_run_out(db: &PgPool, owner: &str) {
    eventually(
        &format!("the leases of {owner} to run out"),
        DEADLINE,
        || async {
            let live: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM instances WHERE lease_owner = $1 AND lease_until >= now()",
            )
            .bind(owner)
            .fetch_one(db)
            .await
            .expect("read leases");
            live == 0
        },
    )
    .await
}

/// Waits until the database's clock is past `instance`'s lease (or it has
/// none), reading the row rather than sleeping for the lease.
pub async fn lease_run_out(db: &PgPool, instance: uuid::Uuid) {
    eventually(
        &format!("the lease of instance {instance} to run out"),
        DEADLINE,
        || async {
            let live: bool = sqlx::query_scalar(
                "SELECT COALESCE(lease_until >= now(), false) FROM instances WHERE id = $1",
            )
            .bind(instance)
            .fetch_one(db)
            .await
            .expect("read lease");
            !live
        },
    )
    .await
}

/// Waits until no connection named `app` (see [`crate::TestDb::url_as`])
/// is open to the database: the service that used that name has let go of
/// it, so nothing of it can read or write any more. This is the positive
/// sign a "nothing more happens after it stopped" check waits for.
pub async fn connections_closed(db: &PgPool, app: &str) {
    eventually_ok(
        &format!("the connections of {app} to close"),
        DEADLINE,
        || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1",
            )
            .bind(app)
            .fetch_one(db)
            .await
            .expect("read pg_stat_activity");
            match open {
                0 => Ok(()),
                n => Err(format!("{n} open")),
            }
        },
    )
    .await
}
