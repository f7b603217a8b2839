//! Row: `Provision` RPC → provider create call, p50/p99, at a steady request
//! rate (200/s by default), beside the latency of the create call alone made
//! directly to the provider-adapter at the same rate.
//!
//! Requests are sent open-loop (a slow answer does not slow the sender).
//! Latency runs from the moment the request is sent (so it includes the RPC
//! itself) to the machine's creation time as the simulated cloud recorded
//! it: api → commit with outbox row → relay → JetStream → scheduler wakes →
//! claim → intent committed → create.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use flotilla_proto::v1;
use tokio::time::MissedTickBehavior;

use crate::env::{API_TOKEN, POOL, authed};
use crate::ready::Pipeline;
use crate::stats::Samples;
use crate::table::{Line, ms};
use crate::{Ctx, Row};

type Sent = Arc<Mutex<Vec<(String, DateTime<Utc>)>>>;

pub async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Line>> {
    let p = Pipeline::start(ctx, &[]).await?;
    let rate = ctx.provision_rate.max(1);
    let total = (rate as u64 * ctx.measure.as_secs()).max(10) as usize;
    let period = Duration::from_secs_f64(1.0 / rate as f64);

    // Raw: the provider create call alone, same rate, same stack.
    let raw = {
        let lat = Arc::new(Mutex::new(Vec::with_capacity(total)));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..total {
            tick.tick().await;
            let mut client = p.provider.client.clone();
            let lat = lat.clone();
            tasks.spawn(async move {
                let t = std::time::Instant::now();
                let r = client
                    .create_machine(v1::CreateMachineRequest {
                        target: Some(v1::ProviderTarget {
                            provider: "sim".into(),
                            pool: POOL.into(),
                            region: "ams".into(),
                        }),
                        instance_id: uuid::Uuid::new_v4().to_string(),
                        name: format!("raw-{i}"),
                        instance_type: "shared-cpu-1x".into(),
                        image: "registry/worker:1".into(),
                        ..Default::default()
                    })
                    .await;
                if r.is_ok() {
                    lat.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(t.elapsed());
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        let v = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
        anyhow::ensure!(!v.is_empty(), "no direct create call succeeded");
        Samples::new(v)
    };

    // A short warm-up, so connection set-up is not in the figures.
    p.provision(5, "bench-warm").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sent: Sent = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        tick.tick().await;
        let mut fleet = p.fleet.clone();
        let sent = sent.clone();
        tasks.spawn(async move {
            let at = Utc::now();
            let r = fleet
                .provision(authed(
                    v1::ProvisionRequest {
                        pool: POOL.into(),
                        count: 1,
                        idempotency_key: format!("bench-lat-{i}"),
                        ..Default::default()
                    },
                    API_TOKEN,
                ))
                .await;
            if let Ok(r) = r
                && let Some(inst) = r.into_inner().instances.first()
            {
                sent.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((inst.id.clone(), at));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let sent = std::mem::take(&mut *sent.lock().unwrap_or_else(|e| e.into_inner()));
    anyhow::ensure!(
        sent.len() == total,
        "{} of {total} Provision calls failed",
        total - sent.len()
    );

    // Wait for every machine, then read when each was created.
    let want: HashMap<String, DateTime<Utc>> = sent.into_iter().collect();
    let mut created: HashMap<String, DateTime<Utc>> = HashMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while created.len() < want.len() {
        for m in p.provider.sim.sim().machines() {
            if let Some(id) = m.machine.config.env.get("FLOTILLA_INSTANCE_ID")
                && want.contains_key(id)
            {
                created.insert(id.clone(), m.machine.created_at);
            }
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} of {} machines created",
            created.len(),
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lat = Samples::new(
        want.iter()
            .map(|(id, at)| (created[id] - *at).to_std().unwrap_or_default())
            .collect(),
    );
    let p99 = lat.pct(99.0);
    let target = Duration::from_millis(25);
    let line = Line::new(
        Row::ProvisionLatency.label(),
        format!(
            "p50 {} / p99 {} (max {}) at {rate} req/s, {} calls",
            ms(lat.median()),
            ms(p99),
            ms(lat.max()),
            lat.len()
        ),
        format!(
            "direct create p50 {} / p99 {}",
            ms(raw.median()),
            ms(raw.pct(99.0))
        ),
        format!(
            "p99 {:.1}x of direct",
            p99.as_secs_f64() / raw.pct(99.0).as_secs_f64().max(1e-6)
        ),
        format!("p99 <= 25 ms at {} req/s", 200),
        Some(p99 <= target && rate >= 200),
    );
    Ok(vec![line])
}
