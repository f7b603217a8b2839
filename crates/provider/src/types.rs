//! The provider vocabulary: machine and volume specs, what providers report,
//! the ownership tags, and paging.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use flotilla_core::InstanceId;
use serde::{Deserialize, Serialize};

/// The ownership tags are shared with the services that read listings.
pub use flotilla_core::tags::{TAG_CONTROL_PLANE, TAG_INSTANCE, TAG_POOL};

/// Every documented machine state, mapped exactly from each provider's
/// spelling; `Unknown` keeps an undocumented one from being guessed at.
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
    /// Fly: the machine is being created (before `created`).
    Creating,
    /// Fly: a restart is under way (the machine will be started again).
    Restarting,
    /// Fly: the launch failed; the machine exists and is not running.
    LaunchFailed,
    /// Fly: a config update is being applied.
    Updating,
    /// Fly: this version of the machine was replaced by a newer one.
    Replaced,
    /// Fly: the machine was moved to another host.
    Migrated,
    Unknown,
}

impl MachineState {
    /// In passing: the machine is on its way between settled states, or in
    /// a state nobody documented. Never evidence that it is dead or gone;
    /// a caller waits it out (bounded) and looks again.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            MachineState::Creating
                | MachineState::Starting
                | MachineState::Stopping
                | MachineState::Suspending
                | MachineState::Replacing
                | MachineState::Destroying
                | MachineState::Restarting
                | MachineState::Updating
                | MachineState::Replaced
                | MachineState::Migrated
                | MachineState::Unknown
        )
    }

    /// Settled states where a delete without force is accepted.
    pub fn is_deletable(self) -> bool {
        matches!(
            self,
            MachineState::Created
                | MachineState::Stopped
                | MachineState::Suspended
                | MachineState::Failed
                | MachineState::LaunchFailed
        )
    }

    /// The machine runs or is about to.
    pub fn is_running(self) -> bool {
        matches!(self, MachineState::Starting | MachineState::Started)
    }

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
            MachineState::Creating => "creating",
            MachineState::Restarting => "restarting",
            MachineState::LaunchFailed => "launch_failed",
            MachineState::Updating => "updating",
            MachineState::Replaced => "replaced",
            MachineState::Migrated => "migrated",
            MachineState::Unknown => "unknown",
        }
    }
}

/// The shape of a pool's machines, checked before any is created.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecCheck {
    pub region: String,
    pub instance_type: String,
    pub image: String,
    /// 0: no data volume.
    pub volume_size_gb: u32,
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineSpec {
    pub instance_id: InstanceId,
    /// 1-63 chars [a-z0-9-].
    pub name: String,
    pub pool: String,
    pub region: String,
    pub instance_type: String,
    /// Image reference (for `local`, the command to run).
    pub image: String,
    /// Environment of the machine's main process.
    pub env: BTreeMap<String, String>,
    /// Extra tags; the ownership tags are added by the provider.
    pub tags: BTreeMap<String, String>,
    pub volume_ids: Vec<String>,
    /// Start as part of the create, where the provider can.
    pub start: bool,
}

/// A machine as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub id: String,
    pub name: String,
    pub state: MachineState,
    /// The provider's own spelling of the state.
    pub provider_state: String,
    pub region: String,
    pub instance_type: String,
    pub tags: BTreeMap<String, String>,
    pub created_at: Option<DateTime<Utc>>,
    pub private_ip: String,
}

impl Machine {
    /// The instance this machine belongs to, from its ownership tag.
    pub fn instance_id(&self) -> Option<InstanceId> {
        self.tags.get(TAG_INSTANCE).and_then(|s| s.parse().ok())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Creating,
    Available,
    Attached,
    Destroying,
    Destroyed,
    Failed,
    Unknown,
}

/// What volume to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    pub instance_id: InstanceId,
    pub pool: String,
    pub region: String,
    /// GB, 1-10000; each provider refuses above its own limit (Fly: 500).
    pub size_gb: u32,
}

/// A volume as the provider reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub state: VolumeState,
    pub provider_state: String,
    pub size_gb: u32,
    pub region: String,
    pub attached_machine_id: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub created_at: Option<DateTime<Utc>>,
    /// The owning instance, from tags or (where volumes have no tags) the name.
    pub instance_id: Option<InstanceId>,
}

/// One page of a listing request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// 1-1000; 0 means the provider's default.
    pub size: u32,
    /// From the previous page; `None` for the first.
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// `None` on the last page.
    pub next: Option<String>,
}

/// The ownership tags every created resource carries.
pub fn ownership_tags(
    instance: InstanceId,
    pool: &str,
    control_plane: &str,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (TAG_INSTANCE.to_owned(), instance.to_string()),
        (TAG_POOL.to_owned(), pool.to_owned()),
        (TAG_CONTROL_PLANE.to_owned(), control_plane.to_owned()),
    ])
}
