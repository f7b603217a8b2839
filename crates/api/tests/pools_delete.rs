//! The ways out over real gRPC: `AbandonInstance` (an instance whose
//! provider is gone for good) and `DeletePool` (refused while the pool has
//! live instances, unless forced), their refusals, which write nothing,
//! and a deletion racing concurrent provisions.

use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_store::instance::{instance_get, instance_record_machine};
use tonic::{Code, Status};

use crate::common::{Api, authed, field_of};

/// The shared api (token name `ci`) with pool `gpu`.
async fn start() -> Api {
    let api = crate::common::start().await;
    api.create_pool("gpu").await;
    api
}

impl Api {
    /// Rows every refusal must leave as they were.
    async fn footprint(&self) -> (i64, i64, i64, i64, i64) {
        (
            self.count("SELECT count(*) FROM instances").await,
            self.count("SELECT count(*) FROM action_logs").await,
            self.count("SELECT count(*) FROM outbox").await,
            self.count("SELECT count(*) FROM pools").await,
            self.count("SELECT count(*) FROM pool_deletions").await,
        )
    }

    async fn try_provision(&self, pool: &str, count: u32) -> Result<Vec<String>, Status> {
        self.fleet
            .clone()
            .provision(authed(v1::ProvisionRequest {
                pool: pool.into(),
                count,
                ..Default::default()
            }))
            .await
            .map(|r| r.into_inner().instances.into_iter().map(|i| i.id).collect())
    }

    async fn abandon(&self, id: &str, reason: &str) -> Result<v1::AbandonInstanceResponse, Status> {
        self.fleet
            .clone()
            .abandon_instance(authed(v1::AbandonInstanceRequest {
                id: id.into(),
                reason: reason.into(),
            }))
            .await
            .map(|r| r.into_inner())
    }

    async fn delete_pool(&self, name: &str, force: bool) -> Result<v1::DeletePoolResponse, Status> {
        self.fleet
            .clone()
            .delete_pool(authed(v1::DeletePoolRequest {
                name: name.into(),
                force,
                reason: String::new(),
            }))
            .await
            .map(|r| r.into_inner())
    }

    async fn history(&self, id: &str) -> Vec<v1::ActionLog> {
        self.fleet
            .clone()
            .get_instance_history(authed(v1::GetInstanceHistoryRequest { id: id.into() }))
            .await
            .expect("history")
            .into_inner()
            .entries
    }

    /// Records a machine for an instance, as the scheduler does once its
    /// create returned.
    async fn record_machine(&self, id: &str, machine: &str) {
        let id: InstanceId = id.parse().expect("id");
        let mut conn = self.db.pool.acquire().await.expect("conn");
        let row = instance_get(&mut conn, id)
            .await
            .expect("get")
            .expect("row");
        instance_record_machine(&mut conn, id, row.version, machine)
            .await
            .expect("machine");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_refuses_bad_input_and_unknown_ids_and_writes_nothing() {
    let api = start().await;
    let id = api
        .try_provision("gpu", 1)
        .await
        .expect("provision")
        .remove(0);
    let before = api.footprint().await;
    for (req_id, reason, field) in [
        (id.as_str(), "", "reason"),
        (id.as_str(), "   ", "reason"),
        (id.as_str(), "bad\0byte", "reason"),
        ("", "provider gone", "id"),
        ("not-a-uuid", "provider gone", "id"),
    ] {
        let e = api.abandon(req_id, reason).await.expect_err("refused");
        assert_eq!(field_of(&e), field, "{e:?}");
    }
    let long = "x".repeat(1025);
    let e = api.abandon(&id, &long).await.expect_err("too long");
    assert_eq!(field_of(&e), "reason");
    let unknown = InstanceId::new().to_string();
    let e = api
        .abandon(&unknown, "provider gone")
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&unknown), "{e:?}");
    assert_eq!(api.footprint().await, before, "refusals write nothing");
    let state: String = sqlx::query_scalar("SELECT state FROM instances")
        .fetch_one(&api.db.pool)
        .await
        .expect("state");
    assert_eq!(state, "requested");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_of_an_instance_stuck_in_deleting_records_who_and_why_and_warns_of_its_machine() {
    let api = start().await;
    let id = api
        .try_provision("gpu", 1)
        .await
        .expect("provision")
        .remove(0);
    api.walk(
        &id,
        &[InstanceState::Requested, InstanceState::Provisioning],
    )
    .await;
    api.record_machine(&id, "m-gone-with-its-app").await;
    api.walk(&id, &[InstanceState::Provisioning, InstanceState::Deleting])
        .await;
    // Its delete has been failing for a while: the provider is gone.
    sqlx::query(
        "UPDATE instances SET needs_attention = true, attempts = 40,
             last_error = 'unavailable: app not found'",
    )
    .execute(&api.db.pool)
    .await
    .expect("flag");
    let events = api
        .count("SELECT count(*) FROM outbox WHERE subject = 'EVT.instance.abandoned'")
        .await;
    assert_eq!(events, 0);

    let answer = api
        .abandon(&id, "the Fly app was deleted with the account")
        .await
        .expect("abandon");
    assert!(answer.abandoned);
    assert_eq!(answer.from_state, v1::InstanceState::Deleting as i32);
    let instance = answer.instance.expect("instance");
    assert_eq!(instance.state, v1::InstanceState::Abandoned as i32);
    assert_eq!(instance.desired_state, v1::DesiredState::Terminated as i32);
    assert!(!instance.needs_attention, "nothing is left to retry");
    // The warning names the machine, says it may exist, and who deletes it.
    for part in ["m-gone-with-its-app", "may still exist", "orphan scan", &id] {
        assert!(answer.warning.contains(part), "{part}: {}", answer.warning);
    }
    // History: who and why, and the error it was stuck on.
    let history = api.history(&id).await;
    let last = history.last().expect("a row");
    assert_eq!(last.from_state, v1::InstanceState::Deleting as i32);
    assert_eq!(last.to_state, v1::InstanceState::Abandoned as i32);
    assert_eq!(last.actor, "api:ci");
    assert_eq!(last.reason, "the Fly app was deleted with the account");
    assert_eq!(last.error, "unavailable: app not found");
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'EVT.instance.abandoned'")
            .await,
        1
    );

    // Again: already done, no second row, the warning still true.
    let rows = history.len();
    let again = api.abandon(&id, "retry").await.expect("already done");
    assert!(!again.abandoned);
    assert_eq!(again.from_state, v1::InstanceState::Unspecified as i32);
    assert!(
        again.warning.contains("m-gone-with-its-app"),
        "{}",
        again.warning
    );
    assert_eq!(api.history(&id).await.len(), rows);
    // Terminate cannot take it back up either.
    let t = api
        .fleet
        .clone()
        .terminate(authed(v1::TerminateRequest {
            selector: Some(v1::InstanceSelector {
                instance_ids: vec![id.clone()],
                ..Default::default()
            }),
            force: true,
            reason: String::new(),
        }))
        .await
        .expect("terminate")
        .into_inner();
    assert_eq!(t.unchanged_ids, std::slice::from_ref(&id));
    assert_eq!(api.history(&id).await.len(), rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandon_of_a_terminated_instance_is_already_done_and_a_requested_one_leaves_nothing() {
    let api = start().await;
    let ids = api.try_provision("gpu", 2).await.expect("provision");
    api.walk(
        &ids[0],
        &[InstanceState::Requested, InstanceState::Terminated],
    )
    .await;
    let rows = api.history(&ids[0]).await.len();
    let done = api.abandon(&ids[0], "cleanup").await.expect("ok");
    assert!(!done.abandoned);
    assert!(done.warning.is_empty(), "{}", done.warning);
    assert_eq!(
        done.instance.expect("instance").state,
        v1::InstanceState::Terminated as i32
    );
    assert_eq!(api.history(&ids[0]).await.len(), rows, "no second row");

    // Never given to the provider: nothing of it can be there.
    let never = api.abandon(&ids[1], "not needed").await.expect("abandon");
    assert!(never.abandoned);
    assert!(
        never.warning.contains("no provider call was ever made"),
        "{}",
        never.warning
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_live_instances_is_not_deleted_without_force_and_nothing_changes() {
    let api = start().await;
    api.try_provision("gpu", 2).await.expect("provision");
    let before = api.footprint().await;
    let e = api.delete_pool("gpu", false).await.expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("2 live instances"), "{e:?}");
    assert!(e.message().contains("--force"), "{e:?}");
    let e = api.delete_pool("nope", true).await.expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("pool nope"), "{e:?}");
    let e = api.delete_pool("Not A Name", false).await.expect_err("bad");
    assert_eq!(field_of(&e), "name");
    let e = api
        .fleet
        .clone()
        .delete_pool(authed(v1::DeletePoolRequest {
            name: "gpu".into(),
            force: true,
            reason: "x".repeat(1025),
        }))
        .await
        .expect_err("long reason");
    assert_eq!(field_of(&e), "reason");
    assert_eq!(api.footprint().await, before, "refusals write nothing");
    let pool = api
        .fleet
        .clone()
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect("pool")
        .into_inner();
    assert!(pool.deleting_since.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_delete_terminates_the_pool_refuses_new_instances_and_deletes_it_once_they_are_gone()
 {
    let api = start().await;
    let ids = api.try_provision("gpu", 2).await.expect("provision");
    let answer = api.delete_pool("gpu", true).await.expect("forced");
    assert!(!answer.deleted);
    assert_eq!(answer.live_instances, 2);
    let mut terminating = answer.terminating_ids.clone();
    terminating.sort();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(terminating, sorted);
    let pool = answer.pool.expect("the pool, deleting");
    assert!(pool.deleting_since.is_some());
    assert_eq!(
        api.count("SELECT count(*) FROM outbox WHERE subject = 'CMD.terminate'")
            .await,
        1
    );
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE desired_state = 'terminated'")
            .await,
        2
    );

    // A deleting pool takes no instances and cannot be changed.
    let instances = api.count("SELECT count(*) FROM instances").await;
    let e = api.try_provision("gpu", 1).await.expect_err("deleting");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("being deleted"), "{e:?}");
    assert_eq!(api.count("SELECT count(*) FROM instances").await, instances);
    let e = api
        .fleet
        .clone()
        .update_pool(authed(v1::UpdatePoolRequest {
            name: "gpu".into(),
            desired_capacity: Some(3),
            ..Default::default()
        }))
        .await
        .expect_err("deleting");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = api.try_create_pool("gpu").await.expect_err("still there");
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Asked again while they are on their way: how far it is.
    let again = api.delete_pool("gpu", false).await.expect("progress");
    assert!(!again.deleted);
    assert_eq!(again.live_instances, 2);
    assert!(again.terminating_ids.is_empty(), "nothing asked twice");

    // Both gone (one cancelled, one given up): the pool goes.
    api.walk(
        &ids[0],
        &[InstanceState::Requested, InstanceState::Terminated],
    )
    .await;
    api.abandon(&ids[1], "provider gone")
        .await
        .expect("abandon");
    let done = api.delete_pool("gpu", false).await.expect("deleted");
    assert!(done.deleted && done.pool.is_none());
    let e = api
        .fleet
        .clone()
        .get_pool(authed(v1::GetPoolRequest { name: "gpu".into() }))
        .await
        .expect_err("gone");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let (actor, forced, live, deleted): (String, bool, i32, bool) = sqlx::query_as(
        "SELECT actor, forced, live_instances, deleted_at IS NOT NULL FROM pool_deletions",
    )
    .fetch_one(&api.db.pool)
    .await
    .expect("the deletion's record");
    assert_eq!(
        (actor.as_str(), forced, live, deleted),
        ("api:ci", true, 2, true)
    );

    // The name is free: a new pool takes it and works, and the old
    // instances keep their history.
    api.try_create_pool("gpu").await.expect("created again");
    api.try_provision("gpu", 1)
        .await
        .expect("provision into the new pool");
    assert!(api.history(&ids[1]).await.len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisions_racing_a_forced_delete_are_either_terminated_by_it_or_refused() {
    let api = start().await;
    api.try_provision("gpu", 1).await.expect("a live instance");
    let provisions: Vec<_> = (0..8)
        .map(|_| {
            let fleet = api.fleet.clone();
            tokio::spawn(async move {
                fleet
                    .clone()
                    .provision(authed(v1::ProvisionRequest {
                        pool: "gpu".into(),
                        count: 2,
                        ..Default::default()
                    }))
                    .await
                    .map(|r| r.into_inner().instances.len())
            })
        })
        .collect();
    let deletion = api.delete_pool("gpu", true).await.expect("forced");
    assert!(!deletion.deleted);
    let mut accepted = 0;
    for p in provisions {
        match p.await.expect("task") {
            Ok(n) => accepted += n,
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("being deleted"), "{e:?}");
            }
        }
    }
    println!("{accepted} of 16 instances accepted before the deletion, the rest refused");
    // Whatever got in before the deletion was asked to terminate by it;
    // nothing got in after.
    assert_eq!(
        api.count("SELECT count(*) FROM instances").await,
        1 + accepted as i64
    );
    assert_eq!(
        api.count("SELECT count(*) FROM instances WHERE desired_state = 'running'")
            .await,
        0,
        "{accepted} accepted; every instance of the pool is on its way out"
    );
    let e = api.try_provision("gpu", 1).await.expect_err("after");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
}
