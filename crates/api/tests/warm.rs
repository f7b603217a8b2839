//! Warm pools at the api: `warm_size` set and validated by CreatePool and
//! UpdatePool, `warm_count` on every pool answer, and `Provision` serving
//! a batch from warm stock first (the caller's names, labels and key on
//! the warm rows, which keep their ids and machines and say
//! `provisioning`), the rest cold, replayed as one answer, with warm stock
//! free against the spend cap until taken.

use std::collections::BTreeMap;

use flotilla_api::Limits;
use flotilla_core::price::PriceTable;
use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_store::WriteCtx;
use flotilla_store::instance::NewInstance;
use flotilla_store::warm::warm_request;
use tonic::Code;

use crate::common::*;

/// `n` warm instances of `pool` the short way: rows held warm with a
/// recorded machine id, as the scheduler leaves them.
async fn warm(api: &Api, pool: &str, n: usize) -> Vec<String> {
    let mut conn = api.db.pool.acquire().await.expect("conn");
    let new: Vec<NewInstance> = (0..n)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: pool.into(),
            name: format!("{pool}-warm{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let rows = warm_request(&mut conn, &WriteCtx::new("scheduler"), &new)
        .await
        .expect("warm");
    let mut ids = Vec::new();
    for r in rows {
        let id = r.id.to_string();
        api.walk(
            &id,
            &[InstanceState::Requested, InstanceState::Provisioning],
        )
        .await;
        sqlx::query("UPDATE instances SET provider_machine_id = $2 WHERE id = $1")
            .bind(r.id.0)
            .bind(format!("m-{id}"))
            .execute(&api.db.pool)
            .await
            .expect("machine");
        api.walk(&id, &[InstanceState::Provisioning, InstanceState::Warm])
            .await;
        ids.push(id);
    }
    ids
}

#[tokio::test]
async fn warm_size_is_set_by_create_and_update_pool_validated_and_the_stock_is_counted() {
    let api = start().await;
    let pool = api
        .try_create_pool_with("gpu", |p| p.warm_size = 2)
        .await
        .expect("pool");
    assert_eq!((pool.warm_size, pool.warm_count), (2, 0));
    let bad = api
        .try_create_pool_with("cpu", |p| p.warm_size = 10_001)
        .await
        .expect_err("too many");
    assert_eq!(field_of(&bad), "pool.warm_size");
    let bad = api
        .fleet
        .clone()
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            warm_size: Some(10_001),
            ..Default::default()
        }))
        .await
        .expect_err("too many");
    assert_eq!(field_of(&bad), "warm_size");
    warm(&api, "gpu", 2).await;
    assert_eq!(api.get_pool("gpu").await.warm_count, 2);
    let updated = api
        .fleet
        .clone()
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            warm_size: Some(5),
            ..Default::default()
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!((updated.warm_size, updated.warm_count), (5, 2));
    let wakes = api
        .count("SELECT count(*) FROM outbox WHERE subject LIKE '%reconcile%'")
        .await;
    assert_eq!(wakes, 1, "the scheduler is woken to refill");
}

#[tokio::test]
async fn provision_serves_warm_stock_first_with_the_callers_names_and_the_rest_cold() {
    let api = start().await;
    api.try_create_pool_with("gpu", |p| p.warm_size = 2)
        .await
        .expect("pool");
    let warm_ids = warm(&api, "gpu", 2).await;
    let mut req = keyed(named("gpu", &["a", "b", "c"]), "k1");
    req.labels.insert("team".into(), "ml".into());
    let answer = api.provision(req.clone()).await.expect("provision");
    let got: Vec<(String, String, i32)> = answer
        .instances
        .iter()
        .map(|i| (i.id.clone(), i.name.clone(), i.state))
        .collect();
    assert_eq!(got[0].0, warm_ids[0], "the oldest warm first");
    assert_eq!(got[1].0, warm_ids[1]);
    assert!(!warm_ids.contains(&got[2].0), "the third is new");
    assert_eq!(
        got.iter().map(|g| g.1.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert_eq!(got[0].2, v1::InstanceState::Provisioning as i32);
    assert_eq!(got[1].2, v1::InstanceState::Provisioning as i32);
    assert_eq!(got[2].2, v1::InstanceState::Requested as i32);
    assert_eq!(
        answer.instances[0].provider_machine_id,
        format!("m-{}", warm_ids[0]),
        "it keeps its machine"
    );
    for i in &answer.instances {
        assert_eq!(i.labels.get("team").map(String::as_str), Some("ml"));
        assert_eq!(i.desired_state, v1::DesiredState::Running as i32);
    }
    let key: i64 = api
        .count("SELECT count(*) FROM instances WHERE idempotency_key = 'k1'")
        .await;
    assert_eq!(key, 3, "the key is on the warm rows too");
    assert_eq!(api.get_pool("gpu").await.warm_count, 0);

    // A retry with the key is the same answer, and takes nothing more.
    warm(&api, "gpu", 1).await;
    let again = api.provision(req).await.expect("replay");
    assert!(again.replayed);
    assert_eq!(ids(&again), ids(&answer));
    assert_eq!(api.get_pool("gpu").await.warm_count, 1);
}

#[tokio::test]
async fn warm_stock_is_free_against_the_spend_cap_until_a_provision_takes_it() {
    let api = start_with(Limits {
        prices: PriceTable::parse("shared-cpu-1x=0.5").expect("prices"),
        ..Limits::default()
    })
    .await;
    // At most 1 an hour: two machines of 0.50.
    api.try_create_pool_with("gpu", |p| {
        p.spend_cap_per_hour_micros = 1_000_000;
        p.warm_size = 3;
    })
    .await
    .expect("pool");
    warm(&api, "gpu", 3).await;
    assert_eq!(api.get_pool("gpu").await.spend_per_hour_micros, 0);
    let refused = api.provision(count("gpu", 3)).await.expect_err("1.50 > 1");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(api.get_pool("gpu").await.warm_count, 3, "nothing taken");
    api.provision(count("gpu", 2)).await.expect("1 of 1");
    let pool = api.get_pool("gpu").await;
    assert_eq!(pool.spend_per_hour_micros, 1_000_000);
    assert_eq!(pool.warm_count, 1);
}

#[tokio::test]
async fn two_batches_taking_at_once_never_take_the_same_warm_machine_and_neither_waits() {
    use flotilla_store::warm::{WarmTake, warm_take};
    use sqlx::Acquire;

    let api = start().await;
    api.try_create_pool_with("gpu", |p| p.warm_size = 2)
        .await
        .expect("pool");
    let warm_ids = warm(&api, "gpu", 2).await;
    let take = |name: &str| WarmTake {
        name: name.into(),
        labels: BTreeMap::new(),
        idempotency_key: None,
    };
    let ctx = WriteCtx::new("api:test");
    let mut c1 = api.db.pool.acquire().await.expect("conn");
    let mut c2 = api.db.pool.acquire().await.expect("conn");
    let mut t1 = c1.begin().await.expect("tx");
    let first = warm_take(&mut t1, &ctx, "gpu", &[take("a")])
        .await
        .expect("take");
    // The first batch holds its row uncommitted: the second skips it at
    // once instead of waiting, and gets the other one only.
    let mut t2 = c2.begin().await.expect("tx");
    let second = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        warm_take(&mut t2, &ctx, "gpu", &[take("b"), take("c")]),
    )
    .await
    .expect("did not wait for the other batch")
    .expect("take");
    assert_eq!(first.len(), 1);
    assert_eq!(second.len(), 1, "only the row not already taken");
    assert_ne!(first[0].id, second[0].id);
    t1.commit().await.expect("commit");
    t2.commit().await.expect("commit");
    let taken: Vec<String> = [&first[0], &second[0]]
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    for id in &warm_ids {
        assert!(taken.contains(id), "{id} taken once");
    }
    assert_eq!(api.get_pool("gpu").await.warm_count, 0);
}
