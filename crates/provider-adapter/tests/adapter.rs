//! The Provider API over real gRPC, in front of the simulated cloud: the
//! lifecycle, refusals as status codes, and bad input refused before it
//! reaches a provider.

use std::sync::Arc;

use clap::Parser;
use flotilla_core::InstanceId;
use flotilla_proto::client::AdapterClient;
use flotilla_proto::status::RETRY_AFTER_MS;
use flotilla_proto::v1;
use flotilla_provider_adapter::{AdapterArgs, registry, serve};
use flotilla_sim_provider::{ErrorRates, Faults, Operation, SimConfig, SimHandle};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::stack::{connect_adapter, test_access};
use tonic::Code;
use tonic::transport::Channel;

struct Stack {
    sim: SimHandle,
    client: AdapterClient,
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn stack() -> Stack {
    let sim = flotilla_sim_provider::start(SimConfig {
        faults: Faults {
            start_delay_ms: 20,
            stop_delay_ms: 20,
            destroy_delay_ms: 10,
            destroyed_linger_ms: 50,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let args = AdapterArgs::try_parse_from([
        "provider-adapter",
        "--sim-api-base-url",
        sim.url(),
        "--sim-api-token",
        sim.token(),
        "--control-plane-id",
        "cp-test",
        "--provider-request-timeout-seconds",
        "5",
        "--provider-retry-max-attempts",
        "0",
    ])
    .unwrap();
    let registry = Arc::new(registry(&args).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve(registry, test_access(), listener, stop.clone()));
    let client = connect_adapter(&format!("http://{addr}")).await;
    Stack {
        sim,
        client,
        addr,
        stop,
        server,
    }
}

fn target() -> Option<v1::ProviderTarget> {
    Some(v1::ProviderTarget {
        provider: "sim".into(),
        pool: "gpu".into(),
        region: "ams".into(),
    })
}

fn create(start: bool) -> v1::CreateMachineRequest {
    v1::CreateMachineRequest {
        target: target(),
        instance_id: InstanceId::new().to_string(),
        name: "w-1".into(),
        instance_type: "shared-cpu-1x".into(),
        image: "registry/worker:1".into(),
        start,
        ..Default::default()
    }
}

fn wait(id: &str, state: v1::MachineState) -> v1::WaitMachineRequest {
    v1::WaitMachineRequest {
        target: target(),
        machine_id: id.into(),
        state: state as i32,
        timeout: Some(prost_types::Duration {
            seconds: 5,
            nanos: 0,
        }),
    }
}

fn mref(id: &str) -> v1::MachineRef {
    v1::MachineRef {
        target: target(),
        machine_id: id.into(),
    }
}

#[tokio::test]
async fn a_machine_is_created_stopped_and_deleted_over_grpc() {
    let mut s = stack().await;
    let m = s
        .client
        .create_machine(create(true))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.tags["flotilla_control_plane"], "cp-test");
    s.client
        .wait_machine(wait(&m.id, v1::MachineState::Started))
        .await
        .unwrap();
    s.client
        .stop_machine(v1::StopMachineRequest {
            target: target(),
            machine_id: m.id.clone(),
            grace: None,
            suspend: false,
        })
        .await
        .unwrap();
    s.client
        .wait_machine(wait(&m.id, v1::MachineState::Stopped))
        .await
        .unwrap();
    s.client
        .delete_machine(v1::DeleteMachineRequest {
            target: target(),
            machine_id: m.id.clone(),
            force: false,
        })
        .await
        .unwrap();
    s.client
        .wait_machine(wait(&m.id, v1::MachineState::Destroyed))
        .await
        .unwrap();
    // Destroyed lingers a moment, then the machine is gone.
    let client = s.client.clone();
    flotilla_test_utils::eventually(
        "the destroyed machine gone",
        flotilla_test_utils::DEADLINE,
        || {
            let mut client = client.clone();
            let id = m.id.clone();
            async move {
                match client.get_machine(mref(&id)).await {
                    Ok(_) => false,
                    // Polled faster than Fly's per-machine read limit.
                    Err(err) if err.code() == Code::ResourceExhausted => false,
                    Err(err) => {
                        assert_eq!(err.code(), Code::NotFound);
                        true
                    }
                }
            }
        },
    )
    .await;

    s.stop.cancel();
    s.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn provider_refusals_arrive_as_their_status_codes() {
    let mut s = stack().await;
    let m = s
        .client
        .create_machine(create(true))
        .await
        .unwrap()
        .into_inner();
    s.client
        .wait_machine(wait(&m.id, v1::MachineState::Started))
        .await
        .unwrap();
    let err = s
        .client
        .delete_machine(v1::DeleteMachineRequest {
            target: target(),
            machine_id: m.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    let mut f = s.sim.sim().faults();
    f.retry_after_secs = 3;
    f.error_rate.insert(
        Operation::Create,
        ErrorRates {
            rate_429: 1.0,
            ..Default::default()
        },
    );
    s.sim.sim().set_faults(f).unwrap();
    let err = s.client.create_machine(create(true)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(
        err.metadata()
            .get(RETRY_AFTER_MS)
            .and_then(|v| v.to_str().ok()),
        Some("3000")
    );

    s.sim
        .sim()
        .update_faults(|f| {
            f.error_rate.clear();
            f.start_fails_rate = 1.0;
        })
        .unwrap();
    let created = s
        .client
        .create_machine(create(false))
        .await
        .unwrap()
        .into_inner();
    let err = s.client.start_machine(mref(&created.id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field_and_reaches_no_provider() {
    let mut s = stack().await;
    let mut cases: Vec<(&str, v1::CreateMachineRequest)> = Vec::new();
    let mut r = create(true);
    r.target = None;
    cases.push(("target", r));
    let mut r = create(true);
    r.target.as_mut().unwrap().provider = "aws".into();
    cases.push(("target.provider", r));
    let mut r = create(true);
    r.target.as_mut().unwrap().pool = "Bad Pool!".into();
    cases.push(("target.pool", r));
    let mut r = create(true);
    r.instance_id = "not-a-uuid".into();
    cases.push(("instance_id", r));
    let mut r = create(true);
    r.instance_id = String::new();
    cases.push(("instance_id", r));
    let mut r = create(true);
    r.name = "x".repeat(100);
    cases.push(("name", r));
    let mut r = create(true);
    r.image = String::new();
    cases.push(("image", r));
    let mut r = create(true);
    r.env = (0..100).map(|i| (format!("K{i}"), "v".into())).collect();
    cases.push(("env", r));
    let mut r = create(true);
    r.tags
        .insert("flotilla_instance_id".into(), "forged".into());
    cases.push(("tags", r));
    let mut r = create(true);
    r.instance_type = "enormous".into();
    cases.push(("instance_type", r));
    for (field, req) in cases {
        let err = s.client.create_machine(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(
            err.message().starts_with(&format!("{field}:"))
                || err.message().contains(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    assert_eq!(s.sim.sim().stats().total(Operation::Create), 0);
    assert_eq!(s.sim.sim().machines().len(), 0);

    let err = s.client.get_machine(mref("")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("machine_id:"),
        "{}",
        err.message()
    );
    for size in [0, 10_001, u32::MAX] {
        let err = s
            .client
            .create_volume(v1::CreateVolumeRequest {
                target: target(),
                instance_id: InstanceId::new().to_string(),
                name: String::new(),
                size_gb: size,
                tags: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("size_gb:"), "{}", err.message());
    }
    let err = s
        .client
        .wait_machine(wait("m1", v1::MachineState::Starting))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("state:"), "{}", err.message());
    let mut w = wait("m1", v1::MachineState::Started);
    w.timeout = Some(prost_types::Duration {
        seconds: 3600,
        nanos: 0,
    });
    let err = s.client.wait_machine(w).await.unwrap_err();
    assert!(err.message().starts_with("timeout:"), "{}", err.message());
    let err = s
        .client
        .list_machines(v1::ListMachinesRequest {
            target: target(),
            page_size: 1_000_000,
            page_token: String::new(),
            instance_id: String::new(),
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("page_size:"), "{}", err.message());
    assert_eq!(s.sim.sim().stats().total(Operation::Get), 0);
    assert_eq!(s.sim.sim().stats().total(Operation::VolumeCreate), 0);
}

fn spec(instance_type: &str, image: &str) -> v1::CheckSpecRequest {
    v1::CheckSpecRequest {
        target: target(),
        instance_type: instance_type.into(),
        image: image.into(),
        volume_size_gb: 0,
    }
}

#[tokio::test]
async fn check_spec_answers_ok_or_names_the_field_and_calls_no_provider() {
    let mut s = stack().await;
    s.client
        .check_spec(spec("shared-cpu-2x", "registry/worker:1"))
        .await
        .expect("a shape the provider takes");
    let mut with_volume = spec("performance-2x", "registry/worker:1");
    with_volume.volume_size_gb = 20;
    s.client
        .check_spec(with_volume)
        .await
        .expect("with a volume");

    let mut cases: Vec<(&str, v1::CheckSpecRequest)> = Vec::new();
    let mut r = spec("shared-cpu-1x", "img");
    r.target.as_mut().unwrap().provider = "fly".into();
    cases.push(("target.provider", r));
    let mut r = spec("shared-cpu-1x", "img");
    r.target.as_mut().unwrap().region = "Not A Region".into();
    cases.push(("target.region", r));
    cases.push(("instance_type", spec("enormous", "img")));
    cases.push(("instance_type", spec("", "img")));
    cases.push(("image", spec("shared-cpu-1x", "")));
    let mut r = spec("shared-cpu-1x", "img");
    r.volume_size_gb = 10_001;
    cases.push(("volume_size_gb", r));
    for (field, req) in cases {
        let err = s.client.check_spec(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    // Decided in the adapter: the cloud was never asked about machines or
    // volumes (the adapter's own readiness check of the app may have run).
    let asked: Vec<_> = s
        .sim
        .sim()
        .stats()
        .requests
        .into_keys()
        .filter(|op| *op != flotilla_sim_provider::Operation::AppGet)
        .collect();
    assert!(asked.is_empty(), "the cloud was asked: {asked:?}");
}

/// The adapter as a client with no generated code sees it: through server
/// reflection only (v1alpha, as grpcio-reflection and older grpcurl speak
/// it), a real third-party client (Python grpcio).
mod reflection {
    use flotilla_test_utils::python_client::reflection_client;
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn a_reflection_only_client_sees_exactly_the_provider_service_and_calls_it() {
        let mut s = stack().await;
        let m = s
            .client
            .create_machine(create(false))
            .await
            .unwrap()
            .into_inner();
        let target = json!({"provider": "sim", "pool": "gpu", "region": "ams"});
        let Some(answer) = reflection_client(&json!({
            "target": s.addr.to_string(),
            "metadata": [
                ["x-correlation-id", "py-adapter-1"],
                ["authorization", format!("Bearer {}", flotilla_test_utils::stack::SERVICE_TOKEN)],
            ],
            "calls": [
                {"method": "flotilla.v1.Provider/ListMachines", "request": {"target": target}},
                {"method": "flotilla.v1.Provider/GetMachine",
                 "request": {"target": target, "machine_id": m.id}},
                {"method": "flotilla.v1.Provider/GetMachine",
                 "request": {"target": target, "machine_id": ""}},
            ],
        }))
        .await
        else {
            return;
        };
        let mut services: Vec<&str> = answer["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        services.sort();
        assert_eq!(
            services,
            [
                "flotilla.v1.Provider",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
        );
        assert_eq!(
            answer["files"]["flotilla.v1.Provider"],
            "flotilla/v1/provider.proto"
        );
        let calls = answer["calls"].as_array().unwrap();
        assert_eq!(calls[0]["code"], "OK", "{calls:?}");
        let listed: Vec<&str> = calls[0]["response"]["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, [m.id.as_str()]);
        assert_eq!(calls[1]["code"], "OK", "{calls:?}");
        assert_eq!(calls[1]["response"]["id"], m.id.as_str());
        assert_eq!(calls[1]["response"]["name"], "w-1");
        // The caller's correlation id comes back, on success and refusal.
        assert_eq!(calls[1]["metadata"]["x-correlation-id"], "py-adapter-1");
        assert_eq!(calls[2]["code"], "INVALID_ARGUMENT", "{calls:?}");
        assert!(
            calls[2]["details"]
                .as_str()
                .unwrap()
                .starts_with("machine_id:"),
            "{calls:?}"
        );
        assert_eq!(calls[2]["metadata"]["x-correlation-id"], "py-adapter-1");
    }

    /// `MachineRef` with its string field re-declared as bytes, so the
    /// request can carry bytes that are not UTF-8.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RawMachineRef {
        #[prost(message, optional, tag = "1")]
        target: Option<v1::ProviderTarget>,
        #[prost(bytes = "vec", tag = "2")]
        machine_id: Vec<u8>,
    }

    #[tokio::test]
    async fn a_request_that_is_not_utf8_is_invalid_argument_naming_the_field_with_a_correlation_id()
    {
        let s = stack().await;
        let channel = Channel::from_shared(format!("http://{}", s.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let mut req = tonic::Request::new(RawMachineRef {
            target: target(),
            machine_id: b"m-\xff\xfe".to_vec(),
        });
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", flotilla_test_utils::stack::SERVICE_TOKEN)
                .parse()
                .unwrap(),
        );
        let err = grpc
            .unary(
                req,
                http::uri::PathAndQuery::from_static("/flotilla.v1.Provider/GetMachine"),
                tonic_prost::ProstCodec::<RawMachineRef, v1::Machine>::default(),
            )
            .await
            .expect_err("not UTF-8");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("machine_id: cannot be decoded: "),
            "{}",
            err.message()
        );
        // No id was sent: the one minted for the call comes back.
        let cid = err
            .metadata()
            .get(flotilla_core::ids::CORRELATION_METADATA)
            .expect("a correlation id")
            .to_str()
            .unwrap();
        assert!(flotilla_core::CorrelationId::parse(cid).is_some(), "{cid}");
    }
}

/// Issue #18: the adapter holds the cloud credentials, so a call without a
/// known service token is answered UNAUTHENTICATED and reaches no provider
/// (the sim records every request it receives).
#[tokio::test]
async fn calls_without_a_known_service_token_are_unauthenticated_and_reach_no_provider() {
    use flotilla_proto::client::{ServiceToken, adapter_client};

    let s = stack().await;
    s.sim.sim().set_recording(true);
    let channel = Channel::from_shared(format!("http://{}", s.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let callers = [
        ("no token", ServiceToken::none()),
        (
            "an unknown token",
            ServiceToken::new("not-the-service-token").unwrap(),
        ),
    ];
    for (what, token) in callers {
        let mut client = adapter_client(channel.clone(), token);
        let created = client.create_machine(create(true)).await;
        assert_eq!(created.unwrap_err().code(), Code::Unauthenticated, "{what}");
        let listed = client
            .list_machines(v1::ListMachinesRequest {
                target: target(),
                ..Default::default()
            })
            .await;
        assert_eq!(listed.unwrap_err().code(), Code::Unauthenticated, "{what}");
        let deleted = client
            .delete_machine(v1::DeleteMachineRequest {
                target: target(),
                machine_id: "m-any".into(),
                force: true,
            })
            .await;
        assert_eq!(deleted.unwrap_err().code(), Code::Unauthenticated, "{what}");
    }
    assert!(
        s.sim.sim().requests().is_empty(),
        "{:?}",
        s.sim.sim().requests()
    );
    assert!(s.sim.sim().machines().is_empty());

    // The same channel with the service token is served: the refusals above
    // came from the credential, not from the channel.
    let mut client = s.client.clone();
    client.create_machine(create(false)).await.unwrap();
    assert!(!s.sim.sim().requests().is_empty());
}
