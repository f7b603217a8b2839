//! Spend caps: a pool's spend rate from the price table (or the pool's own
//! price), shown on every pool answer; a `Provision` that would pass the
//! cap refused with the figures and nothing written, also when provisions
//! race; the cap set and checked by CreatePool and UpdatePool.

use flotilla_api::Limits;
use flotilla_core::price::PriceTable;
use flotilla_proto::v1;
use tonic::{Code, Status};

use crate::common::*;

/// An api whose price table prices the test pools' type at 0.50 an hour.
async fn priced() -> Api {
    start_with(Limits {
        prices: PriceTable::parse("shared-cpu-1x=0.5").expect("prices"),
        ..Limits::default()
    })
    .await
}

/// CreatePool of a `sim` pool with a spend cap (and its own price, when
/// non-zero), in micros.
async fn capped_pool(api: &Api, name: &str, cap: u64, own_price: u64) -> Result<v1::Pool, Status> {
    api.try_create_pool_with(name, |p| {
        p.spend_cap_per_hour_micros = cap;
        p.price_per_hour_micros = own_price;
    })
    .await
}

#[tokio::test]
async fn a_provision_over_the_spend_cap_is_refused_with_the_figures_and_writes_nothing() {
    let api = priced().await;
    // 0.50 an hour each, at most 2 an hour: four machines.
    let pool = capped_pool(&api, "gpu", 2_000_000, 0).await.expect("pool");
    assert_eq!(pool.spend_cap_per_hour_micros, 2_000_000);
    assert_eq!(pool.spend_per_hour_micros, 0);
    api.provision(count("gpu", 3)).await.expect("1.50 of 2");
    let (instances, outbox) = (api.instances().await, api.outbox().await);

    let refused = api.provision(count("gpu", 2)).await.expect_err("2.50 > 2");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    for figure in ["1/h", "1.5/h", "2/h"] {
        assert!(
            refused.message().contains(figure),
            "{figure} missing: {}",
            refused.message()
        );
    }
    assert_eq!(api.instances().await, instances, "no instance written");
    assert_eq!(api.outbox().await, outbox, "no command or event queued");
    // A dry run says the same and writes nothing either.
    let dry = api
        .provision(v1::ProvisionRequest {
            dry_run: true,
            ..count("gpu", 2)
        })
        .await
        .expect_err("dry run over the cap");
    assert_eq!(dry.code(), Code::ResourceExhausted);

    // Exactly at the cap is allowed; one more is not.
    api.provision(count("gpu", 1)).await.expect("2 of 2");
    let over = api.provision(count("gpu", 1)).await.expect_err("full");
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert_eq!(api.get_pool("gpu").await.spend_per_hour_micros, 2_000_000);

    // A terminated instance costs nothing any more: its place is free.
    sqlx::query(
        "UPDATE instances SET state = 'terminated', desired_state = 'terminated'
         WHERE id = (SELECT id FROM instances ORDER BY id LIMIT 1)",
    )
    .execute(&api.db.pool)
    .await
    .expect("terminate one");
    assert_eq!(api.get_pool("gpu").await.spend_per_hour_micros, 1_500_000);
    api.provision(count("gpu", 1)).await.expect("a freed place");
}

#[tokio::test]
async fn a_pools_own_price_overrides_the_table_and_an_unpriced_type_is_free() {
    let api = priced().await;
    // 1.00 of its own, cap 2.50: two machines, not the table's five.
    capped_pool(&api, "own", 2_500_000, 1_000_000)
        .await
        .expect("pool");
    api.provision(count("own", 2)).await.expect("2 of 2.5");
    let refused = api.provision(count("own", 1)).await.expect_err("3 > 2.5");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("2/h"), "{}", refused.message());

    // A type neither the table nor the pool prices costs nothing, so its
    // cap never refuses.
    api.fleet
        .clone()
        .create_pool(authed(v1::CreatePoolRequest {
            pool: Some(v1::Pool {
                name: "free".into(),
                provider: "sim".into(),
                instance_type: "unpriced-1x".into(),
                region: "ams".into(),
                spend_cap_per_hour_micros: 1,
                ..Default::default()
            }),
        }))
        .await
        .expect("pool");
    api.provision(count("free", 10)).await.expect("free");

    let pools = api
        .fleet
        .clone()
        .list_pools(authed(v1::ListPoolsRequest {}))
        .await
        .expect("list")
        .into_inner()
        .pools;
    let spend: Vec<(String, u64, u64)> = pools
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.spend_per_hour_micros,
                p.spend_cap_per_hour_micros,
            )
        })
        .collect();
    assert_eq!(
        spend,
        [
            ("free".to_owned(), 0, 1),
            ("own".to_owned(), 2_000_000, 2_500_000)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provisions_racing_on_one_pool_cannot_together_pass_its_cap() {
    let api = priced().await;
    // Room for exactly five machines; twenty callers ask for one each at once.
    capped_pool(&api, "gpu", 2_500_000, 0).await.expect("pool");
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let mut fleet = api.fleet.clone();
            tokio::spawn(async move { fleet.provision(authed(count("gpu", 1))).await })
        })
        .collect();
    let mut accepted = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => accepted += 1,
            Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}"),
        }
    }
    assert_eq!(accepted, 5, "five fit under the cap");
    assert_eq!(api.instances().await, 5);
}

#[tokio::test]
async fn a_repeated_request_replays_its_answer_even_once_the_pool_is_at_its_cap() {
    let api = priced().await;
    capped_pool(&api, "gpu", 1_000_000, 0).await.expect("pool");
    let first = api
        .provision(keyed(count("gpu", 2), "fill-it"))
        .await
        .expect("1 of 1");
    let again = api
        .provision(keyed(count("gpu", 2), "fill-it"))
        .await
        .expect("replayed, not refused");
    assert!(again.replayed);
    assert_eq!(again.instances, first.instances);
    assert_eq!(api.instances().await, 2);
}

#[tokio::test]
async fn the_spend_cap_is_validated_set_and_removed_through_the_pool_calls() {
    let api = priced().await;
    let too_big = capped_pool(&api, "gpu", u64::MAX, 0)
        .await
        .expect_err("too large");
    assert_eq!(field_of(&too_big), "pool.spend_cap_per_hour_micros");
    assert_eq!(api.count("SELECT count(*) FROM pools").await, 0);

    api.create_pool("gpu").await;
    let mut fleet = api.fleet.clone();
    let bad = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            spend_cap_per_hour_micros: Some(u64::MAX),
            desired_capacity: Some(3),
            ..Default::default()
        }))
        .await
        .expect_err("too large");
    assert_eq!(field_of(&bad), "spend_cap_per_hour_micros");
    let unchanged = api.get_pool("gpu").await;
    assert_eq!(
        (
            unchanged.version,
            unchanged.desired_capacity,
            unchanged.spend_cap_per_hour_micros
        ),
        (1, 0, 0),
        "nothing changed"
    );

    api.provision(count("gpu", 2)).await.expect("uncapped");
    let set = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            spend_cap_per_hour_micros: Some(1_200_000),
            ..Default::default()
        }))
        .await
        .expect("cap")
        .into_inner();
    assert_eq!(
        (set.spend_cap_per_hour_micros, set.spend_per_hour_micros),
        (1_200_000, 1_000_000)
    );
    let refused = api.provision(count("gpu", 1)).await.expect_err("1.5 > 1.2");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    // 0 removes the cap.
    let removed = fleet
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            spend_cap_per_hour_micros: Some(0),
            ..Default::default()
        }))
        .await
        .expect("no cap")
        .into_inner();
    assert_eq!(removed.spend_cap_per_hour_micros, 0);
    api.provision(count("gpu", 5))
        .await
        .expect("uncapped again");
}
