//! The worker API: reported boot phases, heartbeats (batched, ordered,
//! telling the worker what to do), and the races between them.

use flotilla_core::InstanceState;
use flotilla_proto::v1;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn reported_phases_drive_a_booting_instance_to_ready_and_a_repeat_writes_nothing() {
    let api = start().await;
    let (_, b) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let registered = worker
        .register(with_token(
            v1::RegisterRequest {
                instance_id: b.clone(),
                agent_version: "0.1.0".into(),
                hostname: "w-b".into(),
            },
            "token-b",
        ))
        .await
        .expect("register")
        .into_inner();
    assert_eq!(registered.heartbeat_interval_ms, 5000);
    assert!(!registered.cordoned);
    // The interval it was told is kept: the watchdog sums the heartbeats
    // the fleet should send from it.
    let kept: Option<i32> =
        sqlx::query_scalar("SELECT heartbeat_interval_ms FROM instances WHERE id = $1")
            .bind(b.parse::<uuid::Uuid>().expect("uuid"))
            .fetch_one(&api.db.pool)
            .await
            .expect("interval");
    assert_eq!(kept, Some(5000));
    let (_, _, logs_at_boot) = api.state_of(&b).await;
    // Requested 1000 s ago: its time to ready is measured from then. Other
    // tests of this binary make instances of pool `gpu` ready within
    // seconds, so only this one lands above the 900 s bucket.
    sqlx::query("UPDATE instances SET created_at = now() - interval '1000 seconds' WHERE id = $1")
        .bind(b.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&api.db.pool)
        .await
        .expect("aged");
    let slow_readies = || {
        flotilla_test_utils::metrics::value(r#"flotilla_instance_ready_seconds_count{pool="gpu"}"#)
            - flotilla_test_utils::metrics::value(
                r#"flotilla_instance_ready_seconds_bucket{pool="gpu",le="900"}"#,
            )
    };
    let slow_before = slow_readies();

    for p in [
        v1::WorkerPhase::Installing,
        v1::WorkerPhase::Starting,
        v1::WorkerPhase::Ready,
    ] {
        worker
            .report_phase(with_token(phase(&b, p), "token-b"))
            .await
            .expect("phase accepted");
        if p != v1::WorkerPhase::Ready {
            assert_eq!(slow_readies(), slow_before, "not ready yet at {p:?}");
        }
    }
    let (state, version, logs) = api.state_of(&b).await;
    assert_eq!(state, InstanceState::Ready);
    assert_eq!(logs, logs_at_boot + 3);
    assert_eq!(
        slow_readies() - slow_before,
        1.0,
        "ready 1000 s after its request"
    );
    let tail: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT from_state, to_state, actor FROM action_logs WHERE instance_id = $1 ORDER BY id DESC LIMIT 3",
    )
    .bind(b.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_all(&api.db.pool)
    .await
    .expect("logs");
    let tail: Vec<(&str, &str, &str)> = tail
        .iter()
        .rev()
        .map(|(f, t, a)| (f.as_deref().unwrap_or(""), t.as_str(), a.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("booting", "installing", "worker"),
            ("installing", "starting", "worker"),
            ("starting", "ready", "worker"),
        ]
    );
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        1
    );

    for p in [v1::WorkerPhase::Ready, v1::WorkerPhase::Installing] {
        worker
            .report_phase(with_token(phase(&b, p), "token-b"))
            .await
            .expect("a repeat is fine");
    }
    assert_eq!(
        api.state_of(&b).await,
        (InstanceState::Ready, version, logs)
    );
}

#[tokio::test]
async fn ready_for_an_instance_not_yet_booting_is_a_failed_precondition() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["w-1"]))
        .await
        .expect("created");
    let id = created.instances[0].id.clone();
    api.set_worker_token(&id, "token-1").await;
    let before = api.state_of(&id).await;
    let err = api
        .worker
        .clone()
        .report_phase(with_token(phase(&id, v1::WorkerPhase::Ready), "token-1"))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(api.state_of(&id).await, before);
    let bad = api
        .worker
        .clone()
        .report_phase(with_token(
            phase(&id, v1::WorkerPhase::Unspecified),
            "token-1",
        ))
        .await
        .expect_err("no phase");
    assert_eq!(field_of(&bad), "phase");
}

#[tokio::test]
async fn a_heartbeat_records_liveness_and_tells_the_worker_what_to_do() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let answer = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("beat")
        .into_inner();
    assert_eq!(answer.heartbeat_interval_ms, 5000);
    assert!(!answer.cordoned && !answer.shutdown);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        1
    );
    let (state, version, logs) = api.state_of(&a).await;

    sqlx::query("UPDATE instances SET cordoned = true, desired_state = 'terminated' WHERE id = $1")
        .bind(a.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&api.db.pool)
        .await
        .expect("cordon");
    let answer = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("beat")
        .into_inner();
    assert!(answer.cordoned && answer.shutdown);
    // A heartbeat is not a transition.
    assert_eq!(api.state_of(&a).await, (state, version, logs));

    let too_many = v1::HeartbeatRequest {
        gpus: vec![v1::GpuStats::default(); 17],
        ..beat(&a)
    };
    let err = worker
        .heartbeat(with_token(too_many, "token-a"))
        .await
        .expect_err("too many gpus");
    assert_eq!(field_of(&err), "gpus");
}

#[tokio::test]
async fn a_heartbeat_older_than_the_last_written_changes_nothing_until_the_agent_registers_again() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    let idle_of = |api: &Api| {
        let pool = api.db.pool.clone();
        let id: uuid::Uuid = a.parse().expect("uuid");
        async move {
            sqlx::query_scalar::<_, bool>("SELECT worker_idle FROM instances WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("idle")
        }
    };
    let send = |sequence: u64, idle: bool| v1::HeartbeatRequest {
        sequence,
        idle,
        ..beat(&a)
    };
    worker
        .heartbeat(with_token(send(10, false), "token-a"))
        .await
        .expect("busy beat");
    assert!(!idle_of(&api).await);
    // A beat sent earlier (sequence 9, idle) arrives late, after the cordon:
    // it must not end the drain of a worker that is busy.
    let answer = worker
        .heartbeat(with_token(send(9, true), "token-a"))
        .await
        .expect("a late beat is answered")
        .into_inner();
    assert!(!answer.shutdown);
    assert!(
        !idle_of(&api).await,
        "a late heartbeat overwrote a newer one"
    );
    worker
        .heartbeat(with_token(send(11, true), "token-a"))
        .await
        .expect("newer beat");
    assert!(idle_of(&api).await);
    // A restarted agent registers and counts anew.
    worker
        .register(with_token(
            v1::RegisterRequest {
                instance_id: a.clone(),
                ..Default::default()
            },
            "token-a",
        ))
        .await
        .expect("register");
    worker
        .heartbeat(with_token(send(1, false), "token-a"))
        .await
        .expect("first beat of the new process");
    assert!(
        !idle_of(&api).await,
        "the new process's first beat was dropped"
    );
}

#[tokio::test]
async fn a_terminating_worker_is_told_to_exit_only_after_its_drain() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let worker = api.worker.clone();
    let id: uuid::Uuid = a.parse().expect("uuid");
    let answer_in = |state: &'static str| {
        let pool = api.db.pool.clone();
        let mut worker = worker.clone();
        let a = a.clone();
        async move {
            sqlx::query(
                "UPDATE instances SET state = $2, cordoned = true, desired_state = 'terminated' \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(state)
            .execute(&pool)
            .await
            .expect("set state");
            worker
                .heartbeat(with_token(beat(&a), "token-a"))
                .await
                .expect("beat")
                .into_inner()
        }
    };
    // Told to exit while ready or draining, the worker would never send the
    // idle heartbeat after the cordon that ends its drain.
    for state in ["ready", "draining"] {
        let answer = answer_in(state).await;
        assert!(answer.cordoned, "{state}: not told it is cordoned");
        assert!(
            !answer.shutdown,
            "{state}: told to exit before its drain ended"
        );
    }
    for state in ["stopping", "booting"] {
        assert!(answer_in(state).await.shutdown, "{state}: not told to exit");
    }
}

#[tokio::test]
async fn racing_reports_of_one_phase_all_succeed_and_move_the_instance_once() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let calls = (0..8).map(|_| {
        let mut worker = api.worker.clone();
        let req = with_token(phase(&a, v1::WorkerPhase::Ready), "token-a");
        async move { worker.report_phase(req).await }
    });
    for answer in futures::future::join_all(calls).await {
        answer.expect("a report that lost the race is re-decided, not refused");
    }
    let moves: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM action_logs WHERE instance_id = $1 AND to_state = 'ready'",
    )
    .bind(a.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_one(&api.db.pool)
    .await
    .expect("count");
    assert_eq!(moves, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_heartbeats_are_written_in_batches_and_none_is_lost() {
    use flotilla_api::heartbeat::HeartbeatBatcher;
    let api = start().await;
    api.create_pool("gpu").await;
    let ids: Vec<flotilla_core::InstanceId> =
        ids(&api.provision(count("gpu", 200)).await.expect("200"))
            .iter()
            .map(|s| s.parse().expect("uuid"))
            .collect();
    let batcher = HeartbeatBatcher::spawn(api.db.pool.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..10 {
        for id in &ids {
            let (b, id) = (batcher.clone(), *id);
            tasks.spawn(async move { b.beat(id, round % 2 == 0, 0).await });
        }
    }
    let mut answered = 0;
    while let Some(r) = tasks.join_next().await {
        let view = r.expect("task").expect("written").expect("instance exists");
        assert_eq!(view.state, InstanceState::Requested);
        answered += 1;
    }
    assert_eq!(answered, 2000);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        200
    );
    let stats = batcher.stats();
    let statements = stats.statements.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        stats.heartbeats.load(std::sync::atomic::Ordering::Relaxed),
        2000
    );
    assert!(
        statements < 400,
        "{statements} statements for 2000 heartbeats"
    );
    println!("2000 concurrent heartbeats written with {statements} statements");
    // A heartbeat for an instance that does not exist is answered as such.
    assert!(
        batcher
            .beat(flotilla_core::InstanceId::new(), true, 0)
            .await
            .expect("answered")
            .is_none()
    );
}

#[tokio::test]
async fn a_worker_reporting_before_its_start_was_recorded_moves_the_instance_through_booting() {
    let api = start().await;
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["early"]))
        .await
        .expect("created");
    let id = created.instances[0].id.clone();
    use InstanceState::*;
    api.walk(&id, &[Requested, Provisioning]).await;
    api.set_worker_token(&id, "token-early").await;
    let mut worker = api.worker.clone();
    worker
        .report_phase(with_token(
            phase(&id, v1::WorkerPhase::Ready),
            "token-early",
        ))
        .await
        .expect("an early report is accepted");
    let history: Vec<(Option<String>, String, String)> = sqlx::query_as(
        "SELECT from_state, to_state, actor FROM action_logs WHERE instance_id = $1 ORDER BY id",
    )
    .bind(id.parse::<uuid::Uuid>().expect("uuid"))
    .fetch_all(&api.db.pool)
    .await
    .expect("history");
    let tail: Vec<(String, String)> = history[history.len() - 2..]
        .iter()
        .map(|(f, t, _)| (f.clone().unwrap_or_default(), t.clone()))
        .collect();
    assert_eq!(
        tail,
        [
            ("provisioning".to_owned(), "booting".to_owned()),
            ("booting".to_owned(), "ready".to_owned())
        ]
    );
    assert!(
        history[history.len() - 2..]
            .iter()
            .all(|(_, _, a)| a == "worker")
    );
}

/// WORKER_HEARTBEAT_MARK_SECONDS decides when a heartbeat moves the mark
/// the watchdog's silent-worker scan reads.
#[tokio::test]
async fn the_heartbeat_mark_interval_setting_decides_when_a_heartbeat_moves_the_mark() {
    for (every, moved) in [(60, false), (10, true)] {
        let api = start_with(flotilla_api::Limits {
            heartbeat_mark_every: std::time::Duration::from_secs(every),
            ..flotilla_api::Limits::default()
        })
        .await;
        let (a, _) = two_booting_workers(&api).await;
        let id = a.parse::<uuid::Uuid>().expect("uuid");
        sqlx::query(
            "UPDATE instances SET last_heartbeat = now() - interval '20 seconds',
                 heartbeat_mark = now() - interval '20 seconds' WHERE id = $1",
        )
        .bind(id)
        .execute(&api.db.pool)
        .await
        .expect("aged");
        api.worker
            .clone()
            .heartbeat(with_token(beat(&a), "token-a"))
            .await
            .expect("beat");
        let age: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM now() - heartbeat_mark)::float8 FROM instances WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&api.db.pool)
        .await
        .expect("mark");
        if moved {
            assert!(
                age < 5.0,
                "a {every} s interval moves a 20 s old mark: {age}"
            );
        } else {
            assert!(
                age >= 19.0,
                "a {every} s interval keeps a 20 s old mark: {age}"
            );
        }
    }
}
