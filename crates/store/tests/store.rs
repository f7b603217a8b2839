//! The store's invariants on a real PostgreSQL: guarded transitions,
//! atomicity, optimistic concurrency, exclusive claims.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use flotilla_core::price::PriceTable;
use flotilla_core::{DesiredState, ErrorClass, InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_store::fleet::{fleet_cordon, fleet_uncordon};
use flotilla_store::instance::{
    Abandon, ClaimQuery, ListFilter, NewInstance, Transition, instance_abandon, instance_claim_due,
    instance_get, instance_insert_requested, instance_insert_with_provision, instance_list,
    instance_record_failure, instance_record_machine, instance_release_owner,
    instance_renew_leases, instance_transition,
};
use flotilla_store::pool::{NewPool, pool_create, pool_set_desired_capacity};
use flotilla_store::pool_delete::{
    DeletionProgress, PoolDeletion, pool_delete, pool_deletions_of, pool_finish_deletion,
};
use flotilla_store::spend::{SpendRoom, spend_live_counts, spend_room};
use flotilla_store::watchdog::watchdog_scan_targets;
use flotilla_store::{StoreError, WriteCtx, action_log, idempotency};
use flotilla_test_utils::wait::eventually;
use flotilla_test_utils::{TestDb, run_out_leases};
use prost::Message;
use sqlx::{Acquire, PgPool};

async fn make_pool(db: &PgPool, name: &str) {
    let mut conn = db.acquire().await.unwrap();
    pool_create(
        &mut conn,
        &NewPool {
            name: name.into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

fn new_instances(pool: &str, n: usize) -> Vec<NewInstance> {
    (0..n)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: pool.into(),
            name: format!("w-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::from([("team".into(), "ml".into())]),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect()
}

async fn insert(db: &PgPool, pool: &str, n: usize) -> Vec<flotilla_store::instance::InstanceRow> {
    let mut conn = db.acquire().await.unwrap();
    instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new_instances(pool, n))
        .await
        .unwrap()
}

async fn count(db: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test]
async fn migrated_schema_has_every_table_and_refuses_unknown_states() {
    let db = TestDb::new().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        tables,
        [
            "action_logs",
            "idempotency_records",
            "instance_health",
            "instance_volumes",
            "instances",
            "outbox",
            "pool_deletions",
            "pool_events",
            "pool_failures",
            "pools"
        ]
    );
    make_pool(&db.pool, "p").await;
    let row = &insert(&db.pool, "p", 1).await[0];
    let err = sqlx::query("UPDATE instances SET state = 'running' WHERE id = $1")
        .bind(row.id.0)
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("check constraint"), "{err}");
    // Every state of the domain is accepted by the schema.
    for s in InstanceState::ALL {
        sqlx::query("UPDATE instances SET state = $2 WHERE id = $1")
            .bind(row.id.0)
            .bind(s.as_str())
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("schema refuses {s}: {e}"));
    }
}

#[tokio::test]
async fn creating_instances_writes_rows_action_logs_and_events_together() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 3).await;
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r.state == InstanceState::Requested && r.version == 1)
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM action_logs").await, 3);
    let events: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT subject, payload FROM outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(events.len(), 3);
    for ((subject, payload), row) in events.iter().zip(&rows) {
        assert_eq!(subject, "EVT.instance.requested");
        let ev = v1::InstanceEvent::decode(payload.as_slice()).unwrap();
        assert_eq!(ev.instance_id, row.id.to_string());
        assert_eq!(ev.to_state, v1::InstanceState::Requested as i32);
        assert_eq!(ev.from_state, v1::InstanceState::Unspecified as i32);
    }
}

#[tokio::test]
async fn a_transition_bumps_the_version_and_logs_and_publishes_it() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let row = insert(&db.pool, "p", 1).await.remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    let ctx = WriteCtx::new("scheduler");
    let after = instance_transition(
        &mut conn,
        &ctx,
        &Transition {
            id: row.id,
            from: InstanceState::Requested,
            to: InstanceState::Provisioning,
            expected_version: row.version,
            error: None,
            reason: Some("provision command"),
        },
    )
    .await
    .unwrap();
    assert_eq!(after.state, InstanceState::Provisioning);
    assert_eq!(after.version, row.version + 1);

    let logs = action_log::action_log_for_instance(&mut conn, row.id.0)
        .await
        .unwrap();
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[1].from_state.as_deref(), Some("requested"));
    assert_eq!(logs[1].to_state.as_deref(), Some("provisioning"));
    assert_eq!(logs[1].actor, "scheduler");
    assert_eq!(logs[1].correlation_id, ctx.correlation_id.as_str());
    assert_eq!(logs[1].reason.as_deref(), Some("provision command"));

    let (subject, payload, headers): (String, Vec<u8>, serde_json::Value) =
        sqlx::query_as("SELECT subject, payload, headers FROM outbox ORDER BY id DESC LIMIT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert_eq!(subject, "EVT.instance.provisioning");
    let ev = v1::InstanceEvent::decode(payload.as_slice()).unwrap();
    assert_eq!(ev.version, after.version as u64);
    assert_eq!(ev.event_id, logs[1].id as u64);
    assert_eq!(
        headers["Flotilla-Correlation-Id"],
        ctx.correlation_id.as_str()
    );
}

#[tokio::test]
async fn an_illegal_transition_is_a_typed_error_and_writes_nothing() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let row = insert(&db.pool, "p", 1).await.remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    let err = instance_transition(
        &mut conn,
        &WriteCtx::new("test"),
        &Transition {
            id: row.id,
            from: InstanceState::Requested,
            to: InstanceState::Ready,
            expected_version: row.version,
            error: None,
            reason: None,
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::IllegalTransition(e) if e.to == InstanceState::Ready),
        "{err}"
    );
    let now = instance_get(&mut conn, row.id).await.unwrap().unwrap();
    assert_eq!((now.state, now.version), (row.state, row.version));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM action_logs").await, 1);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 1);
}

#[tokio::test]
async fn a_stale_version_write_is_rejected_and_writes_nothing() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let row = insert(&db.pool, "p", 1).await.remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    let ctx = WriteCtx::new("test");
    let step = |v| Transition {
        id: row.id,
        from: InstanceState::Requested,
        to: InstanceState::Provisioning,
        expected_version: v,
        error: None,
        reason: None,
    };
    // Another writer moved the row on (here: recorded a failure).
    instance_record_failure(
        &mut conn,
        &WriteCtx::new("t"),
        &row,
        "boom",
        ErrorClass::Retryable,
        &policy(Duration::ZERO, 99),
        None,
    )
    .await
    .unwrap();
    let err = instance_transition(&mut conn, &ctx, &step(row.version))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let now = instance_get(&mut conn, row.id).await.unwrap().unwrap();
    assert_eq!(now.state, InstanceState::Requested);
    // Only the creation is a transition (the other writer's failure is a
    // `step_retried` row): the stale write logged nothing.
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM action_logs WHERE action IS NULL"
        )
        .await,
        1
    );
    // With the fresh version it applies.
    instance_transition(&mut conn, &ctx, &step(now.version))
        .await
        .unwrap();
    // A missing row is NotFound, not Conflict.
    let missing = Transition {
        id: InstanceId::new(),
        ..step(1)
    };
    let err = instance_transition(&mut conn, &ctx, &missing)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn of_two_concurrent_writers_at_one_version_exactly_one_wins() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 20).await;
    let mut handles = Vec::new();
    for row in rows.iter().flat_map(|r| [r.clone(), r.clone()]) {
        let pool = db.pool.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            instance_transition(
                &mut conn,
                &WriteCtx::new("racer"),
                &Transition {
                    id: row.id,
                    from: InstanceState::Requested,
                    to: InstanceState::Provisioning,
                    expected_version: row.version,
                    error: None,
                    reason: None,
                },
            )
            .await
            .is_ok()
        }));
    }
    let mut wins = 0;
    for h in handles {
        wins += h.await.unwrap() as usize;
    }
    assert_eq!(wins, 20);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM action_logs WHERE to_state = 'provisioning'"
        )
        .await,
        20
    );
}

#[tokio::test]
async fn a_dropped_transaction_leaves_no_half_written_transition() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let row = insert(&db.pool, "p", 1).await.remove(0);
    {
        let mut conn = db.pool.acquire().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        instance_transition(
            &mut tx,
            &WriteCtx::new("test"),
            &Transition {
                id: row.id,
                from: InstanceState::Requested,
                to: InstanceState::Provisioning,
                expected_version: row.version,
                error: None,
                reason: None,
            },
        )
        .await
        .unwrap();
        // The process dies here: the transaction is never committed.
        drop(tx);
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let now = instance_get(&mut conn, row.id).await.unwrap().unwrap();
    assert_eq!((now.state, now.version), (InstanceState::Requested, 1));
    assert_eq!(count(&db.pool, "SELECT count(*) FROM action_logs").await, 1);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claimers_never_get_the_same_row() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 300).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(4));
    let mut handles = Vec::new();
    for replica in 0..4 {
        let pool = db.pool.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let owner = format!("replica-{replica}");
            let mut mine = Vec::new();
            // 5 rounds x 4 replicas x 20 rows covers all 300 with room to spare.
            for _round in 0..5 {
                // Start every round together so the claims really collide.
                barrier.wait().await;
                let got = instance_claim_due(
                    &pool,
                    &ClaimQuery {
                        states: &[InstanceState::Requested],
                        desired: None,
                        pool: None,
                        owner: &owner,
                        lease: Duration::from_secs(60),
                        limit: 20,
                    },
                )
                .await
                .unwrap();
                assert!(got.iter().all(|r| r.lease_owner.as_deref() == Some(&owner)));
                mine.extend(got.into_iter().map(|r| r.id));
            }
            mine
        }));
    }
    let mut seen = HashSet::new();
    let mut total = 0;
    for h in handles {
        for id in h.await.unwrap() {
            total += 1;
            assert!(seen.insert(id), "{id} claimed twice");
        }
    }
    assert_eq!(total, 300);
}

#[tokio::test]
async fn a_claim_skips_rows_another_replica_has_locked_instead_of_waiting() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 4).await;
    // Another replica is in the middle of claiming the first two rows.
    let mut other = db.pool.begin().await.unwrap();
    sqlx::query("SELECT id FROM instances WHERE id = ANY($1) FOR UPDATE")
        .bind(vec![rows[0].id.0, rows[1].id.0])
        .execute(&mut *other)
        .await
        .unwrap();
    let got = tokio::time::timeout(
        Duration::from_secs(5),
        instance_claim_due(
            &db.pool,
            &ClaimQuery {
                states: &[InstanceState::Requested],
                desired: None,
                pool: None,
                owner: "me",
                lease: Duration::from_secs(60),
                limit: 10,
            },
        ),
    )
    .await
    .expect("a claim must not wait for another replica's locks")
    .unwrap();
    let got: HashSet<_> = got.into_iter().map(|r| r.id).collect();
    assert_eq!(got, HashSet::from([rows[2].id, rows[3].id]));
    other.rollback().await.unwrap();
}

#[tokio::test]
async fn claims_skip_rows_not_yet_due_and_take_over_expired_leases() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 2).await;
    let mut conn = db.pool.acquire().await.unwrap();
    // One row failed and waits an hour for its retry.
    instance_record_failure(
        &mut conn,
        &WriteCtx::new("t"),
        &rows[0],
        "provider said 503",
        ErrorClass::Retryable,
        &policy(Duration::from_secs(3600), 3),
        Some(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    let claim = |owner: &'static str, lease| {
        let pool = db.pool.clone();
        async move {
            instance_claim_due(
                &pool,
                &ClaimQuery {
                    states: &[InstanceState::Requested],
                    desired: None,
                    pool: Some("p"),
                    owner,
                    lease,
                    limit: 10,
                },
            )
            .await
            .unwrap()
        }
    };
    let a = claim("a", Duration::from_secs(60)).await;
    assert_eq!(a.iter().map(|r| r.id).collect::<Vec<_>>(), vec![rows[1].id]);
    assert!(claim("b", Duration::from_secs(60)).await.is_empty());
    // a's lease runs out (its time passes in the database: lease_until
    // moves to the past), and b takes the row over.
    run_out_leases(&db.pool, "a").await;
    let b = claim("b", Duration::from_secs(60)).await;

    assert_eq!(b.iter().map(|r| r.id).collect::<Vec<_>>(), vec![rows[1].id]);
    // Shutdown gives leases back.
    assert_eq!(instance_release_owner(&mut conn, "b").await.unwrap(), 1);
    assert_eq!(claim("c", Duration::from_secs(60)).await.len(), 1);
}

#[tokio::test]
async fn a_failure_keeps_the_state_counts_attempts_and_flags_after_the_threshold() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let mut row = insert(&db.pool, "p", 1).await.remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    for attempt in 1..=3 {
        row = instance_record_failure(
            &mut conn,
            &WriteCtx::new("scheduler"),
            &row,
            "412 machine still started",
            ErrorClass::Retryable,
            &policy(Duration::ZERO, 3),
            None,
        )
        .await
        .unwrap();
        assert_eq!(row.state, InstanceState::Requested);
        assert_eq!(row.attempts, attempt);
        assert_eq!(row.needs_attention, attempt >= 3);
        assert!(row.lease_owner.is_none());
    }
    assert_eq!(row.last_error.as_deref(), Some("412 machine still started"));
    // Each attempt is in the history, numbered, with its class and error;
    // none of them reads as a transition.
    let history = action_log::action_log_for_instance(&mut conn, row.id.0)
        .await
        .unwrap();
    let retries: Vec<_> = history
        .iter()
        .filter(|a| a.action.as_deref() == Some("step_retried"))
        .collect();
    assert_eq!(retries.len(), 3, "{history:?}");
    for (n, r) in retries.iter().enumerate() {
        let reason = r.reason.as_deref().unwrap_or_default();
        assert!(
            reason.starts_with(&format!(
                "attempt {} of requested failed (retryable)",
                n + 1
            )),
            "{reason}"
        );
        assert_eq!(r.error.as_deref(), Some("412 machine still started"));
        assert_eq!(
            (r.from_state.as_deref(), r.to_state.as_deref()),
            (None, None)
        );
        assert_eq!(r.actor, "scheduler");
    }
    assert!(
        retries[2]
            .reason
            .as_deref()
            .unwrap_or_default()
            .ends_with("; needs attention")
    );
    assert!(
        !retries[1]
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("attention")
    );
    // Moving on resets the step's bookkeeping.
    let row = instance_transition(
        &mut conn,
        &WriteCtx::new("t"),
        &Transition {
            id: row.id,
            from: InstanceState::Requested,
            to: InstanceState::Provisioning,
            expected_version: row.version,
            error: None,
            reason: None,
        },
    )
    .await
    .unwrap();
    assert_eq!(row.attempts, 0);
    let row = instance_record_machine(&mut conn, row.id, row.version, "m-123")
        .await
        .unwrap();
    assert_eq!(row.provider_machine_id.as_deref(), Some("m-123"));
}

#[tokio::test]
async fn new_instances_and_their_provision_commands_are_written_together_in_chunks_per_pool() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    make_pool(&db.pool, "q").await;
    let mut new = new_instances("p", 1001);
    new.extend(new_instances("q", 2));
    let mut conn = db.pool.acquire().await.unwrap();
    let rows = instance_insert_with_provision(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1003);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE subject = 'EVT.instance.requested'"
        )
        .await,
        1003
    );
    let commands: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM outbox WHERE subject = 'CMD.provision' ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let commands: Vec<v1::ProvisionCommand> = commands
        .iter()
        .map(|p| v1::ProvisionCommand::decode(p.as_slice()).unwrap())
        .collect();
    let shape: Vec<(&str, usize)> = commands
        .iter()
        .map(|c| (c.pool.as_str(), c.instance_ids.len()))
        .collect();
    assert_eq!(shape, [("p", 1000), ("p", 1), ("q", 2)]);
    let named: Vec<&String> = commands.iter().flat_map(|c| &c.instance_ids).collect();
    let wanted: Vec<String> = new.iter().map(|n| n.id.to_string()).collect();
    assert_eq!(named, wanted.iter().collect::<Vec<_>>());
}

#[tokio::test]
async fn new_instances_are_not_kept_when_their_provision_command_cannot_be_written() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    // The outbox refuses provision commands: the instance rows (and their
    // events) written before it must go with it, even on a bare connection.
    sqlx::raw_sql(
        "CREATE FUNCTION refuse_provision() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'no provision commands'; END $$;
         CREATE TRIGGER refuse_provision BEFORE INSERT ON outbox FOR EACH ROW
         WHEN (NEW.subject = 'CMD.provision') EXECUTE FUNCTION refuse_provision();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let err =
        instance_insert_with_provision(&mut conn, &WriteCtx::new("t"), &new_instances("p", 3))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("no provision commands"), "{err}");
    assert_eq!(count(&db.pool, "SELECT count(*) FROM instances").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM action_logs").await, 0);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 0);
}

#[tokio::test]
async fn names_are_unique_among_a_pools_live_instances() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 1).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let err = instance_insert_requested(&mut conn, &WriteCtx::new("t"), &new_instances("p", 2))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Duplicate(_)), "{err}");
    // The batch was refused whole.
    assert_eq!(count(&db.pool, "SELECT count(*) FROM instances").await, 1);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, 1);
}

#[tokio::test]
async fn list_filters_by_pool_state_and_labels_and_pages_by_id() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "a").await;
    make_pool(&db.pool, "b").await;
    insert(&db.pool, "a", 5).await;
    insert(&db.pool, "b", 2).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let mut filter = ListFilter {
        pool: Some("a".into()),
        limit: 2,
        ..Default::default()
    };
    let mut all = Vec::new();
    loop {
        let page = instance_list(&mut conn, &filter).await.unwrap();
        if page.is_empty() {
            break;
        }
        filter.after = page.last().map(|r| r.id);
        all.extend(page);
    }
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    let labelled = instance_list(
        &mut conn,
        &ListFilter {
            labels: BTreeMap::from([("team".into(), "ml".into())]),
            states: vec![InstanceState::Requested],
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(labelled.len(), 7);
    let none = instance_list(
        &mut conn,
        &ListFilter {
            labels: BTreeMap::from([("team".into(), "web".into())]),
            limit: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn pool_capacity_updates_are_version_checked() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let mut conn = db.pool.acquire().await.unwrap();
    let p = pool_set_desired_capacity(&mut conn, "p", 5, Some(1))
        .await
        .unwrap();
    assert_eq!((p.desired_capacity, p.version), (5, 2));
    let err = pool_set_desired_capacity(&mut conn, "p", 9, Some(1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let err = pool_set_desired_capacity(&mut conn, "nope", 1, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn an_idempotency_key_keeps_its_first_answer() {
    let db = TestDb::new().await;
    let mut conn = db.pool.acquire().await.unwrap();
    let ttl = Duration::from_secs(3600);
    assert!(
        idempotency::idempotency_put(&mut conn, "provision", "k1", b"h1", b"first", ttl)
            .await
            .unwrap()
    );
    assert!(
        !idempotency::idempotency_put(&mut conn, "provision", "k1", b"h2", b"second", ttl)
            .await
            .unwrap()
    );
    let rec = idempotency::idempotency_get(&mut conn, "provision", "k1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (rec.request_hash.as_slice(), rec.response.as_slice()),
        (&b"h1"[..], &b"first"[..])
    );
    // Scopes are separate key spaces.
    assert!(
        idempotency::idempotency_get(&mut conn, "terminate", "k1")
            .await
            .unwrap()
            .is_none()
    );
}

/// An error policy retrying after `base` (and at most that), flagging
/// after `attention_after` failed attempts.
fn policy(base: Duration, attention_after: u32) -> flotilla_core::backoff::ErrorPolicy {
    flotilla_core::backoff::ErrorPolicy {
        retry: flotilla_core::backoff::RetryPolicy { base, max: base },
        attention_after,
    }
}

#[tokio::test]
async fn each_request_leaves_its_trace_and_correlation_id_on_the_rows_it_asked_for() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let traceparent = (
        "traceparent".to_owned(),
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
    );
    let ctx = WriteCtx::new("api:ops")
        .with_correlation(flotilla_core::CorrelationId::parse("req-provision-7").unwrap())
        .with_trace_headers(vec![traceparent.clone()]);
    let mut conn = db.pool.acquire().await.unwrap();
    let rows = instance_insert_requested(&mut conn, &ctx, &new_instances("p", 2))
        .await
        .unwrap();
    for r in &rows {
        let o = &r.origin.as_ref().expect("an origin").0;
        assert_eq!(o.correlation_id, "req-provision-7");
        assert_eq!(o.trace_headers, vec![traceparent.clone()]);
    }
    // A later request about the instance is where its next work comes from.
    let ctx = WriteCtx::new("api:ops")
        .with_correlation(flotilla_core::CorrelationId::parse("req-terminate-8").unwrap());
    flotilla_store::fleet::fleet_request_terminate(&mut conn, &ctx, &[rows[0].id.0], false, "done")
        .await
        .unwrap();
    let now = instance_get(&mut conn, rows[0].id).await.unwrap().unwrap();
    assert_eq!(now.origin.unwrap().0.correlation_id, "req-terminate-8");
    let other = instance_get(&mut conn, rows[1].id).await.unwrap().unwrap();
    assert_eq!(other.origin.unwrap().0.correlation_id, "req-provision-7");
}

// ---- Abandoning instances and deleting pools ----

fn not_terminal() -> Vec<InstanceState> {
    InstanceState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .collect()
}

#[tokio::test]
async fn abandon_ends_a_claimed_instance_once_takes_its_lease_and_fences_the_holder() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 1).await;
    // A replica holds the row (its claim bumped the version: the fence).
    let held = instance_claim_due(
        &db.pool,
        &ClaimQuery {
            states: &[InstanceState::Requested],
            desired: None,
            pool: None,
            owner: "scheduler-1",
            lease: Duration::from_secs(60),
            limit: 10,
        },
    )
    .await
    .unwrap()
    .remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    let ops = WriteCtx::new("api:ops");
    let Abandon::Abandoned { row, from } =
        instance_abandon(&mut conn, &ops, held.id, "provider account closed")
            .await
            .unwrap()
    else {
        panic!("not abandoned");
    };
    assert_eq!(from, InstanceState::Requested);
    assert_eq!(row.state, InstanceState::Abandoned);
    assert_eq!(row.desired_state, DesiredState::Terminated);
    assert!(row.lease_owner.is_none() && row.lease_until.is_none());
    assert!(row.version > held.version);

    // The holder cannot renew its lease, and its write is refused.
    let renewed = instance_renew_leases(
        &mut conn,
        &[held.id],
        "scheduler-1",
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(renewed.is_empty(), "the lease is gone");
    let err = instance_transition(
        &mut conn,
        &WriteCtx::new("scheduler"),
        &Transition {
            id: held.id,
            from: InstanceState::Requested,
            to: InstanceState::Provisioning,
            expected_version: held.version,
            error: None,
            reason: None,
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    // And nothing leaves `abandoned` through the table.
    for to in InstanceState::ALL {
        let err = instance_transition(
            &mut conn,
            &WriteCtx::new("terminator"),
            &Transition {
                id: held.id,
                from: InstanceState::Abandoned,
                to,
                expected_version: row.version,
                error: None,
                reason: None,
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, StoreError::IllegalTransition(_)),
            "{to}: {err}"
        );
    }
    // No loop claims it: claims name states that are not terminal.
    let states = not_terminal();
    let claimed = instance_claim_due(
        &db.pool,
        &ClaimQuery {
            states: &states,
            desired: None,
            pool: None,
            owner: "anyone",
            lease: Duration::from_secs(60),
            limit: 10,
        },
    )
    .await
    .unwrap();
    assert!(claimed.is_empty());

    // Who and why are in the history, with its event.
    let history = action_log::action_log_for_instance(&mut conn, held.id.0)
        .await
        .unwrap();
    let last = history.last().unwrap();
    assert_eq!(last.from_state.as_deref(), Some("requested"));
    assert_eq!(last.to_state.as_deref(), Some("abandoned"));
    assert_eq!(last.actor, "api:ops");
    assert_eq!(last.reason.as_deref(), Some("provider account closed"));
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE subject = 'EVT.instance.abandoned'"
        )
        .await,
        1
    );

    // Once: a second abandon writes nothing.
    let logs = count(&db.pool, "SELECT count(*) FROM action_logs").await;
    let again = instance_abandon(&mut conn, &ops, held.id, "again")
        .await
        .unwrap();
    assert!(matches!(again, Abandon::AlreadyTerminal(ref r) if r.version == row.version));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM action_logs").await,
        logs
    );
    let err = instance_abandon(&mut conn, &ops, InstanceId::new(), "typo")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");

    // Its name is free again, as a terminated instance's is.
    insert(&db.pool, "p", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_deletion_waits_for_an_uncommitted_insert_and_counts_its_instances() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    // A writer of new instances (Provision, capacity, a replacement) is
    // in the middle of its transaction.
    let mut writer = db.pool.begin().await.unwrap();
    instance_insert_requested(
        &mut writer,
        &WriteCtx::new("api:ci"),
        &new_instances("p", 2),
    )
    .await
    .unwrap();
    let pool = db.pool.clone();
    let deletion = tokio::spawn(async move {
        let mut conn = pool.acquire().await.unwrap();
        pool_delete(&mut conn, &WriteCtx::new("api:ops"), "p", false, "done").await
    });
    // The deletion waits for the writer's lock on the pool row.
    eventually(
        "the deletion waits on a lock",
        Duration::from_secs(10),
        || async {
            count(
                &db.pool,
                "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await
                >= 1
        },
    )
    .await;
    writer.commit().await.unwrap();
    let err = deletion.await.unwrap().unwrap_err();
    assert!(
        matches!(err, StoreError::Refused(ref why) if why.contains("2 live instances")),
        "{err}"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pools").await, 1);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pool_deletions").await,
        0
    );
}

#[tokio::test]
async fn a_forced_pool_deletion_terminates_live_instances_refuses_new_ones_and_ends_with_the_last()
{
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 2).await;
    let mut conn = db.pool.acquire().await.unwrap();
    let ops = WriteCtx::new("api:ops");
    let outbox = count(&db.pool, "SELECT count(*) FROM outbox").await;

    // Not without force, and the refusal changes nothing.
    let err = pool_delete(&mut conn, &ops, "p", false, "moving")
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Refused(ref why) if why.contains("2 live instances") && why.contains("--force")),
        "{err}"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM outbox").await, outbox);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM instances WHERE desired_state = 'running'"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM pools WHERE deleting_since IS NULL"
        )
        .await,
        1
    );

    let PoolDeletion::Deleting {
        pool,
        live,
        requested,
    } = pool_delete(&mut conn, &ops, "p", true, "moving to fr-par")
        .await
        .unwrap()
    else {
        panic!("deleted with live instances");
    };
    assert!(pool.deleting_since.is_some());
    assert_eq!(live, 2);
    let mut ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id.0).collect();
    ids.sort();
    assert_eq!(requested, ids);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM instances WHERE desired_state = 'terminated'"
        )
        .await,
        2
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM outbox WHERE subject = 'CMD.terminate'"
        )
        .await,
        1
    );
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM action_logs WHERE action = 'terminate_requested'
               AND reason = 'pool p is being deleted: moving to fr-par' AND actor = 'api:ops'"
        )
        .await,
        2
    );

    // No new instances, whoever writes them.
    let err = instance_insert_with_provision(
        &mut conn,
        &WriteCtx::new("scheduler"),
        &new_instances("p", 1),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, StoreError::Refused(ref why) if why.contains("being deleted")),
        "{err}"
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM instances").await, 2);

    // Asked again: how far it is, nothing asked twice.
    let PoolDeletion::Deleting {
        live, requested, ..
    } = pool_delete(&mut conn, &ops, "p", false, "again")
        .await
        .unwrap()
    else {
        panic!("deleted with live instances");
    };
    assert_eq!((live, requested.len()), (2, 0));
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM pool_deletions").await,
        1
    );

    // The row stays while an instance still needs it for its teardown.
    let scheduler = WriteCtx::new("scheduler");
    assert_eq!(
        pool_finish_deletion(&mut conn, &scheduler, "p")
            .await
            .unwrap(),
        DeletionProgress::Waiting(2)
    );
    let cancelled = instance_get(&mut conn, rows[0].id).await.unwrap().unwrap();
    instance_transition(
        &mut conn,
        &scheduler,
        &Transition {
            id: cancelled.id,
            from: InstanceState::Requested,
            to: InstanceState::Terminated,
            expected_version: cancelled.version,
            error: None,
            reason: None,
        },
    )
    .await
    .unwrap();
    instance_abandon(&mut conn, &ops, rows[1].id, "provider gone")
        .await
        .unwrap();
    assert_eq!(
        pool_finish_deletion(&mut conn, &scheduler, "p")
            .await
            .unwrap(),
        DeletionProgress::Deleted
    );
    assert_eq!(
        pool_finish_deletion(&mut conn, &scheduler, "p")
            .await
            .unwrap(),
        DeletionProgress::NotDeleting
    );
    assert_eq!(count(&db.pool, "SELECT count(*) FROM pools").await, 0);

    // Who asked, when, why, and what it left.
    let records = pool_deletions_of(&mut conn, "p").await.unwrap();
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert_eq!(r.actor, "api:ops");
    assert!(r.forced);
    assert_eq!(r.reason.as_deref(), Some("moving to fr-par"));
    assert_eq!(r.live_instances, 2);
    assert!(r.deleted_at.is_some_and(|at| at >= r.requested_at));
    assert_eq!(r.abandoned_instances, Some(1));
    // The abandoned instance's machine may be there still: the orphan scan
    // goes on listing where the pool's machines lived.
    assert_eq!(
        watchdog_scan_targets(&mut conn).await.unwrap(),
        [("sim".to_owned(), "ams".to_owned(), "p".to_owned())]
    );

    // The name is free; the new pool starts without the old one's
    // failures, and the old instances' names do not block it.
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 2).await;
    assert_eq!(
        watchdog_scan_targets(&mut conn).await.unwrap().len(),
        1,
        "one listing per provider and region"
    );
}

#[tokio::test]
async fn a_pool_without_live_instances_is_deleted_at_once_and_then_unknown() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let mut conn = db.pool.acquire().await.unwrap();
    let ops = WriteCtx::new("api:ops");
    assert!(matches!(
        pool_delete(&mut conn, &ops, "p", false, "unused")
            .await
            .unwrap(),
        PoolDeletion::Deleted
    ));
    let r = &pool_deletions_of(&mut conn, "p").await.unwrap()[0];
    assert!(!r.forced && r.live_instances == 0 && r.deleted_at.is_some());
    assert_eq!(r.abandoned_instances, Some(0));
    assert!(
        watchdog_scan_targets(&mut conn).await.unwrap().is_empty(),
        "nothing of it can be left at the provider"
    );
    let err = pool_delete(&mut conn, &ops, "p", true, "again")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    let err = instance_insert_requested(&mut conn, &ops, &new_instances("p", 1))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
}

/// The subject and decoded event of the newest outbox row.
async fn last_event(db: &PgPool) -> (String, v1::InstanceEvent) {
    let (subject, payload): (String, Vec<u8>) =
        sqlx::query_as("SELECT subject, payload FROM outbox ORDER BY id DESC LIMIT 1")
            .fetch_one(db)
            .await
            .unwrap();
    let event = v1::InstanceEvent::decode(payload.as_slice()).unwrap();
    (subject, event)
}

#[tokio::test]
async fn a_cordon_and_its_undoing_keep_the_state_and_are_each_an_act_with_its_event() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 2).await;
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id.0).collect();
    let mut conn = db.pool.acquire().await.unwrap();
    let ops = WriteCtx::new("api:ops");

    let cordoned = fleet_cordon(&mut conn, &ops, &ids[..1], "kernel upgrade")
        .await
        .unwrap();
    assert_eq!(cordoned, ids[..1].to_vec());
    let row = instance_get(&mut conn, rows[0].id).await.unwrap().unwrap();
    assert!(row.cordoned);
    assert_eq!(
        row.state,
        InstanceState::Requested,
        "a cordon is no transition"
    );
    assert_eq!(row.version, rows[0].version);
    let (subject, event) = last_event(&db.pool).await;
    assert_eq!(subject, "EVT.instance.cordoned");
    assert_eq!(event.action, "cordoned");
    assert_eq!(event.instance_id, ids[0].to_string());
    assert_eq!(event.from_state, event.to_state);
    assert_eq!(event.reason, "kernel upgrade");
    let history = action_log::action_log_for_instance(&mut conn, ids[0])
        .await
        .unwrap();
    let act = history.last().unwrap();
    assert_eq!(act.action.as_deref(), Some("drain_requested"));
    assert_eq!(act.id as u64, event.event_id);
    assert_eq!(act.to_state, None);

    // Cordoning both: only the one not cordoned yet changes.
    let outbox = count(&db.pool, "SELECT count(*) FROM outbox").await;
    let again = fleet_cordon(&mut conn, &ops, &ids, "").await.unwrap();
    assert_eq!(again, ids[1..].to_vec());
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM outbox").await,
        outbox + 1
    );

    let undone = fleet_uncordon(&mut conn, &ops, rows[0].id, "upgrade done")
        .await
        .unwrap();
    assert!(!undone.cordoned);
    assert_eq!(undone.version, rows[0].version);
    let (subject, event) = last_event(&db.pool).await;
    assert_eq!(subject, "EVT.instance.uncordoned");
    assert_eq!(event.action, "uncordoned");
    let history = action_log::action_log_for_instance(&mut conn, ids[0])
        .await
        .unwrap();
    let act = history.last().unwrap();
    assert_eq!(act.action.as_deref(), Some("uncordoned"));
    assert_eq!(act.actor, "api:ops");
    assert_eq!(act.reason.as_deref(), Some("upgrade done"));

    // Nothing to undo: refused, nothing written.
    let writes = |db: &PgPool| {
        let db = db.clone();
        async move {
            (
                count(&db, "SELECT count(*) FROM outbox").await,
                count(&db, "SELECT count(*) FROM action_logs").await,
            )
        }
    };
    let before = writes(&db.pool).await;
    let err = fleet_uncordon(&mut conn, &ops, rows[0].id, "")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused(m) if m.contains("is not cordoned")),
        "{err}"
    );
    sqlx::query("UPDATE instances SET desired_state = 'terminated' WHERE id = $1")
        .bind(ids[1])
        .execute(&db.pool)
        .await
        .unwrap();
    let err = fleet_uncordon(&mut conn, &ops, rows[1].id, "")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Refused(m) if m.contains("is being terminated")),
        "{err}"
    );
    assert!(
        instance_get(&mut conn, rows[1].id)
            .await
            .unwrap()
            .unwrap()
            .cordoned
    );
    let err = fleet_uncordon(&mut conn, &ops, InstanceId::new(), "")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert_eq!(writes(&db.pool).await, before);
}

#[tokio::test]
async fn list_filters_by_cordon() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 3).await;
    let mut conn = db.pool.acquire().await.unwrap();
    fleet_cordon(&mut conn, &WriteCtx::new("test"), &[rows[1].id.0], "")
        .await
        .unwrap();
    let list = |cordoned| ListFilter {
        cordoned,
        limit: 100,
        ..Default::default()
    };
    let only = instance_list(&mut conn, &list(Some(true))).await.unwrap();
    assert_eq!(only.iter().map(|r| r.id).collect::<Vec<_>>(), [rows[1].id]);
    let others = instance_list(&mut conn, &list(Some(false))).await.unwrap();
    assert_eq!(others.len(), 2);
    assert!(others.iter().all(|r| !r.cordoned));
    assert_eq!(
        instance_list(&mut conn, &list(None)).await.unwrap().len(),
        3
    );
}

/// A pool named `name` with a spend cap and a price of its own (micros).
async fn make_capped_pool(db: &PgPool, name: &str, cap: i64, price: i64) {
    let mut conn = db.acquire().await.unwrap();
    pool_create(
        &mut conn,
        &NewPool {
            name: name.into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            price_per_hour_micros: price,
            spend_cap_per_hour_micros: cap,
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn spend_counts_live_instances_at_the_pools_price_or_the_tables() {
    let db = TestDb::new().await;
    make_capped_pool(&db.pool, "own", 3_000_000, 1_000_000).await;
    make_pool(&db.pool, "tabled").await;
    let own = insert(&db.pool, "own", 3).await;
    insert(&db.pool, "tabled", 2).await;
    sqlx::query("UPDATE instances SET state = 'abandoned' WHERE id = $1")
        .bind(own[0].id.0)
        .execute(&db.pool)
        .await
        .unwrap();
    let table = PriceTable::parse("shared-cpu-1x=0.25").unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let room = spend_room(&mut conn, "own", &table).await.unwrap();
    assert_eq!(
        room,
        SpendRoom {
            rate: 2_000_000,
            unit_price: 1_000_000,
            cap: Some(3_000_000)
        },
        "the abandoned one costs nothing; the pool's own price wins"
    );
    assert_eq!(
        (room.fitting(5), room.admits(1), room.admits(2)),
        (1, true, false)
    );
    let tabled = spend_room(&mut conn, "tabled", &table).await.unwrap();
    assert_eq!(
        (tabled.rate, tabled.cap, tabled.fitting(1000)),
        (500_000, None, 1000)
    );
    let live = spend_live_counts(&mut conn, None).await.unwrap();
    assert_eq!((live["own"], live["tabled"]), (2, 2));
    let err = spend_room(&mut conn, "nope", &table)
        .await
        .expect_err("no pool");
    assert!(matches!(err, StoreError::NotFound(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_counts_the_first_writers_instances_on_a_capped_pool() {
    let db = TestDb::new().await;
    make_capped_pool(&db.pool, "p", 2_000_000, 1_000_000).await;
    let table = PriceTable::default();
    let mut first = db.pool.begin().await.unwrap();
    let room = spend_room(&mut first, "p", &table).await.unwrap();
    assert!(room.admits(2));
    instance_insert_requested(&mut first, &WriteCtx::new("t"), &new_instances("p", 2))
        .await
        .unwrap();
    // The second writer waits for the first one's transaction...
    let pool = db.pool.clone();
    let second = tokio::spawn(async move {
        let mut tx = pool.begin().await.unwrap();
        spend_room(&mut tx, "p", &PriceTable::default())
            .await
            .unwrap()
    });
    eventually(
        "the second writer waits on the pool row",
        Duration::from_secs(30),
        || async {
            let waiting: i64 = count(
                &db.pool,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            waiting > 0
        },
    )
    .await;
    assert!(!second.is_finished());
    // ...and once it commits, counts its instances: the pool is full.
    first.commit().await.unwrap();
    let room = second.await.unwrap();
    assert_eq!(room.rate, 2_000_000);
    assert!(!room.admits(1));
}

/// The heartbeat mark moves only once older than the interval the caller
/// passes (`WORKER_HEARTBEAT_MARK_SECONDS`), in both heartbeat writes.
#[tokio::test]
async fn a_heartbeat_moves_the_mark_only_once_older_than_the_interval_given() {
    use flotilla_store::worker::{worker_heartbeat, worker_heartbeat_batch};
    let db = TestDb::new().await;
    make_pool(&db.pool, "gpu").await;
    let rows = insert(&db.pool, "gpu", 2).await;
    let ids: Vec<uuid::Uuid> = rows.iter().map(|r| r.id.0).collect();
    // Marks 20 s old.
    let age_marks = || async {
        sqlx::query(
            "UPDATE instances SET last_heartbeat = now() - interval '20 seconds',
                 heartbeat_mark = now() - interval '20 seconds' WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&db.pool)
        .await
        .unwrap();
    };
    let mark_age = |id: uuid::Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, f64>(
                "SELECT extract(epoch FROM now() - heartbeat_mark)::float8
                   FROM instances WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let mut conn = db.pool.acquire().await.unwrap();
    for (every, moved) in [
        (Duration::from_secs(60), false),
        (Duration::from_secs(10), true),
    ] {
        age_marks().await;
        worker_heartbeat(&mut conn, rows[0].id, Some(true), every)
            .await
            .unwrap()
            .expect("exists");
        worker_heartbeat_batch(&mut conn, &ids[1..], &[true], &[0], every)
            .await
            .unwrap();
        for id in &ids {
            let age = mark_age(*id).await;
            if moved {
                assert!(
                    age < 5.0,
                    "a {every:?} interval moves a 20 s old mark: {age}"
                );
            } else {
                assert!(
                    age >= 19.0,
                    "a {every:?} interval keeps a 20 s old mark: {age}"
                );
            }
        }
    }
}

#[tokio::test]
async fn a_late_failure_never_undoes_a_volume_confirmed_deleted() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "gpu").await;
    let row = insert(&db.pool, "gpu", 1).await.remove(0);
    let mut conn = db.pool.acquire().await.unwrap();
    let vol = flotilla_store::volume::volume_record_created(&mut conn, row.id, "vol-1", 1)
        .await
        .unwrap();
    // One replica's delete was refused (still bound); another's went
    // through; then the first, paused mid-call, records its refusal late.
    flotilla_store::volume::volume_record_failure(&mut conn, vol.id, "412 still bound")
        .await
        .unwrap();
    flotilla_store::volume::volume_mark_deleted(&mut conn, vol.id)
        .await
        .unwrap();
    flotilla_store::volume::volume_record_failure(&mut conn, vol.id, "412 still bound")
        .await
        .unwrap();
    let state: String = sqlx::query_scalar("SELECT state FROM instance_volumes WHERE id = $1")
        .bind(vol.id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(state, "deleted", "what the provider confirmed stays true");
}
