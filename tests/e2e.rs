//! The end-to-end tests across Flotilla's services, as one test binary
//! (one link instead of one per file); each file is a module of it. Each
//! test brings its own database, NATS namespace, ports and processes, so
//! they run side by side in one process.
//!
//! `promtool.rs` is the exception, its own binary (see `Cargo.toml`).

#[path = "cli_story.rs"]
mod cli_story;
#[path = "compose.rs"]
mod compose;
#[path = "local_fleet.rs"]
mod local_fleet;
#[path = "provision_path.rs"]
mod provision_path;
#[path = "trace_chain.rs"]
mod trace_chain;
