//! Authentication of both APIs: fleet tokens, worker tokens (each good
//! only for its own instance, cached safely), and no start without one.

use flotilla_core::InstanceId;
use flotilla_proto::v1;
use flotilla_telemetry::CancellationToken;
use tonic::{Code, Request};

use crate::common::*;

#[tokio::test]
async fn calls_without_a_valid_api_token_are_unauthenticated_and_write_nothing() {
    let api = start().await;
    let pool = v1::CreatePoolRequest {
        pool: Some(v1::Pool {
            name: "gpu".into(),
            provider: "sim".into(),
            instance_type: "x".into(),
            region: "ams".into(),
            ..Default::default()
        }),
    };
    let mut fleet = api.fleet.clone();
    let refusals = [
        fleet
            .create_pool(Request::new(pool.clone()))
            .await
            .expect_err("no token"),
        fleet
            .create_pool(with_token(pool.clone(), "wrong"))
            .await
            .expect_err("wrong"),
        fleet
            .provision(with_token(count("gpu", 1), "wrong"))
            .await
            .expect_err("wrong"),
        fleet
            .list_pools(with_token(v1::ListPoolsRequest {}, &format!("{TOKEN}x")))
            .await
            .expect_err("longer"),
    ];
    for err in refusals {
        assert_eq!(err.code(), Code::Unauthenticated);
        assert_eq!(err.message(), "missing or invalid API token");
    }
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    assert_eq!(api.instances().await, 0);
    assert_eq!(api.outbox().await, 0);
}

#[tokio::test]
async fn a_worker_token_is_good_only_for_its_own_instance_and_a_refusal_writes_nothing() {
    let api = start().await;
    let (a, b) = two_booting_workers(&api).await;
    let before = api.state_of(&b).await;
    let mut worker = api.worker.clone();

    let denied = [
        worker
            .report_phase(with_token(phase(&b, v1::WorkerPhase::Ready), "token-a"))
            .await
            .expect_err("a's token for b"),
        worker
            .heartbeat(with_token(beat(&b), "token-a"))
            .await
            .expect_err("a's token for b"),
    ];
    for err in denied {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    }
    let unknown = InstanceId::new().to_string();
    let unauthenticated = [
        worker
            .report_phase(Request::new(phase(&b, v1::WorkerPhase::Ready)))
            .await
            .expect_err("no token"),
        worker
            .report_phase(with_token(phase(&b, v1::WorkerPhase::Ready), "made-up"))
            .await
            .expect_err("no such token"),
        worker
            .heartbeat(with_token(beat(&unknown), "token-a"))
            .await
            .expect_err("unknown instance"),
        worker
            .heartbeat(with_token(beat(&b), TOKEN))
            .await
            .expect_err("an API token is no worker token"),
    ];
    for err in unauthenticated {
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    assert_eq!(api.state_of(&b).await, before);
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await,
        0
    );

    // An instance with no token issued yet cannot be spoken for at all.
    sqlx::query("UPDATE instances SET worker_token_hash = NULL WHERE id = $1")
        .bind(a.parse::<uuid::Uuid>().expect("uuid"))
        .execute(&api.db.pool)
        .await
        .expect("clear");
    let err = worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect_err("no token issued");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn the_service_refuses_to_start_without_any_api_token() {
    use clap::Parser;
    let args = flotilla_api::ApiArgs::try_parse_from(["api", "--metrics-addr", ""]).expect("args");
    let err = flotilla_api::run(args, CancellationToken::new())
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("API_TOKENS"), "{err}");
}

#[tokio::test]
async fn a_cached_worker_token_never_lets_a_wrong_token_through() {
    let api = start().await;
    let (a, _) = two_booting_workers(&api).await;
    let mut worker = api.worker.clone();
    worker
        .heartbeat(with_token(beat(&a), "token-a"))
        .await
        .expect("good token, now cached");
    for wrong in ["token-b", "nonsense"] {
        let before = api
            .count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
            .await;
        sqlx::query("UPDATE instances SET last_heartbeat = NULL")
            .execute(&api.db.pool)
            .await
            .expect("reset");
        let err = worker
            .heartbeat(with_token(beat(&a), wrong))
            .await
            .expect_err("refused");
        assert!(
            matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated),
            "{err:?}"
        );
        assert_eq!(
            api.count("SELECT count(*) FROM instances WHERE last_heartbeat IS NOT NULL")
                .await,
            0,
            "nothing written (was {before})"
        );
    }
}
