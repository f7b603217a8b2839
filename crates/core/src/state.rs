//! The instance lifecycle: every state, every allowed transition, in one table.
//!
//! Every state write in Flotilla goes through [`check_transition`]; the store
//! refuses to write a transition this table does not list. Groups of states
//! that loops select on (terminal, live, deletable…) are constants here so the
//! SQL and the code agree on them.
//!
//! Design notes: the table is deliberately a flat list of `(from, &[to])`
//! rows rather than scattered `match` arms, so a reviewer sees the whole
//! lifecycle at once and the exhaustive tests in this module can walk it.
//! Retrying a step (another provisioning attempt, another delete attempt) is
//! not a transition: the row stays in its state and only its attempt
//! bookkeeping changes, which keeps "state only says what is true" — an
//! instance is `provisioning` for as long as nothing proved otherwise.
//!
//! Two states are terminal. `terminated` is entered only where nothing can
//! remain at the provider (it never called the provider, or the provider
//! confirmed the machine and volumes gone). `abandoned` is an operator's
//! act for an instance whose provider is gone for good: it is entered from
//! any state that is not terminal without a provider call, so it claims
//! nothing about the provider — the machine may still exist, and the orphan
//! scan treats a tagged machine of an abandoned instance as an orphan. No
//! loop group contains it, so no loop ever claims it again.
//!
//! `warm` is a machine held in reserve for its pool: created at the
//! provider and not running (Fly `skip_launch`, a Scaleway server not yet
//! powered on). It is entered from `provisioning`, by an instance whose
//! desired state is [`DesiredState::Warm`], once its machine is recorded,
//! or from `stopped`, by an idle instance of a pool whose idle action is
//! `stop` once the provider confirmed its machine stopped;
//! `Provision` takes it back to `provisioning` (the step left is the start,
//! which the provisioning loop retries and fences like any start), and a
//! warm machine let go is deleted directly (`deleting`: it never ran, so
//! there is nothing to drain or stop). It is a resting state, in no timeout
//! group: it waits, by design, until someone wants it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where an instance is in its life. The string forms (`as_str`) are what the
/// database and the event subjects (`EVT.instance.<state>`) use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Accepted by the API; no provider call has been made yet.
    Requested,
    /// Intent recorded; the provider create/start is under way (or will be retried).
    Provisioning,
    /// The machine exists and was started; the worker has not reported yet.
    Booting,
    /// The worker reported it is installing its payload.
    Installing,
    /// The worker reported it is starting its payload.
    Starting,
    /// A heartbeat or health check proved the worker serves.
    Ready,
    /// Cordoned: no new work; waiting for the worker to go idle (bounded).
    Draining,
    /// Stop requested at the provider; waiting until it reports stopped.
    Stopping,
    /// The provider reported the machine stopped.
    Stopped,
    /// Deleting the machine, then its volumes.
    Deleting,
    /// The provider confirmed the machine and its volumes gone. Terminal.
    Terminated,
    /// Provisioning attempts exhausted; cleanup of whatever was created follows.
    ProvisioningFailed,
    /// A boot phase exceeded its deadline.
    StartupFailed,
    /// A ready worker stopped heartbeating and a second signal confirmed it.
    WorkerDead,
    /// The machine vanished at the provider while the instance was live.
    Lost,
    /// An operator gave the instance up (its provider is gone for good):
    /// Flotilla no longer acts on it and made no provider call to get here,
    /// so its machine and volumes may still exist. Terminal. Whatever of it
    /// is left at the provider and carries Flotilla's tags is an orphan to
    /// the orphan scan.
    Abandoned,
    /// Held in reserve: the machine exists at the provider and was never
    /// started; `Provision` takes it (see the module docs).
    Warm,
}

use InstanceState::*;

/// The one table of allowed transitions. A state absent from the left column
/// has no exits.
const TRANSITIONS: &[(InstanceState, &[InstanceState])] = &[
    // `Abandoned` ends every row: an operator's way out of any state that
    // is not terminal (`AbandonInstance`), never a step a loop takes.
    //
    // Nothing exists at the provider yet, so cancelling needs no cleanup.
    (Requested, &[Provisioning, Terminated, Abandoned]),
    (
        Provisioning,
        &[Booting, ProvisioningFailed, Deleting, Lost, Abandoned, Warm],
    ),
    // Taken by `Provision` (its start is what is left), or let go (never
    // started, so deleted at once), or vanished at the provider.
    (Warm, &[Provisioning, Deleting, Lost, Abandoned]),
    // A worker may skip phases it does not have (no install step, say).
    (
        Booting,
        &[
            Installing,
            Starting,
            Ready,
            StartupFailed,
            Stopping,
            Deleting,
            Lost,
            Abandoned,
        ],
    ),
    (
        Installing,
        &[
            Starting,
            Ready,
            StartupFailed,
            Stopping,
            Deleting,
            Lost,
            Abandoned,
        ],
    ),
    (
        Starting,
        &[Ready, StartupFailed, Stopping, Deleting, Lost, Abandoned],
    ),
    (
        Ready,
        &[Draining, Stopping, Deleting, WorkerDead, Lost, Abandoned],
    ),
    // `Deleting` straight from draining/stopping is the forced path.
    (Draining, &[Stopping, Deleting, Lost, Abandoned]),
    (Stopping, &[Stopped, Deleting, Lost, Abandoned]),
    // An idle instance of a pool whose idle action is `stop` goes back to
    // warm stock once its machine is stopped (never while it runs).
    (Stopped, &[Deleting, Warm, Abandoned]),
    (Deleting, &[Terminated, Abandoned]),
    (ProvisioningFailed, &[Deleting, Abandoned]),
    // A startup failure is retried by restarting the machine, or cleaned up.
    (StartupFailed, &[Booting, Stopping, Deleting, Abandoned]),
    (WorkerDead, &[Stopping, Deleting, Abandoned]),
    // The machine is gone, but volumes may not be: deleting sweeps them.
    (Lost, &[Deleting, Abandoned]),
];

impl InstanceState {
    /// Every state, in lifecycle order.
    pub const ALL: [InstanceState; 17] = [
        Requested,
        Provisioning,
        Booting,
        Installing,
        Starting,
        Ready,
        Draining,
        Stopping,
        Stopped,
        Deleting,
        Terminated,
        ProvisioningFailed,
        StartupFailed,
        WorkerDead,
        Lost,
        Abandoned,
        Warm,
    ];

    /// States with no exit. `terminated` says the provider confirmed
    /// everything gone; `abandoned` says nothing about the provider.
    pub const TERMINAL: &'static [InstanceState] = &[Terminated, Abandoned];

    /// States that count towards a pool's capacity: a machine exists and is
    /// booting or serving.
    pub const LIVE: &'static [InstanceState] = &[Booting, Installing, Starting, Ready];

    /// States the provisioning loop owns: wanted, not yet booting.
    pub const PROVISION_PHASES: &'static [InstanceState] = &[Requested, Provisioning];

    /// Boot phases, each bounded by a per-pool deadline.
    pub const BOOT_PHASES: &'static [InstanceState] = &[Booting, Installing, Starting];

    /// States whose machine should be running at the provider: a listing
    /// that does not show it makes the instance suspected lost.
    pub const MACHINE_RUNNING: &'static [InstanceState] =
        &[Booting, Installing, Starting, Ready, Draining];

    /// States whose machine should exist at the provider stopped (never
    /// started): a listing that does not show it makes the instance
    /// suspected lost, as for [`Self::MACHINE_RUNNING`].
    pub const MACHINE_HELD: &'static [InstanceState] = &[Warm];

    /// States whose machine a listing must show, running or held.
    pub const MACHINE_EXPECTED: &'static [InstanceState] =
        &[Booting, Installing, Starting, Ready, Draining, Warm];

    /// States in which the instance is on its way out; the terminator owns them.
    pub const TEARDOWN: &'static [InstanceState] = &[Draining, Stopping, Stopped, Deleting];

    /// Failure states: each is followed by cleanup (or a retry).
    pub const FAILED: &'static [InstanceState] =
        &[ProvisioningFailed, StartupFailed, WorkerDead, Lost];

    /// States that have a timeout when nothing moves them on.
    pub const TRANSITIONAL: &'static [InstanceState] = &[
        Provisioning,
        Booting,
        Installing,
        Starting,
        Draining,
        Stopping,
        Deleting,
    ];

    /// Transitional states the watchdog recovers when they outlast their
    /// timeout; the boot phases have per-pool deadlines of their own.
    pub const STUCK_WATCHED: &'static [InstanceState] =
        &[Provisioning, Draining, Stopping, Deleting];

    pub const fn as_str(self) -> &'static str {
        match self {
            Requested => "requested",
            Provisioning => "provisioning",
            Booting => "booting",
            Installing => "installing",
            Starting => "starting",
            Ready => "ready",
            Draining => "draining",
            Stopping => "stopping",
            Stopped => "stopped",
            Deleting => "deleting",
            Terminated => "terminated",
            ProvisioningFailed => "provisioning_failed",
            StartupFailed => "startup_failed",
            WorkerDead => "worker_dead",
            Lost => "lost",
            Abandoned => "abandoned",
            Warm => "warm",
        }
    }

    /// The states this one may move to.
    pub fn exits(self) -> &'static [InstanceState] {
        TRANSITIONS
            .iter()
            .find(|(from, _)| *from == self)
            .map(|(_, to)| *to)
            .unwrap_or(&[])
    }

    pub fn can_transition_to(self, to: InstanceState) -> bool {
        self.exits().contains(&to)
    }

    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }

    /// The strings of a group, for `state = ANY($1)` in SQL.
    pub fn strs(states: &[InstanceState]) -> Vec<String> {
        states.iter().map(|s| s.as_str().to_owned()).collect()
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown instance state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for InstanceState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

impl TryFrom<String> for InstanceState {
    type Error = UnknownState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// What the operator wants for an instance; reconcilers move the recorded
/// state towards it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    Running,
    Terminated,
    /// Created at the provider and not started: held in its pool's warm
    /// stock until `Provision` takes it (then `Running`).
    Warm,
}

impl DesiredState {
    pub const fn as_str(self) -> &'static str {
        match self {
            DesiredState::Running => "running",
            DesiredState::Terminated => "terminated",
            DesiredState::Warm => "warm",
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DesiredState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(DesiredState::Running),
            "terminated" => Ok(DesiredState::Terminated),
            "warm" => Ok(DesiredState::Warm),
            other => Err(UnknownState(other.to_owned())),
        }
    }
}

impl TryFrom<String> for DesiredState {
    type Error = UnknownState;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// A transition the table does not allow. Never written, always reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal instance transition {from} -> {to}")]
pub struct IllegalTransition {
    pub from: InstanceState,
    pub to: InstanceState,
}

/// The only gate for state changes.
pub fn check_transition(from: InstanceState, to: InstanceState) -> Result<(), IllegalTransition> {
    if from.can_transition_to(to) {
        Ok(())
    } else {
        Err(IllegalTransition { from, to })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashSet, VecDeque};

    use proptest::prelude::*;

    use super::*;

    fn reachable_from(start: InstanceState) -> HashSet<InstanceState> {
        let mut seen = HashSet::from([start]);
        let mut queue = VecDeque::from([start]);
        while let Some(s) = queue.pop_front() {
            for &next in s.exits() {
                if seen.insert(next) {
                    queue.push_back(next);
                }
            }
        }
        seen
    }

    #[test]
    fn every_state_but_the_terminal_ones_can_reach_terminated() {
        for s in InstanceState::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert!(
                reachable_from(s).contains(&Terminated),
                "{s} cannot reach terminated"
            );
        }
    }

    #[test]
    fn every_state_that_is_not_terminal_can_be_abandoned_and_abandoned_is_final() {
        // The operator's way out exists everywhere a loop might be stuck,
        // and once taken nothing can undo it.
        for s in InstanceState::ALL {
            assert_eq!(s.can_transition_to(Abandoned), !s.is_terminal(), "{s}");
        }
        assert!(Abandoned.is_terminal());
        assert!(Abandoned.exits().is_empty());
        assert!(
            !Terminated.can_transition_to(Abandoned),
            "terminated is already done"
        );
    }

    #[test]
    fn no_loop_group_contains_a_terminal_state() {
        // Loops claim rows by these groups: a terminal row in one would be
        // claimed, and an abandoned one acted on again.
        for group in [
            InstanceState::LIVE,
            InstanceState::PROVISION_PHASES,
            InstanceState::BOOT_PHASES,
            InstanceState::MACHINE_RUNNING,
            InstanceState::TEARDOWN,
            InstanceState::FAILED,
            InstanceState::TRANSITIONAL,
            InstanceState::STUCK_WATCHED,
            InstanceState::MACHINE_HELD,
            InstanceState::MACHINE_EXPECTED,
        ] {
            assert!(group.iter().all(|s| !s.is_terminal()), "{group:?}");
        }
    }

    #[test]
    fn terminal_states_have_no_exits() {
        for &s in InstanceState::TERMINAL {
            assert!(s.exits().is_empty(), "{s} is terminal but has exits");
        }
    }

    #[test]
    fn only_terminal_states_have_no_exits() {
        for s in InstanceState::ALL {
            assert_eq!(s.exits().is_empty(), s.is_terminal(), "{s}");
        }
    }

    #[test]
    fn the_table_lists_each_state_once_and_never_a_self_loop() {
        let mut seen = HashSet::new();
        for (from, to) in TRANSITIONS {
            assert!(seen.insert(*from), "{from} listed twice");
            assert!(!to.contains(from), "{from} loops to itself");
            let unique: HashSet<_> = to.iter().collect();
            assert_eq!(unique.len(), to.len(), "{from} lists an exit twice");
        }
    }

    #[test]
    fn every_state_is_reachable_from_requested() {
        let reachable = reachable_from(Requested);
        for s in InstanceState::ALL {
            assert!(reachable.contains(&s), "{s} is unreachable");
        }
    }

    #[test]
    fn terminated_is_only_entered_where_nothing_can_remain_at_the_provider() {
        // `deleting` confirms machine and volumes gone; `requested` never
        // called the provider. Any other way in would be a leak.
        let into: Vec<_> = InstanceState::ALL
            .into_iter()
            .filter(|s| s.can_transition_to(Terminated))
            .collect();
        assert_eq!(into, vec![Requested, Deleting]);
    }

    #[test]
    fn ready_is_only_entered_from_a_boot_phase() {
        for s in InstanceState::ALL {
            assert_eq!(
                s.can_transition_to(Ready),
                InstanceState::BOOT_PHASES.contains(&s),
                "{s}"
            );
        }
    }

    #[test]
    fn every_transitional_state_has_exactly_one_timeout() {
        // A transitional state in neither group would wait forever; one in
        // both would be recovered by two loops.
        for s in InstanceState::TRANSITIONAL {
            let boot = InstanceState::BOOT_PHASES.contains(s);
            let stuck = InstanceState::STUCK_WATCHED.contains(s);
            assert!(
                boot != stuck,
                "{s}: boot deadline {boot}, stuck timeout {stuck}"
            );
        }
        let covered = InstanceState::BOOT_PHASES.len() + InstanceState::STUCK_WATCHED.len();
        assert_eq!(covered, InstanceState::TRANSITIONAL.len());
    }

    #[test]
    fn warm_is_entered_only_from_provisioning_and_never_straight_to_a_running_state() {
        // The provisioning loop makes a warm machine (create, record, no
        // start), and an idle instance returns to warm stock only once the
        // provider stopped its machine; taking one goes back through
        // provisioning, whose start is fenced and retried, so nothing
        // claims to boot before the provider started it.
        let into: Vec<_> = InstanceState::ALL
            .into_iter()
            .filter(|s| s.can_transition_to(Warm))
            .collect();
        assert_eq!(into, vec![Provisioning, Stopped]);
        for s in Warm.exits() {
            assert!(
                !InstanceState::MACHINE_RUNNING.contains(s),
                "warm -> {s} would claim a start"
            );
        }
        assert!(Warm.can_transition_to(Provisioning));
        assert!(
            Warm.can_transition_to(Deleting),
            "never started: no drain, no stop"
        );
        assert!(Warm.can_transition_to(Lost));
    }

    #[test]
    fn warm_is_a_resting_state_with_its_machine_expected_but_not_counted_as_serving() {
        assert!(!InstanceState::TRANSITIONAL.contains(&Warm));
        assert!(!InstanceState::LIVE.contains(&Warm));
        assert!(!InstanceState::MACHINE_RUNNING.contains(&Warm));
        assert!(InstanceState::MACHINE_HELD.contains(&Warm));
        let expected: HashSet<_> = InstanceState::MACHINE_EXPECTED.iter().collect();
        let union: HashSet<_> = InstanceState::MACHINE_RUNNING
            .iter()
            .chain(InstanceState::MACHINE_HELD)
            .collect();
        assert_eq!(expected, union);
    }

    #[test]
    fn illegal_transition_is_a_typed_error() {
        assert_eq!(
            check_transition(Terminated, Ready),
            Err(IllegalTransition {
                from: Terminated,
                to: Ready
            })
        );
        assert_eq!(check_transition(Ready, Draining), Ok(()));
    }

    #[test]
    fn string_forms_round_trip() {
        for s in InstanceState::ALL {
            assert_eq!(s.as_str().parse::<InstanceState>(), Ok(s));
        }
        assert!("Ready".parse::<InstanceState>().is_err());
        assert!("".parse::<InstanceState>().is_err());
        for d in [
            DesiredState::Running,
            DesiredState::Terminated,
            DesiredState::Warm,
        ] {
            assert_eq!(d.as_str().parse::<DesiredState>(), Ok(d));
        }
    }

    proptest! {
        /// Random walks that only take listed exits always can end at
        /// `terminated` within the number of states (no cycles trap an
        /// instance), unless an operator abandoned it.
        #[test]
        fn random_legal_walks_stay_finishable(choices in prop::collection::vec(any::<prop::sample::Index>(), 1..64)) {
            let mut state = Requested;
            for ix in choices {
                let exits = state.exits();
                if exits.is_empty() {
                    prop_assert!(state.is_terminal());
                    break;
                }
                state = exits[ix.index(exits.len())];
            }
            prop_assert!(state == Abandoned || reachable_from(state).contains(&Terminated));
        }
    }
}
