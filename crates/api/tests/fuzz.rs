//! Fuzzing the public FleetService: a seeded generator sends random
//! requests (pools, counts, names, labels, ids, selectors, page tokens;
//! empty, huge, odd Unicode, control characters, and for some requests
//! bytes that are not UTF-8 at all) to the real api on a real PostgreSQL.
//!
//! What must hold for every request: the server answers (no panic, no
//! dropped connection), a refusal is one of the codes a caller can act on
//! (never INTERNAL or UNKNOWN), and a refusal writes nothing: the row
//! counts of every table the api writes are the same after it as before.
//!
//! `FLOTILLA_FUZZ_REQUESTS` sets the number of requests (the full
//! value is 100000; the default is the CI size) and `FLOTILLA_FUZZ_SEED`
//! replays a run; the seed is printed at the start. The same run goes over
//! TLS too (`FLOTILLA_FUZZ_TLS_REQUESTS`, 1,000 by default), as agents and
//! the CLI reach a production api.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use flotilla_api::{ApiState, ApiToken, Limits, Listeners, serve_with};
use flotilla_bus::Bus;
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{TestDb, TestNats};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

const TOKEN: &str = "fuzz-token";
/// Requests when `FLOTILLA_FUZZ_REQUESTS` is unset: what CI runs.
const CI_REQUESTS: u64 = 5_000;
/// Requests over TLS when `FLOTILLA_FUZZ_TLS_REQUESTS` is unset.
const CI_TLS_REQUESTS: u64 = 1_000;

/// Tables the FleetService writes.
const TABLES: &[&str] = &[
    "instances",
    "outbox",
    "idempotency_records",
    "action_logs",
    "pools",
    "instance_volumes",
    "pool_deletions",
];

/// Codes a refusal may carry: each tells the caller what to do.
const REFUSALS: &[Code] = &[
    Code::InvalidArgument,
    Code::NotFound,
    Code::AlreadyExists,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unauthenticated,
    Code::PermissionDenied,
    Code::ResourceExhausted,
];

async fn counts(db: &TestDb) -> Vec<i64> {
    let sql = TABLES
        .iter()
        .map(|t| format!("(SELECT count(*) FROM {t})"))
        .collect::<Vec<_>>()
        .join(", ");
    let row: Vec<i64> = {
        let r = sqlx::query(&format!("SELECT ARRAY[{sql}]"))
            .fetch_one(&db.pool)
            .await
            .expect("count rows");
        sqlx::Row::get(&r, 0)
    };
    row
}

// ---------- random inputs ----------

/// Strings that try every rule: empty, valid, long, huge, odd Unicode,
/// control characters, NUL, SQL and path shapes.
fn string(rng: &mut StdRng, known: &[String]) -> String {
    match rng.random_range(0..16) {
        0 => String::new(),
        1 | 2 if !known.is_empty() => known[rng.random_range(0..known.len())].clone(),
        3 => "a".repeat(rng.random_range(60..70)),
        4 => "x".repeat(rng.random_range(1_000..70_000)),
        5 => "é🚀\u{202e}ß".repeat(rng.random_range(1..40)),
        6 => "\0".into(),
        7 => format!("a{}b", char::from(rng.random_range(0u8..0x20))),
        8 => "'; DROP TABLE instances; --".into(),
        9 => "../../etc/passwd".into(),
        10 => uuid::Uuid::new_v4().to_string(),
        11 => "\u{feff}\u{200b}\u{fffd}\u{10ffff}".into(),
        12 => "A-UPPER".into(),
        _ => {
            let len = rng.random_range(1..24);
            (0..len)
                .map(|_| {
                    let pool = b"abcxyz0129-_./ :%*\\";
                    char::from(pool[rng.random_range(0..pool.len())])
                })
                .collect()
        }
    }
}

fn labels(rng: &mut StdRng) -> HashMap<String, String> {
    let n = match rng.random_range(0..10) {
        0..=5 => 0,
        6..=8 => rng.random_range(1..4),
        _ => rng.random_range(30..40),
    };
    (0..n)
        .map(|i| {
            let key = if rng.random_bool(0.5) {
                format!("k{i}")
            } else {
                string(rng, &[])
            };
            (key, string(rng, &[]))
        })
        .collect()
}

fn count(rng: &mut StdRng) -> u32 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => 1,
        2 => 3,
        3 => 1000,
        4 => 1001,
        5 => u32::MAX,
        6 => rng.random(),
        _ => rng.random_range(0..5),
    }
}

fn ids(rng: &mut StdRng, known: &[String]) -> Vec<String> {
    let n = match rng.random_range(0..10) {
        0 => 0,
        1 => rng.random_range(1000..1100),
        _ => rng.random_range(1..5),
    };
    (0..n).map(|_| string(rng, known)).collect()
}

fn selector(rng: &mut StdRng, pools: &[String], known: &[String]) -> Option<v1::InstanceSelector> {
    if rng.random_ratio(1, 8) {
        return None;
    }
    Some(v1::InstanceSelector {
        instance_ids: if rng.random_bool(0.6) {
            ids(rng, known)
        } else {
            Vec::new()
        },
        pool: if rng.random_bool(0.4) {
            string(rng, pools)
        } else {
            String::new()
        },
        labels: labels(rng),
    })
}

fn pool_msg(rng: &mut StdRng, pools: &[String]) -> v1::Pool {
    v1::Pool {
        name: string(rng, pools),
        provider: ["sim", "fly", "aws", "", "local"][rng.random_range(0..5)].into(),
        instance_type: string(rng, &[]),
        region: string(rng, &[]),
        desired_capacity: count(rng),
        timeouts: rng.random_bool(0.3).then(|| v1::PoolTimeouts {
            booting_seconds: count(rng),
            installing_seconds: count(rng),
            starting_seconds: count(rng),
            draining_seconds: count(rng),
        }),
        labels: labels(rng),
        image: string(rng, &[]),
        volume_size_gb: count(rng),
        price_per_hour_micros: rng.random(),
        version: rng.random(),
        ..Default::default()
    }
}

// ---------- bytes that are not UTF-8 ----------

/// The string fields of a request re-declared as bytes, so the client can
/// put anything on the wire; tags match `fleet.proto`.
#[derive(Clone, PartialEq, prost::Message)]
struct RawProvision {
    #[prost(bytes = "vec", tag = "1")]
    pool: Vec<u8>,
    #[prost(uint32, tag = "2")]
    count: u32,
    #[prost(bytes = "vec", repeated, tag = "3")]
    names: Vec<Vec<u8>>,
    #[prost(bytes = "vec", tag = "5")]
    idempotency_key: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawGet {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
}

/// Encodes any prost message, decodes the declared answer.
struct RawCodec<E, D>(PhantomData<fn(E) -> D>);

impl<E, D> Codec for RawCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = RawEncoder<E>;
    type Decoder = RawDecoder<D>;

    fn encoder(&mut self) -> RawEncoder<E> {
        RawEncoder(PhantomData)
    }

    fn decoder(&mut self) -> RawDecoder<D> {
        RawDecoder(PhantomData)
    }
}

struct RawEncoder<E>(PhantomData<fn(E)>);

impl<E: prost::Message> Encoder for RawEncoder<E> {
    type Item = E;
    type Error = Status;

    fn encode(&mut self, item: E, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("client encode: {e}")))
    }
}

struct RawDecoder<D>(PhantomData<fn() -> D>);

impl<D: prost::Message + Default> Decoder for RawDecoder<D> {
    type Item = D;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
        D::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("client decode: {e}")))
    }
}

fn not_utf8(rng: &mut StdRng) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..rng.random_range(1..40)).map(|_| rng.random()).collect();
    // At least one byte that can never appear in UTF-8.
    bytes.push(0xff);
    bytes
}

async fn raw_call<E, D>(channel: &Channel, path: &'static str, msg: E) -> Result<D, Status>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(authed(msg, TOKEN), path, RawCodec(PhantomData))
        .await
        .map(tonic::Response::into_inner)
}

// ---------- the run ----------

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(v) = MetadataValue::try_from(format!("Bearer {token}")) {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

/// What one request was and how it ended.
enum Outcome {
    /// OK; `writes` says whether an OK of this kind may write.
    Ok {
        writes: bool,
    },
    Refused(Status),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_never_crash_the_api_and_refusals_write_nothing() {
    let total: u64 = std::env::var("FLOTILLA_FUZZ_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_REQUESTS);
    fuzz(total, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_requests_over_tls_never_crash_the_api_and_refusals_write_nothing() {
    let total: u64 = std::env::var("FLOTILLA_FUZZ_TLS_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_TLS_REQUESTS);
    fuzz(total, Some(crate::security::Pki::new(false))).await;
}

/// `total` random requests, over TLS when `pki` is given.
async fn fuzz(total: u64, pki: Option<crate::security::Pki>) {
    let seed: u64 = std::env::var("FLOTILLA_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "fuzz: {total} requests{}, FLOTILLA_FUZZ_SEED={seed}",
        if pki.is_some() { " over TLS" } else { "" }
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).expect("namespace"),
        BusConfig::default(),
    );
    bus.ensure_streams().await.expect("streams");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_with(
        ApiState {
            pool: db.pool.clone(),
            bus,
            tokens: vec![ApiToken::from_plain("fuzz", TOKEN)].into(),
            limits: Limits {
                // Small, so accepted provisions stay cheap over 100k requests.
                max_provision_count: 5,
                ..Limits::default()
            },
            provider: None,
        },
        listener,
        Listeners {
            tls: pki.as_ref().map(|p| p.server()),
            health: None,
        },
        stop.clone(),
    ));
    struct StopOnDrop(CancellationToken);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.cancel();
        }
    }
    let _guard = StopOnDrop(stop.clone());
    let endpoint = match &pki {
        None => Channel::from_shared(format!("http://{addr}")).expect("uri"),
        Some(p) => p
            .client()
            .endpoint(&format!("https://127.0.0.1:{}", addr.port()))
            .expect("TLS endpoint"),
    };
    let channel = endpoint
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("connect");
    let fleet = FleetServiceClient::new(channel.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    // Two real pools and a few real instances, so valid names and ids occur.
    let mut pools: Vec<String> = vec!["alpha".into(), "beta".into()];
    for name in &pools {
        fleet
            .clone()
            .create_pool(authed(
                v1::CreatePoolRequest {
                    pool: Some(v1::Pool {
                        name: name.clone(),
                        provider: "sim".into(),
                        instance_type: "shared-cpu-1x".into(),
                        region: "ams".into(),
                        ..Default::default()
                    }),
                },
                TOKEN,
            ))
            .await
            .expect("pool");
    }
    let first = fleet
        .clone()
        .provision(authed(
            v1::ProvisionRequest {
                pool: "alpha".into(),
                count: 4,
                labels: [("team".to_owned(), "fuzz".to_owned())].into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .expect("seed instances")
        .into_inner();
    let mut known: Vec<String> = first.instances.iter().map(|i| i.id.clone()).collect();
    let mut keys: Vec<String> = vec!["k-1".into()];
    let mut page_tokens: Vec<String> = Vec::new();

    let mut by_code: BTreeMap<String, u64> = BTreeMap::new();
    let mut wrote_on_refusal = Vec::new();
    let mut bad_codes = Vec::new();
    let mut before = counts(&db).await;
    let started = Instant::now();
    for n in 0..total {
        let kind = rng.random_range(0..16);
        let outcome = match kind {
            0..=2 => {
                let dry_run = rng.random_ratio(1, 4);
                let req = v1::ProvisionRequest {
                    pool: string(&mut rng, &pools),
                    count: count(&mut rng),
                    names: if rng.random_ratio(1, 3) {
                        ids(&mut rng, &[])
                    } else {
                        Vec::new()
                    },
                    labels: labels(&mut rng),
                    idempotency_key: if rng.random_bool(0.5) {
                        string(&mut rng, &keys)
                    } else {
                        String::new()
                    },
                    dry_run,
                };
                if !req.idempotency_key.is_empty() && keys.len() < 64 {
                    keys.push(req.idempotency_key.clone());
                }
                match fleet.clone().provision(authed(req, TOKEN)).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        if !dry_run && known.len() < 5_000 {
                            known.extend(r.instances.iter().map(|i| i.id.clone()));
                        }
                        // A dry run writes nothing; neither does a replay.
                        Outcome::Ok {
                            writes: !dry_run && !r.replayed,
                        }
                    }
                    Err(s) => Outcome::Refused(s),
                }
            }
            3 => {
                let req = v1::TerminateRequest {
                    selector: selector(&mut rng, &pools, &known),
                    force: rng.random(),
                    reason: string(&mut rng, &[]),
                };
                match fleet.clone().terminate(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: true },
                    Err(s) => Outcome::Refused(s),
                }
            }
            4 => {
                let req = v1::DrainRequest {
                    selector: selector(&mut rng, &pools, &known),
                    reason: string(&mut rng, &[]),
                };
                match fleet.clone().drain(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: true },
                    Err(s) => Outcome::Refused(s),
                }
            }
            5 => {
                let req = v1::GetInstanceRequest {
                    id: string(&mut rng, &known),
                };
                match fleet.clone().get_instance(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: false },
                    Err(s) => Outcome::Refused(s),
                }
            }
            6 | 7 => {
                let states = (0..rng.random_range(0..4))
                    .map(|_| match rng.random_range(0..3) {
                        0 => rng.random(),
                        _ => rng.random_range(-1..17),
                    })
                    .collect();
                let req = v1::ListInstancesRequest {
                    pool: if rng.random_bool(0.5) {
                        string(&mut rng, &pools)
                    } else {
                        String::new()
                    },
                    states,
                    labels: labels(&mut rng),
                    page_size: count(&mut rng),
                    page_token: if rng.random_bool(0.5) {
                        string(&mut rng, &page_tokens)
                    } else {
                        String::new()
                    },
                    cordoned: rng.random_bool(0.3).then(|| rng.random()),
                };
                match fleet.clone().list_instances(authed(req, TOKEN)).await {
                    Ok(r) => {
                        let token = r.into_inner().next_page_token;
                        if !token.is_empty() && page_tokens.len() < 64 {
                            page_tokens.push(token);
                        }
                        Outcome::Ok { writes: false }
                    }
                    Err(s) => Outcome::Refused(s),
                }
            }
            8 => {
                let req = v1::GetInstanceHistoryRequest {
                    id: string(&mut rng, &known),
                };
                match fleet.clone().get_instance_history(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: false },
                    Err(s) => Outcome::Refused(s),
                }
            }
            9 => {
                let pool = rng.random_ratio(7, 8).then(|| pool_msg(&mut rng, &pools));
                let name = pool.as_ref().map(|p| p.name.clone());
                match fleet
                    .clone()
                    .create_pool(authed(v1::CreatePoolRequest { pool }, TOKEN))
                    .await
                {
                    Ok(_) => {
                        if let Some(name) = name {
                            pools.push(name);
                        }
                        Outcome::Ok { writes: true }
                    }
                    Err(s) => Outcome::Refused(s),
                }
            }
            10 => {
                let req = v1::UpdatePoolRequest {
                    name: string(&mut rng, &pools),
                    desired_capacity: rng.random_bool(0.5).then(|| count(&mut rng)),
                    timeouts: rng.random_bool(0.3).then(|| v1::PoolTimeouts {
                        booting_seconds: count(&mut rng),
                        installing_seconds: count(&mut rng),
                        starting_seconds: count(&mut rng),
                        draining_seconds: count(&mut rng),
                    }),
                    price_per_hour_micros: rng.random_bool(0.3).then(|| rng.random()),
                    expected_version: match rng.random_range(0..3) {
                        0 => 0,
                        1 => rng.random_range(1..4),
                        _ => rng.random(),
                    },
                    ..Default::default()
                };
                match fleet.clone().update_pool(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: true },
                    Err(s) => Outcome::Refused(s),
                }
            }
            11 => {
                let req = v1::GetPoolRequest {
                    name: string(&mut rng, &pools),
                };
                match fleet.clone().get_pool(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: false },
                    Err(s) => Outcome::Refused(s),
                }
            }
            12 => {
                // A mutating call without a valid token.
                let token = ["", "wrong", "Bearer", "fuzz-token "][rng.random_range(0..4)];
                let req = v1::ProvisionRequest {
                    pool: "alpha".into(),
                    count: 1,
                    ..Default::default()
                };
                let mut c = fleet.clone();
                let answer = if token.is_empty() {
                    c.provision(Request::new(req)).await
                } else {
                    c.provision(authed(req, token)).await
                };
                match answer {
                    Ok(_) => Outcome::Ok { writes: true },
                    Err(s) => Outcome::Refused(s),
                }
            }
            14 => {
                // The way out for a stuck instance: a reason is required.
                let req = v1::AbandonInstanceRequest {
                    id: string(&mut rng, &known),
                    reason: if rng.random_ratio(1, 4) {
                        String::new()
                    } else {
                        string(&mut rng, &[])
                    },
                };
                match fleet.clone().abandon_instance(authed(req, TOKEN)).await {
                    Ok(r) => Outcome::Ok {
                        writes: r.into_inner().abandoned,
                    },
                    Err(s) => Outcome::Refused(s),
                }
            }
            15 => {
                // Rare, so the seeded pools usually outlive the run.
                let name = if rng.random_ratio(1, 4) {
                    string(&mut rng, &pools)
                } else {
                    string(&mut rng, &[])
                };
                let req = v1::DeletePoolRequest {
                    name,
                    force: rng.random_ratio(1, 4),
                    reason: string(&mut rng, &[]),
                };
                match fleet.clone().delete_pool(authed(req, TOKEN)).await {
                    Ok(_) => Outcome::Ok { writes: true },
                    Err(s) => Outcome::Refused(s),
                }
            }
            _ => {
                // Bytes that are not UTF-8 where the API has strings.
                let answer = if rng.random_bool(0.5) {
                    let msg = RawProvision {
                        pool: not_utf8(&mut rng),
                        count: 1,
                        names: vec![not_utf8(&mut rng)],
                        idempotency_key: not_utf8(&mut rng),
                    };
                    raw_call::<_, v1::ProvisionResponse>(
                        &channel,
                        "/flotilla.v1.FleetService/Provision",
                        msg,
                    )
                    .await
                    .map(|_| ())
                } else {
                    let msg = RawGet {
                        id: not_utf8(&mut rng),
                    };
                    raw_call::<_, v1::Instance>(
                        &channel,
                        "/flotilla.v1.FleetService/GetInstance",
                        msg,
                    )
                    .await
                    .map(|_| ())
                };
                match answer {
                    Ok(()) => Outcome::Ok { writes: true },
                    // Refused before any handler runs, by the servers'
                    // codec: INVALID_ARGUMENT naming the field, never
                    // INTERNAL (checked with every other refusal below).
                    Err(s) => {
                        if s.code() == Code::InvalidArgument
                            && !s.message().contains(": cannot be decoded: ")
                        {
                            bad_codes.push(format!(
                                "request {n} (kind {kind}): an undecodable request refused for another reason: {s:?}"
                            ));
                        }
                        Outcome::Refused(s)
                    }
                }
            }
        };
        match outcome {
            Outcome::Ok { writes } => {
                *by_code.entry("Ok".into()).or_default() += 1;
                if writes {
                    before = counts(&db).await;
                } else {
                    let after = counts(&db).await;
                    if after != before {
                        wrote_on_refusal.push(format!(
                            "request {n} (kind {kind}) answered OK as read-only but wrote: {before:?} -> {after:?}"
                        ));
                        before = after;
                    }
                }
            }
            Outcome::Refused(status) => {
                *by_code.entry(format!("{:?}", status.code())).or_default() += 1;
                if !REFUSALS.contains(&status.code()) {
                    bad_codes.push(format!("request {n} (kind {kind}): {status:?}"));
                }
                let after = counts(&db).await;
                if after != before {
                    wrote_on_refusal.push(format!(
                        "request {n} (kind {kind}) refused with {:?} but wrote: {before:?} -> {after:?}",
                        status.code()
                    ));
                    before = after;
                }
            }
        }
        assert!(
            !server.is_finished(),
            "the api server stopped at request {n}"
        );
    }
    let took = started.elapsed();
    eprintln!(
        "fuzz: {total} requests in {:.1}s ({:.0}/s), answers {by_code:?}",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    // Still serving after all of it.
    fleet
        .clone()
        .list_pools(authed(v1::ListPoolsRequest {}, TOKEN))
        .await
        .expect("the api still answers");
    assert!(
        bad_codes.is_empty(),
        "{} refusals with a code a caller cannot act on (seed {seed}):\n{}",
        bad_codes.len(),
        bad_codes
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        wrote_on_refusal.is_empty(),
        "{} refusals that wrote (seed {seed}):\n{}",
        wrote_on_refusal.len(),
        wrote_on_refusal
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
