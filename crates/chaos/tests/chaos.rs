//! The chaos suite at the reduced size CI runs: every service as its own
//! process, ~10 % injected provider faults, kill -9s, one NATS and one
//! PostgreSQL restart, a partition of each of scheduler-1 ↔ PostgreSQL,
//! provider-adapter ↔ cloud and terminator-1 ↔ NATS, a paused replica,
//! lying listings, then lying 404s, and every PostgreSQL connection taken
//! (4 s windows); then 0 lost, 0 leaked, 0 duplicated, no instance
//! replaced that was alive, nothing terminated over a machine left behind,
//! database equal to provider, and a leak and a false verdict planted on
//! purpose must be reported.
//! A second run does the same on a 3-node NATS cluster with one node killed
//! mid-storm.
//!
//! The service binaries are built by `cargo build --bins` at the start
//! (a no-op when `cargo test --workspace` already built them).
//! `scripts/chaos.sh` runs the full size.

use std::sync::OnceLock;

use flotilla_chaos::{ChaosConfig, build_service_binaries, default_bin_dir, lifecycle, run};

static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
/// One run at a time: each starts a dozen processes, and CI has 2 cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config() -> ChaosConfig {
    let built = BUILT.get_or_init(|| build_service_binaries(false).map_err(|e| format!("{e:#}")));
    if let Err(e) = built {
        panic!("building the service binaries: {e}");
    }
    ChaosConfig::reduced(default_bin_dir().expect("target dir"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_through_kills_and_restarts_loses_leaks_and_duplicates_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let report = run(config()).await.expect("the harness runs");
    println!("{report}");
    assert!(
        report.storm.provision_acked > 0,
        "the storm provisioned nothing"
    );
    assert!(
        report.storm.terminate_acked > 0,
        "the storm terminated nothing"
    );
    assert!(
        report.links.values().all(|&n| n > 0),
        "a fault proxy carried nothing, so its partition tested nothing: {report}"
    );
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_on_a_nats_cluster_losing_a_node_loses_leaks_and_duplicates_nothing() {
    let _one_at_a_time = SERIAL.lock().await;
    let report = run(ChaosConfig {
        nats_nodes: 3,
        ..config()
    })
    .await
    .expect("the harness runs");
    println!("{report}");
    assert!(
        report.storm.provision_acked > 0,
        "the storm provisioned nothing"
    );
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_lifecycle_with_volumes_through_faults_and_kills_leaves_nothing_at_the_provider() {
    let _one_at_a_time = SERIAL.lock().await;
    let report = lifecycle(config()).await.expect("the harness runs");
    println!("{report}");
    assert!(
        report.provider_volumes_ever >= 40,
        "the pool's volumes were not created: {report}"
    );
    assert!(report.passed(), "{report}");
}
