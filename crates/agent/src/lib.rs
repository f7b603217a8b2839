//! The `agent` that runs on every worker machine: it registers the worker
//! with the control plane, reports its boot phases, heartbeats with a small
//! load report, and ends the process when the control plane says so or
//! cannot be reached, so that a lost machine stops (and stops costing).
//!
//! Design notes: the boot path (register, then each phase) must get through,
//! so each call there is retried with backoff. Heartbeats need no retry of
//! their own: the next one is the retry. Contact is judged apart from the
//! calls by a dead-man watchdog: it starts counting when a call fails (from
//! the moment that call was sent) and stops at the next success, so time
//! spent installing without calling the api never counts as lost contact.
//! A worker that is busy is never ended by the watchdog: the work in
//! progress is worth more than the machine's cost until the api answers.
//! Only a refusal of the credentials ends the agent with an error: no
//! number of retries can change it.

pub mod client;
pub mod config;

use std::path::PathBuf;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use flotilla_proto::v1;
use flotilla_telemetry::CancellationToken;
use tokio::sync::watch;
use tokio::time::Instant;

pub use client::{CallError, Fault, WorkerApi};
pub use config::AgentArgs;

/// How often a worker past its dead-man deadline looks again at whether it
/// is still busy.
const BUSY_POLL: Duration = Duration::from_millis(250);
/// First delay before repeating a failed boot call.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest delay between boot call attempts, so contact is noticed soon
/// after the api comes back.
const RETRY_MAX_DELAY: Duration = Duration::from_secs(5);
/// The api accepts at most this many characters of hostname.
const MAX_HOSTNAME_CHARS: usize = 255;

/// Why the agent stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// The control plane asked this worker to shut down.
    Shutdown,
    /// SIGTERM or SIGINT (the shutdown token) was received.
    Signal,
    /// No call succeeded for the dead-man time while the worker was idle.
    DeadMan,
}

impl ExitReason {
    /// The process exit code `main` returns.
    pub const fn exit_code(self) -> u8 {
        match self {
            ExitReason::Shutdown | ExitReason::Signal => 0,
            ExitReason::DeadMan => 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The api refused this worker's credentials.
    #[error("the api rejected this worker: {0}")]
    Rejected(CallError),
    /// The configuration cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl AgentError {
    /// The process exit code `main` returns.
    pub const fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) => 1,
            AgentError::Rejected(_) => 2,
        }
    }
}

/// How far the worker has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Registering,
    Installing,
    Starting,
    Ready,
}

/// What the agent knows now; see [`Agent::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    pub stage: Stage,
    /// The control plane asked this worker to take no new work.
    pub cordoned: bool,
    pub heartbeat_interval: Duration,
    /// Heartbeats sent so far by this process (0: none yet).
    pub heartbeats_sent: u64,
    /// When the first failed call since the last success was sent.
    pub out_of_contact_since: Option<Instant>,
}

/// One worker's agent, built from its settings.
#[derive(Debug)]
pub struct Agent {
    api: WorkerApi,
    dead_man: Duration,
    install_time: Duration,
    start_time: Duration,
    busy_file: Option<PathBuf>,
    status: watch::Sender<AgentStatus>,
}

/// Runs an agent with `args` until it stops; see [`Agent::run`].
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> Result<ExitReason, AgentError> {
    Agent::new(&args)?.run(shutdown).await
}

impl Agent {
    /// Must be called inside a Tokio runtime. Fails only on unusable settings.
    pub fn new(args: &AgentArgs) -> Result<Agent, AgentError> {
        let tls = args.tls().map_err(|e| AgentError::Config(e.to_string()))?;
        let api = WorkerApi::new(
            &args.api_url,
            &tls,
            args.request_timeout(),
            args.keepalive(),
            args.instance_id,
            &args.worker_token,
        )?;
        let (status, _) = watch::channel(AgentStatus {
            stage: Stage::Registering,
            cordoned: false,
            heartbeat_interval: args.fallback_heartbeat_interval(),
            heartbeats_sent: 0,
            out_of_contact_since: None,
        });
        Ok(Agent {
            api,
            dead_man: args.dead_man(),
            install_time: args.install_time(),
            start_time: args.start_time(),
            busy_file: args.busy_file().map(PathBuf::from),
            status,
        })
    }

    /// Follows what the agent learns (cordon, interval, contact) as it runs.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Registers, reports the boot phases, then heartbeats until the api
    /// says shut down, `shutdown` is cancelled, or the dead-man watchdog
    /// fires. Errs only when the api rejects the credentials.
    pub async fn run(self, shutdown: CancellationToken) -> Result<ExitReason, AgentError> {
        tracing::info!(instance_id = %self.api.instance_id(), "agent starting");
        tokio::select! {
            biased;
            () = shutdown.cancelled() => Ok(ExitReason::Signal),
            () = self.dead_man_watch() => Ok(ExitReason::DeadMan),
            result = self.work() => result,
        }
    }

    async fn work(&self) -> Result<ExitReason, AgentError> {
        self.register().await?;
        let phases = [
            (
                v1::WorkerPhase::Installing,
                Stage::Installing,
                self.install_time,
            ),
            (v1::WorkerPhase::Starting, Stage::Starting, self.start_time),
            (v1::WorkerPhase::Ready, Stage::Ready, Duration::ZERO),
        ];
        for (phase, stage, time) in phases {
            self.report_phase(phase, stage).await?;
            tokio::time::sleep(time).await;
        }
        self.heartbeat_loop().await
    }

    async fn register(&self) -> Result<(), AgentError> {
        let hostname = hostname();
        let attempt = || self.observed(self.api.register(hostname.clone()));
        let answer = attempt
            .retry(backoff())
            .when(|e: &CallError| e.fault != Fault::Rejected)
            .await
            .map_err(AgentError::Rejected)?;
        self.learn(answer.cordoned, answer.heartbeat_interval_ms);
        tracing::info!(
            hostname,
            heartbeat_interval = ?self.status.borrow().heartbeat_interval,
            "registered"
        );
        Ok(())
    }

    /// A refused report is passed over: the api keeps the instance's state,
    /// and the heartbeats that follow tell the agent what to do (shut down)
    /// better than repeating a report the api will not take.
    async fn report_phase(&self, phase: v1::WorkerPhase, stage: Stage) -> Result<(), AgentError> {
        let attempt = || self.observed(self.api.report_phase(phase));
        let answer = attempt
            .retry(backoff())
            .when(|e: &CallError| e.fault == Fault::Transient)
            .await;
        self.status.send_modify(|s| s.stage = stage);
        match answer {
            Ok(answer) => {
                self.learn(answer.cordoned, 0);
                tracing::info!(phase = phase.as_str_name(), "phase reported");
                Ok(())
            }
            Err(e) => match e.fault {
                Fault::Rejected => Err(AgentError::Rejected(e)),
                Fault::Refused => {
                    tracing::warn!(phase = phase.as_str_name(), error = %e, "phase report refused; going on");
                    Ok(())
                }
                // `when` retries these until they succeed.
                Fault::Transient => Ok(()),
            },
        }
    }

    async fn heartbeat_loop(&self) -> Result<ExitReason, AgentError> {
        // The api drops a heartbeat whose sequence is not above the last
        // one it wrote. Counting from the wall clock in milliseconds keeps
        // a restarted agent above anything its predecessor could have sent
        // (one beat per millisecond at the very most); the api also forgets
        // the old sequence when the new process registers.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        let mut sent_count = 0;
        loop {
            sent_count += 1;
            let sequence = base + sent_count;
            let sent = Instant::now();
            let request = v1::HeartbeatRequest {
                instance_id: self.api.instance_id().to_owned(),
                load: load_average(),
                queue_depth: 0,
                idle: self.idle().await,
                gpus: Vec::new(),
                sequence,
            };
            let answer = self.observed(self.api.heartbeat(request)).await;
            self.status.send_modify(|s| s.heartbeats_sent = sent_count);
            match answer {
                Ok(answer) => {
                    self.learn(answer.cordoned, answer.heartbeat_interval_ms);
                    if answer.shutdown {
                        tracing::info!("the control plane asked this worker to shut down");
                        return Ok(ExitReason::Shutdown);
                    }
                }
                Err(e) => match e.fault {
                    Fault::Rejected => return Err(AgentError::Rejected(e)),
                    // The next heartbeat is the retry; the watchdog keeps time.
                    Fault::Refused | Fault::Transient => {}
                },
            }
            let interval = self.status.borrow().heartbeat_interval;
            tokio::time::sleep_until(sent + interval).await;
        }
    }

    /// Awaits one call and records what it says about contact.
    async fn observed<T>(
        &self,
        call: impl Future<Output = Result<T, CallError>>,
    ) -> Result<T, CallError> {
        let sent = Instant::now();
        let result = call.await;
        match &result {
            Ok(_) => {
                let since = self.status.borrow().out_of_contact_since;
                if let Some(since) = since {
                    tracing::info!(out_for = ?since.elapsed(), "contact with the control plane regained");
                    self.status.send_modify(|s| s.out_of_contact_since = None);
                }
            }
            Err(e) => {
                let since = self.status.borrow().out_of_contact_since;
                if since.is_none() {
                    tracing::warn!(error = %e, "lost contact with the control plane");
                    self.status
                        .send_modify(|s| s.out_of_contact_since = Some(sent));
                } else {
                    tracing::debug!(error = %e, "call failed");
                }
            }
        }
        result
    }

    /// Takes in the cordon flag and, when non-zero, the interval in ms.
    fn learn(&self, cordoned: bool, interval_ms: u32) {
        let interval = Duration::from_millis(interval_ms.into());
        self.status.send_if_modified(|s| {
            let mut changed = false;
            if s.cordoned != cordoned {
                s.cordoned = cordoned;
                changed = true;
                if cordoned {
                    tracing::info!("cordoned: this worker takes no new work");
                } else {
                    tracing::info!("uncordoned: this worker may take work again");
                }
            }
            if !interval.is_zero() && s.heartbeat_interval != interval {
                s.heartbeat_interval = interval;
                changed = true;
                tracing::info!(?interval, "heartbeat interval changed");
            }
            changed
        });
    }

    /// Resolves when no call has succeeded for the dead-man time and the
    /// worker is idle; never while contact holds.
    async fn dead_man_watch(&self) {
        let mut status = self.status.subscribe();
        let mut held_for_work = false;
        loop {
            let since = status.borrow_and_update().out_of_contact_since;
            let Some(since) = since else {
                held_for_work = false;
                changed(&mut status).await;
                continue;
            };
            let due = since + self.dead_man;
            if Instant::now() < due {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    () = changed(&mut status) => {}
                }
                continue;
            }
            if self.idle().await {
                tracing::warn!(
                    out_for = ?since.elapsed(),
                    "no contact with the control plane and idle: exiting so the machine stops"
                );
                return;
            }
            if !held_for_work {
                held_for_work = true;
                tracing::warn!(
                    "no contact with the control plane, but busy: staying up and trying"
                );
            }
            tokio::select! {
                () = tokio::time::sleep(BUSY_POLL) => {}
                () = changed(&mut status) => {}
            }
        }
    }

    async fn idle(&self) -> bool {
        match &self.busy_file {
            None => true,
            // A file that cannot be checked counts as present: wrongly
            // believing the worker busy costs machine time, wrongly
            // believing it idle could end its work.
            Some(path) => matches!(tokio::fs::try_exists(path).await, Ok(false)),
        }
    }
}

/// Waits for a status change; never returns once the sender is gone (it
/// lives as long as the agent, so that is only during teardown).
async fn changed(status: &mut watch::Receiver<AgentStatus>) {
    if status.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(RETRY_MIN_DELAY)
        .with_max_delay(RETRY_MAX_DELAY)
        .with_jitter()
        .without_max_times()
}

/// The one-minute load average, or 0 where it cannot be read.
pub fn load_average() -> f64 {
    // A procfs read does not block, so no need to leave the async thread.
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| parse_load_average(&text))
        .unwrap_or(0.0)
}

/// The first field of `/proc/loadavg`, or 0 when it is not a load.
pub fn parse_load_average(text: &str) -> f64 {
    text.split_whitespace()
        .next()
        .and_then(|field| field.parse::<f64>().ok())
        .filter(|load| load.is_finite() && *load >= 0.0)
        .unwrap_or(0.0)
}

/// This machine's name for the api's log, cut to what the api accepts.
fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .map(|name| name.trim().to_owned())
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_default()
        .chars()
        .take(MAX_HOSTNAME_CHARS)
        .collect()
}

/// The whole `agent` binary: parse settings, start telemetry, run until a
/// reason to stop, and map it to the process exit code. Kept here so other
/// packages (end-to-end tests) can ship the same binary.
pub async fn cli() -> std::process::ExitCode {
    use clap::Parser;
    use std::process::ExitCode;
    // Exit code 2 means rejected credentials here, so a bad setting must
    // not exit with clap's usual 2.
    let args = match AgentArgs::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let telemetry = match flotilla_telemetry::init("agent", &args.telemetry) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = flotilla_telemetry::shutdown::token_on_signal();
    let code = match run(args, shutdown).await {
        Ok(reason) => {
            tracing::info!(?reason, "agent stopped");
            reason.exit_code()
        }
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            e.exit_code()
        }
    };
    telemetry.shutdown();
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_is_the_first_field_of_proc_loadavg_and_zero_when_garbled() {
        assert_eq!(parse_load_average("0.52 0.40 0.31 1/123 4567\n"), 0.52);
        assert_eq!(parse_load_average(""), 0.0);
        assert_eq!(parse_load_average("high 0.40"), 0.0);
        assert_eq!(parse_load_average("NaN 1 1"), 0.0);
        assert_eq!(parse_load_average("-1 1 1"), 0.0);
    }

    #[test]
    fn exit_codes_tell_a_stop_from_a_lost_worker_from_a_rejected_one() {
        assert_eq!(ExitReason::Shutdown.exit_code(), 0);
        assert_eq!(ExitReason::Signal.exit_code(), 0);
        assert_eq!(ExitReason::DeadMan.exit_code(), 3);
        let rejected = AgentError::Rejected(CallError {
            rpc: "Register",
            code: tonic::Code::Unauthenticated,
            message: String::new(),
            fault: Fault::Rejected,
        });
        assert_eq!(rejected.exit_code(), 2);
        assert_eq!(AgentError::Config(String::new()).exit_code(), 1);
    }
}
