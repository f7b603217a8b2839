//! Telemetry seen from outside: what `/metrics` serves and how trace context
//! crosses a header map.

use std::time::Duration;

use flotilla_core::ErrorClass;
use flotilla_telemetry::loops::{ActivationStatus, Wake, record};
use flotilla_telemetry::propagation::{current_trace_headers, set_parent_from_headers};
use flotilla_telemetry::{CancellationToken, metrics};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn metrics_endpoint_serves_what_loops_record() {
    let stop = CancellationToken::new();
    let (addr, task) = metrics::serve("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .unwrap();
    let mut status = ActivationStatus {
        found: 3,
        acted: 2,
        already_done: 1,
        errors: vec![],
        more: false,
    };
    status.error(ErrorClass::Retryable, "i-1", "412 machine started");
    record(
        "telemetry_test",
        Wake::Tick,
        Duration::from_millis(20),
        &status,
    );

    let body = http_get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains(r#"flotilla_loop_runs_total{loop="telemetry_test",reason="tick"} 1"#),
        "{body}"
    );
    assert!(
        body.contains(r#"flotilla_loop_errors_total{loop="telemetry_test",class="retryable"} 1"#)
    );
    assert!(body.contains(r#"flotilla_loop_items_total{loop="telemetry_test",outcome="acted"} 2"#));
    assert!(
        body.contains(
            r#"flotilla_loop_duration_seconds_bucket{loop="telemetry_test",le="0.025"} 1"#
        )
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("metrics endpoint stops on shutdown")
        .unwrap();
}

#[test]
fn trace_context_survives_a_header_round_trip() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::with_default(subscriber, || {
        let parent = tracing::info_span!("api.provision");
        let headers = parent.in_scope(current_trace_headers);
        let traceparent = headers
            .iter()
            .find(|(k, _)| k == "traceparent")
            .map(|(_, v)| v.clone())
            .expect("traceparent injected");
        let parent_trace = parent.context().span().span_context().trace_id();
        assert!(traceparent.contains(&parent_trace.to_string()));

        // Another process receives the headers (e.g. from NATS).
        let child = tracing::info_span!("scheduler.provision");
        set_parent_from_headers(&child, &headers);
        assert_eq!(
            child.context().span().span_context().trace_id(),
            parent_trace
        );

        // Without headers the span starts its own trace.
        let lone = tracing::info_span!("lone");
        set_parent_from_headers(&lone, &[]);
        assert_ne!(
            lone.context().span().span_context().trace_id(),
            parent_trace
        );
    });
    drop(provider);
}

/// Every `metrics::counter!/gauge!/histogram!("flotilla_…")` in the
/// workspace, with its kind.
fn recorded_metric_names() -> Vec<(metrics::Kind, String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    let mut dirs = vec![root.join("crates"), root.join("tests")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "target") {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut found = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (macro_name, kind) in [
            ("metrics::counter!(", metrics::Kind::Counter),
            ("metrics::gauge!(", metrics::Kind::Gauge),
            ("metrics::histogram!(", metrics::Kind::Histogram),
        ] {
            for (at, _) in text.match_indices(macro_name) {
                let rest = text[at + macro_name.len()..].trim_start();
                if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                    && name.starts_with("flotilla_")
                {
                    found.push((kind, name.to_owned(), f.display().to_string()));
                }
            }
        }
    }
    found
}

#[test]
fn every_metric_recorded_in_the_workspace_has_help_text_of_its_kind() {
    let found = recorded_metric_names();
    assert!(
        found
            .iter()
            .any(|(_, n, _)| n == "flotilla_loop_runs_total"),
        "the scan finds the loop metrics"
    );
    let mut problems = Vec::new();
    for (kind, name, file) in found {
        match metrics::DESCRIPTIONS.iter().find(|(_, n, _)| *n == name) {
            None => problems.push(format!("{name} (in {file}) has no entry")),
            Some(d) if d.0 != kind => {
                problems.push(format!("{name} (in {file}) is described as a {:?}", d.0))
            }
            Some(_) => {}
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "add these to flotilla_telemetry::metrics::DESCRIPTIONS:\n{}",
        problems.join("\n")
    );
}
