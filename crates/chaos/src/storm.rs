//! The storm driver: a stream of `Provision` and `Terminate` calls against
//! the api over gRPC, several in flight, while the chaos kills things. Every
//! command the api acknowledged (gRPC OK) is written to the ledger the
//! checker judges; a command that never got its OK is not a promise.
//!
//! Design notes: a call that fails in transport (api killed, restarting) is
//! retried for a while with the same idempotency key, because that is what a
//! careful client does, and because the key turns "was it applied?" into a
//! replayed answer rather than a second set of instances.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use rand::Rng;
use rand::seq::IteratorRandom;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use uuid::Uuid;

use crate::invariants::Ledger;

/// What the driver did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StormStats {
    pub provision_calls: u64,
    pub provision_acked: u64,
    pub terminate_calls: u64,
    pub terminate_acked: u64,
    /// Calls that got no OK even after retrying (not in the ledger).
    pub given_up: u64,
    /// Attempts that failed and were retried.
    pub retries: u64,
    pub replayed: u64,
}

/// The ledger and counters, shared by the concurrent calls.
#[derive(Debug, Default)]
pub struct Recorder {
    ledger: Mutex<Ledger>,
    stats: Mutex<StormStats>,
    /// Acknowledged and not yet named by a terminate: candidates for one.
    running: Mutex<BTreeSet<Uuid>>,
}

impl Recorder {
    pub fn ledger(&self) -> Ledger {
        self.ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stats(&self) -> StormStats {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn with_stats(&self, f: impl FnOnce(&mut StormStats)) {
        f(&mut self.stats.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// A FleetService client with the bearer token on every call.
#[derive(Debug, Clone)]
pub struct Fleet {
    client: FleetServiceClient<Channel>,
    token: String,
}

impl Fleet {
    /// Connects lazily: the api may be down right now.
    pub fn new(api_url: &str, token: &str) -> anyhow::Result<Fleet> {
        let channel = tonic::transport::Endpoint::from_shared(api_url.to_owned())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        Ok(Fleet {
            client: FleetServiceClient::new(channel),
            token: token.to_owned(),
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(v) = MetadataValue::try_from(format!("Bearer {}", self.token)) {
            r.metadata_mut().insert("authorization", v);
        }
        r
    }

    pub async fn create_pool(&self, pool: v1::Pool) -> Result<v1::Pool, Status> {
        let mut c = self.client.clone();
        c.create_pool(self.req(v1::CreatePoolRequest { pool: Some(pool) }))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn update_pool(&self, req: v1::UpdatePoolRequest) -> Result<v1::Pool, Status> {
        let mut c = self.client.clone();
        c.update_pool(self.req(req))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn provision(
        &self,
        req: v1::ProvisionRequest,
    ) -> Result<v1::ProvisionResponse, Status> {
        let mut c = self.client.clone();
        c.provision(self.req(req))
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn terminate(
        &self,
        req: v1::TerminateRequest,
    ) -> Result<v1::TerminateResponse, Status> {
        let mut c = self.client.clone();
        c.terminate(self.req(req))
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Worth retrying: the api (or what it needs) is down, not the request bad.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Cancelled
    )
}

/// Calls `f` until it answers OK, a permanent error, or `patience` runs out.
pub(crate) async fn with_retries<T, F, Fut>(
    recorder: &Recorder,
    patience: Duration,
    mut f: F,
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let started = Instant::now();
    loop {
        match f().await {
            Ok(answer) => return Some(answer),
            Err(status) if transient(&status) && started.elapsed() < patience => {
                recorder.with_stats(|s| s.retries += 1);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(status) => {
                eprintln!("chaos: storm call gave up: {status}");
                recorder.with_stats(|s| s.given_up += 1);
                return None;
            }
        }
    }
}

/// The shape of one storm.
#[derive(Debug, Clone)]
pub struct StormPlan {
    /// Each Provision names one of these, at random.
    pub pools: Vec<String>,
    /// Instances to ask for in total.
    pub instances: u64,
    /// Per cent of Provision calls matched by a Terminate call later.
    pub terminate_percent: u64,
    pub duration: Duration,
    pub concurrency: usize,
    /// How long one command is retried through outages.
    pub patience: Duration,
}

/// Runs the storm to its end; what the api acknowledged is in `recorder`.
pub async fn run(fleet: Fleet, plan: StormPlan, recorder: Arc<Recorder>) {
    // Mean instances per Provision is 2 (counts 1..=3).
    let provisions = plan.instances.div_ceil(2).max(1);
    let terminates = (provisions * plan.terminate_percent.min(100)).div_ceil(100);
    let ops = provisions + terminates;
    let gap = plan.duration.as_secs_f64() / ops as f64;
    let limit = Arc::new(tokio::sync::Semaphore::new(plan.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut asked = 0u64;
    let (mut p_done, mut t_done) = (0u64, 0u64);
    for n in 0..ops {
        let due = started + Duration::from_secs_f64(gap * n as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        // Terminate only once something is there to terminate, and keep
        // the two kinds interleaved over the whole storm.
        let want_terminate = t_done < terminates
            && (p_done >= provisions || rand::rng().random_bool(terminates as f64 / ops as f64))
            && !recorder
                .running
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_empty();
        let (fleet, recorder, plan) = (fleet.clone(), recorder.clone(), plan.clone());
        if want_terminate {
            t_done += 1;
            tasks.spawn(async move {
                terminate_some(&fleet, &recorder, &plan).await;
                drop(permit);
            });
        } else {
            p_done += 1;
            let remaining = plan.instances.saturating_sub(asked);
            let remaining = u32::try_from(remaining).unwrap_or(u32::MAX).max(1);
            let count = rand::rng().random_range(1..=3u32).min(remaining);
            asked += u64::from(count);
            tasks.spawn(async move {
                provision_some(&fleet, &recorder, &plan, count).await;
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn provision_some(fleet: &Fleet, recorder: &Recorder, plan: &StormPlan, count: u32) {
    recorder.with_stats(|s| s.provision_calls += 1);
    let key = Uuid::new_v4().to_string();
    let pool = plan
        .pools
        .iter()
        .choose(&mut rand::rng())
        .cloned()
        .unwrap_or_default();
    let req = v1::ProvisionRequest {
        pool,
        count,
        idempotency_key: key,
        labels: [("chaos".to_owned(), "storm".to_owned())].into(),
        ..Default::default()
    };
    let Some(answer) = with_retries(recorder, plan.patience, || fleet.provision(req.clone())).await
    else {
        return;
    };
    let ids: Vec<Uuid> = answer
        .instances
        .iter()
        .filter_map(|i| Uuid::parse_str(&i.id).ok())
        .collect();
    recorder
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .provisioned
        .extend(ids.iter().copied());
    recorder
        .running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(ids);
    recorder.with_stats(|s| {
        s.provision_acked += 1;
        s.replayed += u64::from(answer.replayed);
    });
}

async fn terminate_some(fleet: &Fleet, recorder: &Recorder, plan: &StormPlan) {
    let picked: Vec<Uuid> = {
        let mut running = recorder
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let n = rand::rng().random_range(1..=3usize);
        let picked: Vec<Uuid> = running.iter().copied().choose_multiple(&mut rand::rng(), n);
        for id in &picked {
            running.remove(id);
        }
        picked
    };
    if picked.is_empty() {
        return;
    }
    recorder.with_stats(|s| s.terminate_calls += 1);
    let req = v1::TerminateRequest {
        selector: Some(v1::InstanceSelector {
            instance_ids: picked.iter().map(Uuid::to_string).collect(),
            ..Default::default()
        }),
        force: rand::rng().random_bool(0.2),
        reason: "chaos storm".into(),
    };
    let Some(answer) = with_retries(recorder, plan.patience, || fleet.terminate(req.clone())).await
    else {
        // Not acknowledged: these stay wanted as far as the ledger knows;
        // whether the api applied them is unknown, so they are not judged
        // as either (see `Ledger::unsure`).
        recorder
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unsure
            .extend(picked);
        return;
    };
    let named: BTreeSet<Uuid> = answer
        .accepted_ids
        .iter()
        .chain(&answer.unchanged_ids)
        .filter_map(|id| Uuid::parse_str(id).ok())
        .collect();
    recorder
        .ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .terminated
        .extend(named);
    recorder.with_stats(|s| s.terminate_acked += 1);
}
