//! The chaos harness of issues #9 and #15: every Flotilla service as its
//! own process (two replicas of scheduler, terminator and watchdog) against
//! the simulated cloud with injected faults, a storm of `Provision` and
//! `Terminate` calls, `kill -9`s of random services, one restart each of
//! NATS and PostgreSQL (or of one node of a 3-node NATS cluster),
//! partitions through TCP fault proxies, a paused replica, lying listings
//! and 404s, and PostgreSQL out of connections; then the wait for
//! convergence and the invariant checks against the provider's own truth:
//! 0 lost, 0 leaked, 0 duplicated, no instance replaced that was alive,
//! database equal to provider.
//!
//! It exists because the promises in ARCHITECTURE.md are about crashes, and
//! in-process tests cannot crash a process. PostgreSQL and NATS are private
//! instances started here, never the shared ones.

pub mod cluster;
pub mod exhaust;
pub mod infra;
pub mod invariants;
pub mod lifecycle;
pub mod proxy;
pub mod report;
pub mod run;
pub mod storm;
pub mod supervisor;
pub mod timeline;
pub mod truth;

pub use cluster::{Cluster, build_service_binaries, default_bin_dir};
pub use invariants::{Ledger, Violation, check};
pub use lifecycle::{LifecycleReport, lifecycle};
pub use report::ChaosReport;
pub use run::{ChaosConfig, run};
