//! The api over real gRPC, on a real PostgreSQL and `nats-server -js`:
//! provisioning with its idempotency and all-or-nothing validation,
//! authentication of both APIs, listing, history, the event watch, pools
//! and their spend caps, and boot phases reported by workers.
//!
//! One test binary; each topic is a module of it, and what they share is
//! in `common`.

#[path = "common.rs"]
mod common;

#[path = "auth.rs"]
mod auth;
#[path = "cordon.rs"]
mod cordon;
#[path = "fuzz.rs"]
mod fuzz;
#[path = "grpc_surface.rs"]
mod grpc_surface;
#[path = "instances.rs"]
mod instances;
#[path = "pools.rs"]
mod pools;
#[path = "pools_delete.rs"]
mod pools_delete;
#[path = "provision.rs"]
mod provision;
#[path = "security.rs"]
mod security;
#[path = "shutdown.rs"]
mod shutdown;
#[path = "spend.rs"]
mod spend;
#[path = "terminate.rs"]
mod terminate;
#[path = "warm.rs"]
mod warm;
#[path = "watch.rs"]
mod watch;
#[path = "workers.rs"]
mod workers;
