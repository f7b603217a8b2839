//! Active health checks: a booting worker that never reports its phases
//! (an image without the agent, or an agent that cannot reach the api) is
//! still seen `ready` once its health endpoint answers; and such a worker,
//! once ready, keeps being probed, because it will never heartbeat: its
//! probes are its liveness (the watchdog declares it dead from them, see
//! `flotilla_store::watchdog`).
//!
//! Design notes: the pool names the URL ([`HealthUrl`]); probes of one
//! instance back off exponentially while it does not answer (the schedule
//! is in the database, so it survives restarts and replicas share it); a
//! result is cached for a short time so that a re-evaluation right after a
//! probe (a lost version race, a second replica) does not probe again; and
//! an instance whose worker heartbeated recently is not probed at all —
//! the worker's own report is better evidence than a probe from outside.
//! A failed probe never fails the instance here: the pool's phase deadline
//! (`boot.rs`) does that while it boots, and the watchdog, after a run of
//! failures and the provider's confirmation, once it is ready — so a slow
//! boot or a blip and a dead worker are told apart by time, not by one
//! probe. A probe of a ready worker that answers ends the run of failures
//! and schedules the next probe one interval later.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use flotilla_core::health::HealthUrl;
use flotilla_core::{Classify, InstanceState};
use flotilla_proto::status::status_to_provider_error;
use flotilla_proto::v1;
use flotilla_store::health::{
    HealthClaim, HealthDue, health_claim_due, health_record_address, health_record_failure,
    health_record_ok,
};
use flotilla_store::instance::{Transition, instance_transition};
use flotilla_store::{StoreError, WriteCtx};
use flotilla_telemetry::grpc::outgoing;
use flotilla_telemetry::loops::ActivationStatus;
use futures::StreamExt;

use crate::Scheduler;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A 2xx answer.
    Up,
    /// Anything else, with what was seen.
    Down(String),
}

impl Probe {
    /// The `outcome` label of the probe metrics.
    pub const OUTCOMES: [&'static str; 2] = ["up", "down"];

    fn outcome(&self) -> &'static str {
        match self {
            Probe::Up => "up",
            Probe::Down(_) => "down",
        }
    }
}

/// Probes health URLs, remembering each answer for a short time.
#[derive(Debug)]
pub struct HealthChecker {
    client: reqwest::Client,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Probe)>>,
}

/// Entries kept before expired ones are swept out.
const CACHE_SWEEP_AT: usize = 4096;

impl HealthChecker {
    /// Probes bounded by `timeout`, outcomes cached for `ttl`, connects by
    /// [`DEFAULT_CONNECT_TIMEOUT`](flotilla_telemetry::http_client::DEFAULT_CONNECT_TIMEOUT).
    pub fn new(timeout: Duration, ttl: Duration) -> HealthChecker {
        Self::with_connect_timeout(
            timeout,
            ttl,
            flotilla_telemetry::http_client::DEFAULT_CONNECT_TIMEOUT,
        )
    }

    /// As [`new`](Self::new), a connect taking at most `connect_timeout`
    /// (`HTTP_CONNECT_TIMEOUT_SECONDS`).
    pub fn with_connect_timeout(
        timeout: Duration,
        ttl: Duration,
        connect_timeout: Duration,
    ) -> HealthChecker {
        // Each outcome has its series from the start, so `rate()` and
        // `increase()` see the first probe.
        for outcome in Probe::OUTCOMES {
            metrics::counter!("flotilla_scheduler_health_checks_total", "outcome" => outcome)
                .increment(0);
            // Registering a histogram exports it with no observations.
            let _ = metrics::histogram!(
                "flotilla_scheduler_health_check_duration_seconds",
                "outcome" => outcome
            );
        }
        HealthChecker {
            client: flotilla_telemetry::http_client::client_builder(timeout, connect_timeout)
                .build()
                .expect("a reqwest client with rustls builds"),
            ttl,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The answer of `url`, from the cache when it is fresh enough.
    pub async fn check(&self, url: &str) -> Probe {
        if let Some(hit) = self.cached(url) {
            return hit;
        }
        let started = Instant::now();
        let probe = match self.client.get(url).send().await {
            Ok(r) if r.status().is_success() => Probe::Up,
            Ok(r) => Probe::Down(format!("health check answered {}", r.status())),
            Err(e) if e.is_timeout() => Probe::Down("health check timed out".to_owned()),
            Err(e) if e.is_connect() => Probe::Down("health check: connection refused".to_owned()),
            Err(e) => Probe::Down(format!("health check failed: {e}")),
        };
        let outcome = probe.outcome();
        metrics::histogram!("flotilla_scheduler_health_check_duration_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("flotilla_scheduler_health_checks_total", "outcome" => outcome)
            .increment(1);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_SWEEP_AT {
            let ttl = self.ttl;
            cache.retain(|_, (at, _)| at.elapsed() < ttl);
        }
        cache.insert(url.to_owned(), (Instant::now(), probe.clone()));
        probe
    }

    fn cached(&self, url: &str) -> Option<Probe> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(url)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, p)| p.clone())
    }
}

impl Scheduler {
    /// One activation: probes the instances that are due, moves the booting
    /// ones that answer to `ready`, and records what the probes of ready
    /// ones found.
    #[tracing::instrument(skip_all, name = "scheduler.health")]
    pub async fn health_once(&self, checker: &HealthChecker) -> ActivationStatus {
        let mut status = ActivationStatus::default();
        let claim = HealthClaim {
            heartbeat_priority: self.tuning.heartbeat_priority(),
            hold: self.tuning.health_check_timeout() * 2 + Duration::from_secs(1),
            limit: self.tuning.scheduler_batch,
        };
        let due = match health_claim_due(&self.db, &claim).await {
            Ok(due) => due,
            Err(e) => {
                status.error(e.class(), "claim health checks", e);
                return status;
            }
        };
        status.found = due.len() as u64;
        let ctx = WriteCtx::new("scheduler");
        let checks = due.into_iter().map(|row| {
            let ctx = &ctx;
            async move {
                let id = row.id;
                (id, self.check_one(ctx, checker, row).await)
            }
        });
        let mut results = futures::stream::iter(checks)
            .buffer_unordered(self.tuning.scheduler_provider_concurrency.max(1));
        while let Some((id, result)) = results.next().await {
            match result {
                Ok(true) => status.acted += 1,
                Ok(false) => {}
                Err(e) => status.error(e.class(), id, e),
            }
        }
        status
    }

    /// Probes one instance; `true` when it became ready.
    async fn check_one(
        &self,
        ctx: &WriteCtx,
        checker: &HealthChecker,
        row: HealthDue,
    ) -> Result<bool, StoreError> {
        let template = match HealthUrl::parse(&row.health_check_url) {
            Ok(t) => t,
            // The api refuses bad templates; one written around it is
            // reported once per backoff step, not probed.
            Err(e) => {
                let error = format!("pool {} health_check_url: {e}", row.pool);
                return self.probe_failed(&row, &error).await.map(|()| false);
            }
        };
        let address = match (&row.address, template.needs_private_ip()) {
            (Some(a), _) => a.clone(),
            (None, false) => String::new(),
            (None, true) => match self.private_ip(ctx, &row).await {
                Ok(ip) => ip,
                Err(error) => return self.probe_failed(&row, &error).await.map(|()| false),
            },
        };
        let id = row.id.to_string();
        let vars = BTreeMap::from([
            ("machine_id", row.provider_machine_id.as_str()),
            ("instance_id", id.as_str()),
            ("name", row.name.as_str()),
            ("private_ip", address.as_str()),
        ]);
        match checker.check(&template.render(&vars)).await {
            Probe::Up if row.state == InstanceState::Ready => {
                self.probe_answered(&row).await.map(|()| false)
            }
            Probe::Up => self.mark_ready(ctx, &row).await,
            Probe::Down(error) => self.probe_failed(&row, &error).await.map(|()| false),
        }
    }

    /// A probe answered: the run of failures (if any) ends; the next probe
    /// of this instance is one interval from now.
    async fn probe_answered(&self, row: &HealthDue) -> Result<(), StoreError> {
        let at = chrono::Utc::now()
            + chrono::Duration::from_std(self.tuning.health_backoff().base)
                .unwrap_or(chrono::Duration::seconds(1));
        let mut conn = self.db.acquire().await?;
        health_record_ok(&mut conn, row.id, at).await
    }

    async fn mark_ready(&self, ctx: &WriteCtx, row: &HealthDue) -> Result<bool, StoreError> {
        let mut conn = self.db.acquire().await?;
        let moved = instance_transition(
            &mut conn,
            ctx,
            &Transition {
                id: row.id,
                from: row.state,
                to: InstanceState::Ready,
                expected_version: row.version,
                error: None,
                reason: Some("active health check answered"),
            },
        )
        .await;
        match moved {
            Ok(ready) => {
                drop(conn);
                flotilla_telemetry::metrics::instance_ready(
                    &ready.pool,
                    ready.seconds_requested_to_state(),
                );
                // A worker that came up by probe alone is probed on while
                // ready (it may have no agent to heartbeat).
                self.probe_answered(row).await?;
                tracing::info!(instance_id = %row.id, from = %row.state, "ready by health check");
                Ok(true)
            }
            // The worker reported meanwhile (or the instance is being torn
            // down): its own word wins; the next tick looks again if needed.
            Err(StoreError::Conflict(_) | StoreError::IllegalTransition(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn probe_failed(&self, row: &HealthDue, error: &str) -> Result<(), StoreError> {
        let failures = row.failures.saturating_add(1);
        let delay = self
            .tuning
            .health_backoff()
            .delay(failures.max(1) as u32, rand::random());
        let at = chrono::Utc::now()
            + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::seconds(60));
        let mut conn = self.db.acquire().await?;
        health_record_failure(&mut conn, row.id, failures, at, error).await?;
        tracing::debug!(instance_id = %row.id, failures, ?delay, error, "health check failed");
        Ok(())
    }

    /// Reads the machine's private address from the provider and keeps it.
    async fn private_ip(&self, ctx: &WriteCtx, row: &HealthDue) -> Result<String, String> {
        let machine = self
            .provider
            .clone()
            .get_machine(outgoing(
                v1::MachineRef {
                    target: Some(v1::ProviderTarget {
                        provider: row.provider.clone(),
                        pool: row.pool.clone(),
                        region: row.region.clone(),
                    }),
                    machine_id: row.provider_machine_id.clone(),
                },
                &ctx.correlation_id,
            ))
            .await
            .map_err(|s| {
                format!(
                    "reading the machine address: {}",
                    status_to_provider_error(&s)
                )
            })?
            .into_inner();
        if machine.private_ip.is_empty() {
            return Err("the provider reports no private address yet".to_owned());
        }
        let mut conn = self.db.acquire().await.map_err(|e| e.to_string())?;
        health_record_address(&mut conn, row.id, &machine.private_ip)
            .await
            .map_err(|e| e.to_string())?;
        Ok(machine.private_ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-route HTTP server answering `status`, counting requests.
    async fn server(status: u16) -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hits = std::sync::Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/healthz", listener.local_addr().unwrap());
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });
        (url, hits)
    }

    #[tokio::test]
    async fn an_answer_is_reused_while_fresh_and_asked_again_after() {
        use std::sync::atomic::Ordering;
        let (url, hits) = server(200).await;
        let checker = HealthChecker::new(Duration::from_secs(2), Duration::from_millis(300));
        assert_eq!(checker.check(&url).await, Probe::Up);
        assert_eq!(checker.check(&url).await, Probe::Up);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the second answer came from the cache"
        );
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(checker.check(&url).await, Probe::Up);
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "an expired answer is asked again"
        );
    }

    #[tokio::test]
    async fn non_success_refused_and_silent_endpoints_are_down() {
        let (url, _) = server(503).await;
        let checker = HealthChecker::new(Duration::from_millis(300), Duration::ZERO);
        assert!(matches!(checker.check(&url).await, Probe::Down(e) if e.contains("503")));
        // A port nobody listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert!(matches!(
            checker.check(&format!("http://{closed}/healthz")).await,
            Probe::Down(_)
        ));
        // Accepts and never answers: the timeout ends the probe.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_url = format!("http://{}/healthz", silent.local_addr().unwrap());
        let keep = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        assert_eq!(
            checker.check(&silent_url).await,
            Probe::Down("health check timed out".to_owned())
        );
        keep.abort();
    }
}
