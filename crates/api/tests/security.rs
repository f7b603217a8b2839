//! The api's security over real gRPC: what each token scope may call
//! (every mutating RPC of the service descriptor refused to a read-only
//! token, writing nothing), the token name in the audit log, several
//! tokens valid at once, and TLS: a client trusting the CA is served; a
//! wrong CA, an expired certificate and plaintext on either side are
//! refused with errors that say why, and write nothing; health answers
//! without a token, and in plaintext on its own listener.
//!
//! Certificates are made here with `rcgen`, never checked in.

use std::collections::BTreeSet;

use flotilla_api::auth::{ADMIN_METHODS, READ_ONLY_METHODS};
use flotilla_api::{ApiState, ApiToken, Limits, Listeners, Scope, serve_with};
use flotilla_bus::Bus;
use flotilla_bus::streams::BusConfig;
use flotilla_bus::subjects::Namespace;
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_telemetry::CancellationToken;
use flotilla_telemetry::tls::{ClientTls, error_chain};
use flotilla_test_utils::{TestDb, TestNats};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};
use tonic::Code;
use tonic::transport::{Channel, ServerTlsConfig};

use crate::common::with_token;

const ADMIN: &str = "admin-token-for-tests";
const READER: &str = "read-only-token-for-tests";
const FLEET: &str = "flotilla.v1.FleetService";

/// Tables a FleetService call may write.
const TABLES: &[&str] = &[
    "instances",
    "outbox",
    "idempotency_records",
    "action_logs",
    "pools",
    "instance_volumes",
];

/// A test CA and a server certificate (for `localhost` and 127.0.0.1) it
/// signed, as PEM.
pub(crate) struct Pki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    /// `expired`: the server certificate's validity ended in 2021.
    pub(crate) fn new(expired: bool) -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Each CA its own name: a client then cannot even find the issuer
        // of a certificate another CA signed.
        ca.distinguished_name.push(
            DnType::CommonName,
            format!("Flotilla test CA {}", rand::random::<u32>()),
        );
        let ca =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key")).expect("ca");
        let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "flotilla api");
        if expired {
            server.not_before = date_time_ymd(2020, 1, 1);
            server.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("server key");
        let cert = server.signed_by(&key, &ca).expect("server cert");
        Pki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// The server side, through the same path as API_TLS_CERT/API_TLS_KEY.
    pub(crate) fn server(&self) -> ServerTlsConfig {
        flotilla_telemetry::tls::server_tls(
            ("API_TLS_CERT", Some(&self.cert_pem)),
            ("API_TLS_KEY", Some(&self.key_pem)),
        )
        .expect("usable pair")
        .expect("TLS")
    }

    /// A client that trusts this CA only.
    pub(crate) fn client(&self) -> ClientTls {
        ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "FLOTILLA_ALLOW_PLAINTEXT",
        )
        .with_ca(Some(&self.ca_pem))
        .expect("CA")
    }
}

struct Secure {
    db: TestDb,
    addr: std::net::SocketAddr,
    health: std::net::SocketAddr,
    stop: CancellationToken,
    _nats: TestNats,
}

impl Drop for Secure {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Secure {
    async fn start(tokens: Vec<ApiToken>, tls: Option<ServerTlsConfig>) -> Secure {
        let db = TestDb::new().await;
        let nats = TestNats::new().await;
        let bus = Bus::new(
            nats.client.clone(),
            Namespace::new(&nats.namespace).expect("namespace"),
            BusConfig::default(),
        );
        bus.ensure_streams().await.expect("streams");
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let (listener, health) = (bind().await.expect("bind"), bind().await.expect("bind"));
        let (addr, health_addr) = (
            listener.local_addr().expect("addr"),
            health.local_addr().expect("addr"),
        );
        let stop = CancellationToken::new();
        let state = ApiState {
            pool: db.pool.clone(),
            bus,
            tokens: tokens.into(),
            limits: Limits::default(),
            provider: None,
        };
        let extra = Listeners {
            tls,
            health: Some(health),
        };
        tokio::spawn(serve_with(state, listener, extra, stop.clone()));
        Secure {
            db,
            addr,
            health: health_addr,
            stop,
            _nats: nats,
        }
    }

    async fn counts(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for t in TABLES {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
                .fetch_one(&self.db.pool)
                .await
                .expect("count");
            out.push(((*t).to_owned(), n));
        }
        out
    }

    async fn plain_channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }
}

fn tokens() -> Vec<ApiToken> {
    vec![
        ApiToken::from_plain("ci", ADMIN),
        ApiToken::scoped("dashboard", READER, Scope::Read),
    ]
}

/// FleetService's methods as the compiled descriptor set has them, with
/// whether each streams its answer.
fn fleet_methods() -> Vec<(String, bool)> {
    let set = prost_types::FileDescriptorSet::decode(flotilla_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            if format!("{}.{}", file.package(), service.name()) == FLEET {
                for m in &service.method {
                    methods.push((m.name().to_owned(), m.server_streaming()));
                }
            }
        }
    }
    assert!(!methods.is_empty(), "{FLEET} not in the descriptor set");
    methods
}

/// An empty message: enough to reach the service's checks, which run
/// before its request is decoded.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// Calls `method` of FleetService with an empty request and `token`.
async fn call(channel: Channel, method: &str, streaming: bool, token: &str) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::try_from(format!("/{FLEET}/{method}")).expect("path");
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    let req = with_token(Empty {}, token);
    let answer = if streaming {
        grpc.server_streaming(req, path, codec).await.map(drop)
    } else {
        grpc.unary(req, path, codec).await.map(drop)
    };
    answer.err().unwrap_or_else(|| tonic::Status::ok(""))
}

#[test]
fn every_fleet_rpc_is_classified_read_only_or_admin_in_the_scope_table() {
    let methods: BTreeSet<String> = fleet_methods().into_iter().map(|(m, _)| m).collect();
    let read: BTreeSet<String> = READ_ONLY_METHODS.iter().map(|m| m.to_string()).collect();
    let admin: BTreeSet<String> = ADMIN_METHODS.iter().map(|m| m.to_string()).collect();
    let unclassified: Vec<_> = methods
        .iter()
        .filter(|m| !read.contains(*m) && !admin.contains(*m))
        .collect();
    assert!(
        unclassified.is_empty(),
        "FleetService methods in no scope list of crates/api/src/auth.rs \
         (READ_ONLY_METHODS or ADMIN_METHODS): {unclassified:?}"
    );
    let both: Vec<_> = read.intersection(&admin).collect();
    assert!(both.is_empty(), "in both scope lists: {both:?}");
    let stale: Vec<_> = read
        .union(&admin)
        .filter(|m| !methods.contains(*m))
        .collect();
    assert!(
        stale.is_empty(),
        "scope lists name methods the service lacks: {stale:?}"
    );
}

#[tokio::test]
async fn a_read_only_token_is_denied_every_mutating_rpc_and_nothing_changes() {
    let api = Secure::start(tokens(), None).await;
    let mut fleet = FleetServiceClient::new(api.plain_channel().await);
    fleet
        .create_pool(with_token(
            v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: "gpu".into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    ..Default::default()
                }),
            },
            ADMIN,
        ))
        .await
        .expect("admin creates a pool");
    fleet
        .provision(with_token(
            v1::ProvisionRequest {
                pool: "gpu".into(),
                count: 1,
                ..Default::default()
            },
            ADMIN,
        ))
        .await
        .expect("admin provisions");
    let before = api.counts().await;

    let mut denied = Vec::new();
    for (method, streaming) in fleet_methods() {
        let status = call(api.plain_channel().await, &method, streaming, READER).await;
        if READ_ONLY_METHODS.contains(&method.as_str()) {
            assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "{method} refused to a read-only token: {status:?}"
            );
        } else {
            assert_eq!(
                status.code(),
                Code::PermissionDenied,
                "{method} with a read-only token: {status:?}"
            );
            assert!(status.message().contains("read-only"), "{status:?}");
            denied.push(method);
        }
    }
    assert!(denied.contains(&"Provision".to_owned()), "{denied:?}");
    assert_eq!(api.counts().await, before, "a denied call wrote");

    // Typed: what the CLI would send.
    let err = fleet
        .provision(with_token(
            v1::ProvisionRequest {
                pool: "gpu".into(),
                count: 1,
                ..Default::default()
            },
            READER,
        ))
        .await
        .expect_err("denied");
    assert_eq!(err.code(), Code::PermissionDenied);
    let listed = fleet
        .list_instances(with_token(v1::ListInstancesRequest::default(), READER))
        .await
        .expect("reads")
        .into_inner();
    assert_eq!(listed.instances.len(), 1);
    assert_eq!(api.counts().await, before);
}

#[tokio::test]
async fn tokens_rotate_without_downtime_and_the_audit_log_names_the_one_that_acted() {
    let old = "rotating-old-token";
    let new = "rotating-new-token";
    let api = Secure::start(
        vec![
            ApiToken::from_plain("ci-2025", old),
            ApiToken::from_plain("ci-2026", new),
        ],
        None,
    )
    .await;
    let mut fleet = FleetServiceClient::new(api.plain_channel().await);
    fleet
        .create_pool(with_token(
            v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: "gpu".into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    ..Default::default()
                }),
            },
            old,
        ))
        .await
        .expect("old token still valid");
    let mut ids = Vec::new();
    for token in [old, new] {
        let answer = fleet
            .provision(with_token(
                v1::ProvisionRequest {
                    pool: "gpu".into(),
                    count: 1,
                    ..Default::default()
                },
                token,
            ))
            .await
            .expect("both tokens valid at once")
            .into_inner();
        ids.push(answer.instances[0].id.clone());
    }
    for (id, name) in ids.iter().zip(["api:ci-2025", "api:ci-2026"]) {
        let history = fleet
            .get_instance_history(with_token(
                v1::GetInstanceHistoryRequest { id: id.clone() },
                new,
            ))
            .await
            .expect("history")
            .into_inner();
        assert!(
            history.entries.iter().any(|e| e.actor == name),
            "{name} not in {:?}",
            history.entries
        );
    }
}

/// How a connection attempt ended: the error chain, or "" if it worked.
async fn connect_error(endpoint: tonic::transport::Endpoint) -> String {
    match endpoint.connect().await {
        Ok(_) => String::new(),
        Err(e) => error_chain(&e),
    }
}

#[tokio::test]
async fn over_tls_a_client_trusting_the_ca_is_served_and_health_needs_no_token_nor_tls() {
    let pki = Pki::new(false);
    let api = Secure::start(tokens(), Some(pki.server())).await;
    let url = format!("https://127.0.0.1:{}", api.addr.port());
    let channel = pki
        .client()
        .endpoint(&url)
        .expect("endpoint")
        .connect()
        .await
        .expect("TLS handshake with a trusted CA");
    let mut fleet = FleetServiceClient::new(channel.clone());
    fleet
        .create_pool(with_token(
            v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: "gpu".into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    ..Default::default()
                }),
            },
            ADMIN,
        ))
        .await
        .expect("served over TLS");

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    // On the TLS port, without a token.
    let on_tls = HealthClient::new(channel)
        .check(check(FLEET))
        .await
        .expect("health over TLS")
        .into_inner();
    assert_eq!(on_tls.status(), ServingStatus::Serving);
    // On the health-only listener, in plaintext: health and nothing else.
    let plain = Channel::from_shared(format!("http://{}", api.health))
        .expect("uri")
        .connect()
        .await
        .expect("health listener");
    let answer = HealthClient::new(plain.clone())
        .check(check(FLEET))
        .await
        .expect("plaintext health")
        .into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);
    let err = FleetServiceClient::new(plain)
        .list_pools(with_token(v1::ListPoolsRequest::default(), ADMIN))
        .await
        .expect_err("the health listener serves health only");
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test]
async fn a_wrong_ca_an_expired_certificate_or_plaintext_is_refused_clearly_and_writes_nothing() {
    let pki = Pki::new(false);
    let api = Secure::start(tokens(), Some(pki.server())).await;
    let url = format!("https://127.0.0.1:{}", api.addr.port());

    // A CA that did not sign the server's certificate.
    let stranger = Pki::new(false);
    let err = connect_error(stranger.client().endpoint(&url).expect("endpoint")).await;
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "wrong CA: {err}"
    );

    // Plaintext to the TLS port: no gRPC answer, and nothing written.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", api.addr))
        .expect("uri")
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(5));
    if let Ok(channel) = plain.connect().await {
        let err = FleetServiceClient::new(channel)
            .provision(with_token(
                v1::ProvisionRequest {
                    pool: "gpu".into(),
                    count: 1,
                    ..Default::default()
                },
                ADMIN,
            ))
            .await
            .expect_err("plaintext to a TLS port");
        assert_ne!(err.code(), Code::Ok);
    }

    // TLS to a plaintext server.
    let plaintext_api = Secure::start(tokens(), None).await;
    let err = connect_error(
        pki.client()
            .endpoint(&format!("https://127.0.0.1:{}", plaintext_api.addr.port()))
            .expect("endpoint"),
    )
    .await;
    assert!(!err.is_empty(), "TLS to a plaintext server connected");

    // A certificate that expired.
    let old = Pki::new(true);
    let expired_api = Secure::start(tokens(), Some(old.server())).await;
    let err = connect_error(
        old.client()
            .endpoint(&format!("https://127.0.0.1:{}", expired_api.addr.port()))
            .expect("endpoint"),
    )
    .await;
    assert!(err.to_lowercase().contains("expired"), "expired: {err}");

    for server in [&api, &plaintext_api, &expired_api] {
        assert!(
            server.counts().await.iter().all(|(_, n)| *n == 0),
            "a refused connection wrote: {:?}",
            server.counts().await
        );
    }
}
