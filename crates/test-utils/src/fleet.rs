//! Instances put in a given state the short way, for tests of the loops
//! that act on them: rows written through the store, machines (and
//! volumes) created at the simulator through the adapter, as the
//! scheduler would have left them.

use std::collections::BTreeMap;

use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::client::AdapterClient;
use flotilla_proto::v1;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{
    InstanceRow, NewInstance, Transition, instance_insert_requested, instance_record_machine,
    instance_transition,
};
use flotilla_store::volume::volume_record_created;
use sqlx::{PgConnection, PgPool};

/// Pool `gpu` on the simulated provider in region `ams`, as the tests'
/// pools are created.
pub fn target() -> Option<v1::ProviderTarget> {
    Some(v1::ProviderTarget {
        provider: "sim".into(),
        pool: "gpu".into(),
        region: "ams".into(),
    })
}

/// One checked transition of `r` to `to`.
pub async fn step(conn: &mut PgConnection, r: &InstanceRow, to: InstanceState) -> InstanceRow {
    instance_transition(
        conn,
        &WriteCtx::new("test"),
        &Transition {
            id: r.id,
            from: r.state,
            to,
            expected_version: r.version,
            error: None,
            reason: None,
        },
    )
    .await
    .expect("transition")
}

/// What the ready instances carry.
#[derive(Debug, Clone, Default)]
pub struct ReadySpec {
    pub labels: BTreeMap<String, String>,
    /// A recorded 1 GB volume mounted by each machine.
    pub volume: bool,
}

/// `n` instances of pool `gpu` in `ready`, each with a started machine
/// (and its volume) at the provider, recorded on its row.
pub async fn ready_instances(
    db: &PgPool,
    client: &AdapterClient,
    n: usize,
    spec: &ReadySpec,
) -> Vec<InstanceRow> {
    let mut conn = db.acquire().await.expect("conn");
    let new: Vec<NewInstance> = (0..n)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: "gpu".into(),
            name: format!("w-{i}"),
            provider: "sim".into(),
            labels: spec.labels.clone(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let rows = instance_insert_requested(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .expect("requested");
    let mut client = client.clone();
    let mut ready = Vec::with_capacity(n);
    for mut r in rows {
        let mut volume_ids = Vec::new();
        if spec.volume {
            let v = client
                .create_volume(v1::CreateVolumeRequest {
                    target: target(),
                    instance_id: r.id.to_string(),
                    name: String::new(),
                    size_gb: 1,
                    tags: Default::default(),
                })
                .await
                .expect("volume")
                .into_inner();
            volume_record_created(&mut conn, r.id, &v.id, 1)
                .await
                .expect("record volume");
            volume_ids.push(v.id);
        }
        let m = client
            .create_machine(v1::CreateMachineRequest {
                target: target(),
                instance_id: r.id.to_string(),
                name: r.name.clone(),
                instance_type: "shared-cpu-1x".into(),
                image: "img".into(),
                volume_ids,
                start: true,
                ..Default::default()
            })
            .await
            .expect("machine")
            .into_inner();
        for to in [InstanceState::Provisioning, InstanceState::Booting] {
            r = step(&mut conn, &r, to).await;
        }
        r = instance_record_machine(&mut conn, r.id, r.version, &m.id)
            .await
            .expect("record machine");
        ready.push(step(&mut conn, &r, InstanceState::Ready).await);
    }
    ready
}

/// `n` instances of pool `gpu` held as warm stock: desired state `warm`,
/// state `warm`, each with a machine created at the provider and never
/// started (as the scheduler's warm refill leaves them).
pub async fn warm_instances(db: &PgPool, client: &AdapterClient, n: usize) -> Vec<InstanceRow> {
    let mut conn = db.acquire().await.expect("conn");
    let new: Vec<NewInstance> = (0..n)
        .map(|i| NewInstance {
            id: InstanceId::new(),
            pool: "gpu".into(),
            name: format!("warm-{i}"),
            provider: "sim".into(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            worker_token_hash: None,
        })
        .collect();
    let rows = flotilla_store::warm::warm_request(&mut conn, &WriteCtx::new("test"), &new)
        .await
        .expect("warm requested");
    let mut client = client.clone();
    let mut warm = Vec::with_capacity(n);
    for mut r in rows {
        let m = client
            .create_machine(v1::CreateMachineRequest {
                target: target(),
                instance_id: r.id.to_string(),
                name: r.name.clone(),
                instance_type: "shared-cpu-1x".into(),
                image: "img".into(),
                start: false,
                ..Default::default()
            })
            .await
            .expect("machine")
            .into_inner();
        r = step(&mut conn, &r, InstanceState::Provisioning).await;
        r = instance_record_machine(&mut conn, r.id, r.version, &m.id)
            .await
            .expect("record machine");
        warm.push(step(&mut conn, &r, InstanceState::Warm).await);
    }
    warm
}
