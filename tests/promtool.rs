//! What `/metrics` serves after real activity passes `promtool check
//! metrics` (Prometheus' own linter: naming conventions, `_total` on
//! counters, help text on every metric), and carries the fleet metrics the
//! dashboards use: gRPC requests by method and code, provider calls,
//! breaker state, instances by pool and state, heartbeat ages, orphan cost,
//! the heartbeats expected, and the series with known labels at 0.
//!
//! `promtool` comes from the Debian package `prometheus` (scripts/services.sh
//! installs it). Without it the test fails: a check that is skipped where
//! the tool is missing passes without checking anything.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

use clap::Parser;
use flotilla_api::{ApiToken, Limits};
use flotilla_e2e::{TestApi, start_api};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_scheduler::{Scheduler, SchedulerTuning};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::stack::{instant, provider_stack};
use flotilla_test_utils::{DEADLINE, TestDb, TestNats, eventually_ok};
use flotilla_watchdog::{Watchdog, WatchdogTuning};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Request;
use tonic::metadata::MetadataValue;

const TOKEN: &str = "metrics-token";

#[derive(Parser)]
struct S {
    #[command(flatten)]
    t: SchedulerTuning,
}

#[derive(Parser)]
struct W {
    #[command(flatten)]
    t: WatchdogTuning,
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).expect("header"),
    );
    r
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// `promtool check metrics` on `text`: `None` when promtool is missing,
/// else its success and output.
fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_real_activity_pass_promtool_and_show_the_fleet() {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let stack = provider_stack(instant(), &[]).await;
    let stop = CancellationToken::new();
    let (metrics_addr, _) =
        flotilla_telemetry::metrics::serve("127.0.0.1:0".parse().unwrap(), stop.clone())
            .await
            .expect("metrics endpoint");

    let TestApi { addr, bus } = start_api(
        &db,
        &nats,
        ApiToken::from_plain("metrics", TOKEN),
        Limits::default(),
        &stop,
    )
    .await;
    let scheduler = Scheduler {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: S::try_parse_from(["x", "--scheduler-tick-ms", "100"])
            .expect("tuning")
            .t,
        owner: "scheduler-metrics".into(),
        worker_api_url: format!("http://{addr}"),
        crash_after: None,
    };
    tokio::spawn(scheduler.run(Some(bus.clone()), stop.clone()));
    // Dry run: the orphan made below stays, so its cost shows.
    let watchdog = Watchdog {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: W::try_parse_from([
            "x",
            "--watchdog-tick-ms",
            "100",
            "--orphan-scan-interval-seconds",
            "1",
            "--orphan-grace-seconds",
            "0",
            "--watchdog-dry-run",
            "true",
        ])
        .expect("tuning")
        .t,
        owner: "watchdog-metrics".into(),
    };
    tokio::spawn(watchdog.run(stop.clone()));

    let mut fleet = FleetServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("api reachable");
    // "empty" has no instance yet: its series exist at 0 from the start.
    for (name, price_per_hour_micros) in [("metered", 2_500_000), ("empty", 0)] {
        fleet
            .create_pool(authed(v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: name.into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    image: "registry/worker:1".into(),
                    price_per_hour_micros,
                    ..Default::default()
                }),
            }))
            .await
            .expect("pool");
    }
    fleet
        .provision(authed(v1::ProvisionRequest {
            pool: "metered".into(),
            count: 3,
            ..Default::default()
        }))
        .await
        .expect("provision");
    // A refused call, so a non-OK code is counted too.
    let refused = fleet
        .provision(authed(v1::ProvisionRequest {
            pool: "metered".into(),
            count: 0,
            ..Default::default()
        }))
        .await
        .expect_err("count 0 is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    // A machine nobody owns: an orphan for the scan to price.
    stack
        .client
        .clone()
        .create_machine(v1::CreateMachineRequest {
            target: Some(v1::ProviderTarget {
                provider: "sim".into(),
                pool: "metered".into(),
                region: "ams".into(),
            }),
            instance_id: uuid::Uuid::new_v4().to_string(),
            name: "stray".into(),
            instance_type: "shared-cpu-1x".into(),
            image: "registry/worker:1".into(),
            env: HashMap::new(),
            tags: HashMap::new(),
            volume_ids: Vec::new(),
            start: true,
        })
        .await
        .expect("stray machine");
    eventually_ok("3 instances booting", DEADLINE, || async {
        let booting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM instances WHERE state = 'booting'")
                .fetch_one(&db.pool)
                .await
                .expect("count");
        if booting == 3 { Ok(()) } else { Err(booting) }
    })
    .await;
    // Two workers were heard from 3 s ago, so there are heartbeat ages;
    // they have been ready for 20 minutes, and one is flagged as needing
    // attention (what the alerting rules of deploy/alerts read).
    sqlx::query(
        "UPDATE instances SET state = 'ready', last_heartbeat = now() - interval '3 seconds',
                state_entered_at = now() - interval '20 minutes'
         WHERE id IN (SELECT id FROM instances WHERE state = 'booting' ORDER BY id LIMIT 2)",
    )
    .execute(&db.pool)
    .await
    .expect("ready");
    sqlx::query(
        "UPDATE instances SET needs_attention = true
         WHERE id = (SELECT id FROM instances WHERE state = 'ready' ORDER BY id LIMIT 1)",
    )
    .execute(&db.pool)
    .await
    .expect("flagged");
    let text = eventually_ok("the fleet's gauges scraped", DEADLINE, || async {
        let text = scrape(metrics_addr).await;
        let booting = sample(
            &text,
            r#"flotilla_instances{pool="metered",state="booting"}"#,
        );
        let ready = sample(&text, r#"flotilla_instances{pool="metered",state="ready"}"#);
        let cost = sample(&text, "flotilla_watchdog_orphan_cost_per_hour");
        let attention = sample(
            &text,
            r#"flotilla_instances_needing_attention{pool="metered",state="ready"}"#,
        );
        let oldest = sample(
            &text,
            r#"flotilla_instances_oldest_in_state_seconds{pool="metered",state="ready"}"#,
        );
        let empty_ready = sample(&text, r#"flotilla_instances{pool="empty",state="ready"}"#);
        let no_deleting = sample(
            &text,
            r#"flotilla_instances_needing_attention{pool="metered",state="deleting"}"#,
        );
        if booting == Some(1.0)
            && ready == Some(2.0)
            && cost == Some(2.5)
            && attention == Some(1.0)
            && oldest.is_some_and(|s| (1200.0..1300.0).contains(&s))
            && empty_ready == Some(0.0)
            && no_deleting == Some(0.0)
        {
            Ok(text)
        } else {
            Err(format!(
                "booting {booting:?}, ready {ready:?}, orphan cost {cost:?}, needing attention \
                 {attention:?}, oldest ready {oldest:?}, empty pool ready {empty_ready:?}, \
                 deleting {no_deleting:?}:\n{text}"
            ))
        }
    })
    .await;

    for series in [
        r#"flotilla_grpc_server_requests_total{service="api",method="flotilla.v1.FleetService/Provision",code="OK"}"#,
        r#"flotilla_grpc_server_requests_total{service="api",method="flotilla.v1.FleetService/Provision",code="INVALID_ARGUMENT"}"#,
        r#"flotilla_grpc_server_requests_total{service="provider-adapter",method="flotilla.v1.Provider/CreateMachine",code="OK"}"#,
        r#"flotilla_grpc_server_request_duration_seconds_count{service="api",method="flotilla.v1.FleetService/Provision"}"#,
        r#"flotilla_provider_calls_total{provider="sim",op="create_machine",outcome="ok"}"#,
        "flotilla_heartbeat_age_seconds_count",
        r#"flotilla_loop_backlog{loop="scheduler_boot"}"#,
        r#"flotilla_loop_runs_total{loop="watchdog_fleet_metrics",reason="tick"}"#,
        r#"flotilla_loop_duration_seconds_count{loop="scheduler_provision"}"#,
    ] {
        let v = sample(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
        assert!(v >= 1.0, "{series} = {v}");
    }
    // Counters of failures have a series before any failure, so `rate()`
    // and `increase()` see the first one.
    for series in [
        r#"flotilla_loop_errors_total{loop="scheduler_provision",class="retryable"}"#,
        r#"flotilla_loop_errors_total{loop="scheduler_provision",class="permanent"}"#,
        r#"flotilla_loop_errors_total{loop="watchdog_fleet_metrics",class="already_done"}"#,
        "flotilla_api_heartbeat_flush_failures_total",
    ] {
        assert!(
            sample(&text, series).is_some(),
            "no {series} before any failure:\n{text}"
        );
    }
    // Series with known labels exist from the start, at 0 (histograms
    // without observations), so `rate()` and alerts see the first one.
    for series in [
        r#"flotilla_volume_deletes_total{service="watchdog",outcome="deleted"}"#,
        r#"flotilla_volume_deletes_total{service="watchdog",outcome="already_gone"}"#,
        r#"flotilla_volume_deletes_total{service="watchdog",outcome="failed"}"#,
        r#"flotilla_volume_delete_duration_seconds_count{service="watchdog",outcome="failed"}"#,
        r#"flotilla_scheduler_health_checks_total{outcome="down"}"#,
        r#"flotilla_scheduler_health_check_duration_seconds_count{outcome="down"}"#,
    ] {
        assert_eq!(
            sample(&text, series),
            Some(0.0),
            "{series} at 0 in:\n{text}"
        );
    }
    // No worker registered an agent: none is expected to heartbeat.
    assert_eq!(
        sample(&text, "flotilla_heartbeats_expected_per_second"),
        Some(0.0),
        "{text}"
    );
    assert!(
        text.contains("flotilla_provider_breaker_state{"),
        "breaker state exported:\n{text}"
    );
    assert!(
        text.contains("# HELP flotilla_instances "),
        "help text rendered:\n{text}"
    );
    // The two ready workers were last heard from about 3 s ago.
    assert!(
        sample(&text, r#"flotilla_heartbeat_age_seconds_bucket{le="1"}"#) == Some(0.0),
        "no heartbeat is fresher than 1 s:\n{text}"
    );

    // The heartbeat flusher's duration: no sample before any heartbeat
    // (nothing here runs an agent), one per batch once real heartbeats
    // come in through the worker API.
    let flushes = "flotilla_api_heartbeat_flush_duration_seconds_count";
    assert_eq!(
        sample(&text, flushes).unwrap_or(0.0),
        0.0,
        "no heartbeat batch yet:\n{text}"
    );
    let beating: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM instances WHERE state = 'ready' ORDER BY id LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .expect("a ready worker");
    sqlx::query(
        "UPDATE instances SET worker_token_hash = sha256('beat-token'::bytea) WHERE id = $1",
    )
    .bind(beating)
    .execute(&db.pool)
    .await
    .expect("worker token");
    let mut worker = WorkerServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("worker api reachable");
    for _ in 0..3 {
        let mut beat = Request::new(v1::HeartbeatRequest {
            instance_id: beating.to_string(),
            ..Default::default()
        });
        beat.metadata_mut().insert(
            "authorization",
            MetadataValue::try_from("Bearer beat-token").expect("header"),
        );
        worker.heartbeat(beat).await.expect("heartbeat accepted");
    }
    let after = scrape(metrics_addr).await;
    // Each heartbeat is answered after its batch is written, one at a time.
    assert_eq!(sample(&after, flushes), Some(3.0), "{after}");
    assert!(
        sample(&after, "flotilla_api_heartbeat_flush_duration_seconds_sum")
            .is_some_and(|s| s > 0.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "flotilla_api_heartbeat_flush_failures_total"),
        Some(0.0),
        "{after}"
    );

    match promtool(&text) {
        Some((ok, said)) => assert!(ok, "promtool check metrics:\n{said}\n--- input:\n{text}"),
        None => panic!(
            "promtool is not installed: run scripts/services.sh (it installs the Debian package \
             `prometheus`)"
        ),
    }
    stop.cancel();
}
