//! The watchdog on a real PostgreSQL against the simulated cloud behind a
//! real provider-adapter: dead and paused workers, the storm guard, lost
//! machines, orphan machines and volumes (those of abandoned instances
//! too), dry run, two replicas, stuck-state recovery, and the spend gauges.

#[path = "abandon.rs"]
mod abandon;
#[path = "observability.rs"]
mod observability;
#[path = "shutdown.rs"]
mod shutdown;
#[path = "spend.rs"]
mod spend;
#[path = "warm.rs"]
mod warm;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_sim_provider::Faults;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{
    InstanceRow, NewInstance, Transition, instance_get, instance_insert_requested,
    instance_transition,
};
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_test_utils::fleet::{ReadySpec, ready_instances, target};
use flotilla_test_utils::stack::{ProviderStack, documented, provider_stack};
use flotilla_test_utils::{
    DEADLINE, TestDb, age_instances, eventually, eventually_ok, eventually_some,
};
use flotilla_watchdog::{Watchdog, WatchdogTuning};

struct Env {
    db: TestDb,
    stack: ProviderStack,
}

async fn env(faults: Faults) -> Env {
    let db = TestDb::new().await;
    let stack = provider_stack(faults, &[]).await;
    let mut conn = db.pool.acquire().await.unwrap();
    pool_create(
        &mut conn,
        &NewPool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            image: "img".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Env { db, stack }
}

/// The tuning flags as a binary takes them; a flag given again (a test's
/// own) overrides the default before it.
#[derive(Parser)]
#[command(args_override_self = true)]
struct Tuning {
    #[command(flatten)]
    t: WatchdogTuning,
}

/// A watchdog whose heartbeat timeout (a minute) and confirm grace (two)
/// the tests pass by ageing the rows ([`age`]), so "not yet" and "now"
/// are both certain however busy the machine; the tests that measure how
/// soon it acts in real time ask for short ones.
fn watchdog(env: &Env, owner: &str, extra: &[&str]) -> Watchdog {
    let mut argv = vec![
        "x",
        "--watchdog-tick-ms",
        "50",
        "--worker-heartbeat-timeout-seconds",
        "60",
        "--worker-dead-confirm-seconds",
        "120",
        "--orphan-grace-seconds",
        "1",
        "--watchdog-lease-seconds",
        "60",
    ];
    argv.extend_from_slice(extra);
    Watchdog {
        db: env.db.pool.clone(),
        provider: env.stack.client.clone(),
        tuning: Tuning::try_parse_from(argv).unwrap().t,
        owner: owner.into(),
    }
}

async fn machine(env: &Env, instance: InstanceId) -> v1::Machine {
    env.stack
        .client
        .clone()
        .create_machine(v1::CreateMachineRequest {
            target: target(),
            instance_id: instance.to_string(),
            name: "w".into(),
            instance_type: "shared-cpu-1x".into(),
            image: "img".into(),
            start: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

/// `n` ready instances with started machines and a fresh heartbeat.
async fn ready(env: &Env, n: usize) -> Vec<InstanceId> {
    let spec = ReadySpec {
        labels: BTreeMap::from([("team".into(), "ml".into())]),
        ..ReadySpec::default()
    };
    let ids: Vec<InstanceId> = ready_instances(&env.db.pool, &env.stack.client, n, &spec)
        .await
        .into_iter()
        .map(|r| r.id)
        .collect();
    heartbeat(env, &ids).await;
    ids
}

async fn heartbeat(env: &Env, ids: &[InstanceId]) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    sqlx::query("UPDATE instances SET last_heartbeat = now() WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&env.db.pool)
        .await
        .unwrap();
}

async fn get(env: &Env, id: InstanceId) -> InstanceRow {
    let mut conn = env.db.pool.acquire().await.unwrap();
    instance_get(&mut conn, id).await.unwrap().unwrap()
}

async fn replacements_of(env: &Env, id: InstanceId) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE labels ->> 'flotilla.dev/replaces' = $1",
    )
    .bind(id.to_string())
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

fn kill(env: &Env, machine_id: &str) {
    env.stack.sim.sim().kill(machine_id).unwrap();
}

/// Past the heartbeat timeout of [`watchdog`] (60 s).
const PAST_TIMEOUT: u64 = 61;
/// Past its confirm grace (120 s).
const PAST_CONFIRM: u64 = 121;

/// The instances' rows age `secs` seconds (silence, suspicion, leases), as
/// if that time had passed without a heartbeat.
async fn age(env: &Env, ids: &[InstanceId], secs: u64) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    age_instances(&env.db.pool, &ids, Duration::from_secs(secs)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_detected_within_the_timeout_plus_a_tick_and_replaced() {
    let env = env(documented()).await;
    let ids = ready(&env, 2).await;
    // A real 1 s timeout: this test measures how soon a death is seen.
    let w = watchdog(&env, "w1", &["--worker-heartbeat-timeout-seconds", "1"]);
    let victim = get(&env, ids[0]).await;
    // Its last heartbeat, then it dies: its process exits, so its machine
    // stops. Silence is measured from that heartbeat.
    let died = Instant::now();
    heartbeat(&env, &ids).await;
    kill(&env, victim.provider_machine_id.as_deref().unwrap());
    eventually("the dead worker declared", DEADLINE, || async {
        heartbeat(&env, &ids[1..]).await;
        w.dead_workers_once().await;
        get(&env, ids[0]).await.state == InstanceState::WorkerDead
    })
    .await;
    let latency = died.elapsed();
    println!("dead worker detected after {latency:?} (timeout 1 s, tick 50 ms)");
    assert!(
        latency >= Duration::from_secs(1),
        "not before the timeout: {latency:?}"
    );
    // The figure is timeout + one tick (printed above); the bound only
    // guards against "much later" (the 120 s confirm grace, which a
    // stopped machine must not wait for) on a loaded machine.
    assert!(
        latency < Duration::from_secs(20),
        "detected far too late: {latency:?}"
    );
    let dead = get(&env, ids[0]).await;
    assert_eq!(
        dead.desired_state,
        DesiredState::Terminated,
        "handed to the terminator"
    );
    assert_eq!(replacements_of(&env, ids[0]).await, 1);
    assert_eq!(
        get(&env, ids[1]).await.state,
        InstanceState::Ready,
        "the live one is untouched"
    );
    let cmds: Vec<String> =
        sqlx::query_scalar("SELECT subject FROM outbox WHERE subject LIKE 'CMD.%' ORDER BY id")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(cmds, ["CMD.terminate", "CMD.provision"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_past_its_max_lifetime_is_not_replaced_twice() {
    let env = env(documented()).await;
    let ids = ready(&env, 1).await;
    // Pool capacity asked for its replacement already (max lifetime).
    sqlx::query("UPDATE instances SET disruption = 'expiring' WHERE id = $1")
        .bind(ids[0].0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    let w = watchdog(&env, "w1", &["--worker-heartbeat-timeout-seconds", "1"]);
    heartbeat(&env, &ids).await;
    kill(
        &env,
        get(&env, ids[0])
            .await
            .provider_machine_id
            .as_deref()
            .unwrap(),
    );
    eventually("the dead worker declared", DEADLINE, || async {
        w.dead_workers_once().await;
        get(&env, ids[0]).await.state == InstanceState::WorkerDead
    })
    .await;
    assert_eq!(
        get(&env, ids[0]).await.desired_state,
        DesiredState::Terminated
    );
    assert_eq!(
        replacements_of(&env, ids[0]).await,
        0,
        "its replacement is capacity's, on the way already"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_that_resumes_before_confirmation_is_not_replaced() {
    let env = env(documented()).await;
    let ids = ready(&env, 1).await;
    let w = watchdog(&env, "w1", &[]);
    // Silent past the timeout, but its machine still runs (SIGSTOP).
    age(&env, &ids, PAST_TIMEOUT).await;
    w.dead_workers_once().await;
    let suspect = get(&env, ids[0]).await;
    assert_eq!(suspect.state, InstanceState::Ready);
    assert!(suspect.suspect_since.is_some(), "suspect");
    // Resumed: a heartbeat clears the suspicion.
    heartbeat(&env, &ids).await;
    w.dead_workers_once().await;
    let row = get(&env, ids[0]).await;
    assert!(row.suspect_since.is_none());
    // The confirm grace passes; it keeps beating.
    age(&env, &ids, PAST_CONFIRM).await;
    heartbeat(&env, &ids).await;
    w.dead_workers_once().await;
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Ready);
    assert_eq!(replacements_of(&env, ids[0]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_whose_machine_runs_is_declared_dead_after_the_confirm_grace() {
    let env = env(documented()).await;
    let ids = ready(&env, 1).await;
    let w = watchdog(&env, "w1", &[]);
    age(&env, &ids, PAST_TIMEOUT).await;
    w.dead_workers_once().await;
    let suspect = get(&env, ids[0]).await;
    assert_eq!(suspect.state, InstanceState::Ready);
    assert!(suspect.suspect_since.is_some(), "suspect, within the grace");
    age(&env, &ids, PAST_CONFIRM).await;
    w.dead_workers_once().await;
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::WorkerDead);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_pool_going_silent_holds_remediation_instead_of_replacing_it() {
    let env = env(documented()).await;
    let ids = ready(&env, 8).await;
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "0.4"]);
    for id in &ids[..4] {
        kill(
            &env,
            get(&env, *id).await.provider_machine_id.as_deref().unwrap(),
        );
    }
    age(&env, &ids, PAST_TIMEOUT).await;
    heartbeat(&env, &ids[4..]).await;
    w.dead_workers_once().await;
    for id in &ids {
        assert_eq!(
            get(&env, *id).await.state,
            InstanceState::Ready,
            "held, not remediated"
        );
    }
    let held: bool =
        sqlx::query_scalar("SELECT storm_hold_since IS NOT NULL FROM pools WHERE name = 'gpu'")
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert!(held, "the hold is visible on the pool");
    let extra: i64 = sqlx::query_scalar("SELECT count(*) FROM instances")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(extra, 8, "no replacements during the storm");
    // Most of them come back: the share drops and remediation resumes.
    heartbeat(&env, &ids[1..]).await;
    w.dead_workers_once().await;
    // The one still silent stays so for another timeout (its lease from
    // the held pass runs out with it).
    age(&env, &ids[..1], PAST_TIMEOUT).await;
    heartbeat(&env, &ids[1..]).await;
    w.dead_workers_once().await;
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::WorkerDead);
    let held: bool =
        sqlx::query_scalar("SELECT storm_hold_since IS NOT NULL FROM pools WHERE name = 'gpu'")
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert!(!held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_deleted_after_the_grace_age_and_only_reported_in_dry_run() {
    let env = env(documented()).await;
    let ids = ready(&env, 1).await;
    // A tagged machine and volume nobody recorded (a crash after create).
    let stray = InstanceId::new();
    let orphan = machine(&env, stray).await;
    let vol = env
        .stack
        .client
        .clone()
        .create_volume(v1::CreateVolumeRequest {
            target: target(),
            instance_id: stray.to_string(),
            name: String::new(),
            size_gb: 1,
            tags: Default::default(),
        })
        .await
        .unwrap()
        .into_inner();
    // The grace age is the provider's record of when the machine was
    // created, so it cannot be aged here: a watchdog with an hour's grace
    // sees them young, one with a second's grace (1 s) sees them old
    // once a second has passed.
    let patient = watchdog(&env, "w0", &["--orphan-grace-seconds", "3600"]);
    let (_, young) = patient.orphans_once().await;
    assert!(
        young.orphan_machines.is_empty() && young.orphan_volumes.is_empty(),
        "younger than the grace age"
    );
    assert!(young.deleted_machines.is_empty() && young.deleted_volumes.is_empty());
    let w = watchdog(&env, "w1", &[]);
    let dry = watchdog(&env, "w2", &["--watchdog-dry-run", "true"]);
    let report = eventually_some("the orphans past their grace age", DEADLINE, || async {
        let (_, report) = dry.orphans_once().await;
        (!report.orphan_machines.is_empty() && !report.orphan_volumes.is_empty()).then_some(report)
    })
    .await;
    heartbeat(&env, &ids).await;
    assert_eq!(report.orphan_machines, std::slice::from_ref(&orphan.id));
    assert_eq!(report.orphan_volumes, std::slice::from_ref(&vol.id));
    assert!(report.deleted_machines.is_empty() && report.deleted_volumes.is_empty());
    assert!(
        env.stack
            .sim
            .sim()
            .machine(&orphan.id)
            .unwrap()
            .machine
            .state
            .to_string()
            == "started"
    );
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.deleted_machines, std::slice::from_ref(&orphan.id));
    assert_eq!(report.deleted_volumes, std::slice::from_ref(&vol.id));
    assert!(
        report.lost_instances.is_empty(),
        "the recorded machine is not touched"
    );
    // Deleted: on its way (`destroying` takes a moment) or gone.
    let orphan_state = env
        .stack
        .sim
        .sim()
        .machine(&orphan.id)
        .unwrap()
        .machine
        .state
        .to_string();
    assert!(
        ["destroying", "destroyed"].contains(&orphan_state.as_str()),
        "{orphan_state}"
    );
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Ready);
}

/// Moves the rows' clocks back by `secs`: `created_at` (the lost
/// verdict's minimum age) when `created`, and always `updated_at` (rows
/// recorded before a listing started are expected in it).
async fn age_rows(env: &Env, ids: &[InstanceId], secs: f64, created: bool) {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    sqlx::query(
        "UPDATE instances SET updated_at = updated_at - make_interval(secs => $2),
             created_at = CASE WHEN $3 THEN created_at - make_interval(secs => $2)
                               ELSE created_at END
         WHERE id = ANY($1)",
    )
    .bind(&ids)
    .bind(secs)
    .bind(created)
    .execute(&env.db.pool)
    .await
    .unwrap();
}

async fn count(env: &Env, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
}

/// Deletes an instance's machine behind Flotilla's back.
async fn destroy_behind_our_back(env: &Env, id: InstanceId) -> String {
    let machine_id = get(env, id).await.provider_machine_id.unwrap();
    env.stack
        .client
        .clone()
        .delete_machine(v1::DeleteMachineRequest {
            target: target(),
            machine_id: machine_id.clone(),
            force: true,
        })
        .await
        .unwrap();
    // The destroy takes a moment at the provider (`destroying` is still
    // listed); the machine is gone from listings once it is `destroyed`.
    eventually("the destroy to finish", DEADLINE, || async {
        env.stack
            .sim
            .sim()
            .machine(&machine_id)
            .is_none_or(|m| m.machine.state.to_string() == "destroyed")
    })
    .await;
    machine_id
}

fn set_listing(env: &Env, listing: flotilla_sim_provider::Listing) {
    env.stack
        .sim
        .sim()
        .update_faults(|f| f.listing = listing)
        .unwrap();
}

/// Nothing was declared gone or replaced, every row is still `ready`.
async fn nothing_replaced(env: &Env, ids: &[InstanceId]) {
    for id in ids {
        assert_eq!(get(env, *id).await.state, InstanceState::Ready, "{id}");
    }
    assert_eq!(
        count(env, "SELECT count(*) FROM instances").await,
        ids.len() as i64,
        "no replacement was asked for"
    );
    assert_eq!(
        count(
            env,
            "SELECT count(*) FROM action_logs WHERE to_state = 'lost'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_deleted_behind_our_back_is_lost_after_the_min_age_once_a_get_confirms() {
    let env = env(documented()).await;
    let ids = ready(&env, 4).await;
    // Recorded long before the listing, but created just now.
    age_rows(&env, &ids, 3600.0, false).await;
    let machine_id = destroy_behind_our_back(&env, ids[0]).await;
    let w = watchdog(&env, "w1", &[]);
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.missing_instances, [ids[0]], "a suspect");
    assert!(
        report.lost_instances.is_empty(),
        "younger than WATCHDOG_LOST_MIN_AGE_SECONDS (30 s by default)"
    );
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Ready);
    assert!(
        sqlx::query_scalar::<_, Option<f64>>(
            "SELECT extract(epoch FROM missing_since)::float8 FROM instances WHERE id = $1"
        )
        .bind(ids[0].0)
        .fetch_one(&env.db.pool)
        .await
        .unwrap()
        .is_some(),
        "the suspicion is recorded"
    );

    age_rows(&env, &ids, 3600.0, true).await;
    env.stack.sim.sim().set_recording(true);
    let (_, report) = w.orphans_once().await;
    assert_eq!(report.lost_instances, [ids[0]]);
    let gets: Vec<_> = env
        .stack
        .sim
        .sim()
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with(&format!("/machines/{machine_id}")))
        .collect();
    // Gone is a 404, or `destroyed` while the provider still shows it.
    assert!(
        !gets.is_empty() && gets.iter().all(|r| r.status == 404 || r.status == 200),
        "a direct look at the machine confirmed it gone: {gets:?}"
    );
    let lost = get(&env, ids[0]).await;
    assert_eq!(lost.state, InstanceState::Lost);
    assert_eq!(lost.desired_state, DesiredState::Terminated);
    assert_eq!(replacements_of(&env, ids[0]).await, 1);
    for id in &ids[1..] {
        assert_eq!(get(&env, *id).await.state, InstanceState::Ready);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_recorded_within_the_clock_skew_margin_is_no_suspect() {
    let env = env(documented()).await;
    let ids = ready(&env, 4).await;
    // Last written 10 s before the listing, by the database's clock.
    age_rows(&env, &ids, 10.0, false).await;
    destroy_behind_our_back(&env, ids[0]).await;
    let wide = watchdog(&env, "w1", &["--orphan-scan-clock-skew-seconds", "60"]);
    let (_, report) = wide.orphans_once().await;
    assert!(
        report.missing_instances.is_empty(),
        "inside a 60 s margin the row may postdate the listing: {report:?}"
    );
    // The default margin (2 s) is narrower than its 10 s.
    let (_, report) = watchdog(&env, "w1", &[]).orphans_once().await;
    assert_eq!(report.missing_instances, [ids[0]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_listing_is_counted_and_changes_nothing() {
    let env = env(documented()).await;
    let ids = ready(&env, 5).await;
    age_rows(&env, &ids, 3600.0, true).await;
    set_listing(&env, flotilla_sim_provider::Listing::Empty);
    // The storm guard out of the way: the empty listing alone must hold.
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "1.0"]);
    for pass in 0..3 {
        let (_, report) = w.orphans_once().await;
        assert_eq!(report.empty_listings, 1, "pass {pass}");
        assert!(report.missing_instances.is_empty(), "no suspicion at all");
        assert!(report.lost_instances.is_empty());
    }
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM instances WHERE missing_since IS NOT NULL"
        )
        .await,
        0
    );
    nothing_replaced(&env, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_listing_replaces_nothing_because_a_direct_look_finds_the_machines() {
    let env = env(documented()).await;
    let ids = ready(&env, 5).await;
    age_rows(&env, &ids, 3600.0, true).await;
    set_listing(
        &env,
        flotilla_sim_provider::Listing::Partial {
            hidden_fraction: 0.4,
        },
    );
    // Neither the minimum age nor the storm guard protects them here.
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "1.0"]);
    for _ in 0..3 {
        let (_, report) = w.orphans_once().await;
        assert_eq!(report.missing_instances.len(), 2, "two of five hidden");
        assert!(report.lost_instances.is_empty());
        assert!(report.held_pools.is_empty());
    }
    nothing_replaced(&env, &ids).await;
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM instances WHERE missing_since IS NOT NULL"
        )
        .await,
        2,
        "suspected, not judged"
    );
    // The listing tells the truth again: the suspicion clears.
    set_listing(&env, flotilla_sim_provider::Listing::Normal);
    let (_, report) = w.orphans_once().await;
    assert!(report.missing_instances.is_empty());
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM instances WHERE missing_since IS NOT NULL"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_listing_replaces_nothing() {
    let env = env(documented()).await;
    let lag = Duration::from_secs(4);
    set_listing(
        &env,
        flotilla_sim_provider::Listing::Stale {
            lag_ms: lag.as_millis() as u64,
        },
    );
    let old = ready(&env, 3).await;
    // Names free for the second batch.
    sqlx::query("UPDATE instances SET name = name || '-old'")
        .execute(&env.db.pool)
        .await
        .unwrap();
    // Until the listing has caught up with the first machines.
    eventually_ok("the stale listing to catch up", lag + DEADLINE, || async {
        let listed = env
            .stack
            .client
            .clone()
            .list_machines(v1::ListMachinesRequest {
                target: target(),
                page_size: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .machines
            .len();
        if listed == old.len() {
            Ok(())
        } else {
            Err(format!("{listed} of {} listed", old.len()))
        }
    })
    .await;
    let young = ready(&env, 2).await;
    let all: Vec<InstanceId> = old.iter().chain(&young).copied().collect();
    // Rows old by the database's clock: only the direct look protects.
    age_rows(&env, &all, 3600.0, true).await;
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "1.0"]);
    let (_, report) = w.orphans_once().await;
    let mut missing = report.missing_instances.clone();
    missing.sort_by_key(|i| i.0);
    let mut expected = young.clone();
    expected.sort_by_key(|i| i.0);
    assert_eq!(
        missing, expected,
        "the listing is behind the young machines"
    );
    for _ in 0..2 {
        let (_, report) = w.orphans_once().await;
        assert!(report.lost_instances.is_empty());
    }
    nothing_replaced(&env, &all).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_machines_mostly_vanish_at_once_is_held_by_the_storm_guard() {
    let env = env(documented()).await;
    let ids = ready(&env, 6).await;
    age_rows(&env, &ids, 3600.0, true).await;
    for id in &ids[..4] {
        destroy_behind_our_back(&env, *id).await;
    }
    let w = watchdog(&env, "w1", &[]);
    for _ in 0..2 {
        let (_, report) = w.orphans_once().await;
        assert_eq!(report.held_pools, ["gpu"]);
        assert_eq!(report.missing_instances.len(), 4);
        assert!(report.lost_instances.is_empty(), "4 of 6 at once: held");
    }
    nothing_replaced(&env, &ids).await;
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM pools WHERE name = 'gpu' AND lost_hold_since IS NOT NULL"
        )
        .await,
        1,
        "the hold is visible on the pool"
    );
    // (instance, from, to, action)
    type AuditRow = (uuid::Uuid, Option<String>, Option<String>, Option<String>);
    let audit: Vec<AuditRow> = sqlx::query_as(
        "SELECT instance_id, from_state, to_state, action FROM action_logs
         WHERE reason LIKE 'storm guard:%' ORDER BY instance_id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let mut held: Vec<uuid::Uuid> = ids[..4].iter().map(|i| i.0).collect();
    held.sort();
    assert_eq!(
        audit.iter().map(|a| a.0).collect::<Vec<_>>(),
        held,
        "one audit row per held instance, not one per pass"
    );
    assert!(
        audit
            .iter()
            .all(|a| a.1.is_none() && a.2.is_none() && a.3.as_deref() == Some("lost_verdict_held")),
        "not a transition, named as what it is: {audit:?}"
    );
    // An operator raises the threshold: the hold releases, the verdicts
    // (each confirmed by a direct look) go through.
    let w = watchdog(&env, "w1", &["--watchdog-storm-fraction", "0.7"]);
    let (_, report) = w.orphans_once().await;
    assert!(report.held_pools.is_empty());
    assert_eq!(report.lost_instances.len(), 4);
    assert_eq!(
        count(
            &env,
            "SELECT count(*) FROM pools WHERE name = 'gpu' AND lost_hold_since IS NOT NULL"
        )
        .await,
        0
    );
    for id in &ids[..4] {
        assert_eq!(get(&env, *id).await.state, InstanceState::Lost);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_watchdog_replicas_never_act_twice_on_one_instance() {
    let env = env(documented()).await;
    let ids = ready(&env, 30).await;
    for id in &ids {
        kill(
            &env,
            get(&env, *id).await.provider_machine_id.as_deref().unwrap(),
        );
    }
    age(&env, &ids, PAST_TIMEOUT).await;
    // The storm guard would hold a whole-pool outage; switch it off here.
    let a = watchdog(&env, "a", &["--watchdog-storm-fraction", "1.0"]);
    let b = watchdog(&env, "b", &["--watchdog-storm-fraction", "1.0"]);
    eventually_ok("all 30 declared dead", DEADLINE, || async {
        let (ra, rb) = tokio::join!(a.dead_workers_once(), b.dead_workers_once());
        let _ = (ra, rb);
        let dead: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instances WHERE state = 'worker_dead'")
                .fetch_one(&env.db.pool)
                .await
                .unwrap();
        if dead == 30 { Ok(()) } else { Err(dead) }
    })
    .await;

    let per_instance: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM action_logs WHERE to_state = 'worker_dead' GROUP BY instance_id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(per_instance.len(), 30);
    assert!(per_instance.iter().all(|n| *n == 1));
    for id in &ids {
        assert_eq!(replacements_of(&env, *id).await, 1);
    }
}

async fn instance_in(db: &TestDb, path: &[InstanceState]) -> InstanceId {
    let mut conn = db.pool.acquire().await.unwrap();
    let mut r: InstanceRow = instance_insert_requested(
        &mut conn,
        &WriteCtx::new("test"),
        &[NewInstance {
            id: InstanceId::new(),
            pool: "gpu".into(),
            name: format!("w-{}", uuid::Uuid::new_v4().simple()),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        }],
    )
    .await
    .unwrap()
    .remove(0);
    for to in path {
        r = instance_transition(
            &mut conn,
            &WriteCtx::new("test"),
            &Transition {
                id: r.id,
                from: r.state,
                to: *to,
                expected_version: r.version,
                error: None,
                reason: None,
            },
        )
        .await
        .unwrap();
    }
    r.id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_instances_are_retried_spaced_by_their_timeout_then_escalated_and_flagged() {
    use InstanceState::*;
    let db = TestDb::new().await;
    let stack = provider_stack(documented(), &[]).await;
    let mut conn = db.pool.acquire().await.unwrap();
    pool_create(
        &mut conn,
        &NewPool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let provisioning = instance_in(&db, &[Provisioning]).await;
    let draining = instance_in(&db, &[Provisioning, Booting, Ready, Draining]).await;
    let stopping = instance_in(&db, &[Provisioning, Booting, Stopping]).await;
    let deleting = instance_in(&db, &[Provisioning, Deleting]).await;
    let fresh = instance_in(&db, &[Provisioning]).await;
    let w = Watchdog {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: Tuning::try_parse_from([
            "x",
            "--recovery-provisioning-timeout-seconds",
            "60",
            "--recovery-draining-timeout-seconds",
            "60",
            "--recovery-stopping-timeout-seconds",
            "60",
            "--recovery-deleting-timeout-seconds",
            "60",
            "--stuck-max-retries",
            "1",
        ])
        .unwrap()
        .t,
        owner: "w".into(),
    };
    let get = |id| {
        let pool = db.pool.clone();
        async move {
            let mut c = pool.acquire().await.unwrap();
            instance_get(&mut c, id).await.unwrap().unwrap()
        }
    };
    assert_eq!(w.stuck_once().await.found, 0, "nothing is stuck yet");
    let stuck: Vec<uuid::Uuid> = [provisioning, draining, stopping, deleting]
        .iter()
        .map(|i| i.0)
        .collect();

    // Past one timeout: each is retried once, nothing escalates. (The
    // fresh row, which moved on in the meantime, is not aged.)
    age_instances(&db.pool, &stuck, Duration::from_secs(61)).await;
    assert_eq!(w.stuck_once().await.found, 4);
    assert_eq!(
        w.stuck_once().await.found,
        0,
        "the next retry waits a timeout"
    );
    for id in [provisioning, draining, stopping, deleting] {
        let r = get(id).await;
        assert_eq!(r.stuck_recoveries, 1);
        assert!(!r.needs_attention);
        assert!(
            r.lease_owner.is_none(),
            "the owning loop may take it at once"
        );
    }

    // Past two timeouts: the breaker opens and each state escalates.
    age_instances(&db.pool, &stuck, Duration::from_secs(61)).await;
    assert_eq!(w.stuck_once().await.found, 4);
    let p = get(provisioning).await;
    assert_eq!(p.state, ProvisioningFailed);
    assert_eq!(p.desired_state, DesiredState::Terminated, "cleanup follows");
    assert_eq!(get(draining).await.state, Stopping);
    assert!(
        get(stopping).await.force_terminate,
        "a stop that never settles is forced"
    );
    let d = get(deleting).await;
    assert_eq!(d.state, Deleting, "a deletion is never given up");
    for id in [provisioning, draining, stopping, deleting] {
        assert!(get(id).await.needs_attention, "an operator is told");
    }
    assert_eq!(get(fresh).await.stuck_recoveries, 0);
}

/// The simulated cloud seen through a proxy that makes chosen machines
/// answer `GET` in a chosen state: Fly documents states (creating,
/// restarting, updating, replacing, replaced, migrated, …; Machines API
/// docs, "Machine states") the sim never enters by itself, and a real API
/// may add more. Everything else passes through unchanged, so the adapter's
/// own parsing of the state is what is tested. A hook can run once between
/// the sim answering a machine listing and the caller receiving it.
struct StateProxy {
    states: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
    on_list: ListHook,
    client: flotilla_proto::client::AdapterClient,
    stop: flotilla_telemetry::CancellationToken,
}

impl Drop for StateProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl StateProxy {
    /// From now on, `GET` of `machine_id` reports `state` (Fly's spelling).
    fn report(&self, machine_id: &str, state: &str) {
        self.states
            .lock()
            .unwrap()
            .insert(machine_id.to_owned(), state.to_owned());
    }

    fn clear(&self, machine_id: &str) {
        self.states.lock().unwrap().remove(machine_id);
    }

    /// Runs `hook` once, after the next machine listing was answered by
    /// the sim and before its answer is passed on.
    fn after_next_listing(&self, hook: impl std::future::Future<Output = ()> + Send + 'static) {
        *self.on_list.lock().unwrap() = Some(Box::pin(hook));
    }
}

type ListHook = std::sync::Arc<
    std::sync::Mutex<Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>>,
>;

async fn state_proxy(env: &Env) -> StateProxy {
    use axum::body::{Body, to_bytes};
    use axum::extract::{Request, State};
    use axum::response::Response;

    #[derive(Clone)]
    struct Proxy {
        upstream: String,
        http: reqwest::Client,
        states: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, String>>>,
        on_list: ListHook,
    }
    async fn forward(State(p): State<Proxy>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        let body = to_bytes(body, usize::MAX).await.unwrap_or_default();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut out = p
            .http
            .request(parts.method.clone(), format!("{}{path}", p.upstream))
            .body(body);
        for (k, v) in &parts.headers {
            if k != axum::http::header::HOST && k != axum::http::header::CONTENT_LENGTH {
                out = out.header(k, v);
            }
        }
        let Ok(got) = out.send().await else {
            return Response::builder().status(502).body(Body::empty()).unwrap();
        };
        let status = got.status();
        let content_type = got.headers().get(axum::http::header::CONTENT_TYPE).cloned();
        let mut bytes = got.bytes().await.unwrap_or_default().to_vec();
        let id = parts.uri.path().rsplit('/').next().unwrap_or_default();
        if parts.method == axum::http::Method::GET && parts.uri.path().ends_with("/machines") {
            let hook = p.on_list.lock().unwrap().take();
            if let Some(hook) = hook {
                hook.await;
            }
        }
        let forced = p.states.lock().unwrap().get(id).cloned();
        if parts.method == axum::http::Method::GET
            && status.is_success()
            && let Some(state) = forced
            && let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&bytes)
        {
            v["state"] = serde_json::Value::String(state);
            bytes = serde_json::to_vec(&v).unwrap();
        }
        let mut r = Response::builder().status(status);
        if let Some(ct) = content_type {
            r = r.header(axum::http::header::CONTENT_TYPE, ct);
        }
        r.body(Body::from(bytes)).unwrap()
    }

    let states = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let on_list: ListHook = Default::default();
    let proxy = Proxy {
        on_list: on_list.clone(),
        upstream: env.stack.sim.url().to_owned(),
        http: flotilla_provider::http::client_builder(
            Duration::from_secs(10),
            flotilla_telemetry::http_client::DEFAULT_CONNECT_TIMEOUT,
        )
        .build()
        .unwrap(),
        states: states.clone(),
    };
    let stop = flotilla_telemetry::CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(forward).with_state(proxy);
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        });
    }
    // An adapter of its own in front of the proxy, set up as the shared
    // stack sets up its adapter.
    use clap::Parser as _;
    let args = flotilla_provider_adapter::AdapterArgs::try_parse_from([
        "provider-adapter",
        "--sim-api-base-url",
        &proxy_url,
        "--sim-api-token",
        env.stack.sim.token(),
        "--provider-retry-max-attempts",
        "0",
        "--provider-rate-limit-per-second",
        "100000",
        "--provider-rate-limit-burst",
        "100000",
        "--circuit-breaker-failure-threshold",
        "1000000",
    ])
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(flotilla_provider_adapter::serve(
        std::sync::Arc::new(flotilla_provider_adapter::registry(&args).unwrap()),
        flotilla_test_utils::stack::test_access(),
        listener,
        stop.clone(),
    ));
    let client = flotilla_test_utils::stack::connect_adapter(&format!("http://{addr}")).await;
    StateProxy {
        states,
        on_list,
        client,
        stop,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_created_and_recorded_while_the_listing_runs_is_not_an_orphan() {
    let env = env(documented()).await;
    let proxy = state_proxy(&env).await;
    // A tagged machine whose instance the database does not have yet: the
    // scheduler created it and records it while the scan's listing runs.
    let id = InstanceId::new();
    let m = machine(&env, id).await;
    let db = env.db.pool.clone();
    let machine_id = m.id.clone();
    proxy.after_next_listing(async move {
        let mut conn = db.acquire().await.unwrap();
        let ctx = WriteCtx::new("scheduler");
        let r = instance_insert_requested(
            &mut conn,
            &ctx,
            &[NewInstance {
                id,
                pool: "gpu".into(),
                name: "w-late".into(),
                provider: "sim".into(),
                labels: BTreeMap::new(),
                idempotency_key: None,
                worker_token_hash: None,
            }],
        )
        .await
        .unwrap()
        .remove(0);
        let r = instance_transition(
            &mut conn,
            &ctx,
            &Transition {
                id,
                from: r.state,
                to: InstanceState::Provisioning,
                expected_version: r.version,
                error: None,
                reason: None,
            },
        )
        .await
        .unwrap();
        flotilla_store::instance::instance_record_machine(&mut conn, id, r.version, &machine_id)
            .await
            .unwrap();
    });
    let mut w = watchdog(&env, "w1", &[]);
    // Any age is old enough: only the order of the reads protects it.
    w.tuning.orphan_grace_seconds = 0;
    w.provider = proxy.client.clone();
    let (_, report) = w.orphans_once().await;
    assert!(proxy.on_list.lock().unwrap().is_none(), "the hook ran");
    assert!(
        report.orphan_machines.is_empty() && report.deleted_machines.is_empty(),
        "owned by the time the database is read: {report:?}"
    );
    assert_eq!(
        env.stack
            .sim
            .sim()
            .machine(&m.id)
            .unwrap()
            .machine
            .state
            .to_string(),
        "started"
    );
}

/// Seconds since the instance became suspect, by the database's clock.
async fn suspect_for(env: &Env, id: InstanceId) -> Option<f64> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - suspect_since)::float8 FROM instances WHERE id = $1",
    )
    .bind(id.0)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_whose_machine_is_in_passing_is_waited_out_for_the_grace_then_declared_dead() {
    let env = env(documented()).await;
    let proxy = state_proxy(&env).await;
    let ids = ready(&env, 4).await;
    // Transient grace (3 s) longer than the confirm grace (2 s): a state
    // taken for "running" would be declared at 2 s, one taken for "not
    // running" at once. Real seconds: the test watches the graces run.
    let mut w = watchdog(
        &env,
        "w1",
        &[
            "--worker-heartbeat-timeout-seconds",
            "1",
            "--worker-dead-confirm-seconds",
            "2",
            "--watchdog-transient-grace-seconds",
            "3",
            "--watchdog-storm-min-instances",
            "100",
        ],
    );
    w.provider = proxy.client.clone();
    let machine_of = |i: usize| {
        let env = &env;
        let id = ids[i];
        async move { get(env, id).await.provider_machine_id.unwrap() }
    };
    // Documented states the sim does not enter, and one nobody documented.
    proxy.report(&machine_of(0).await, "updating");
    proxy.report(&machine_of(1).await, "replacing");
    proxy.report(&machine_of(2).await, "frobnicating");
    // The fourth recovers within the grace: its machine settles as started
    // and the worker heartbeats again.
    let recovering = machine_of(3).await;
    proxy.report(&recovering, "restarting");
    let grace = 3.0;
    // Each declaration is checked as it happens (its suspicion is cleared
    // on the next pass), while the recovering worker keeps beating.
    let recovered = std::cell::Cell::new(false);
    let declared = std::cell::RefCell::new(std::collections::HashSet::new());
    eventually_ok("the suspects in passing declared", DEADLINE, || async {
        w.dead_workers_once().await;
        let mut pending = 0;
        for &id in &ids[..3] {
            if declared.borrow().contains(&id) {
                continue;
            }
            let row = get(&env, id).await;
            if row.state == InstanceState::Ready {
                pending += 1;
                continue;
            }
            declared.borrow_mut().insert(id);
            assert_eq!(row.state, InstanceState::WorkerDead, "{id}");
            // Declared no earlier than the grace after it became suspect.
            let waited: f64 = sqlx::query_scalar(
                "SELECT extract(epoch FROM a.at - i.suspect_since)::float8
                 FROM action_logs a JOIN instances i ON i.id = a.instance_id
                 WHERE a.instance_id = $1 AND a.to_state = 'worker_dead'",
            )
            .bind(id.0)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
            assert!(
                waited >= grace,
                "{id} declared dead {waited:.2} s after becoming suspect, within the grace"
            );
        }
        if !recovered.get() && suspect_for(&env, ids[3]).await.is_some_and(|s| s > 1.0) {
            proxy.clear(&recovering);
            recovered.set(true);
        }
        if recovered.get() {
            heartbeat(&env, &ids[3..]).await;
        }
        if pending == 0 {
            Ok(())
        } else {
            Err(format!("{pending} suspects in passing not declared"))
        }
    })
    .await;
    for &id in &ids[..3] {
        assert_eq!(replacements_of(&env, id).await, 1, "{id} replaced");
    }
    let survivor = get(&env, ids[3]).await;
    assert_eq!(survivor.state, InstanceState::Ready, "recovered in time");
    assert!(survivor.suspect_since.is_none());
    assert_eq!(replacements_of(&env, ids[3]).await, 0);
}

#[derive(Parser)]
struct SchedulerArgs {
    #[command(flatten)]
    t: flotilla_scheduler::SchedulerTuning,
}

/// A scheduler on the same database and provider, probing health checks
/// every 50 ms (doubling to 200 ms while they fail, no cache).
fn scheduler(env: &Env) -> flotilla_scheduler::Scheduler {
    flotilla_scheduler::Scheduler {
        db: env.db.pool.clone(),
        provider: env.stack.client.clone(),
        tuning: SchedulerArgs::try_parse_from([
            "x",
            "--scheduler-lease-seconds",
            "60",
            "--health-check-interval-ms",
            "50",
            "--health-check-max-interval-ms",
            "200",
            "--health-check-cache-ms",
            "0",
            "--health-check-timeout-ms",
            "1000",
        ])
        .unwrap()
        .t,
        owner: "s1".into(),
        worker_api_url: "http://127.0.0.1:1".into(),
        crash_after: None,
    }
}

/// Seconds since every ready instance of `ids` entered `ready`, the least.
async fn ready_for(env: &Env, ids: &[InstanceId]) -> f64 {
    let ids: Vec<uuid::Uuid> = ids.iter().map(|i| i.0).collect();
    sqlx::query_scalar(
        "SELECT COALESCE(min(extract(epoch FROM now() - state_entered_at))::float8, 0)
         FROM instances WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_one(&env.db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_agent_lives_by_its_health_check_and_dies_by_it() {
    let env = env(documented()).await;
    {
        let mut conn = env.db.pool.acquire().await.unwrap();
        flotilla_store::pool::pool_update(
            &mut conn,
            "gpu",
            &flotilla_store::pool::PoolUpdate {
                health_check_url: Some(format!(
                    "{}/_sim/workers/{{machine_id}}/healthz",
                    env.stack.sim.url()
                )),
                ..Default::default()
            },
            None,
        )
        .await
        .unwrap();
    }
    let ids: Vec<InstanceId> = {
        let mut conn = env.db.pool.acquire().await.unwrap();
        let new: Vec<NewInstance> = (0..3)
            .map(|i| NewInstance {
                id: InstanceId::new(),
                pool: "gpu".into(),
                name: format!("plain-{i}"),
                provider: "sim".into(),
                labels: BTreeMap::new(),
                idempotency_key: None,
                worker_token_hash: None,
            })
            .collect();
        instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    let s = scheduler(&env);
    let checker = flotilla_scheduler::health::HealthChecker::new(
        s.tuning.health_check_timeout(),
        s.tuning.health_check_cache(),
    );
    // Heartbeat timeout 1 s, confirm grace 2 s; 3 failed probes over 1 s:
    // real seconds, the test watches the failing probes' window run.
    let w = watchdog(
        &env,
        "w1",
        &[
            "--worker-heartbeat-timeout-seconds",
            "1",
            "--worker-dead-confirm-seconds",
            "2",
            "--worker-probe-failures",
            "3",
            "--worker-probe-failure-window-seconds",
            "1",
            "--watchdog-storm-min-instances",
            "100",
        ],
    );
    // Provisioned, then ready by their health checks alone: no agent ever
    // reports a phase or a heartbeat.
    eventually_ok("the three ready by their probes", DEADLINE, || async {
        s.provision_once().await;
        s.health_once(&checker).await;
        let mut ready = 0;
        for &id in &ids {
            let row = get(&env, id).await;
            assert!(row.last_heartbeat.is_none());
            ready += usize::from(row.state == InstanceState::Ready);
        }
        if ready == ids.len() {
            Ok(())
        } else {
            Err(format!("{ready} of 3 ready"))
        }
    })
    .await;

    // Kept alive by their probes an hour past timeout + confirm grace,
    // where the heartbeat path would declare them dead in two passes
    // (suspect, then confirm): a few passes of both loops change nothing.
    age(&env, &ids, 3600).await;
    assert!(ready_for(&env, &ids).await >= 3600.0);
    for _ in 0..4 {
        s.health_once(&checker).await;
        w.dead_workers_once().await;
        for &id in &ids {
            let row = get(&env, id).await;
            assert_eq!(row.state, InstanceState::Ready, "{id} kept alive by probes");
            assert!(row.suspect_since.is_none(), "{id} never suspect");
        }
    }

    // One worker stops answering its health check; its machine still runs.
    let sick = ids[0];
    let machine_id = get(&env, sick).await.provider_machine_id.unwrap();
    env.stack.sim.sim().set_worker_healthy(&machine_id, false);
    eventually("the failing health checks declared", DEADLINE, || async {
        s.health_once(&checker).await;
        w.dead_workers_once().await;
        if get(&env, sick).await.state == InstanceState::WorkerDead {
            return true;
        }
        for &id in &ids[1..] {
            assert_eq!(get(&env, id).await.state, InstanceState::Ready);
        }
        false
    })
    .await;

    let (reason, waited, failures): (Option<String>, f64, i32) = sqlx::query_as(
        "SELECT a.reason, extract(epoch FROM a.at - h.failing_since)::float8, h.failures
         FROM action_logs a JOIN instance_health h ON h.instance_id = a.instance_id
         WHERE a.instance_id = $1 AND a.to_state = 'worker_dead'",
    )
    .bind(sick.0)
    .fetch_one(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        reason.as_deref(),
        Some("health checks failing and the provider confirms")
    );
    assert!(failures >= 3, "{failures} failures");
    // The window (1 s), then the provider's confirm grace (2 s: its machine
    // still runs).
    assert!(
        waited >= 3.0,
        "declared {waited:.2} s after the first failure"
    );
    assert_eq!(replacements_of(&env, sick).await, 1, "replaced");
    assert_eq!(
        get(&env, sick).await.desired_state,
        DesiredState::Terminated
    );
    for &id in &ids[1..] {
        assert_eq!(get(&env, id).await.state, InstanceState::Ready);
        assert_eq!(replacements_of(&env, id).await, 0);
    }
}
