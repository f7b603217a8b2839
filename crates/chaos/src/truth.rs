//! Reading the two sides the checker compares: the database rows (read-only
//! SELECTs of the harness's own, since it judges the store rather than
//! using it) and the simulated cloud's ground truth from its `/_sim` routes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use flotilla_provider::TAG_INSTANCE;
use flotilla_sim_provider::{MachineTruth, Stats, VolumeTruth};
use sqlx::PgPool;
use uuid::Uuid;

use crate::invariants::{
    DbInstance, DbSnapshot, DbVolume, ProviderMachine, ProviderSnapshot, ProviderVolume,
};

/// Every instance and volume row.
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
    Ok(DbSnapshot { instances, volumes })
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
