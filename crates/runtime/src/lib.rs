//! What every Flotilla service that runs reconcile loops shares, written
//! once: its start and stop ([`service`]), the registry that drives its
//! loops and keeps their status ([`loops`]), and the per-instance
//! reconcile driver its loops claim and step work with ([`reconcile`]).
//!
//! A service's own library holds only what the service owns: its steps,
//! its settings, which loops it registers.

pub mod lease;
pub mod loops;
pub mod reconcile;
pub mod service;

pub use lease::{Fence, LeaseLost};
pub use loops::{LoopStatus, Loops};
pub use reconcile::{Step, reconcile};
pub use service::Runtime;
