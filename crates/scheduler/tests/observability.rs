//! What the scheduler leaves for on-call: adoptions in the instance's
//! history, the time to ready and the health probes in its metrics.

use std::collections::BTreeMap;

use flotilla_core::{InstanceId, InstanceState};
use flotilla_scheduler::CrashPoint;
use flotilla_store::WriteCtx;
use flotilla_store::action_log::action_log_for_instance;
use flotilla_store::instance::{NewInstance, instance_get, instance_insert_requested};
use flotilla_store::pool::{NewPool, PoolUpdate, pool_create, pool_update};
use flotilla_test_utils::metrics::{sample, scrape, value};
use flotilla_test_utils::stack::instant;
use flotilla_test_utils::{DEADLINE, eventually, run_out_leases};

use super::{env, health_tuning, provision_all, request, scheduler, tuning};

/// `(action, reason)` of every act in the instance's history.
async fn acts(env: &super::Env, id: InstanceId) -> Vec<(String, String)> {
    let mut conn = env.db.pool.acquire().await.unwrap();
    action_log_for_instance(&mut conn, id.0)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| Some((r.action?, r.reason.unwrap_or_default())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_or_volume_found_by_its_tag_is_adopted_into_the_history_once() {
    for (point, adopted) in [
        (None, None),
        (Some(CrashPoint::AfterVolumeCreate), Some("volume_adopted")),
        (Some(CrashPoint::AfterCreate), Some("machine_adopted")),
    ] {
        let env = env(instant()).await;
        sqlx::query("UPDATE pools SET volume_size_gb = 1")
            .execute(&env.db.pool)
            .await
            .unwrap();
        let ids = request(&env, 3).await;
        if let Some(point) = point {
            // A crash right after the provider made it, before it was
            // recorded: the next attempt finds it by its tag.
            scheduler(&env, "dying", Some(point), tuning(&[]))
                .provision_once()
                .await;
            run_out_leases(&env.db.pool, "dying").await;
        }
        provision_all(&scheduler(&env, "s1", None, tuning(&[])), &env).await;
        for &id in &ids {
            let mut conn = env.db.pool.acquire().await.unwrap();
            let row = instance_get(&mut conn, id).await.unwrap().unwrap();
            let volume: String = sqlx::query_scalar(
                "SELECT provider_volume_id FROM instance_volumes WHERE instance_id = $1",
            )
            .bind(id.0)
            .fetch_one(&env.db.pool)
            .await
            .unwrap();
            let adoptions: Vec<(String, String)> = acts(&env, id)
                .await
                .into_iter()
                .filter(|(a, _)| a.ends_with("_adopted"))
                .collect();
            match adopted {
                None => assert!(adoptions.is_empty(), "{point:?} {id}: {adoptions:?}"),
                Some(action) => {
                    assert_eq!(adoptions.len(), 1, "{point:?} {id}: {adoptions:?}");
                    let (got, reason) = &adoptions[0];
                    assert_eq!(got, action, "{point:?} {id}");
                    // The reason names what was adopted.
                    let named = if action == "machine_adopted" {
                        row.provider_machine_id.clone().unwrap()
                    } else {
                        volume.clone()
                    };
                    assert!(reason.contains(&named), "{point:?} {id}: {reason}");
                    assert!(reason.contains("ownership tag"), "{reason}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_by_health_check_records_the_time_since_the_request_and_the_probe_durations() {
    let env = env(instant()).await;
    // A pool of this test's own: the ready histogram is by pool, and the
    // other tests of this binary share the recorder.
    let mut conn = env.db.pool.acquire().await.unwrap();
    pool_create(
        &mut conn,
        &NewPool {
            name: "ready-timing".into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            image: "registry/worker:1".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    pool_update(
        &mut conn,
        "ready-timing",
        &PoolUpdate {
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
    let new: Vec<NewInstance> = (0..2)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: "ready-timing".into(),
            name: format!("t-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let ids: Vec<InstanceId> = instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    let s = scheduler(&env, "s1", None, health_tuning());
    provision_all(&s, &env).await;
    // Requested 90 s ago: ready now is 90 s after the request.
    sqlx::query("UPDATE instances SET created_at = now() - interval '90 seconds' WHERE pool = $1")
        .bind("ready-timing")
        .execute(&env.db.pool)
        .await
        .unwrap();
    let probes_up = r#"flotilla_scheduler_health_check_duration_seconds_count{outcome="up"}"#;
    let up_before = value(probes_up);
    let checker = flotilla_scheduler::health::HealthChecker::new(
        s.tuning.health_check_timeout(),
        s.tuning.health_check_cache(),
    );
    eventually("both ready by their health checks", DEADLINE, || async {
        s.health_once(&checker).await;
        let mut conn = env.db.pool.acquire().await.unwrap();
        let mut ready = 0;
        for &id in &ids {
            let row = instance_get(&mut conn, id).await.unwrap().unwrap();
            ready += usize::from(row.state == InstanceState::Ready);
        }
        ready == ids.len()
    })
    .await;

    let text = scrape();
    let series = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
    assert_eq!(
        series(r#"flotilla_instance_ready_seconds_count{pool="ready-timing"}"#),
        2.0
    );
    assert_eq!(
        series(r#"flotilla_instance_ready_seconds_bucket{pool="ready-timing",le="60"}"#),
        0.0,
        "measured from the request, not from the boot"
    );
    assert_eq!(
        series(r#"flotilla_instance_ready_seconds_bucket{pool="ready-timing",le="120"}"#),
        2.0
    );
    assert!(
        series(probes_up) >= up_before + 2.0,
        "each probe that answered is timed"
    );
    // Both outcomes exist from the start, at 0 if nothing failed.
    series(r#"flotilla_scheduler_health_check_duration_seconds_count{outcome="down"}"#);
    series(r#"flotilla_scheduler_health_checks_total{outcome="down"}"#);
}
