//! The wire types of the Fly Machines API subset the sim speaks.
//!
//! Field names, state spellings and id shapes follow Fly's documentation so
//! that a client written against these types works against the real API.
//! Machine configs keep the documented fields the sim does not model in
//! `extra`, so the config comes back as it was given; a field the published
//! schema does not name is refused before a body gets here (`schema`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// A machine's state, spelled as Fly spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    Created,
    Starting,
    Started,
    Stopping,
    Stopped,
    Suspending,
    Suspended,
    Replacing,
    Destroying,
    Destroyed,
    Failed,
    /// Transient: a config update is being applied (shown only under the
    /// `transient_state_rate` fault).
    Updating,
    /// Transient: the machine is being restarted (same fault).
    Restarting,
}

impl MachineState {
    /// States a machine may be destroyed from without `force=true`.
    pub const DESTROYABLE: &'static [MachineState] = &[
        MachineState::Stopped,
        MachineState::Suspended,
        MachineState::Failed,
        MachineState::Created,
    ];

    /// States the `wait` endpoint accepts as a target.
    pub const WAITABLE: &'static [MachineState] = &[
        MachineState::Started,
        MachineState::Stopped,
        MachineState::Suspended,
        MachineState::Destroyed,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            MachineState::Created => "created",
            MachineState::Starting => "starting",
            MachineState::Started => "started",
            MachineState::Stopping => "stopping",
            MachineState::Stopped => "stopped",
            MachineState::Suspending => "suspending",
            MachineState::Suspended => "suspended",
            MachineState::Replacing => "replacing",
            MachineState::Destroying => "destroying",
            MachineState::Destroyed => "destroyed",
            MachineState::Failed => "failed",
            MachineState::Updating => "updating",
            MachineState::Restarting => "restarting",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name is not one of Fly's machine states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown machine state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for MachineState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let state = match s {
            "created" => MachineState::Created,
            "starting" => MachineState::Starting,
            "started" => MachineState::Started,
            "stopping" => MachineState::Stopping,
            "stopped" => MachineState::Stopped,
            "suspending" => MachineState::Suspending,
            "suspended" => MachineState::Suspended,
            "replacing" => MachineState::Replacing,
            "destroying" => MachineState::Destroying,
            "destroyed" => MachineState::Destroyed,
            "failed" => MachineState::Failed,
            "updating" => MachineState::Updating,
            "restarting" => MachineState::Restarting,
            other => return Err(UnknownState(other.to_owned())),
        };
        Ok(state)
    }
}

/// A machine as `GET /v1/apps/{app}/machines/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    pub region: String,
    pub instance_id: String,
    pub private_ip: String,
    pub config: MachineConfig,
    #[serde(serialize_with = "rfc3339_secs")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_secs")]
    pub updated_at: DateTime<Utc>,
}

/// The part of a machine config the sim acts on; everything else rides in
/// `extra` untouched.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<Guest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Fly destroys such a machine once it exits; the sim does the same
    /// whenever it reaches `stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_destroy: Option<bool>,
    /// Accepted and echoed; the sim never restarts a machine by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Guest {
    #[serde(default = "Guest::default_cpu_kind")]
    pub cpu_kind: String,
    #[serde(default = "Guest::default_cpus")]
    pub cpus: u32,
    #[serde(default = "Guest::default_memory_mb")]
    pub memory_mb: u32,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Guest {
    fn default_cpu_kind() -> String {
        "shared".to_owned()
    }

    const fn default_cpus() -> u32 {
        1
    }

    const fn default_memory_mb() -> u32 {
        256
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    pub volume: String,
    pub path: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Restart {
    pub policy: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Restart {
    pub const POLICIES: &'static [&'static str] = &["no", "always", "on-failure"];
}

/// Body of `POST /v1/apps/{app}/machines`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateMachineRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub config: MachineConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_launch: Option<bool>,
}

/// Body of `POST .../machines/{id}/stop`; the sim accepts but does not use it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StopRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// Answer of `POST .../machines/{id}/start`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartResponse {
    pub previous_state: MachineState,
    pub migrated: bool,
    pub new_host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Created,
    Destroyed,
}

/// A volume as `GET /v1/apps/{app}/volumes/{id}` returns it. Fly volumes
/// carry no metadata: a client finds its volumes by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub state: VolumeState,
    pub size_gb: u32,
    pub region: String,
    pub attached_machine_id: Option<String>,
    #[serde(serialize_with = "rfc3339_secs")]
    pub created_at: DateTime<Utc>,
}

/// Body of `POST /v1/apps/{app}/volumes`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreateVolumeRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub size_gb: u32,
}

impl CreateVolumeRequest {
    pub const MAX_NAME_LEN: usize = 30;
    pub const SIZE_GB: std::ops::RangeInclusive<u32> = 1..=500;
}

/// Fly writes timestamps to the second (`2024-05-01T12:00:00Z`).
fn rfc3339_secs<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::Secs, true))
}
