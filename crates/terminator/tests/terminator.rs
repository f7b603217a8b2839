//! The terminator on a real PostgreSQL against the simulated cloud behind a
//! real provider-adapter: refusals, absences, faults at scale, crashes and
//! drains. Every assertion about "gone" is checked against the simulator's
//! own truth.

#[path = "observability.rs"]
mod observability;
#[path = "shutdown.rs"]
mod shutdown;
#[path = "warm.rs"]
mod warm;

use std::time::Duration;

use clap::Parser;
use flotilla_core::{DesiredState, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_sim_provider::{ErrorRates, Faults, Operation};
use flotilla_store::instance::{InstanceRow, instance_get, instance_set_desired};
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_telemetry::CancellationToken;
use flotilla_terminator::{Terminator, TerminatorTuning};
use flotilla_test_utils::fleet::{ReadySpec, ready_instances, step, target};
use flotilla_test_utils::stack::{ProviderStack, documented, provider_stack};
use flotilla_test_utils::{
    DEADLINE, TestDb, age_instances, eventually, eventually_ok, leases_run_out,
};

struct Env {
    db: TestDb,
    stack: ProviderStack,
}

async fn env(faults: Faults, drain_timeout: Option<i32>) -> Env {
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
            image: "registry/worker:1".into(),
            draining_timeout_seconds: drain_timeout,
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
    t: TerminatorTuning,
}

fn terminator(env: &Env, owner: &str) -> Terminator {
    terminator_with(env, owner, &[])
}

fn terminator_with(env: &Env, owner: &str, extra: &[&str]) -> Terminator {
    let mut argv = vec![
        "x",
        "--terminator-tick-ms",
        "20",
        "--terminator-poll-ms",
        "50",
        "--terminate-retry-base-ms",
        "20",
        "--terminate-retry-max-ms",
        "200",
        // No step outlives it, however busy the machine; the test of a
        // killed replica's leases running out asks for a short one.
        "--terminator-lease-seconds",
        "60",
        "--provider-wait-seconds",
        "1",
        "--stop-grace-seconds",
        "1",
    ];
    argv.extend_from_slice(extra);
    let t = Tuning::try_parse_from(argv).unwrap().t;
    Terminator {
        db: env.db.pool.clone(),
        provider: env.stack.client.clone(),
        tuning: t,
        owner: owner.into(),
    }
}

/// `n` instances in `ready`, each with a started machine at the simulator
/// and (when `volumes`) a recorded volume mounted on it.
async fn ready(env: &Env, n: usize, volumes: bool) -> Vec<InstanceId> {
    let spec = ReadySpec {
        volume: volumes,
        ..ReadySpec::default()
    };
    ready_instances(&env.db.pool, &env.stack.client, n, &spec)
        .await
        .into_iter()
        .map(|r| r.id)
        .collect()
}

async fn terminate(env: &Env, ids: &[InstanceId], force: bool) {
    let mut conn = env.db.pool.acquire().await.unwrap();
    for id in ids {
        instance_set_desired(&mut conn, *id, DesiredState::Terminated, force)
            .await
            .unwrap();
    }
}

async fn get(env: &Env, id: InstanceId) -> InstanceRow {
    let mut conn = env.db.pool.acquire().await.unwrap();
    instance_get(&mut conn, id).await.unwrap().unwrap()
}

async fn count_state(env: &Env, state: InstanceState) -> usize {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE state = $1")
        .bind(state.as_str())
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    n as usize
}

/// Machines and volumes the simulator still holds (not destroyed).
fn left_at_provider(env: &Env) -> (usize, usize) {
    let machines = env
        .stack
        .sim
        .sim()
        .machines()
        .into_iter()
        .filter(|m| m.machine.state.to_string() != "destroyed")
        .count();
    let volumes = env
        .stack
        .sim
        .sim()
        .volumes()
        .into_iter()
        .filter(|v| v.volume.state != flotilla_sim_provider::VolumeState::Destroyed)
        .count();
    (machines, volumes)
}

/// Runs activations until every instance is terminated (or the deadline).
async fn terminate_all(t: &Terminator, env: &Env, n: usize) {
    eventually_ok(&format!("{n} instances terminated"), DEADLINE, || async {
        match count_state(env, InstanceState::Terminated).await {
            done if done >= n => Ok(()),
            done => {
                t.terminate_once().await;
                Err(format!("only {done} of {n} terminated"))
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_worker_is_cordoned_drained_stopped_and_deleted_with_its_volume() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 1, true).await;
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    terminate_all(&t, &env, 1).await;
    let row = get(&env, ids[0]).await;
    assert!(row.cordoned);
    assert_eq!(left_at_provider(&env), (0, 0));
    let history: Vec<String> =
        sqlx::query_scalar("SELECT to_state FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id")
            .bind(ids[0].0)
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(
        &history[3..],
        [
            "ready",
            "draining",
            "stopping",
            "stopped",
            "deleting",
            "terminated"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_delete_of_a_running_machine_is_retried_without_stopping_the_loop() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 4, false).await;
    // The database believes the first machine stopped, but it runs: its
    // delete is refused (412) until it really stops.
    let mut conn = env.db.pool.acquire().await.unwrap();
    let mut r = get(&env, ids[0]).await;
    for to in [
        InstanceState::Draining,
        InstanceState::Stopping,
        InstanceState::Stopped,
    ] {
        r = step(&mut conn, &r, to).await;
    }
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    let status = t.terminate_once().await;
    assert!(
        status
            .errors
            .iter()
            .any(|e| e.message.contains("failed precondition")),
        "{status:?}"
    );
    let refused = get(&env, ids[0]).await;
    assert_eq!(refused.state, InstanceState::Deleting, "stays where it is");
    assert!(refused.attempts >= 1);
    assert!(refused.last_error.unwrap().contains("412"));
    // The refusal did not stop the others.
    terminate_all(&t, &env, 4).await;
    assert_eq!(left_at_provider(&env), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_already_gone_ends_terminated_at_once() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 1, false).await;
    let row = get(&env, ids[0]).await;
    // Someone deleted it behind Flotilla's back.
    let mut client = env.stack.client.clone();
    client
        .delete_machine(v1::DeleteMachineRequest {
            target: target(),
            machine_id: row.provider_machine_id.clone().unwrap(),
            force: true,
        })
        .await
        .unwrap();
    terminate(&env, &ids, true).await;
    let t = terminator(&env, "t1");
    let status = t.terminate_once().await;
    assert_eq!(status.acted, 1, "{status:?}");
    assert!(status.errors.is_empty(), "{status:?}");
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Terminated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_instances_scale_down_through_faults_and_leave_nothing_behind() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 500, true).await;
    // 20% of provider calls fail from here on: 412-style refusals come from
    // the lifecycle itself, these are 429s, 500s and 503s.
    env.stack
        .sim
        .sim()
        .update_faults(|f| {
            f.retry_after_secs = 0;
            f.error_rate_all = ErrorRates {
                rate_429: 0.05,
                rate_500: 0.1,
                rate_503: 0.05,
                rate_timeout: 0.0,
            };
        })
        .unwrap();
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    let stop = CancellationToken::new();
    let runner = tokio::spawn(t.clone().run(None, stop.clone()));
    eventually_ok(
        "500 instances terminated",
        Duration::from_secs(240),
        || async {
            match count_state(&env, InstanceState::Terminated).await {
                500 => Ok(()),
                done => Err(format!("{done} terminated")),
            }
        },
    )
    .await;
    stop.cancel();
    runner.await.unwrap();
    assert_eq!(
        left_at_provider(&env),
        (0, 0),
        "zero machines and zero volumes left"
    );
    // What the database reports equals the provider's truth.
    let destroyed = env
        .stack
        .sim
        .sim()
        .machines()
        .into_iter()
        .filter(|m| m.machine.state.to_string() == "destroyed")
        .count();
    assert_eq!(
        count_state(&env, InstanceState::Terminated).await,
        destroyed
    );
    let deleted_volumes: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instance_volumes WHERE state = 'deleted'")
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
    assert_eq!(deleted_volumes, 500);
    let faults: u64 = env
        .stack
        .sim
        .sim()
        .stats()
        .requests
        .values()
        .flat_map(|by| by.iter())
        .filter(|(code, _)| matches!(**code, 429 | 500 | 503))
        .map(|(_, n)| *n)
        .sum();
    println!("500-instance scale-down went through {faults} injected provider faults");
    assert!(faults > 50, "the faults really happened ({faults})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminator_killed_mid_sequence_and_restarted_finishes_every_instance() {
    let env = env(
        Faults {
            latency_ms: 5,
            stop_delay_ms: 100,
            destroy_delay_ms: 50,
            ..documented()
        },
        Some(1),
    )
    .await;
    let ids = ready(&env, 40, true).await;
    terminate(&env, &ids, false).await;
    // A short lease: this test is about a killed replica's leases running
    // out on their own.
    let first = terminator_with(&env, "first", &["--terminator-lease-seconds", "1"]);
    let task = tokio::spawn(first.run(None, CancellationToken::new()));
    eventually("5 instances terminated", DEADLINE, || async {
        count_state(&env, InstanceState::Terminated).await >= 5
    })
    .await;
    task.abort();
    let _ = task.await;
    assert!(
        count_state(&env, InstanceState::Terminated).await < 40,
        "killed mid-sequence"
    );
    leases_run_out(&env.db.pool, "first").await;
    let second = terminator(&env, "second");
    terminate_all(&second, &env, 40).await;
    assert_eq!(left_at_provider(&env), (0, 0));
    // Deletes repeated after the crash met "already gone", never an error
    // that stuck: nobody is flagged and each instance terminated once.
    let flagged: i64 = sqlx::query_scalar("SELECT count(*) FROM instances WHERE needs_attention")
        .fetch_one(&env.db.pool)
        .await
        .unwrap();
    assert_eq!(flagged, 0);
    let per_instance: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM action_logs WHERE to_state = 'terminated' GROUP BY instance_id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(per_instance.len(), 40);
    assert!(per_instance.iter().all(|n| *n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_waits_for_an_idle_report_and_ends_at_its_deadline_without_one() {
    // A drain deadline of ten minutes, which the silent worker's row is
    // aged past once the idle one is gone (no race with a short deadline).
    let env = env(documented(), Some(600)).await;
    let ids = ready(&env, 2, false).await;
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    t.terminate_once().await;
    for id in &ids {
        let r = get(&env, *id).await;
        assert_eq!(r.state, InstanceState::Draining);
        assert!(r.cordoned);
    }
    // The first worker reports idle after the cordon; the second never does.
    sqlx::query("UPDATE instances SET worker_idle = true, last_heartbeat = now() WHERE id = $1")
        .bind(ids[0].0)
        .execute(&env.db.pool)
        .await
        .unwrap();
    eventually("the idle worker terminated", DEADLINE, || async {
        t.terminate_once().await;
        get(&env, ids[0]).await.state == InstanceState::Terminated
    })
    .await;
    assert_eq!(
        get(&env, ids[1]).await.state,
        InstanceState::Draining,
        "the silent worker waits for its drain deadline"
    );
    age_instances(&env.db.pool, &[ids[1].0], Duration::from_secs(601)).await;
    eventually("the silent worker terminated", DEADLINE, || async {
        t.terminate_once().await;
        get(&env, ids[1]).await.state == InstanceState::Terminated
    })
    .await;
    let why: Vec<(sqlx::types::Uuid, Option<String>)> = sqlx::query_as(
        "SELECT instance_id, reason FROM action_logs WHERE to_state = 'stopping' ORDER BY id",
    )
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    assert_eq!(
        why,
        [
            (ids[0].0, Some("worker idle".to_owned())),
            (ids[1].0, Some("drain deadline passed".to_owned()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_takes_over_a_stop_that_never_settles() {
    // The machine ignores its stop (it takes ten minutes): the watchdog's
    // escalation sets force, which must win in `stopping` as everywhere.
    let env = env(
        Faults {
            stop_delay_ms: 600_000,
            ..documented()
        },
        Some(1),
    )
    .await;
    let ids = ready(&env, 1, true).await;
    let mut conn = env.db.pool.acquire().await.unwrap();
    let mut r = get(&env, ids[0]).await;
    for to in [InstanceState::Draining, InstanceState::Stopping] {
        r = step(&mut conn, &r, to).await;
    }
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    t.terminate_once().await;
    assert_eq!(get(&env, ids[0]).await.state, InstanceState::Stopping);
    terminate(&env, &ids, true).await;
    terminate_all(&t, &env, 1).await;
    assert_eq!(left_at_provider(&env), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_still_bound_is_retried_without_deleting_its_gone_machine_again_and_the_flag_clears()
 {
    // The sim keeps a volume bound for a while after its machine is
    // destroyed (Fly's 412 "volume is currently bound to machine").
    let env = env(
        Faults {
            volume_release_delay_ms: 600,
            ..documented()
        },
        Some(1),
    )
    .await;
    let ids = ready(&env, 1, true).await;
    terminate(&env, &ids, false).await;
    // Flagged for an operator after one failed attempt.
    let t = terminator_with(&env, "t1", &["--terminate-alert-after-attempts", "1"]);
    let flagged = std::cell::Cell::new(false);
    eventually("the instance terminated", DEADLINE, || async {
        if get(&env, ids[0]).await.state == InstanceState::Terminated {
            return true;
        }
        t.terminate_once().await;
        flagged.set(flagged.get() | get(&env, ids[0]).await.needs_attention);
        false
    })
    .await;
    let flagged = flagged.get();

    let stats = env.stack.sim.sim().stats();
    assert!(
        stats.count(Operation::VolumeDelete, 412) >= 1,
        "the volume delete was refused at least once: {stats:?}"
    );
    assert_eq!(
        stats.total(Operation::Delete),
        1,
        "the machine was deleted once, not on every retry: {stats:?}"
    );
    assert!(flagged, "the retries raised the flag");
    assert!(
        !get(&env, ids[0]).await.needs_attention,
        "success cleared it"
    );
    assert_eq!(left_at_provider(&env), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_scale_down_waits_for_a_slow_stop_with_the_machines_version() {
    // Fly requires `instance_id` when waiting for `stopped` (400 without
    // it); a stop that takes a while must be waited for, not retried.
    let env = env(
        Faults {
            stop_delay_ms: 400,
            ..documented()
        },
        Some(1),
    )
    .await;
    let ids = ready(&env, 2, true).await;
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    terminate_all(&t, &env, 2).await;
    assert_eq!(left_at_provider(&env), (0, 0));
    let stats = env.stack.sim.sim().stats();
    assert_eq!(stats.count(Operation::Wait, 400), 0, "{stats:?}");
    assert!(stats.count(Operation::Wait, 200) >= 2, "{stats:?}");
    // The history holds every failed attempt. The only ones allowed are
    // the volume deletes Fly refuses (412) while the destroyed machine
    // still holds them, which are retried by design; the stop itself was
    // waited for, never failed.
    let errors: Vec<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT error, reason FROM action_logs WHERE error IS NOT NULL")
            .fetch_all(&env.db.pool)
            .await
            .unwrap();
    assert!(
        errors.iter().all(|(e, _)| e
            .as_deref()
            .is_some_and(|e| e.contains("HTTP 412") && e.contains("volume is currently bound"))),
        "{errors:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_terminate_of_a_ready_worker_skips_the_drain_and_its_history_says_forced() {
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 1, false).await;
    terminate(&env, &ids, true).await;
    let t = terminator(&env, "t1");
    terminate_all(&t, &env, 1).await;
    let history: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT from_state, to_state, reason FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id",
    )
    .bind(ids[0].0)
    .fetch_all(&env.db.pool)
    .await
    .unwrap();
    let from_ready: Vec<_> = history
        .iter()
        .filter(|(from, _, _)| from.as_deref() == Some("ready"))
        .map(|(_, to, reason)| (to.as_deref(), reason.as_deref()))
        .collect();
    assert_eq!(
        from_ready,
        [(Some("deleting"), Some("forced: cordoned, drain skipped"))],
        "{history:?}"
    );
    assert!(
        history
            .iter()
            .all(|(_, to, _)| to.as_deref() != Some("draining")),
        "{history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_404_for_a_machine_that_exists_never_ends_terminated_with_the_machine_left_behind() {
    // Every GET of a machine answers 404 although it exists (a gateway or
    // an application-level error); stops, waits and deletes tell the truth.
    let env = env(documented(), Some(1)).await;
    let ids = ready(&env, 3, false).await;
    env.stack
        .sim
        .sim()
        .update_faults(|f| f.get_not_found_rate = 1.0)
        .unwrap();
    terminate(&env, &ids, false).await;
    let t = terminator(&env, "t1");
    terminate_all(&t, &env, ids.len()).await;
    assert_eq!(
        left_at_provider(&env),
        (0, 0),
        "terminated is written only once the machine is deleted"
    );
    let stats = env.stack.sim.sim().stats();
    assert!(stats.count(Operation::Get, 404) >= 3, "{stats:?}");
}
