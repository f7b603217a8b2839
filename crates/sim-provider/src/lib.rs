//! A simulated Fly.io cloud speaking the Fly Machines REST API.
//!
//! Tests and benchmarks run Flotilla's provider against this instead of the
//! real cloud, which cannot be reached from CI. It owns an in-memory store of
//! machines and volumes per app, moves them through Fly's states with
//! configurable delays, answers with Fly's paths, bodies and status codes,
//! and injects the failures a real cloud produces ([`Faults`]). The ground
//! truth (what exists, in which state, how many calls were made) is readable
//! from a [`Sim`] directly or from the `/_sim` admin routes.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let handle = flotilla_sim_provider::start(Default::default()).await?;
//! let base = format!("{}/v1/apps/my-app/machines", handle.url());
//! // ... point a Fly client at `base` with `handle.token()` ...
//! let machines = handle.sim().machines();
//! # drop((base, machines));
//! handle.shutdown().await
//! # }
//! ```

mod admin;
mod api;
pub mod cli;
mod cloud;
mod error;
pub mod faults;
mod ids;
pub mod model;
mod schema;
mod server;
pub mod stats;

pub use cli::SimArgs;
pub use cloud::{
    DEFAULT_APP, MachineTruth, RecordedRequest, Sim, SimConfig, StateChange, VolumeTruth,
    WorkerProbe,
};
pub use error::ApiError;
pub use faults::{ErrorRates, Faults, InvalidFaults, Listing, Operation};
pub use model::{Machine, MachineState, Volume, VolumeState};
pub use server::{SimHandle, router, serve, start};
pub use stats::Stats;
