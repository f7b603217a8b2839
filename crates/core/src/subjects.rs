//! Logical subject names (`CMD.provision`, `EVT.instance.ready`): the one
//! place each is spelled. `flotilla_bus::subjects` re-exports them with the
//! namespace that prefixes them on the wire.
//!
//! They live here, below the store and the bus, because the store's outbox
//! writers name subjects in the transaction that causes them, and the bus
//! (which relays the outbox) depends on the store.

use crate::InstanceState;

pub const PROVISION: &str = "CMD.provision";
pub const TERMINATE: &str = "CMD.terminate";
pub const RECONCILE: &str = "CMD.reconcile";

/// Every event (the `EVT` stream's subjects).
pub const EVENTS: &str = "EVT.>";

/// Every instance event.
pub const INSTANCE_EVENTS: &str = "EVT.instance.>";

/// `EVT.instance.<state>`: the event of an instance entering `state`.
pub fn instance_event(state: InstanceState) -> String {
    format!("EVT.instance.{}", state.as_str())
}

/// `EVT.instance.cordoned` / `EVT.instance.uncordoned`: an instance was
/// drained or uncordoned, an act that changes no state. Under the instance
/// wildcard, so every watcher sees them; no state is spelled like them.
pub fn instance_cordon_event(cordoned: bool) -> &'static str {
    if cordoned {
        "EVT.instance.cordoned"
    } else {
        "EVT.instance.uncordoned"
    }
}

/// `EVT.instance.disrupted`: pool capacity is taking a healthy instance
/// away (scale-down, max lifetime, idle stop; the event's `action` says
/// which, see [`crate::disruption::Disruption`]), an act that changes no
/// state by itself. No state is spelled like it.
pub const INSTANCE_DISRUPTED: &str = "EVT.instance.disrupted";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_events_are_one_token_per_state_under_the_instance_wildcard() {
        assert_eq!(instance_event(InstanceState::Ready), "EVT.instance.ready");
        let prefix = INSTANCE_EVENTS.trim_end_matches('>');
        assert!(prefix.starts_with(EVENTS.trim_end_matches('>')));
        for s in InstanceState::ALL {
            let subject = instance_event(s);
            let state = subject.strip_prefix(prefix).expect("under EVT.instance.>");
            // A token with `.`, `*`, `>` or a space would not be one subject.
            assert_eq!(state, s.as_str());
            assert!(
                state.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{subject}"
            );
        }
        let acts = [
            instance_cordon_event(true),
            instance_cordon_event(false),
            INSTANCE_DISRUPTED,
        ];
        for subject in acts {
            let act = subject.strip_prefix(prefix).expect("under EVT.instance.>");
            assert!(act.bytes().all(|b| b.is_ascii_lowercase()), "{subject}");
            assert!(
                InstanceState::ALL.iter().all(|s| s.as_str() != act),
                "{subject} is no state's subject"
            );
        }
    }
}
