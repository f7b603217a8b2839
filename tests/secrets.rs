//! No secret leaks: a whole lifecycle over TLS (api and provider-adapter
//! serving TLS with a test CA, the loops calling the adapter with the
//! service token, real agents verifying the api with the CA they were
//! handed), with every log line and span of the in-process services, the
//! metrics, the agents' logs, the local provider's bookkeeping and the
//! database rows captured, then scanned for every secret the run used:
//! the API tokens, the service token, each worker token (read from the
//! agents' environments), the TLS private key and the provider credential.
//! A secret planted in a log line on purpose is found, so the scan is known
//! to look where the services write.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use flotilla_api::{ApiState, ApiToken, Limits, Listeners, Scope, serve_with};
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_bus::{Bus, OutboxRelay};
use flotilla_core::config::AdapterClientArgs;
use flotilla_core::token::HashedToken;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_provider_adapter::{Access, AdapterArgs, registry};
use flotilla_scheduler::{Scheduler, SchedulerTuning};
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::tls::ClientTls;
use flotilla_terminator::{Terminator, TerminatorTuning};
use flotilla_test_utils::wait::eventually;
use flotilla_test_utils::{TestDb, TestNats};
use flotilla_watchdog::{Watchdog, WatchdogTuning};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};
use tracing_subscriber::layer::SubscriberExt;

const ADMIN: &str = "secret-admin-api-token-7f3a";
const READER: &str = "secret-read-api-token-91c2";
const SERVICE: &str = "secret-service-token-5d8e";
const SIM_CREDENTIAL: &str = "secret-provider-credential-a41b";
/// Logged on purpose: the scan must find it.
const PLANTED: &str = "planted-secret-canary-0b6d";

#[derive(Parser)]
struct S {
    #[command(flatten)]
    t: SchedulerTuning,
}
#[derive(Parser)]
struct T {
    #[command(flatten)]
    t: TerminatorTuning,
}
#[derive(Parser)]
struct W {
    #[command(flatten)]
    t: WatchdogTuning,
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).expect("header"),
    );
    r
}

/// A `MakeWriter` keeping every formatted log line.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// A CA and one server certificate for 127.0.0.1, serving both the api
/// and the adapter.
struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    Pki {
        ca: ca.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// Machine id -> pid of the local provider's processes.
fn pids(state_dir: &Path) -> BTreeMap<String, i32> {
    let text = std::fs::read_to_string(state_dir.join("machines.json")).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    json["machines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["id"].as_str()?.to_owned(),
                i32::try_from(m["pid"].as_i64()?).ok()?,
            ))
        })
        .collect()
}

/// Kills the agents the test started, also when it fails.
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in pids(&self.0).into_values() {
            let _ = kill(Pid::from_raw(-pid), Signal::SIGKILL);
        }
    }
}

async fn count(db: &TestDb, pool: &str, states: &[&str]) -> usize {
    let states: Vec<String> = states.iter().map(|s| (*s).to_owned()).collect();
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM instances WHERE pool = $1 AND state = ANY($2)")
            .bind(pool)
            .bind(&states)
            .fetch_one(&db.pool)
            .await
            .expect("count");
    usize::try_from(n).unwrap_or(0)
}

// Current-thread: the capturing subscriber is this thread's default, and
// every service of the test runs on this thread.
#[tokio::test]
async fn a_whole_lifecycle_over_tls_leaves_no_secret_in_logs_spans_metrics_or_files() {
    let logs = Captured::default();
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new(
            "debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info",
        ))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(true)
                .with_span_list(true)
                .with_writer(logs.clone()),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("secrets")));
    let _default = tracing::subscriber::set_default(subscriber);
    let metrics = flotilla_telemetry::metrics::install();
    tracing::info!(
        canary = PLANTED,
        "a planted secret, to prove the scan looks here"
    );

    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state_dir = dir.path().join("local");
    let _reaper = Reaper(state_dir.clone());
    let stop = CancellationToken::new();
    let pki = pki();
    let tls = || {
        flotilla_telemetry::tls::server_tls(
            ("API_TLS_CERT", Some(&pki.cert)),
            ("API_TLS_KEY", Some(&pki.key)),
        )
        .expect("pair")
    };

    // The adapter: local processes and the simulated cloud (whose token is
    // the provider credential), TLS, service token holders only.
    let sim = flotilla_sim_provider::start(flotilla_sim_provider::SimConfig {
        token: SIM_CREDENTIAL.into(),
        faults: flotilla_test_utils::stack::instant(),
        ..Default::default()
    })
    .await
    .expect("sim");
    let args = AdapterArgs::try_parse_from([
        "provider-adapter",
        "--local-provider-enabled",
        "true",
        "--local-state-dir",
        state_dir.to_str().expect("utf-8"),
        "--sim-api-base-url",
        sim.url(),
        "--sim-api-token",
        SIM_CREDENTIAL,
        "--provider-retry-max-attempts",
        "0",
    ])
    .expect("adapter args");
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let adapter_listener = bind().await.expect("bind");
    let adapter_url = format!(
        "https://127.0.0.1:{}",
        adapter_listener.local_addr().expect("addr").port()
    );
    tokio::spawn(flotilla_provider_adapter::serve(
        Arc::new(registry(&args).expect("registry")),
        Access {
            tokens: vec![HashedToken::from_plain("services", SERVICE)].into(),
            tls: tls(),
            health: None,
        },
        adapter_listener,
        stop.clone(),
    ));
    // What scheduler, terminator and watchdog build from their settings.
    let adapter = flotilla_runtime::service::provider_client(
        &adapter_url,
        &AdapterClientArgs {
            provider_adapter_token: SERVICE.parse().expect("infallible"),
            provider_adapter_ca: Some(pki.ca.clone()),
            ..Default::default()
        },
    )
    .expect("adapter client");

    // The api over TLS, with an admin and a read-only token.
    let bus = Bus::new(
        nats.client.clone(),
        Namespace::new(&nats.namespace).expect("ns"),
        BusConfig::default(),
    );
    bus.ensure_streams().await.expect("streams");
    let api_listener = bind().await.expect("bind");
    let api_url = format!(
        "https://127.0.0.1:{}",
        api_listener.local_addr().expect("addr").port()
    );
    tokio::spawn(serve_with(
        ApiState {
            pool: db.pool.clone(),
            bus: bus.clone(),
            tokens: vec![
                ApiToken::from_plain("ops", ADMIN),
                ApiToken::scoped("dashboard", READER, Scope::Read),
            ]
            .into(),
            limits: Limits {
                heartbeat_interval_ms: 200,
                ..Limits::default()
            },
            provider: Some(adapter.clone()),
        },
        api_listener,
        Listeners {
            tls: tls(),
            health: None,
        },
        stop.clone(),
    ));
    let relay = OutboxRelay::new(db.pool.clone(), bus.clone());
    tokio::spawn({
        let stop = stop.clone();
        async move { relay.run(stop).await }
    });

    let mut tuning = S::try_parse_from(["x", "--scheduler-tick-ms", "200"])
        .expect("s")
        .t;
    tuning.worker_api_ca = Some(pki.ca.clone());
    tokio::spawn(
        Scheduler {
            db: db.pool.clone(),
            provider: adapter.clone(),
            tuning,
            owner: "scheduler".into(),
            worker_api_url: api_url.clone(),
            crash_after: None,
        }
        .run(Some(bus.clone()), stop.clone()),
    );
    tokio::spawn(
        Terminator {
            db: db.pool.clone(),
            provider: adapter.clone(),
            tuning: T::try_parse_from([
                "x",
                "--terminator-tick-ms",
                "200",
                "--drain-timeout-seconds",
                "1",
                "--stop-grace-seconds",
                "1",
            ])
            .expect("t")
            .t,
            owner: "terminator".into(),
        }
        .run(Some(bus.clone()), stop.clone()),
    );
    tokio::spawn(
        Watchdog {
            db: db.pool.clone(),
            provider: adapter.clone(),
            tuning: W::try_parse_from(["x", "--watchdog-tick-ms", "200"])
                .expect("w")
                .t,
            owner: "watchdog".into(),
        }
        .run(stop.clone()),
    );

    // The CLI's way in: https, trusting the CA.
    let channel = ClientTls::new(
        "FLOTILLA_API_URL",
        "FLOTILLA_API_CA",
        "FLOTILLA_ALLOW_PLAINTEXT",
    )
    .with_ca(Some(&pki.ca))
    .expect("ca")
    .endpoint(&api_url)
    .expect("endpoint")
    .connect()
    .await
    .expect("api over TLS");
    let mut fleet = FleetServiceClient::new(channel);
    for (name, provider, instance_type, region, image) in [
        (
            "local",
            "local",
            "process",
            "local",
            env!("CARGO_BIN_EXE_e2e-agent"),
        ),
        ("cloud", "sim", "shared-cpu-1x", "ams", "registry/worker:1"),
    ] {
        fleet
            .create_pool(authed(
                v1::CreatePoolRequest {
                    pool: Some(v1::Pool {
                        name: name.into(),
                        provider: provider.into(),
                        instance_type: instance_type.into(),
                        region: region.into(),
                        image: image.into(),
                        ..Default::default()
                    }),
                },
                ADMIN,
            ))
            .await
            .expect("pool");
    }
    let mut refusals = Vec::new();
    for token in [READER, "not-a-token"] {
        let err = fleet
            .provision(authed(
                v1::ProvisionRequest {
                    pool: "local".into(),
                    count: 1,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect_err("refused");
        assert!(matches!(
            err.code(),
            Code::PermissionDenied | Code::Unauthenticated
        ));
        refusals.push(format!("{err:?}"));
    }
    for (pool, n) in [("local", 2), ("cloud", 1)] {
        fleet
            .provision(authed(
                v1::ProvisionRequest {
                    pool: pool.into(),
                    count: n,
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .expect("provision");
    }

    // Real agents reach ready over TLS; the cloud's machine boots.
    eventually("2 local agents ready", Duration::from_secs(60), || async {
        count(&db, "local", &["ready"]).await == 2
    })
    .await;
    eventually(
        "the cloud instance booting",
        Duration::from_secs(30),
        || async { count(&db, "cloud", &["booting", "ready"]).await == 1 },
    )
    .await;
    let mut worker_tokens = Vec::new();
    for pid in pids(&state_dir).into_values() {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("agent environment");
        for var in environ.split(|b| *b == 0) {
            if let Some(token) = var.strip_prefix(b"FLOTILLA_WORKER_TOKEN=") {
                worker_tokens.push(String::from_utf8_lossy(token).into_owned());
            }
        }
    }
    assert_eq!(
        worker_tokens.len(),
        2,
        "each agent was given a worker token"
    );
    // The bookkeeping while the machines exist (a terminated machine's
    // record is gone by the end).
    let mut files_while_ready: Vec<(String, String)> = walk(&state_dir)
        .into_iter()
        .map(|p| {
            let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()).into_owned();
            (format!("{} (while ready)", p.display()), text)
        })
        .collect();
    assert!(
        files_while_ready
            .iter()
            .any(|(p, _)| p.contains("machines.json")),
        "no bookkeeping to scan"
    );

    for pool in ["local", "cloud"] {
        fleet
            .terminate(authed(
                v1::TerminateRequest {
                    selector: Some(v1::InstanceSelector {
                        pool: pool.into(),
                        ..Default::default()
                    }),
                    force: false,
                    reason: "test done".into(),
                },
                ADMIN,
            ))
            .await
            .expect("terminate");
    }
    eventually(
        "every instance terminated",
        Duration::from_secs(60),
        || async {
            count(&db, "local", &["terminated"]).await == 2
                && count(&db, "cloud", &["terminated"]).await == 1
        },
    )
    .await;
    stop.cancel();
    let _ = provider.force_flush();

    // Everything the run wrote down.
    let mut corpus: Vec<(String, String)> = Vec::new();
    corpus.push((
        "logs".into(),
        String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned(),
    ));
    let spans = exporter.get_finished_spans().expect("spans");
    assert!(!spans.is_empty(), "no span was captured");
    corpus.push((
        "spans".into(),
        spans
            .iter()
            .map(|s| {
                format!(
                    "{} {:?} {:?} {:?}",
                    s.name, s.attributes, s.events, s.status
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    ));
    corpus.push(("metrics".into(), metrics.render()));
    corpus.push(("refusals".into(), refusals.join("\n")));
    for entry in walk(&state_dir) {
        let text = String::from_utf8_lossy(&std::fs::read(&entry).unwrap_or_default()).into_owned();
        corpus.push((entry.display().to_string(), text));
    }
    corpus.append(&mut files_while_ready);
    for table in [
        "instances",
        "action_logs",
        "outbox",
        "pools",
        "idempotency_records",
    ] {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT row_to_json(t)::text FROM {table} t"))
                .fetch_all(&db.pool)
                .await
                .expect("rows");
        corpus.push((format!("table {table}"), rows.join("\n")));
    }

    let found = |needle: &str| -> Vec<String> {
        corpus
            .iter()
            .filter(|(_, text)| text.contains(needle))
            .map(|(where_, _)| where_.clone())
            .collect()
    };
    assert_eq!(
        found(PLANTED),
        ["logs"],
        "the planted secret is where it was logged"
    );
    // The key's base64 body, line by line: any of it in the open is a leak.
    let key_lines: Vec<&str> = pki
        .key
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    let mut secrets: Vec<(&str, String)> = vec![
        ("the admin API token", ADMIN.into()),
        ("the read-only API token", READER.into()),
        ("the service token", SERVICE.into()),
        ("the provider credential", SIM_CREDENTIAL.into()),
    ];
    secrets.extend(worker_tokens.iter().map(|t| ("a worker token", t.clone())));
    secrets.extend(
        key_lines
            .iter()
            .map(|l| ("the TLS private key", (*l).to_owned())),
    );
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        let places = found(secret);
        if !places.is_empty() {
            leaks.push(format!("{what} in {places:?}"));
        }
    }
    assert!(leaks.is_empty(), "secrets leaked: {leaks:#?}");
    println!(
        "scanned {} log bytes, {} spans, {} metric bytes, {} files and tables for {} secrets: none found",
        corpus[0].1.len(),
        spans.len(),
        corpus[2].1.len(),
        corpus.len() - 4,
        secrets.len()
    );
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}
