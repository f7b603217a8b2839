//! The agent against an in-process fake worker API on a real port: the boot
//! sequence, heartbeats, what it learns from answers, the ways it ends, and
//! the built binary's exit codes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_agent::{Agent, AgentArgs, AgentError, AgentStatus, ExitReason, Fault};
use flotilla_chaos::proxy::FaultProxy;
use flotilla_core::InstanceId;
use flotilla_core::config::{LogFormat, TelemetryArgs};
use flotilla_proto::v1;
use flotilla_proto::v1::worker_service_server::{WorkerService, WorkerServiceServer};
use flotilla_telemetry::CancellationToken;
use flotilla_test_utils::{DEADLINE, eventually};
use tokio::task::JoinHandle;

use tokio::time::{Instant, timeout};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Code, Request, Response, Status};

const TOKEN: &str = "worker-token-for-tests";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Register,
    Phase(v1::WorkerPhase),
    Heartbeat,
}

#[derive(Debug, Clone)]
struct Call {
    kind: Kind,
    at: Instant,
    instance_id: String,
    sequence: u64,
    idle: bool,
    authorization: Option<String>,
}

/// What the fake answers; tests change it while the agent runs.
#[derive(Debug, Clone)]
struct Answers {
    cordoned: bool,
    register_interval_ms: u32,
    heartbeat_interval_ms: u32,
    shutdown: bool,
    /// Returned by every call while set.
    error: Option<Code>,
    /// This many calls fail with UNAVAILABLE before any succeeds.
    unavailable_first: u32,
    /// Calls never answer (the caller's timeout ends them).
    hang: bool,
}

impl Default for Answers {
    fn default() -> Self {
        Answers {
            cordoned: false,
            register_interval_ms: 50,
            heartbeat_interval_ms: 50,
            shutdown: false,
            error: None,
            unavailable_first: 0,
            hang: false,
        }
    }
}

#[derive(Clone, Default)]
struct Fake {
    calls: Arc<Mutex<Vec<Call>>>,
    answers: Arc<Mutex<Answers>>,
}

impl Fake {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    fn heartbeats(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.kind == Kind::Heartbeat)
            .collect()
    }

    fn answer(&self, change: impl FnOnce(&mut Answers)) {
        change(&mut self.answers.lock().expect("answers"));
    }

    /// Records the call, then decides: the answer's settings, or a failure.
    async fn accept<T>(&self, request: &Request<T>, call: Call) -> Result<Answers, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let authorized = authorization.as_deref() == Some(&format!("Bearer {TOKEN}"));
        self.calls.lock().expect("calls").push(Call {
            authorization,
            ..call
        });
        let answers = {
            let mut answers = self.answers.lock().expect("answers");
            let snapshot = answers.clone();
            answers.unavailable_first = answers.unavailable_first.saturating_sub(1);
            snapshot
        };
        if answers.hang {
            std::future::pending::<()>().await;
        }
        if !authorized {
            return Err(Status::unauthenticated("bad worker token"));
        }
        if let Some(code) = answers.error {
            return Err(Status::new(code, "told to fail"));
        }
        if answers.unavailable_first > 0 {
            return Err(Status::unavailable("not yet"));
        }
        Ok(answers)
    }
}

fn call(kind: Kind, instance_id: &str) -> Call {
    Call {
        kind,
        at: Instant::now(),
        instance_id: instance_id.to_owned(),
        sequence: 0,
        idle: true,
        authorization: None,
    }
}

#[tonic::async_trait]
impl WorkerService for Fake {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let id = request.get_ref().instance_id.clone();
        let a = self.accept(&request, call(Kind::Register, &id)).await?;
        Ok(Response::new(v1::RegisterResponse {
            heartbeat_interval_ms: a.register_interval_ms,
            cordoned: a.cordoned,
        }))
    }

    async fn report_phase(
        &self,
        request: Request<v1::ReportPhaseRequest>,
    ) -> Result<Response<v1::ReportPhaseResponse>, Status> {
        let r = request.get_ref();
        let phase = v1::WorkerPhase::try_from(r.phase).unwrap_or(v1::WorkerPhase::Unspecified);
        let id = r.instance_id.clone();
        let a = self.accept(&request, call(Kind::Phase(phase), &id)).await?;
        Ok(Response::new(v1::ReportPhaseResponse {
            cordoned: a.cordoned,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.get_ref();
        let recorded = Call {
            sequence: r.sequence,
            idle: r.idle,
            ..call(Kind::Heartbeat, &r.instance_id)
        };
        let a = self.accept(&request, recorded).await?;
        Ok(Response::new(v1::HeartbeatResponse {
            cordoned: a.cordoned,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            shutdown: a.shutdown,
        }))
    }
}

/// The fake served on a port of its own.
struct Api {
    fake: Fake,
    url: String,
    stop: CancellationToken,
    server: JoinHandle<()>,
}

impl Api {
    async fn start() -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let fake = Fake::default();
        let stop = CancellationToken::new();
        let server = tokio::spawn({
            let (fake, stop) = (fake.clone(), stop.clone());
            async move {
                tonic::transport::Server::builder()
                    .add_service(WorkerServiceServer::new(fake))
                    .serve_with_incoming_shutdown(
                        TcpListenerStream::new(listener),
                        stop.cancelled_owned(),
                    )
                    .await
                    .expect("fake api serves");
            }
        });
        Api {
            fake,
            url,
            stop,
            server,
        }
    }

    /// Closes the port: from now on every call is refused a connection.
    async fn go_away(self) -> Fake {
        self.stop.cancel();
        timeout(Duration::from_secs(5), self.server)
            .await
            .expect("fake api stops")
            .expect("fake api task");
        self.fake
    }

    /// Waits until `done` holds for the recorded calls.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Call]) -> bool) {
        eventually(what, DEADLINE, || {
            let held = done(&self.fake.calls());
            async move { held }
        })
        .await
    }

    async fn wait_for_heartbeats(&self, n: usize) {
        self.wait_for(&format!("{n} heartbeats"), |calls| {
            calls.iter().filter(|c| c.kind == Kind::Heartbeat).count() >= n
        })
        .await;
    }
}

fn args(url: &str, instance_id: InstanceId) -> AgentArgs {
    AgentArgs {
        instance_id,
        worker_token: TOKEN.parse().expect("infallible"),
        api_url: url.to_owned(),
        api_ca: None,
        allow_plaintext: false,
        // Long, so a test only sees 50 ms heartbeats when the api's answer is used.
        heartbeat_interval_ms: 10_000,
        dead_man_seconds: 1,
        install_seconds: 0,
        start_seconds: 0,
        busy_file: None,
        request_timeout_ms: 300,
        keepalive_seconds: 1,
        telemetry: TelemetryArgs {
            log_format: LogFormat::Pretty,
            log_level: "info".to_owned(),
            metrics_addr: String::new(),
        },
    }
}

struct Running {
    status: tokio::sync::watch::Receiver<AgentStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<ExitReason, AgentError>>,
}

fn spawn(args: AgentArgs) -> Running {
    let agent = Agent::new(&args).expect("agent builds");
    let status = agent.status();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(agent.run(shutdown.clone()));
    Running {
        status,
        shutdown,
        task,
    }
}

impl Running {
    async fn ends_within(self, limit: Duration) -> Result<ExitReason, AgentError> {
        timeout(limit, self.task)
            .await
            .expect("agent ends in time")
            .expect("agent task")
    }
}

#[tokio::test]
async fn phases_follow_registration_in_order_after_the_install_time_all_with_the_bearer_token() {
    let api = Api::start().await;
    let id = InstanceId::new();
    let agent = spawn(AgentArgs {
        install_seconds: 1,
        ..args(&api.url, id)
    });
    api.wait_for_heartbeats(1).await;
    agent.shutdown.cancel();
    agent
        .ends_within(Duration::from_secs(2))
        .await
        .expect("stops");

    let calls = api.fake.calls();
    let kinds: Vec<Kind> = calls.iter().map(|c| c.kind).take(5).collect();
    assert_eq!(
        kinds,
        [
            Kind::Register,
            Kind::Phase(v1::WorkerPhase::Installing),
            Kind::Phase(v1::WorkerPhase::Starting),
            Kind::Phase(v1::WorkerPhase::Ready),
            Kind::Heartbeat,
        ]
    );
    let installing = calls[2].at.duration_since(calls[1].at);
    assert!(
        installing >= Duration::from_millis(950),
        "installing lasted {installing:?}"
    );
    for c in &calls {
        assert_eq!(c.instance_id, id.to_string());
        assert_eq!(
            c.authorization.as_deref(),
            Some("Bearer worker-token-for-tests")
        );
    }
}

#[tokio::test]
async fn heartbeats_come_at_the_interval_a_heartbeat_answer_names_with_increasing_sequence() {
    let api = Api::start().await;
    // Register names no interval, so only the heartbeat answers set 50 ms.
    api.fake.answer(|a| a.register_interval_ms = 0);
    let agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(6).await;
    agent.shutdown.cancel();

    let beats = api.fake.heartbeats();
    let sequences: Vec<u64> = beats.iter().map(|c| c.sequence).collect();
    // One more per beat, from a base above any earlier process's.
    let base = sequences[0] - 1;
    let expected: Vec<u64> = (1..=6).map(|n| base + n).collect();
    assert_eq!(sequences[..6], expected[..]);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        base > now_ms - 60_000 && base <= now_ms,
        "the sequence does not start at the process's start time: {base}"
    );
    assert!(beats.iter().all(|c| c.idle));
    // Five intervals of 50 ms between the first and the sixth.
    let span = beats[5].at.duration_since(beats[0].at);
    assert!(span >= Duration::from_millis(200), "too fast: {span:?}");
    assert!(span < Duration::from_millis(2000), "too slow: {span:?}");
}

/// A worker whose network changes under it (a container reconnected, a
/// NAT entry dropped) holds a connection that answers nothing and resets
/// nothing; it must not take TCP's minutes to notice.
#[tokio::test]
async fn heartbeats_resume_on_a_new_connection_after_the_open_one_goes_silent_for_good() {
    let api = Api::start().await;
    let upstream = api.url.trim_start_matches("http://").parse().expect("addr");
    let proxy = FaultProxy::start("agent-api", upstream)
        .await
        .expect("proxy");
    let url = format!("http://{}", proxy.addr());
    let agent = spawn(AgentArgs {
        // Only the keepalive may rescue the agent here, not an exit.
        dead_man_seconds: 600,
        ..args(&url, InstanceId::new())
    });
    api.wait_for_heartbeats(3).await;
    let (beats, connections) = (api.fake.heartbeats().len(), proxy.connections());

    proxy.strand();
    api.wait_for_heartbeats(beats + 3).await;
    assert!(
        proxy.connections() > connections,
        "heartbeats went on without a new connection"
    );
    agent.shutdown.cancel();
}

#[tokio::test]
async fn the_interval_from_register_holds_while_heartbeat_answers_name_none() {
    let api = Api::start().await;
    api.fake.answer(|a| a.heartbeat_interval_ms = 0);
    let agent = spawn(args(&api.url, InstanceId::new()));
    // With the 10 s fallback instead, this would time out.
    api.wait_for_heartbeats(4).await;
    assert_eq!(
        agent.status.borrow().heartbeat_interval,
        Duration::from_millis(50)
    );
    agent.shutdown.cancel();
}

#[tokio::test]
async fn a_cordon_is_learned_from_a_heartbeat_answer_and_so_is_its_end() {
    let api = Api::start().await;
    let mut agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(1).await;
    assert!(!agent.status.borrow().cordoned);

    api.fake.answer(|a| a.cordoned = true);
    timeout(
        Duration::from_secs(2),
        agent.status.wait_for(|s| s.cordoned),
    )
    .await
    .expect("cordon learned in time")
    .expect("agent alive");
    api.fake.answer(|a| a.cordoned = false);
    timeout(
        Duration::from_secs(2),
        agent.status.wait_for(|s| !s.cordoned),
    )
    .await
    .expect("uncordon learned in time")
    .expect("agent alive");
    agent.shutdown.cancel();
}

#[tokio::test]
async fn shutdown_in_a_heartbeat_answer_ends_the_agent_with_shutdown() {
    let api = Api::start().await;
    let agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(2).await;
    api.fake.answer(|a| a.shutdown = true);
    let reason = agent.ends_within(Duration::from_secs(2)).await;
    assert_eq!(reason.expect("no error"), ExitReason::Shutdown);
}

#[tokio::test]
async fn an_unauthenticated_answer_ends_the_agent_as_rejected_after_one_attempt() {
    let api = Api::start().await;
    let agent = spawn(AgentArgs {
        worker_token: "not-the-token".parse().expect("infallible"),
        ..args(&api.url, InstanceId::new())
    });
    let err = agent
        .ends_within(Duration::from_secs(2))
        .await
        .expect_err("rejected");
    let AgentError::Rejected(call) = &err else {
        panic!("expected Rejected, got {err:?}");
    };
    assert_eq!(call.code, Code::Unauthenticated);
    assert_eq!(err.exit_code(), 2);
    // The agent has returned: a retry would have been made before its end.
    assert_eq!(api.fake.calls().len(), 1);
}

#[tokio::test]
async fn permission_denied_on_a_heartbeat_ends_the_agent_as_rejected_without_retrying() {
    let api = Api::start().await;
    let agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(1).await;
    api.fake.answer(|a| a.error = Some(Code::PermissionDenied));
    let before = api.fake.heartbeats().len();
    let err = agent
        .ends_within(Duration::from_secs(2))
        .await
        .expect_err("rejected");
    assert!(matches!(&err, AgentError::Rejected(c) if c.fault == Fault::Rejected));
    // The agent has returned, so any retry was made before its end. The one
    // in flight when the error was switched on may have succeeded.
    assert!(api.fake.heartbeats().len() <= before + 2);
}

#[tokio::test]
async fn registration_is_retried_while_the_api_is_unavailable() {
    let api = Api::start().await;
    api.fake.answer(|a| a.unavailable_first = 3);
    let mut agent = spawn(AgentArgs {
        dead_man_seconds: 60,
        ..args(&api.url, InstanceId::new())
    });
    api.wait_for_heartbeats(1).await;
    let registers = api
        .fake
        .calls()
        .iter()
        .filter(|c| c.kind == Kind::Register)
        .count();
    assert_eq!(registers, 4);
    // The regained contact is recorded.
    timeout(
        Duration::from_secs(2),
        agent.status.wait_for(|s| s.out_of_contact_since.is_none()),
    )
    .await
    .expect("contact regained")
    .expect("agent alive");
    agent.shutdown.cancel();
}

#[tokio::test]
async fn an_idle_agent_exits_dead_man_about_the_dead_man_time_after_the_api_goes_away() {
    let api = Api::start().await;
    let agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(2).await;
    let fake = api.go_away().await;
    let gone = Instant::now();
    let reason = agent.ends_within(Duration::from_secs(5)).await;
    let after = gone.elapsed();
    assert_eq!(reason.expect("no error"), ExitReason::DeadMan);
    assert!(after >= Duration::from_millis(900), "too soon: {after:?}");
    assert!(after <= Duration::from_millis(2000), "too late: {after:?}");
    drop(fake);
}

#[tokio::test]
async fn an_agent_that_never_reaches_the_api_gives_up_after_the_dead_man_time() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    drop(listener);
    let started = Instant::now();
    let reason = spawn(args(&url, InstanceId::new()))
        .ends_within(Duration::from_secs(5))
        .await;
    assert_eq!(reason.expect("no error"), ExitReason::DeadMan);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn a_busy_agent_outlives_the_dead_man_time_and_exits_once_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let busy = dir.path().join("busy");
    std::fs::write(&busy, b"").expect("busy file");
    let api = Api::start().await;
    let mut agent = spawn(AgentArgs {
        busy_file: Some(busy.clone()),
        ..args(&api.url, InstanceId::new())
    });
    api.wait_for_heartbeats(2).await;
    assert!(api.fake.heartbeats().iter().all(|c| !c.idle));

    // The api stops answering: each call ends by the agent's own timeout.
    api.fake.answer(|a| a.hang = true);
    let hung = Instant::now();
    // The sign it outlived its dead-man time (1 s): a heartbeat it sent
    // well after that much time without an answer.
    api.wait_for("a heartbeat past the dead-man time", |calls| {
        calls
            .iter()
            .any(|c| c.kind == Kind::Heartbeat && c.at >= hung + Duration::from_millis(1500))
    })
    .await;
    assert!(!agent.task.is_finished(), "a busy agent exited");

    assert!(
        agent
            .status
            .borrow_and_update()
            .out_of_contact_since
            .is_some()
    );

    std::fs::remove_file(&busy).expect("work done");
    let reason = agent.ends_within(Duration::from_secs(2)).await;
    assert_eq!(reason.expect("no error"), ExitReason::DeadMan);
}

#[tokio::test]
async fn cancelling_the_token_ends_the_agent_with_signal() {
    let api = Api::start().await;
    let agent = spawn(args(&api.url, InstanceId::new()));
    api.wait_for_heartbeats(1).await;
    agent.shutdown.cancel();
    let reason = agent.ends_within(Duration::from_millis(500)).await;
    assert_eq!(reason.expect("no error"), ExitReason::Signal);
}

/// The built binary, configured only through the environment.
fn binary(url: &str, token: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_agent"));
    cmd.env_clear()
        .env("FLOTILLA_INSTANCE_ID", InstanceId::new().to_string())
        .env("FLOTILLA_WORKER_TOKEN", token)
        .env("FLOTILLA_API_URL", url)
        .env("AGENT_DEAD_MAN_SECONDS", "30")
        .env("LOG_LEVEL", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn the_binary_exits_zero_on_sigterm_once_it_heartbeats() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let api = Api::start().await;
    let child = binary(&api.url, TOKEN).spawn().expect("agent starts");
    api.wait_for_heartbeats(1).await;
    let pid = child.id().expect("running");
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits"));
    kill(pid, Signal::SIGTERM).expect("signal sent");
    let out = timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("exits in time")
        .expect("exit status");
    let logs = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "logs:\n{logs}");
    assert!(!logs.contains(TOKEN), "the token was logged:\n{logs}");
}

#[tokio::test]
async fn the_binary_exits_two_when_its_token_is_refused() {
    let api = Api::start().await;
    let child = binary(&api.url, "not-the-token")
        .spawn()
        .expect("agent starts");
    let out = timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .expect("exits in time")
        .expect("exit status");
    assert_eq!(
        out.status.code(),
        Some(2),
        "logs:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(api.fake.calls().len(), 1);
}

#[tokio::test]
async fn the_binary_exits_one_on_an_instance_id_that_is_not_a_uuid() {
    let out = binary("http://127.0.0.1:1", TOKEN)
        .env("FLOTILLA_INSTANCE_ID", "worker-7")
        .output()
        .await
        .expect("agent runs");
    assert_eq!(out.status.code(), Some(1));
}
