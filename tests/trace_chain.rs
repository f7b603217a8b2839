//! One trace per command, end to end: a `Provision` (and then a
//! `Terminate`) call at the api is followed through the outbox, the `CMD.*`
//! message's headers, the consuming service's loop, its gRPC call to the
//! provider-adapter and the adapter's HTTP call to the (simulated) cloud,
//! with the caller's correlation id on every span and in every action log.
//!
//! Spans go to an in-process exporter, the subscriber of every thread of
//! this test's own runtime (and of none of the other tests in the binary).

use std::collections::HashMap;

use clap::Parser;
use flotilla_api::{ApiToken, Limits};
use flotilla_e2e::{TestApi, start_api};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_scheduler::{Scheduler, SchedulerTuning};
use flotilla_telemetry::CancellationToken;
use flotilla_terminator::{Terminator, TerminatorTuning};
use flotilla_test_utils::stack::{instant, provider_stack};
use flotilla_test_utils::{DEADLINE, TestDb, TestNats, eventually_ok};
use opentelemetry::trace::{SpanId, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tonic::Request;
use tonic::metadata::MetadataValue;
use tracing_subscriber::layer::SubscriberExt;

const TOKEN: &str = "trace-token";

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

fn call<T>(msg: T, cid: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {TOKEN}")).expect("header"),
    );
    r.metadata_mut().insert(
        flotilla_core::ids::CORRELATION_METADATA,
        MetadataValue::try_from(cid).expect("header"),
    );
    r
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
}

/// The names from `span` up to its root, following parent ids.
fn ancestry<'a>(spans: &'a [SpanData], span: &'a SpanData) -> Vec<&'a SpanData> {
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let mut chain = vec![span];
    let mut at = span;
    while at.parent_span_id != SpanId::INVALID {
        match by_id.get(&at.parent_span_id) {
            Some(p) => {
                chain.push(p);
                at = p;
            }
            None => break,
        }
    }
    chain
}

fn describe(chain: &[&SpanData]) -> String {
    chain
        .iter()
        .map(|s| s.name.as_ref())
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// Waits for a finished span matching `pred` (spans end when their work does).
async fn wait_span(
    exporter: &InMemorySpanExporter,
    what: &str,
    pred: impl Fn(&SpanData) -> bool,
) -> (Vec<SpanData>, SpanData) {
    eventually_ok(&format!("a {what} span"), DEADLINE, || async {
        let spans = exporter.get_finished_spans().expect("spans");
        match spans.iter().find(|s| pred(s)).cloned() {
            Some(s) => Ok((spans, s)),
            None => Err(format!(
                "have: {:?}",
                spans.iter().map(|s| s.name.clone()).collect::<Vec<_>>()
            )),
        }
    })
    .await
}

/// Asserts that the adapter's `rpc` span for `cid` descends from the api's
/// `api_rpc` span through the consumer and the loop's step span, that a
/// provider HTTP call is made under it, and that each carries `cid`.
async fn assert_chain(
    exporter: &InMemorySpanExporter,
    api_rpc: &str,
    rpc: &str,
    step: &str,
    cid: &str,
) {
    // A parent ends after its children: wait until the whole chain is in.
    let what = format!("an HTTP call under {rpc} reaching {api_rpc}");
    let (spans, http) = eventually_ok(&what, DEADLINE, || async {
        let spans = exporter.get_finished_spans().expect("spans");
        let http = spans
            .iter()
            .filter(|s| s.name.starts_with("HTTP "))
            .find(|s| {
                ancestry(&spans, s)
                    .iter()
                    .any(|a| a.name == rpc && attr(a, "correlation_id").as_deref() == Some(cid))
            })
            .cloned();
        if let Some(http) = &http
            && ancestry(&spans, http).last().map(|s| s.name.as_ref()) == Some(api_rpc)
        {
            return Ok((spans, http.clone()));
        }
        Err(format!(
            "closest: {}",
            http.map(|h| describe(&ancestry(&spans, &h)))
                .unwrap_or_else(|| "none".into())
        ))
    })
    .await;
    let chain = ancestry(&spans, &http);
    let names = describe(&chain);
    let trace_id = http.span_context.trace_id();
    assert!(
        chain.iter().all(|s| s.span_context.trace_id() == trace_id),
        "one trace: {names}"
    );
    let pos = |name: &str| {
        chain
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} missing from the chain {names}"))
    };
    // Leaf to root: HTTP <- adapter rpc <- … <- step <- … <- api rpc. The
    // step continues the trace stored on the instance row by the request;
    // the command only woke the loop: its consumer span is in the same
    // trace, beside the step, not above it.
    let (p_adapter, p_step, p_api) = (pos(rpc), pos(step), pos(api_rpc));
    let subject = if api_rpc.ends_with("/Provision") {
        "CMD.provision"
    } else {
        "CMD.terminate"
    };
    assert!(
        p_adapter < p_step && p_step < p_api,
        "api -> step -> adapter -> HTTP, got {names}"
    );
    assert!(
        !chain.iter().any(|s| s.name == subject),
        "the step does not descend from the wake-up: {names}"
    );
    let consumed = spans
        .iter()
        .find(|s| s.name == subject && s.span_context.trace_id() == trace_id);
    assert!(
        consumed.is_some(),
        "the wake-up {subject} is consumed in the request's trace"
    );
    assert_eq!(
        chain.last().map(|s| s.name.as_ref()),
        Some(api_rpc),
        "{names}"
    );
    for s in [chain[p_adapter], chain[p_step], chain[p_api]] {
        assert_eq!(
            attr(s, "correlation_id").as_deref(),
            Some(cid),
            "correlation id on {}",
            s.name
        );
    }
}

/// A runtime of two workers on whose every thread (workers, blocking pool,
/// and the thread that blocks on it) `dispatch` is the default subscriber:
/// the spans of everything this test spawns go to it, while the other tests
/// of the binary, on their own runtimes, keep theirs.
fn traced_runtime(dispatch: &tracing::Dispatch) -> tokio::runtime::Runtime {
    let for_threads = dispatch.clone();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            // Kept for the thread's life: it ends with the runtime.
            std::mem::forget(tracing::dispatcher::set_default(&for_threads));
        })
        .build()
        .expect("runtime")
}

#[test]
fn provision_and_terminate_each_make_one_trace_from_the_api_to_the_provider_http_call() {
    // The propagator is process-wide; W3C trace context is what every
    // service installs in production, so the other tests lose nothing.
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let dispatch = tracing::Dispatch::new(
        tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new("info"))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("e2e"))),
    );
    let runtime = traced_runtime(&dispatch);
    let _main = tracing::dispatcher::set_default(&dispatch);
    runtime.block_on(trace_one_provision_and_terminate(exporter));
    drop(provider);
}

async fn trace_one_provision_and_terminate(exporter: InMemorySpanExporter) {
    let db = TestDb::new().await;
    let nats = TestNats::new().await;
    let stack = provider_stack(instant(), &[]).await;
    let stop = CancellationToken::new();
    let TestApi { addr, bus } = start_api(
        &db,
        &nats,
        ApiToken::from_plain("trace", TOKEN),
        Limits::default(),
        &stop,
    )
    .await;
    // Ticks far apart: the command's wake-up is what moves the instance, as
    // in production when a tick is not due.
    let scheduler = Scheduler {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: S::try_parse_from(["x", "--scheduler-tick-ms", "600000"])
            .expect("tuning")
            .t,
        owner: "scheduler-trace".into(),
        worker_api_url: format!("http://{addr}"),
        crash_after: None,
    };
    tokio::spawn(scheduler.run(Some(bus.clone()), stop.clone()));
    let terminator = Terminator {
        db: db.pool.clone(),
        provider: stack.client.clone(),
        tuning: T::try_parse_from([
            "x",
            "--terminator-tick-ms",
            "600000",
            "--drain-timeout-seconds",
            "1",
            "--terminator-poll-ms",
            "100",
        ])
        .expect("tuning")
        .t,
        owner: "terminator-trace".into(),
    };
    tokio::spawn(terminator.run(Some(bus.clone()), stop.clone()));

    let mut fleet = FleetServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("api reachable");
    fleet
        .create_pool(call(
            v1::CreatePoolRequest {
                pool: Some(v1::Pool {
                    name: "traced".into(),
                    provider: "sim".into(),
                    instance_type: "shared-cpu-1x".into(),
                    region: "ams".into(),
                    image: "registry/worker:1".into(),
                    ..Default::default()
                }),
            },
            "trace-pool",
        ))
        .await
        .expect("pool");

    let provision_cid = "trace-provision-1";
    let answer = fleet
        .provision(call(
            v1::ProvisionRequest {
                pool: "traced".into(),
                count: 1,
                ..Default::default()
            },
            provision_cid,
        ))
        .await
        .expect("provision")
        .into_inner();
    let id: uuid::Uuid = answer.instances[0].id.parse().expect("uuid");

    assert_chain(
        &exporter,
        "/flotilla.v1.FleetService/Provision",
        "/flotilla.v1.Provider/CreateMachine",
        "scheduler.provision_instance",
        provision_cid,
    )
    .await;
    // The start of the same step is in the same trace too.
    assert_chain(
        &exporter,
        "/flotilla.v1.FleetService/Provision",
        "/flotilla.v1.Provider/StartMachine",
        "scheduler.provision_instance",
        provision_cid,
    )
    .await;

    // The action log says who did each step on whose behalf, and the
    // EVT.instance.booting event continues the trace.
    eventually_ok("the instance booting", DEADLINE, || async {
        let state: String = sqlx::query_scalar("SELECT state FROM instances WHERE id = $1")
            .bind(id)
            .fetch_one(&db.pool)
            .await
            .expect("state");
        if state == "booting" {
            Ok(())
        } else {
            Err(state)
        }
    })
    .await;

    let logs: Vec<(String, String)> = sqlx::query_as(
        "SELECT to_state, correlation_id FROM action_logs WHERE instance_id = $1 AND to_state IS NOT NULL ORDER BY id",
    )
    .bind(id)
    .fetch_all(&db.pool)
    .await
    .expect("logs");
    let states: Vec<&str> = logs.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(states, ["requested", "provisioning", "booting"]);
    assert!(
        logs.iter().all(|(_, c)| c == provision_cid),
        "one correlation id in the action log: {logs:?}"
    );
    let (_, api_span) = wait_span(&exporter, "api Provision", |s| {
        s.name == "/flotilla.v1.FleetService/Provision"
    })
    .await;
    let event_headers: sqlx::types::Json<HashMap<String, String>> = sqlx::query_scalar(
        "SELECT headers FROM outbox WHERE subject = 'EVT.instance.booting' ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .expect("booting event");
    let traceparent = event_headers
        .0
        .get("traceparent")
        .expect("traceparent on the event");
    assert!(
        traceparent.contains(&api_span.span_context.trace_id().to_string()),
        "EVT.instance.booting {traceparent} is in the Provision trace"
    );
    assert_eq!(
        event_headers
            .0
            .get(flotilla_core::ids::CORRELATION_HEADER)
            .map(String::as_str),
        Some(provision_cid)
    );

    // Terminate: its own trace, through the terminator to the provider.
    let terminate_cid = "trace-terminate-1";
    fleet
        .terminate(call(
            v1::TerminateRequest {
                selector: Some(v1::InstanceSelector {
                    instance_ids: vec![id.to_string()],
                    ..Default::default()
                }),
                force: true,
                reason: "trace test".into(),
            },
            terminate_cid,
        ))
        .await
        .expect("terminate");
    assert_chain(
        &exporter,
        "/flotilla.v1.FleetService/Terminate",
        "/flotilla.v1.Provider/DeleteMachine",
        "terminator.take_down",
        terminate_cid,
    )
    .await;

    stop.cancel();
}
