//! Conversions between domain enums (`flotilla-core`) and their wire forms.

use flotilla_core::{DesiredState, InstanceState};

use crate::v1;

impl From<InstanceState> for v1::InstanceState {
    fn from(s: InstanceState) -> Self {
        use InstanceState as S;
        use v1::InstanceState as P;
        match s {
            S::Requested => P::Requested,
            S::Provisioning => P::Provisioning,
            S::Booting => P::Booting,
            S::Installing => P::Installing,
            S::Starting => P::Starting,
            S::Ready => P::Ready,
            S::Draining => P::Draining,
            S::Stopping => P::Stopping,
            S::Stopped => P::Stopped,
            S::Deleting => P::Deleting,
            S::Terminated => P::Terminated,
            S::ProvisioningFailed => P::ProvisioningFailed,
            S::StartupFailed => P::StartupFailed,
            S::WorkerDead => P::WorkerDead,
            S::Lost => P::Lost,
            S::Abandoned => P::Abandoned,
            S::Warm => P::Warm,
        }
    }
}

/// The wire value names no state (UNSPECIFIED or an unknown number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unspecified or unknown state value {0}")]
pub struct UnknownWireState(pub i32);

/// The domain state of a raw enum value as prost stores it in messages.
pub fn state_from_wire(v: i32) -> Result<InstanceState, UnknownWireState> {
    v1::InstanceState::try_from(v)
        .map_err(|_| UnknownWireState(v))
        .and_then(InstanceState::try_from)
}

impl TryFrom<v1::InstanceState> for InstanceState {
    type Error = UnknownWireState;

    fn try_from(p: v1::InstanceState) -> Result<Self, Self::Error> {
        use InstanceState as S;
        use v1::InstanceState as P;
        Ok(match p {
            P::Unspecified => return Err(UnknownWireState(0)),
            P::Requested => S::Requested,
            P::Provisioning => S::Provisioning,
            P::Booting => S::Booting,
            P::Installing => S::Installing,
            P::Starting => S::Starting,
            P::Ready => S::Ready,
            P::Draining => S::Draining,
            P::Stopping => S::Stopping,
            P::Stopped => S::Stopped,
            P::Deleting => S::Deleting,
            P::Terminated => S::Terminated,
            P::ProvisioningFailed => S::ProvisioningFailed,
            P::StartupFailed => S::StartupFailed,
            P::WorkerDead => S::WorkerDead,
            P::Lost => S::Lost,
            P::Abandoned => S::Abandoned,
            P::Warm => S::Warm,
        })
    }
}

impl From<DesiredState> for v1::DesiredState {
    fn from(d: DesiredState) -> Self {
        match d {
            DesiredState::Running => v1::DesiredState::Running,
            DesiredState::Terminated => v1::DesiredState::Terminated,
            DesiredState::Warm => v1::DesiredState::Warm,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips_through_the_wire() {
        for s in InstanceState::ALL {
            let wire = v1::InstanceState::from(s);
            assert_eq!(InstanceState::try_from(wire), Ok(s));
            assert_eq!(state_from_wire(wire as i32), Ok(s));
            // The wire name is the database spelling, upper-cased and prefixed.
            assert_eq!(
                wire.as_str_name(),
                format!("INSTANCE_STATE_{}", s.as_str().to_uppercase())
            );
        }
        assert!(state_from_wire(0).is_err());
        assert!(state_from_wire(999).is_err());
    }
}
