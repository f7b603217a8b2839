//! The reconcile driver and the loop service runtime against a real
//! PostgreSQL: what a batch's steps come to, which leases are given back,
//! and the health a loop service answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_core::{ErrorClass, InstanceId, InstanceState};
use flotilla_runtime::reconcile::{Batch, Step, reconcile};
use flotilla_store::instance::{ClaimQuery, InstanceRow, NewInstance, instance_insert_requested};
use flotilla_store::pool::{NewPool, pool_create};
use flotilla_store::{PgPool, StoreError, WriteCtx};
use flotilla_test_utils::{DEADLINE, TestDb, eventually};

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

async fn insert(db: &PgPool, pool: &str, n: usize) -> Vec<InstanceRow> {
    let new: Vec<NewInstance> = (0..n)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: pool.into(),
            name: format!("{pool}-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let mut conn = db.acquire().await.unwrap();
    instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .unwrap()
}

fn batch(owner: &str, limit: i64, concurrency: usize) -> Batch<'_> {
    Batch {
        claim: ClaimQuery {
            states: &[InstanceState::Requested],
            desired: None,
            pool: None,
            owner,
            lease: Duration::from_secs(600),
            limit,
        },
        concurrency,
        span: "test.step",
        step_timeout: Duration::from_secs(600),
    }
}

/// Who holds each instance's lease now.
async fn lease_owners(db: &PgPool) -> BTreeMap<String, Option<String>> {
    sqlx::query_as::<_, (String, Option<String>)>("SELECT name, lease_owner FROM instances")
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

#[tokio::test]
async fn each_step_is_tallied_one_failure_stops_none_and_only_a_database_error_gives_its_lease_back()
 {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 6).await;
    // Each row's step is decided by its name.
    let status = reconcile(&db.pool, batch("r1", 100, 4), |row, pool, _| async move {
        assert_eq!(pool.name, "p", "the row's own pool");
        Ok(match row.name.as_str() {
            "p-0" => Step::Advanced,
            "p-1" => Step::Waiting,
            "p-2" => Step::AlreadyDone,
            "p-3" => Step::Retrying(ErrorClass::Retryable, "503".into()),
            "p-4" => Step::Failed("image missing".into()),
            _ => return Err(StoreError::Conflict("lost a version race".into())),
        })
    })
    .await;
    assert_eq!(status.found, 6);
    assert_eq!(
        status.acted, 2,
        "advanced and failed-for-good moved the row"
    );
    assert_eq!(status.already_done, 1);
    let mut errors: Vec<(String, ErrorClass)> = status
        .errors
        .iter()
        .map(|e| (e.item.clone(), e.class))
        .collect();
    errors.sort_by(|a, b| a.0.cmp(&b.0));
    let id = |i: usize| rows[i].id.to_string();
    let mut want = vec![
        (id(3), ErrorClass::Retryable),
        (id(4), ErrorClass::Permanent),
        (id(5), ErrorClass::Retryable),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(errors, want);
    let owners = lease_owners(&db.pool).await;
    assert_eq!(owners["p-5"], None, "a database error gives the lease back");
    for kept in ["p-0", "p-1", "p-2", "p-3", "p-4"] {
        assert_eq!(
            owners[kept].as_deref(),
            Some("r1"),
            "{kept}: the step owns it"
        );
    }
    assert!(!status.more, "a short batch has no backlog");
}

#[tokio::test]
async fn a_step_that_hangs_is_dropped_at_the_step_timeout_and_gives_its_lease_back() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    let rows = insert(&db.pool, "p", 3).await;
    let hung = rows[0].id;
    let mut b = batch("r1", 100, 4);
    b.step_timeout = Duration::from_millis(300);
    // One call never answers (a connection a partition killed): the batch
    // must not wait for it, and its row must not stay renewed.
    let status = tokio::time::timeout(
        DEADLINE,
        reconcile(&db.pool, b, |row, _, _| async move {
            if row.id == hung {
                std::future::pending::<()>().await;
            }
            Ok(Step::Advanced)
        }),
    )
    .await
    .expect("the batch waited for the hung step");
    assert_eq!(status.acted, 2, "the others went on");
    let errors: Vec<(String, ErrorClass)> = status
        .errors
        .iter()
        .map(|e| (e.item.clone(), e.class))
        .collect();
    assert_eq!(errors, [(hung.to_string(), ErrorClass::Retryable)]);
    let owners = lease_owners(&db.pool).await;
    assert_eq!(owners["p-0"], None, "the hung step's lease is given back");
    assert_eq!(owners["p-1"].as_deref(), Some("r1"));
}

#[tokio::test]
async fn a_row_whose_pool_is_gone_keeps_its_lease_and_the_rest_of_the_batch_runs() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "kept").await;
    make_pool(&db.pool, "gone").await;
    insert(&db.pool, "kept", 1).await;
    insert(&db.pool, "gone", 1).await;
    sqlx::query("ALTER TABLE instances DROP CONSTRAINT IF EXISTS instances_pool_fkey")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM pools WHERE name = 'gone'")
        .execute(&db.pool)
        .await
        .unwrap();
    let stepped = Arc::new(AtomicUsize::new(0));
    let s = stepped.clone();
    let status = reconcile(&db.pool, batch("r1", 100, 4), move |_, _, _| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            Ok(Step::Advanced)
        }
    })
    .await;
    assert_eq!(
        stepped.load(Ordering::SeqCst),
        1,
        "only the row with a pool"
    );
    assert_eq!(status.acted, 1);
    assert_eq!(status.errors.len(), 1);
    assert!(status.errors[0].message.contains("pool gone not found"));
    // Kept: a missing pool is retried once per lease, not once per tick.
    assert_eq!(
        lease_owners(&db.pool).await["gone-0"].as_deref(),
        Some("r1")
    );
}

#[tokio::test]
async fn steps_run_at_most_the_batch_concurrency_at_once_and_a_full_batch_asks_for_more() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 12).await;
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (now.clone(), peak.clone());
    let status = reconcile(&db.pool, batch("r1", 8, 3), move |_, _, _| {
        let (n, p) = (n.clone(), p.clone());
        async move {
            let in_flight = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(in_flight, Ordering::SeqCst);
            tokio::task::yield_now().await;
            // Not a wait for a condition: the step's own work, which holds
            // its slot while the driver starts the others.
            tokio::time::sleep(Duration::from_millis(5)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(Step::Advanced)
        }
    })
    .await;
    assert_eq!(status.found, 8, "the batch limit");
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    assert!(status.more, "a full batch that moved: run again at once");
}

#[tokio::test]
async fn a_claim_that_fails_on_the_database_is_one_error_and_steps_nothing() {
    let db = TestDb::new().await;
    make_pool(&db.pool, "p").await;
    insert(&db.pool, "p", 2).await;
    db.pool.close().await;
    let status = reconcile(&db.pool, batch("r1", 8, 3), |_, _, _| async {
        panic!("nothing was claimed")
    })
    .await;
    assert_eq!(status.found, 0);
    assert_eq!(status.errors.len(), 1);
    assert_eq!(status.errors[0].item, "claim");
}

mod leases {
    use flotilla_store::instance::{Transition, instance_claim_due, instance_transition};

    use super::*;

    fn short(owner: &str) -> Batch<'_> {
        let mut b = batch(owner, 10, 4);
        b.claim.lease = Duration::from_millis(900);
        b
    }

    #[tokio::test]
    async fn a_step_longer_than_its_lease_keeps_the_row_while_it_works() {
        let db = TestDb::new().await;
        make_pool(&db.pool, "p").await;
        insert(&db.pool, "p", 1).await;
        let other = db.pool.clone();
        let status = reconcile(&db.pool, short("r1"), |claimed, _, fence| {
            let other = other.clone();
            async move {
                // The step works until its lease was renewed past three
                // lease lengths after the claim, by the database's
                // clock; another replica keeps trying to claim meanwhile.
                let claimed_until = claimed.lease_until.expect("claimed with a lease");
                eventually("the lease renewed past three leases", DEADLINE, || async {
                    let taken = instance_claim_due(&other, &short("r2").claim)
                        .await
                        .unwrap();
                    assert!(taken.is_empty(), "claimed while its holder was working");
                    sqlx::query_scalar::<_, bool>(
                        "SELECT lease_until >= $1 + interval '1800 milliseconds' FROM instances",
                    )
                    .bind(claimed_until)
                    .fetch_one(&other)
                    .await
                    .unwrap()
                })
                .await;
                assert!(fence.held(), "renewed all along");
                Ok(Step::Advanced)
            }
        })
        .await;
        assert_eq!(status.acted, 1, "{status:?}");
    }

    #[tokio::test]
    async fn a_holder_that_lost_its_lease_to_another_claim_is_fenced_and_writes_nothing() {
        let db = TestDb::new().await;
        make_pool(&db.pool, "p").await;
        let row = insert(&db.pool, "p", 1).await.remove(0);
        let other = db.pool.clone();
        let status = reconcile(&db.pool, short("paused"), |claimed, _, fence| {
            let other = other.clone();
            async move {
                // As if this replica were stopped: its lease runs out and
                // is not renewed (expired leases never are), and another
                // replica claims the row.
                sqlx::query("UPDATE instances SET lease_until = now() - interval '1 second'")
                    .execute(&other)
                    .await
                    .unwrap();
                let taken = instance_claim_due(&other, &batch("r2", 10, 1).claim)
                    .await
                    .unwrap();
                assert_eq!(taken.len(), 1);
                eventually("the fence to fall", DEADLINE, || async { !fence.held() }).await;
                // A write it had in flight is refused by the claim's version.
                let mut conn = other.acquire().await.unwrap();
                let write = instance_transition(
                    &mut conn,
                    &WriteCtx::new("paused"),
                    &Transition {
                        id: claimed.id,
                        from: InstanceState::Requested,
                        to: InstanceState::Provisioning,
                        expected_version: claimed.version,
                        error: None,
                        reason: None,
                    },
                )
                .await;
                assert!(matches!(write, Err(StoreError::Conflict(_))), "{write:?}");
                write.map(|_| Step::Advanced)
            }
        })
        .await;
        assert_eq!(status.errors.len(), 1, "{status:?}");
        let now: (String, Option<String>, i64) =
            sqlx::query_as("SELECT state, lease_owner, version FROM instances")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(now.0, "requested", "nothing overwritten");
        assert_eq!(
            now.1.as_deref(),
            Some("r2"),
            "the new holder keeps its lease"
        );
        assert_eq!(now.2, row.version + 2, "two claims, no other write");
    }
}

mod health {
    use flotilla_runtime::Loops;
    use flotilla_runtime::service::serve_health;
    use flotilla_telemetry::CancellationToken;
    use flotilla_telemetry::loops::ActivationStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    async fn status_of(
        client: &mut HealthClient<tonic::transport::Channel>,
        service: &str,
    ) -> ServingStatus {
        let answer = client
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        ServingStatus::try_from(answer.status).unwrap()
    }

    #[tokio::test]
    async fn a_loop_service_answers_serving_until_a_loop_stalls_and_names_the_stalled_loop() {
        let shutdown = CancellationToken::new();
        let mut loops = Loops::new(shutdown.clone()).with_stall_floor(Duration::from_millis(300));
        loops.add("steady", Duration::from_millis(20), None, || {
            std::future::ready(ActivationStatus::default())
        });
        let hang = Arc::new(tokio::sync::Notify::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let (h, c) = (hang.clone(), calls.clone());
        // Its second activation never ends, as a hung provider call would.
        loops.add("hangs", Duration::from_millis(20), None, move || {
            let (h, c) = (h.clone(), c.clone());
            async move {
                if c.fetch_add(1, Ordering::SeqCst) > 0 {
                    h.notified().await;
                }
                ActivationStatus::default()
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_health(
            "test",
            loops.statuses(),
            listener,
            shutdown.clone(),
        ));
        let run = tokio::spawn(loops.run(Duration::from_millis(100)));
        let mut client = HealthClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy(),
        );
        // Serving first (the health server may need a moment to bind)...
        eventually("serving", DEADLINE, || {
            let mut client = client.clone();
            async move {
                matches!(
                    client
                        .check(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await,
                    Ok(a) if a.get_ref().status == ServingStatus::Serving as i32
                )
            }
        })
        .await;
        // ...then not serving once the hung loop passed its floor.
        eventually("the stall noticed", DEADLINE, || {
            let mut client = client.clone();
            async move { status_of(&mut client, "").await == ServingStatus::NotServing }
        })
        .await;

        assert_eq!(
            status_of(&mut client, "flotilla.loop.hangs").await,
            ServingStatus::NotServing
        );
        assert_eq!(
            status_of(&mut client, "flotilla.loop.steady").await,
            ServingStatus::Serving
        );
        shutdown.cancel();
        assert_eq!(
            run.await.unwrap(),
            1,
            "the hung activation is aborted after the grace"
        );
    }
}

/// The provider-adapter client against a server behind a TCP fault proxy:
/// once the link goes silent (a partition: no reset, no answer), a call on
/// the connection already open fails within the keepalive instead of
/// hanging for as long as TCP takes to give up.
#[tokio::test]
async fn a_provider_call_on_a_connection_a_partition_silenced_fails_within_the_keepalive() {
    use clap::Parser;
    use flotilla_proto::v1;

    // Any gRPC server: the Provider call is answered UNIMPLEMENTED, which
    // is enough to know the connection carries answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let proxy = flotilla_chaos::proxy::FaultProxy::start("adapter", upstream)
        .await
        .unwrap();

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        adapter: flotilla_core::config::AdapterClientArgs,
    }
    let args = Args::parse_from([
        "test",
        "--provider-adapter-token",
        "service-token",
        "--provider-adapter-keepalive-seconds",
        "1",
        "--provider-adapter-call-timeout-seconds",
        "120",
    ]);
    let mut client = flotilla_runtime::service::provider_client(
        &format!("http://{}", proxy.addr()),
        &args.adapter,
    )
    .unwrap();
    let call = || v1::MachineRef {
        target: None,
        machine_id: "m".into(),
    };
    let first = client
        .get_machine(call())
        .await
        .expect_err("no Provider here");
    assert_eq!(first.code(), tonic::Code::Unimplemented, "{first:?}");

    proxy.cut();
    let answer = tokio::time::timeout(Duration::from_secs(30), client.get_machine(call()))
        .await
        .expect("the call hung on the silenced connection");
    let e = answer.expect_err("nothing can answer through a cut link");
    assert_ne!(e.code(), tonic::Code::Unimplemented, "{e:?}");
}

/// PROVIDER_ADAPTER_CONNECT_TIMEOUT_SECONDS bounds the connect: an adapter
/// that never accepts fails the call as unavailable after it, long before
/// the call timeout.
#[tokio::test]
async fn a_provider_adapter_that_never_accepts_fails_the_call_after_the_connect_timeout() {
    use clap::Parser;
    use flotilla_proto::v1;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        adapter: flotilla_core::config::AdapterClientArgs,
    }
    let (_listener, _held, addr) = flotilla_telemetry::test_support::hanging_address();
    let args = Args::parse_from([
        "test",
        "--provider-adapter-token",
        "service-token",
        "--provider-adapter-connect-timeout-seconds",
        "1",
        "--provider-adapter-call-timeout-seconds",
        "120",
    ]);
    let mut client =
        flotilla_runtime::service::provider_client(&format!("http://{addr}"), &args.adapter)
            .unwrap();
    let call = client.get_machine(v1::MachineRef {
        target: None,
        machine_id: "m".into(),
    });
    let answer = tokio::time::timeout(Duration::from_secs(4), call)
        .await
        .expect("given up after the 1 s connect timeout, not the 5 s default");
    let e = answer.expect_err("nothing accepts");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
}
