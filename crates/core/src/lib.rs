//! Flotilla's domain: what an instance is and how it may change.
//!
//! This crate has no I/O. It owns the instance state machine (the one
//! transition table), the identifiers that tie provider resources back to
//! rows (ids and the provider ownership tags), the closed set of error classes every layer speaks, the retry
//! policy, the price table, voluntary disruption (budgets, replacement names), the logical subject names, the configuration every binary
//! shares, and how bearer tokens are hashed and compared.

pub mod backoff;
pub mod config;
pub mod disruption;
pub mod error;
pub mod health;
pub mod ids;
pub mod price;
pub mod state;
pub mod subjects;
pub mod tags;
pub mod token;

pub use error::{Classify, ErrorClass, ProviderError};
pub use ids::{CorrelationId, InstanceId};
pub use state::{DesiredState, IllegalTransition, InstanceState, check_transition};
