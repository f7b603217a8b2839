//! Reading the two sides the checker compares: the database rows (read-only
//! SELECTs of the harness's own, since it judges the store rather than
//! using it) and the simulated cloud's ground truth from its `/_sim` routes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use flotilla_provider::TAG_INSTANCE;
use flotilla_sim_provider::{Faults, MachineTruth, Stats, VolumeTruth};
use sqlx::PgPool;
use uuid::Uuid;

use crate::invariants::{
    DbInstance, DbSnapshot, DbTransition, DbVolume, ProviderMachine, ProviderSnapshot,
    ProviderVolume, StateAt,
};

/// The states a verdict that an instance is gone moves it to.
pub const VERDICT_STATES: &[&str] = &["lost", "worker_dead"];

/// Every instance and volume row, every verdict that an instance was gone
/// and every termination (whoever wrote them: the check must not trust the
/// actor's name).
pub async fn db_snapshot(db: &PgPool) -> anyhow::Result<DbSnapshot> {
    let rows: Vec<(Uuid, String, String, Option<String>)> =
        sqlx::query_as("SELECT id, state, desired_state, provider_machine_id FROM instances")
            .fetch_all(db)
            .await
            .context("reading instances")?;
    let instances = rows
        .into_iter()
        .map(
            |(id, state, desired_state, provider_machine_id)| DbInstance {
                id,
                state,
                desired_state,
                provider_machine_id,
            },
        )
        .collect();
    let rows: Vec<(Uuid, Option<String>, String)> =
        sqlx::query_as("SELECT instance_id, provider_volume_id, state FROM instance_volumes")
            .fetch_all(db)
            .await
            .context("reading instance_volumes")?;
    let volumes = rows
        .into_iter()
        .map(|(instance_id, provider_volume_id, state)| DbVolume {
            instance_id,
            provider_volume_id,
            state,
        })
        .collect();
    let verdicts = transitions_to(db, VERDICT_STATES).await?;
    let terminations = transitions_to(db, &["terminated"]).await?;
    Ok(DbSnapshot {
        instances,
        volumes,
        verdicts,
        terminations,
    })
}

/// Every transition into one of `states`, with the machine its row records.
async fn transitions_to(db: &PgPool, states: &[&str]) -> anyhow::Result<Vec<DbTransition>> {
    /// Instance, its recorded machine, to state, actor, when.
    type Row = (Uuid, Option<String>, String, String, DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.instance_id, i.provider_machine_id, a.to_state, a.actor, a.at
         FROM action_logs a JOIN instances i ON i.id = a.instance_id
         WHERE a.to_state = ANY($1)",
    )
    .bind(states)
    .fetch_all(db)
    .await
    .with_context(|| format!("reading transitions to {states:?} from action_logs"))?;
    Ok(rows
        .into_iter()
        .map(|(instance, machine, to, actor, at)| DbTransition {
            instance,
            machine,
            to,
            actor,
            at,
        })
        .collect())
}

/// Writes a verdict the watchdog never gave: `instance` declared `lost`,
/// as the watchdog's own transition would record it. The harness plants
/// one after a run to show the check of "no instance replaced that was
/// alive" reads the verdicts it judges (it must report this one).
pub async fn plant_verdict(db: &PgPool, instance: Uuid, from: &str) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO action_logs (instance_id, from_state, to_state, actor, correlation_id, reason)
         VALUES ($1, $2, 'lost', 'watchdog', 'chaos-planted', 'planted by the chaos harness')",
    )
    .bind(instance)
    .bind(from)
    .execute(db)
    .await
    .context("planting a verdict")?;
    Ok(())
}

/// A client of the sim's admin routes.
#[derive(Debug, Clone)]
pub struct SimAdmin {
    http: reqwest::Client,
    base: String,
}

impl SimAdmin {
    pub fn new(base: &str) -> anyhow::Result<SimAdmin> {
        // reqwest is built without a default TLS provider; the harness only
        // speaks plain HTTP, but the client builder still wants one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(SimAdmin {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let answer = self.http.get(&url).send().await?.error_for_status()?;
        Ok(answer.json().await?)
    }

    /// What the cloud really holds, destroyed resources included.
    pub async fn snapshot(&self) -> anyhow::Result<ProviderSnapshot> {
        let machines: Vec<MachineTruth> = self.get("/_sim/machines").await?;
        let volumes: Vec<VolumeTruth> = self.get("/_sim/volumes").await?;
        Ok(ProviderSnapshot {
            machines: machines
                .into_iter()
                .map(|m| ProviderMachine {
                    instance_tag: m.machine.config.metadata.get(TAG_INSTANCE).cloned(),
                    id: m.machine.id,
                    state: m.machine.state.as_str().to_owned(),
                    history: m
                        .history
                        .into_iter()
                        .map(|c| StateAt {
                            state: c.state.as_str().to_owned(),
                            at: c.at,
                        })
                        .collect(),
                })
                .collect(),
            volumes: volumes
                .into_iter()
                .map(|v| ProviderVolume {
                    id: v.volume.id,
                    name: v.volume.name,
                    state: match v.volume.state {
                        flotilla_sim_provider::VolumeState::Created => "created",
                        flotilla_sim_provider::VolumeState::Destroyed => "destroyed",
                    }
                    .to_owned(),
                })
                .collect(),
        })
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        self.get("/_sim/stats").await
    }

    /// The fault set the sim applies now.
    pub async fn faults(&self) -> anyhow::Result<Faults> {
        self.get("/_sim/faults").await
    }

    /// Replaces the whole fault set, at once for every later call.
    pub async fn set_faults(&self, faults: &Faults) -> anyhow::Result<()> {
        let url = format!("{}/_sim/faults", self.base);
        self.http
            .put(&url)
            .json(faults)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Creates a machine behind Flotilla's back, tagged as if it were
    /// instance `owner`'s: the harness uses it to show the checker catches
    /// a leak.
    pub async fn plant_machine(
        &self,
        app: &str,
        token: &str,
        owner: Uuid,
    ) -> anyhow::Result<String> {
        let url = format!("{}/v1/apps/{app}/machines", self.base);
        let metadata: BTreeMap<&str, String> = [(TAG_INSTANCE, owner.to_string())].into();
        let body = serde_json::json!({ "config": { "image": "planted", "metadata": metadata } });
        // Injected faults apply to /v1 as well: retry until one lands.
        for _ in 0..50 {
            let answer = self
                .http
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await?;
            if answer.status().is_success() {
                let machine: serde_json::Value = answer.json().await?;
                return machine["id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("machine without id");
            }
        }
        anyhow::bail!("could not plant a machine through the injected faults")
    }
}

/// Sim calls answered with each non-2xx status, summed over operations.
pub fn error_answers(stats: &Stats) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for by_status in stats.requests.values() {
        for (&status, &n) in by_status {
            if status >= 300 {
                *out.entry(status).or_default() += n;
            }
        }
    }
    out
}

/// Sim calls in total.
pub fn total_calls(stats: &Stats) -> u64 {
    stats.requests.values().flat_map(|m| m.values()).sum()
}
