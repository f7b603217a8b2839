//! What the terminator leaves for on-call: the time from the terminate
//! request to `terminated`, and every volume delete by outcome.
//!
//! The other tests of this binary share the recorder and pool `gpu`, so
//! these assert how much the series grew, counting only what the other
//! tests cannot make (a termination asked for minutes ago).

use flotilla_sim_provider::Faults;
use flotilla_test_utils::metrics::value;
use flotilla_test_utils::stack::documented;

use super::{env, get, left_at_provider, ready, terminate, terminate_all, terminator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn termination_is_timed_from_the_first_request_and_each_volume_delete_is_counted() {
    // A volume stays bound a while after its machine is destroyed, so its
    // first delete is refused.
    let env = env(
        Faults {
            volume_release_delay_ms: 600,
            ..documented()
        },
        Some(1),
    )
    .await;
    let ids = ready(&env, 2, true).await;
    terminate(&env, &ids, false).await;
    // The request came 200 s ago; asking again keeps the first time.
    sqlx::query(
        "UPDATE instances SET terminate_requested_at = now() - interval '200 seconds'
         WHERE id = ANY($1)",
    )
    .bind(ids.iter().map(|i| i.0).collect::<Vec<_>>())
    .execute(&env.db.pool)
    .await
    .unwrap();
    let first = get(&env, ids[0]).await.terminate_requested_at.unwrap();
    terminate(&env, &ids, false).await;
    assert_eq!(
        get(&env, ids[0]).await.terminate_requested_at,
        Some(first),
        "a repeated request keeps the first one's time"
    );

    let count = r#"flotilla_instance_termination_seconds_count{pool="gpu"}"#;
    let quick = r#"flotilla_instance_termination_seconds_bucket{pool="gpu",le="180"}"#;
    let volumes = |outcome: &str| {
        value(&format!(
            r#"flotilla_volume_deletes_total{{service="terminator",outcome="{outcome}"}}"#
        ))
    };
    let timed = |outcome: &str| {
        value(&format!(
            r#"flotilla_volume_delete_duration_seconds_count{{service="terminator",outcome="{outcome}"}}"#
        ))
    };
    let (count_before, quick_before) = (value(count), value(quick));
    let (deleted_before, failed_before) = (volumes("deleted"), volumes("failed"));
    let timed_before = timed("deleted");

    terminate_all(&terminator(&env, "t1"), &env, 2).await;
    assert_eq!(left_at_provider(&env), (0, 0));

    // Terminations other tests make while this runs take seconds; these
    // two took over 180 s since their request.
    let slow = (value(count) - count_before) - (value(quick) - quick_before);
    assert_eq!(slow, 2.0, "both measured from the request 200 s ago");
    assert!(volumes("deleted") >= deleted_before + 2.0);
    assert!(
        volumes("failed") >= failed_before + 1.0,
        "the refused delete counted as failed"
    );
    assert!(timed("deleted") >= timed_before + 2.0, "each delete timed");
}
