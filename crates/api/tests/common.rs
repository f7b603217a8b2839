//! What the api tests share: an api served on loopback with its own
//! database and NATS namespace, authenticated requests, and the shapes of
//! the requests the tests send.

use flotilla_api::{ApiState, ApiToken, Limits, serve};
use flotilla_bus::Bus;
use flotilla_bus::relay::OutboxRelay;
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_core::{InstanceId, InstanceState};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_store::WriteCtx;
use flotilla_store::instance::{Transition, instance_get, instance_transition};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{TestDb, TestNats};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

pub const TOKEN: &str = "fleet-token-for-tests";

/// The api served on loopback over its own database and NATS namespace,
/// with clients of both its services; stopped when dropped.
pub struct Api {
    pub db: TestDb,
    pub bus: Bus,
    pub addr: std::net::SocketAddr,
    pub fleet: FleetServiceClient<Channel>,
    pub worker: WorkerServiceClient<Channel>,
    pub stop: CancellationToken,
    pub _nats: TestNats,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn start() -> Api {
    start_with(Limits::default()).await
}

pub async fn start_with(limits: Limits) -> Api {
    start_full(limits, None).await
}

/// An api whose CreatePool checks pools against `provider`.
pub async fn start_checked(provider: flotilla_proto::client::AdapterClient) -> Api {
    start_full(Limits::default(), Some(provider)).await
}

pub async fn start_full(
    limits: Limits,
    provider: Option<flotilla_proto::client::AdapterClient>,
) -> Api {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).expect("namespace"),
        BusConfig::default(),
    );
    bus.ensure_streams().await.expect("streams");
    let state = ApiState {
        pool: db.pool.clone(),
        bus: bus.clone(),
        tokens: vec![ApiToken::from_plain("ci", TOKEN)].into(),
        limits,
        provider,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    tokio::spawn(serve(state, listener, stop.clone()));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    Api {
        db,
        bus,
        addr,
        fleet: FleetServiceClient::new(channel.clone()),
        worker: WorkerServiceClient::new(channel),
        stop,
        _nats: nats,
    }
}

pub fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    let value = MetadataValue::try_from(format!("Bearer {token}")).expect("ascii");
    req.metadata_mut().insert("authorization", value);
    req
}

pub fn authed<T>(msg: T) -> Request<T> {
    with_token(msg, TOKEN)
}

/// The field an INVALID_ARGUMENT names (the text before the first colon).
pub fn field_of(s: &Status) -> &str {
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    s.message().split(':').next().unwrap_or_default()
}

impl Api {
    pub async fn count(&self, sql: &'static str) -> i64 {
        sqlx::query_scalar(sql)
            .fetch_one(&self.db.pool)
            .await
            .expect("count")
    }

    pub async fn instances(&self) -> i64 {
        self.count("SELECT count(*) FROM instances").await
    }

    pub async fn outbox(&self) -> i64 {
        self.count("SELECT count(*) FROM outbox").await
    }

    /// The pool as `GetPool` answers it.
    pub async fn get_pool(&self, name: &str) -> v1::Pool {
        self.fleet
            .clone()
            .get_pool(authed(v1::GetPoolRequest { name: name.into() }))
            .await
            .expect("get pool")
            .into_inner()
    }

    pub async fn create_pool(&self, name: &str) -> v1::Pool {
        self.try_create_pool(name).await.expect("create pool")
    }

    /// CreatePool of a `sim` pool named `name`, with the api's answer.
    pub async fn try_create_pool(&self, name: &str) -> Result<v1::Pool, Status> {
        self.try_create_pool_with(name, |_| {}).await
    }

    /// CreatePool of a `sim` pool named `name`, changed by `change` first.
    pub async fn try_create_pool_with(
        &self,
        name: &str,
        change: impl FnOnce(&mut v1::Pool),
    ) -> Result<v1::Pool, Status> {
        let mut pool = v1::Pool {
            name: name.into(),
            provider: "sim".into(),
            instance_type: "shared-cpu-1x".into(),
            region: "ams".into(),
            ..Default::default()
        };
        change(&mut pool);
        self.fleet
            .clone()
            .create_pool(authed(v1::CreatePoolRequest { pool: Some(pool) }))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn provision(
        &self,
        req: v1::ProvisionRequest,
    ) -> Result<v1::ProvisionResponse, Status> {
        self.fleet
            .clone()
            .provision(authed(req))
            .await
            .map(|r| r.into_inner())
    }

    pub async fn relay(&self) {
        OutboxRelay::new(self.db.pool.clone(), self.bus.clone())
            .run_once()
            .await
            .expect("relay");
    }

    /// Moves an instance along the table as the scheduler would.
    pub async fn walk(&self, id: &str, path: &[InstanceState]) {
        let id: InstanceId = id.parse().expect("id");
        let mut conn = self.db.pool.acquire().await.expect("conn");
        for pair in path.windows(2) {
            let row = instance_get(&mut conn, id)
                .await
                .expect("get")
                .expect("row");
            instance_transition(
                &mut conn,
                &WriteCtx::new("scheduler"),
                &Transition {
                    id,
                    from: pair[0],
                    to: pair[1],
                    expected_version: row.version,
                    error: None,
                    reason: None,
                },
            )
            .await
            .expect("transition");
        }
    }

    pub async fn state_of(&self, id: &str) -> (InstanceState, i64, i64) {
        let id: InstanceId = id.parse().expect("id");
        let mut conn = self.db.pool.acquire().await.expect("conn");
        let row = instance_get(&mut conn, id)
            .await
            .expect("get")
            .expect("row");
        let logs: i64 =
            sqlx::query_scalar("SELECT count(*) FROM action_logs WHERE instance_id = $1")
                .bind(id.0)
                .fetch_one(&self.db.pool)
                .await
                .expect("logs");
        (row.state, row.version, logs)
    }

    pub async fn set_worker_token(&self, id: &str, token: &str) {
        sqlx::query("UPDATE instances SET worker_token_hash = $2 WHERE id = $1")
            .bind(id.parse::<uuid::Uuid>().expect("uuid"))
            .bind(Sha256::digest(token.as_bytes()).to_vec())
            .execute(&self.db.pool)
            .await
            .expect("set token");
    }
}

pub fn count(pool: &str, n: u32) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        pool: pool.into(),
        count: n,
        ..Default::default()
    }
}

pub fn named(pool: &str, names: &[&str]) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        pool: pool.into(),
        names: names.iter().map(|n| (*n).to_owned()).collect(),
        ..Default::default()
    }
}

pub fn keyed(req: v1::ProvisionRequest, key: &str) -> v1::ProvisionRequest {
    v1::ProvisionRequest {
        idempotency_key: key.into(),
        ..req
    }
}

pub fn ids(r: &v1::ProvisionResponse) -> Vec<String> {
    r.instances.iter().map(|i| i.id.clone()).collect()
}

pub fn by_ids(ids: &[String]) -> Option<v1::InstanceSelector> {
    Some(v1::InstanceSelector {
        instance_ids: ids.to_vec(),
        ..Default::default()
    })
}

/// Two instances in `booting`, each with its own worker token.
pub async fn two_booting_workers(api: &Api) -> (String, String) {
    api.create_pool("gpu").await;
    let created = api
        .provision(named("gpu", &["w-a", "w-b"]))
        .await
        .expect("created");
    let (a, b) = (
        created.instances[0].id.clone(),
        created.instances[1].id.clone(),
    );
    use InstanceState::*;
    for id in [&a, &b] {
        api.walk(id, &[Requested, Provisioning, Booting]).await;
    }
    api.set_worker_token(&a, "token-a").await;
    api.set_worker_token(&b, "token-b").await;
    (a, b)
}

pub fn phase(id: &str, phase: v1::WorkerPhase) -> v1::ReportPhaseRequest {
    v1::ReportPhaseRequest {
        instance_id: id.into(),
        phase: phase as i32,
        message: String::new(),
    }
}

pub fn beat(id: &str) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        instance_id: id.into(),
        ..Default::default()
    }
}
