//! Serving the sim over HTTP: the router, `serve` for a listener the caller
//! owns (the binary), and `start` for tests, which binds port 0 and returns
//! a handle on the base URL and the ground truth.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cloud::{Sim, SimConfig};
use crate::{admin, api};

/// How long `SimHandle::shutdown` lets in-flight calls (a long `wait`)
/// finish before cutting them off.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The Fly API under `/v1`, the admin routes under `/_sim`, and a JSON 404
/// for anything else.
pub fn router(sim: Sim) -> Router {
    Router::new()
        .merge(api::routes().layer(axum::middleware::from_fn_with_state(sim.clone(), record)))
        .merge(admin::routes())
        .fallback(not_found)
        .with_state(sim)
}

/// Keeps each `/v1` request (method, path, query, JSON body) and the
/// status answered, when the sim records requests.
async fn record(
    axum::extract::State(sim): axum::extract::State<Sim>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !sim.recording() {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    // Bodies of this API are small; a bigger one is not recorded whole.
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let query = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let method = parts.method.to_string();
    let path = parts.uri.path().to_owned();
    let parsed = (!bytes.is_empty())
        .then(|| serde_json::from_slice(&bytes).ok())
        .flatten();
    let response = next
        .run(axum::extract::Request::from_parts(
            parts,
            axum::body::Body::from(bytes),
        ))
        .await;
    sim.record_request(crate::cloud::RecordedRequest {
        method,
        path,
        query,
        body: parsed,
        status: response.status().as_u16(),
    });
    response
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response()
}

/// Serves `sim` on `listener` until `shutdown` resolves, then lets
/// in-flight calls finish.
pub async fn serve(
    sim: Sim,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    use axum::serve::ListenerExt;
    // Answers are small: without TCP_NODELAY they wait on delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(sim))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Starts a sim on `127.0.0.1` with a free port, in the background.
pub async fn start(config: SimConfig) -> io::Result<SimHandle> {
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
    let addr = listener.local_addr()?;
    let sim = Sim::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(sim.clone(), listener, async {
        // A dropped sender means the handle is gone: stop as well.
        stopped.await.ok();
    }));
    Ok(SimHandle {
        url: format!("http://{addr}"),
        addr,
        sim,
        stop: Some(stop),
        task: Some(task),
    })
}

/// A running sim. Dropping it stops the server at once.
#[derive(Debug)]
pub struct SimHandle {
    url: String,
    addr: SocketAddr,
    sim: Sim,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`, without a trailing slash; the Fly API is
    /// under `{url}/v1`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The ground truth and fault controls.
    pub fn sim(&self) -> &Sim {
        &self.sim
    }

    pub fn token(&self) -> &str {
        self.sim.token()
    }

    /// Stops accepting calls and waits up to a short grace for in-flight
    /// ones before cutting them off.
    pub async fn shutdown(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => joined.map_err(io::Error::other)?,
            Err(_grace_over) => {
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
