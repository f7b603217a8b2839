//! A real fleet on this machine: the local provider starts real `agent`
//! processes, which register, report their boot phases and heartbeat over
//! the worker API. Killing one makes the watchdog declare it dead, replace
//! it and have the terminator remove it; pausing one (SIGSTOP) past the
//! timeout and resuming it before confirmation replaces nothing. The
//! `secrets` module runs a fleet over TLS and scans what it wrote for
//! every secret it used.

#[path = "secrets.rs"]
mod secrets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use flotilla_api::{ApiToken, Limits};
use flotilla_e2e::{TestApi, start_api};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_provider_adapter::{AdapterArgs, registry};
use flotilla_scheduler::{Scheduler, SchedulerTuning};
use flotilla_telemetry::CancellationToken;
use flotilla_terminator::{Terminator, TerminatorTuning};
use flotilla_test_utils::{TestDb, TestNats};
use flotilla_watchdog::{Watchdog, WatchdogTuning};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

const TOKEN: &str = "local-fleet-token";

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).expect("header"),
    );
    r
}

#[derive(Parser)]
struct S {
    #[command(flatten)]
    t: SchedulerTuning,
}
#[derive(Parser)]
struct T {
    #[command(flatten)]
    t: TerminatorTuning,
}
#[derive(Parser)]
struct W {
    #[command(flatten)]
    t: WatchdogTuning,
}

/// Kills every process the local provider still lists, even when the test
/// fails, so no agent outlives it.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in pids(&self.0).into_values() {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Machine id → pid, from the local provider's bookkeeping.
fn pids(state_dir: &Path) -> std::collections::HashMap<String, i32> {
    let Ok(text) = std::fs::read_to_string(state_dir.join("machines.json")) else {
        return Default::default();
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Default::default();
    };
    json["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["id"].as_str()?.to_owned(),
                i32::try_from(m["pid"].as_i64()?).ok()?,
            ))
        })
        .collect()
}

async fn states(db: &TestDb) -> Vec<(String, String, Option<String>, Option<String>)> {
    sqlx::query_as(
        "SELECT id::text, state, provider_machine_id, labels ->> 'flotilla.dev/replaces'
         FROM instances ORDER BY created_at",
    )
    .fetch_all(&db.pool)
    .await
    .expect("states")
}

/// instance, from, to, reason, error
type HistoryRow = (String, String, String, Option<String>, Option<String>);

async fn wait_until<F, Fut>(db: &TestDb, what: &str, within: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    if !flotilla_test_utils::wait::holds_within(within, f).await {
        let history: Vec<HistoryRow> = sqlx::query_as(
            "SELECT instance_id::text, coalesce(from_state, '-'), coalesce(to_state, action), reason, error
             FROM action_logs ORDER BY id",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap_or_default();
        panic!(
            "timed out waiting for {what}; instances: {:#?}; history: {history:#?}",
            states(db).await
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_boot_to_ready_and_a_killed_one_is_replaced_while_a_paused_one_is_not() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("local");
    let _reaper = Reaper(state_dir.clone());
    let stop = CancellationToken::new();

    // provider-adapter with the local provider
    let args = AdapterArgs::try_parse_from([
        "provider-adapter",
        "--local-provider-enabled",
        "true",
        "--local-state-dir",
        state_dir.to_str().expect("utf-8 path"),
        "--provider-retry-max-attempts",
        "0",
    ])
    .expect("adapter args");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let adapter_addr = listener.local_addr().expect("addr");
    tokio::spawn(flotilla_provider_adapter::serve(
        std::sync::Arc::new(registry(&args).expect("registry")),
        flotilla_test_utils::stack::test_access(),
        listener,
        stop.clone(),
    ));
    let provider =
        flotilla_test_utils::stack::connect_adapter(&format!("http://{adapter_addr}")).await;

    let TestApi {
        addr: api_addr,
        bus,
    } = start_api(
        &db,
        &nats,
        ApiToken::from_plain("e2e", TOKEN),
        Limits {
            heartbeat_interval_ms: 200,
            ..Limits::default()
        },
        &stop,
    )
    .await;
    let scheduler = Scheduler {
        db: db.pool.clone(),
        provider: provider.clone(),
        tuning: S::try_parse_from(["x", "--scheduler-tick-ms", "200"])
            .expect("s")
            .t,
        owner: "scheduler".into(),
        worker_api_url: format!("http://{api_addr}"),
        crash_after: None,
    };
    tokio::spawn(scheduler.run(Some(bus.clone()), stop.clone()));
    let terminator = Terminator {
        db: db.pool.clone(),
        provider: provider.clone(),
        tuning: T::try_parse_from([
            "x",
            "--terminator-tick-ms",
            "200",
            "--drain-timeout-seconds",
            "1",
            "--stop-grace-seconds",
            "1",
        ])
        .expect("t")
        .t,
        owner: "terminator".into(),
    };
    tokio::spawn(terminator.run(Some(bus.clone()), stop.clone()));
    let watchdog = Watchdog {
        db: db.pool.clone(),
        provider: provider.clone(),
        tuning: W::try_parse_from([
            "x",
            "--watchdog-tick-ms",
            "100",
            "--worker-heartbeat-timeout-seconds",
            "2",
            "--worker-dead-confirm-seconds",
            "30",
            "--orphan-scan-interval-seconds",
            "3600",
        ])
        .expect("w")
        .t,
        owner: "watchdog".into(),
    };
    tokio::spawn(watchdog.run(stop.clone()));

    let channel = Channel::from_shared(format!("http://{api_addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("api");
    let mut fleet = FleetServiceClient::new(channel);
    fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "local".into(),
                provider: "local".into(),
                instance_type: "process".into(),
                region: "local".into(),
                image: env!("CARGO_BIN_EXE_e2e-agent").into(),
                ..Default::default()
            }),
        }))
        .await
        .expect("pool");
    let answer = fleet
        .provision(authed(v1::ProvisionRequest {
            pool: "local".into(),
            count: 3,
            ..Default::default()
        }))
        .await
        .expect("provision")
        .into_inner();
    assert_eq!(answer.instances.len(), 3);

    // Real agents register, report phases and reach ready.
    wait_until(&db, "3 ready", Duration::from_secs(30), || async {
        states(&db).await.iter().filter(|s| s.1 == "ready").count() == 3
    })
    .await;
    let before = states(&db).await;
    let machines = pids(&state_dir);
    assert_eq!(machines.len(), 3, "one process per instance");

    // Kill one agent: its machine stops, the watchdog confirms and replaces it.
    let (victim, victim_machine) = (before[0].0.clone(), before[0].2.clone().expect("machine"));
    let killed = Instant::now();
    kill(Pid::from_raw(machines[&victim_machine]), Signal::SIGKILL).expect("kill agent");
    // Pause another past the heartbeat timeout, then resume it.
    let (paused, paused_machine) = (before[1].0.clone(), before[1].2.clone().expect("machine"));
    kill(Pid::from_raw(machines[&paused_machine]), Signal::SIGSTOP).expect("pause agent");

    wait_until(
        &db,
        "the killed agent declared dead",
        Duration::from_secs(30),
        || async {
            let s = states(&db).await;
            s.iter().any(|r| r.0 == victim && r.1 != "ready")
        },
    )
    .await;
    println!(
        "killed agent -> declared gone after {:?} (timeout 2 s)",
        killed.elapsed()
    );
    kill(Pid::from_raw(machines[&paused_machine]), Signal::SIGCONT).expect("resume agent");

    wait_until(
        &db,
        "the replacement ready and the dead one terminated",
        Duration::from_secs(30),
        || async {
            let s = states(&db).await;
            let replaced = s
                .iter()
                .any(|r| r.3.as_deref() == Some(victim.as_str()) && r.1 == "ready");
            let gone = s.iter().any(|r| r.0 == victim && r.1 == "terminated");
            replaced && gone
        },
    )
    .await;
    let after = states(&db).await;
    assert_eq!(
        after.iter().find(|r| r.0 == paused).map(|r| r.1.as_str()),
        Some("ready"),
        "the paused-and-resumed worker was not replaced"
    );
    assert!(
        !after
            .iter()
            .any(|r| r.3.as_deref() == Some(paused.as_str())),
        "no replacement for the paused worker"
    );
    assert!(
        !pids(&state_dir).contains_key(&victim_machine),
        "the dead worker's machine is gone from the provider"
    );

    // Terminate everything: every process goes away.
    fleet
        .terminate(authed(v1::TerminateRequest {
            selector: Some(v1::InstanceSelector {
                pool: "local".into(),
                ..Default::default()
            }),
            force: false,
            reason: "test done".into(),
        }))
        .await
        .expect("terminate");
    wait_until(&db, "all terminated", Duration::from_secs(30), || async {
        states(&db).await.iter().all(|s| s.1 == "terminated")
    })
    .await;
    assert!(pids(&state_dir).is_empty(), "no process left");
    stop.cancel();
}
