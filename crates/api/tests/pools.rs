//! Pools: unique names, versioned updates that wake the scheduler, volume
//! sizes, checks against the provider adapter, pauses shown and resumed,
//! disruption settings set, shown and validated.

use flotilla_bus::subjects::RECONCILE;
use flotilla_core::InstanceId;
use flotilla_proto::v1;
use flotilla_store::WriteCtx;
use prost::Message;
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn pools_are_unique_and_updated_under_a_version_check_that_wakes_the_scheduler() {
    let api = start().await;
    let created = api.create_pool("gpu").await;
    assert_eq!((created.version, created.desired_capacity), (1, 0));
    let mut fleet = api.fleet.clone();

    let dup = fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(created.clone()),
        }))
        .await
        .expect_err("duplicate");
    assert_eq!(dup.code(), Code::AlreadyExists);
    let bad = fleet
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "cpu".into(),
                provider: "aws".into(),
                ..created.clone()
            }),
        }))
        .await
        .expect_err("bad provider");
    assert_eq!(field_of(&bad), "pool.provider");

    let updated = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(5),
            expected_version: 1,
            ..Default::default()
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!((updated.version, updated.desired_capacity), (2, 5));
    let wake: Vec<u8> = sqlx::query_scalar("SELECT payload FROM outbox WHERE subject = $1")
        .bind(RECONCILE)
        .fetch_one(&api.db.pool)
        .await
        .expect("one reconcile queued");
    assert_eq!(
        v1::ReconcileCommand::decode(wake.as_slice())
            .expect("decodes")
            .pool,
        "gpu"
    );

    let stale = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(9),
            expected_version: 1,
            ..Default::default()
        }))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);

    let priced = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            price_per_hour_micros: Some(1_500_000),
            timeouts: Some(v1::PoolTimeouts {
                booting_seconds: 90,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .expect("price")
        .into_inner();
    assert_eq!(
        (
            priced.version,
            priced.desired_capacity,
            priced.price_per_hour_micros
        ),
        (3, 5, 1_500_000)
    );
    assert_eq!(priced.timeouts.map(|t| t.booting_seconds), Some(90));
    // Only a capacity change wakes the scheduler.
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.reconcile'")
            .await,
        1
    );

    let missing = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "nope".into(),
            desired_capacity: Some(1),
            ..Default::default()
        }))
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    let too_big = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(10_001),
            ..Default::default()
        }))
        .await
        .expect_err("too big");
    assert_eq!(field_of(&too_big), "desired_capacity");

    let got = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.version, 3);
    let all = fleet
        .list_pools(authed(v1::ListPoolsRequest {}))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(all.pools.len(), 1);
    let absent = fleet
        .get_pool(authed(v1::GetPoolRequest {
            name: "nope".into(),
        }))
        .await
        .expect_err("absent");
    assert_eq!(absent.code(), Code::NotFound);
}

#[tokio::test]
async fn a_pool_may_ask_for_block_volumes_of_up_to_10_tb() {
    let api = start().await;
    let pool = api
        .fleet
        .clone()
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "big-disks".into(),
                provider: "scaleway".into(),
                instance_type: "GP1-XS".into(),
                region: "fr-par-1".into(),
                volume_size_gb: 10_000,
                ..Default::default()
            }),
        }))
        .await
        .expect("a 10 TB Block Storage volume is a valid pool")
        .into_inner();
    assert_eq!(pool.volume_size_gb, 10_000);
}

fn pool_of(provider: &str, instance_type: &str, image: &str) -> v1::CreatePoolRequest {
    v1::CreatePoolRequest {
        pool: Some(v1::Pool {
            name: "gpu".into(),
            provider: provider.into(),
            instance_type: instance_type.into(),
            region: "ams".into(),
            image: image.into(),
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_pool_is_checked_against_the_provider_adapter_and_nothing_is_written_on_refusal() {
    // An adapter with only the simulated cloud configured.
    let stack =
        flotilla_test_utils::stack::provider_stack(flotilla_test_utils::stack::instant(), &[])
            .await;
    let api = start_checked(stack.client.clone()).await;
    let mut fleet = api.fleet.clone();
    let cases = [
        // Valid by the api's own rules, but no Fly account in this adapter.
        (
            "pool.provider",
            pool_of("fly", "shared-cpu-1x", "registry/worker:1"),
        ),
        (
            "pool.instance_type",
            pool_of("sim", "a100", "registry/worker:1"),
        ),
        ("pool.image", pool_of("sim", "shared-cpu-1x", "")),
    ];
    for (field, req) in cases {
        let err = fleet.create_pool(authed(req)).await.expect_err(field);
        assert_eq!(field_of(&err), field, "{err:?}");
    }
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    assert_eq!(api.count("SELECT count(*) FROM action_logs").await, 0);
    assert_eq!(api.outbox().await, 0);
    // A valid one goes through.
    let created = fleet
        .create_pool(authed(pool_of("sim", "shared-cpu-1x", "registry/worker:1")))
        .await
        .expect("valid pool")
        .into_inner();
    assert_eq!(created.provider, "sim");
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 1);
    // A second pool by that name conflicts, as without an adapter.
    let again = fleet
        .create_pool(authed(pool_of("sim", "shared-cpu-1x", "")))
        .await
        .expect_err("name taken");
    assert_eq!(again.code(), Code::AlreadyExists, "{again:?}");
}

#[tokio::test]
async fn a_fly_pool_with_a_size_fly_does_not_have_is_refused_naming_instance_type() {
    // Fly configured in the adapter (its size rules are decided locally, so
    // the API address is never called).
    let stack = flotilla_test_utils::stack::provider_stack(
        flotilla_test_utils::stack::instant(),
        &[
            "--fly-api-token",
            "fly-token",
            "--fly-app-name",
            "flotilla-test",
            "--fly-api-base-url",
            "http://127.0.0.1:1",
        ],
    )
    .await;
    let api = start_checked(stack.client.clone()).await;
    let mut fleet = api.fleet.clone();
    for size in ["a100", "gpu-xl", "shared-cpu-99x"] {
        let err = fleet
            .create_pool(authed(pool_of("fly", size, "registry/worker:1")))
            .await
            .expect_err(size);
        assert_eq!(field_of(&err), "pool.instance_type", "{size}: {err:?}");
    }
    let err = fleet
        .create_pool(authed(pool_of("fly", "shared-cpu-1x", "")))
        .await
        .expect_err("no image");
    assert_eq!(field_of(&err), "pool.image", "{err:?}");
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);
    fleet
        .create_pool(authed(pool_of("fly", "a100-40gb", "registry/worker:1")))
        .await
        .expect("a100-40gb is one of Fly's sizes (fly-go machine_types.go presets)");
}

#[tokio::test]
async fn without_an_adapter_pools_keep_the_api_s_own_rules() {
    let api = start().await;
    let mut fleet = api.fleet.clone();
    let err = fleet
        .create_pool(authed(pool_of("aws", "x", "img")))
        .await
        .expect_err("unknown provider kind");
    assert_eq!(field_of(&err), "pool.provider");
    fleet
        .create_pool(authed(pool_of("fly", "a100", "img")))
        .await
        .expect("not checked against any adapter");
}

#[tokio::test]
async fn a_paused_pool_is_shown_and_resumed_by_update_pool_with_an_audit_row_and_a_wake_up() {
    use flotilla_store::pool_pause::{FailureKind, PausePolicy, pool_record_failure};
    let api = start().await;
    api.create_pool("gpu").await;
    let mut fleet = api.fleet.clone();
    let waiting = api
        .provision(v1::ProvisionRequest {
            pool: "gpu".into(),
            count: 2,
            ..Default::default()
        })
        .await
        .expect("provision");
    // The scheduler's failures pause the pool (one is enough here).
    let mut conn = api.db.pool.acquire().await.expect("conn");
    let failing: InstanceId = waiting.instances[0].id.parse().expect("id");
    pool_record_failure(
        &mut conn,
        &WriteCtx::new("scheduler"),
        "gpu",
        failing,
        FailureKind::StartupFailed,
        "no progress from booting",
        &PausePolicy {
            failures: 1,
            window: std::time::Duration::from_secs(600),
            cooloff: std::time::Duration::from_secs(300),
        },
    )
    .await
    .expect("failure recorded");

    let shown = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    assert!(shown.paused_at.is_some());
    assert!(
        shown.paused_reason.contains("no progress from booting"),
        "{}",
        shown.paused_reason
    );
    assert!(shown.pause_probe_after.is_some(), "a cool-off is set");

    // Bad input names the field; an unknown pool is NOT_FOUND naming it.
    for bad in ["", "Not A Pool"] {
        let e = fleet
            .update_pool(authed(v1::UpdatePoolRequest {
                name: bad.into(),
                paused: Some(false),
                ..Default::default()
            }))
            .await
            .expect_err("bad name");
        assert_eq!(field_of(&e), "name");
    }
    let missing = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "nope".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect_err("unknown pool");
    assert_eq!(missing.code(), Code::NotFound);
    assert!(
        missing.message().contains("pool nope"),
        "{}",
        missing.message()
    );
    // A stale version refuses the whole call: the pool stays paused.
    let stale = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            expected_version: 99,
            ..Default::default()
        }))
        .await
        .expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted);

    let wakes_before = api
        .count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
        .await;
    let resumed = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect("resume")
        .into_inner();
    assert!(resumed.paused_at.is_none());
    assert_eq!(resumed.paused_reason, "");
    assert!(resumed.pause_probe_after.is_none());
    // The waiting instances are woken by a command committed with the resume.
    let wake: Vec<u8> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE subject = 'CMD.provision' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&api.db.pool)
    .await
    .expect("wake");
    let mut woken = v1::ProvisionCommand::decode(wake.as_slice())
        .expect("decodes")
        .instance_ids;
    woken.sort();
    let mut expected: Vec<String> = waiting.instances.iter().map(|i| i.id.clone()).collect();
    expected.sort();
    assert_eq!(woken, expected);
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        wakes_before + 1
    );
    assert_eq!(api.count("SELECT count(*) FROM pool_failures").await, 0);
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, actor FROM pool_events WHERE pool = 'gpu' ORDER BY id")
            .fetch_all(&api.db.pool)
            .await
            .expect("audit");
    assert_eq!(
        audit,
        [
            ("paused".to_owned(), "scheduler".to_owned()),
            ("resumed".to_owned(), "api:ci".to_owned())
        ]
    );

    // Resuming a pool that runs changes nothing and wakes nothing.
    fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(false),
            ..Default::default()
        }))
        .await
        .expect("resume again");
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.provision'")
            .await,
        wakes_before + 1
    );
    assert_eq!(api.count("SELECT count(*) FROM pool_events").await, 2);

    // An operator's pause has no cool-off probe.
    let paused = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            paused: Some(true),
            ..Default::default()
        }))
        .await
        .expect("pause")
        .into_inner();
    assert!(paused.paused_at.is_some());
    assert_eq!(paused.paused_reason, "paused by api:ci");
    assert!(paused.pause_probe_after.is_none());

    // GetPool shows the pool's own history, oldest first; the other
    // answers carry none.
    let shown = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    let events: Vec<(&str, &str, &str)> = shown
        .recent_events
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0].0, "paused");
    assert_eq!(events[0].1, "scheduler");
    assert!(
        events[0].2.contains("no progress from booting"),
        "{events:?}"
    );
    assert_eq!(events[1].0, "resumed");
    assert_eq!(events[2], ("paused", "api:ci", "paused by api:ci"));
    assert!(shown.recent_events.iter().all(|e| e.at.is_some()));
    assert!(paused.recent_events.is_empty());
}

#[tokio::test]
async fn get_pool_returns_the_most_recent_twenty_pool_events_oldest_first() {
    let api = start().await;
    api.create_pool("gpu").await;
    let mut fleet = api.fleet.clone();
    for i in 0..25 {
        fleet
            .update_pool(authed(v1::UpdatePoolRequest {
                name: "gpu".into(),
                paused: Some(i % 2 == 0),
                ..Default::default()
            }))
            .await
            .expect("pause or resume");
    }
    assert_eq!(api.count("SELECT count(*) FROM pool_events").await, 25);
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM pool_events ORDER BY id")
        .fetch_all(&api.db.pool)
        .await
        .expect("ids");
    let shown = fleet
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("get")
        .into_inner();
    let got: Vec<i64> = shown.recent_events.iter().map(|e| e.id as i64).collect();
    assert_eq!(got, ids[5..], "the last twenty, oldest first");
    assert_eq!(shown.recent_events.last().expect("one").action, "paused");
}

#[tokio::test]
async fn disruption_settings_are_set_shown_and_refused_naming_the_field() {
    let api = start().await;
    let created = api
        .try_create_pool_with("gpu", |p| {
            p.disruption_budget = "25%".into();
            p.max_lifetime_seconds = 86_400;
            p.idle_timeout_seconds = 300;
            p.idle_action = "stop".into();
        })
        .await
        .expect("pool");
    assert_eq!(created.disruption_budget, "25%");
    assert_eq!(created.max_lifetime_seconds, 86_400);
    assert_eq!(created.idle_timeout_seconds, 300);
    assert_eq!(created.idle_action, "stop");
    assert_eq!(created.disrupted, 0);
    // Unset, a pool gets Karpenter's default.
    let plain = api.create_pool("cpu").await;
    assert_eq!(plain.disruption_budget, "10%");
    assert_eq!(plain.max_lifetime_seconds, 0);
    assert_eq!(plain.idle_action, "terminate");
    let refused = api
        .fleet
        .clone()
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            idle_action: Some("hibernate".into()),
            ..Default::default()
        }))
        .await
        .expect_err("no such action");
    assert_eq!(field_of(&refused), "idle_action");

    for (budget, ok) in [
        ("3", true),
        ("0", true),
        ("100%", true),
        ("101%", false),
        ("x", false),
    ] {
        let answer = api
            .fleet
            .clone()
            .update_pool(authed(v1::UpdatePoolRequest {
                name: "gpu".into(),
                disruption_budget: Some(budget.into()),
                ..Default::default()
            }))
            .await;
        match answer {
            Ok(p) => {
                assert!(ok, "{budget} accepted");
                assert_eq!(p.into_inner().disruption_budget, budget);
            }
            Err(s) => {
                assert!(!ok, "{budget} refused: {s:?}");
                assert_eq!(s.code(), Code::InvalidArgument);
                assert_eq!(field_of(&s), "disruption_budget", "{s:?}");
            }
        }
    }
    let refused = api
        .try_create_pool_with("big", |p| p.max_lifetime_seconds = u32::MAX)
        .await
        .expect_err("a lifetime in milliseconds");
    assert_eq!(field_of(&refused), "pool.max_lifetime_seconds");
    let before = api.count("SELECT sum(version)::int8 FROM pools").await;
    let refused = api
        .fleet
        .clone()
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            idle_timeout_seconds: Some(u32::MAX),
            ..Default::default()
        }))
        .await
        .expect_err("too long");
    assert_eq!(field_of(&refused), "idle_timeout_seconds");
    assert_eq!(
        api.count("SELECT sum(version)::int8 FROM pools").await,
        before,
        "nothing changed"
    );

    // A marked instance is counted on the pool and named on the instance.
    api.provision(count("gpu", 2)).await.expect("provision");
    sqlx::query(
        "UPDATE instances SET disruption = 'idle'
         WHERE id = (SELECT id FROM instances ORDER BY id LIMIT 1)",
    )
    .execute(&api.db.pool)
    .await
    .unwrap();
    assert_eq!(api.get_pool("gpu").await.disrupted, 1);
    let listed = api
        .fleet
        .clone()
        .list_pools(authed(v1::ListPoolsRequest {}))
        .await
        .expect("list")
        .into_inner()
        .pools;
    let disrupted: Vec<(String, u32)> = listed
        .iter()
        .map(|p| (p.name.clone(), p.disrupted))
        .collect();
    assert_eq!(disrupted, [("cpu".to_owned(), 0), ("gpu".to_owned(), 1)]);
}
