//! The invariant checker: a pure function from what the database says, what
//! the simulated cloud really holds, and which commands the api
//! acknowledged, to the list of broken promises.
//!
//! Design notes: it is pure so it can be tested with fabricated worlds, one
//! broken invariant at a time, without any process running. The same
//! function decides convergence: the run polls snapshots until it returns
//! nothing, so "converged" and "correct" can never drift apart. The
//! provider's truth is the judge, never the database alone: a row that says
//! `terminated` while its machine still runs is a leak.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use flotilla_core::InstanceState;
use uuid::Uuid;

/// One instance row, as much of it as the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbInstance {
    pub id: Uuid,
    pub state: String,
    pub desired_state: String,
    pub provider_machine_id: Option<String>,
}

/// One `instance_volumes` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbVolume {
    pub instance_id: Uuid,
    pub provider_volume_id: Option<String>,
    pub state: String,
}

/// The database side of one observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DbSnapshot {
    pub instances: Vec<DbInstance>,
    pub volumes: Vec<DbVolume>,
}

/// A machine as the simulated cloud knows it (destroyed ones included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMachine {
    pub id: String,
    /// Fly's spelling: `started`, `stopped`, `destroyed`, …
    pub state: String,
    /// The instance id tag in the machine's metadata, if any.
    pub instance_tag: Option<String>,
}

impl ProviderMachine {
    /// Still costs money: anything but `destroyed`.
    pub fn is_live(&self) -> bool {
        self.state != "destroyed"
    }
}

/// A volume as the simulated cloud knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderVolume {
    pub id: String,
    pub name: String,
    pub state: String,
}

impl ProviderVolume {
    pub fn is_live(&self) -> bool {
        self.state != "destroyed"
    }
}

/// The provider side of one observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProviderSnapshot {
    pub machines: Vec<ProviderMachine>,
    pub volumes: Vec<ProviderVolume>,
}

/// Every command the api answered OK, by the instance ids it named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Instances created by an acknowledged `Provision`.
    pub provisioned: BTreeSet<Uuid>,
    /// Instances named (accepted or unchanged) by an acknowledged `Terminate`.
    pub terminated: BTreeSet<Uuid>,
    /// Instances named by a `Terminate` that never got its answer: the api
    /// may or may not have taken it, so either end state is a kept promise.
    pub unsure: BTreeSet<Uuid>,
}

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    /// An acknowledged command whose effect is not (yet) there.
    Lost { instance: Uuid, detail: String },
    /// A machine or volume at the provider that no live instance owns.
    Leaked { resource: String, detail: String },
    /// More than one live machine for one instance.
    Duplicated {
        instance: String,
        machines: Vec<String>,
    },
    /// The database says something the provider contradicts.
    Mismatch { instance: Uuid, detail: String },
    /// A row still on its way somewhere (requested, draining, …).
    NotConverged { instance: Uuid, state: String },
}

impl Violation {
    /// Short class name, for counting.
    pub fn class(&self) -> &'static str {
        match self {
            Violation::Lost { .. } => "lost",
            Violation::Leaked { .. } => "leaked",
            Violation::Duplicated { .. } => "duplicated",
            Violation::Mismatch { .. } => "mismatch",
            Violation::NotConverged { .. } => "not_converged",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Lost { instance, detail } => write!(f, "lost: {instance}: {detail}"),
            Violation::Leaked { resource, detail } => write!(f, "leaked: {resource}: {detail}"),
            Violation::Duplicated { instance, machines } => {
                write!(f, "duplicated: {instance} has machines {machines:?}")
            }
            Violation::Mismatch { instance, detail } => {
                write!(f, "db != provider: {instance}: {detail}")
            }
            Violation::NotConverged { instance, state } => {
                write!(f, "not converged: {instance} still {state}")
            }
        }
    }
}

/// Live machines grouped by their instance tag, only where there is more
/// than one. Also used on snapshots taken during the storm ("never").
pub fn duplicates(provider: &ProviderSnapshot) -> Vec<Violation> {
    let mut by_instance: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for m in provider.machines.iter().filter(|m| m.is_live()) {
        if let Some(tag) = &m.instance_tag {
            by_instance.entry(tag).or_default().push(m.id.clone());
        }
    }
    by_instance
        .into_iter()
        .filter(|(_, machines)| machines.len() > 1)
        .map(|(instance, machines)| Violation::Duplicated {
            instance: instance.to_owned(),
            machines,
        })
        .collect()
}

fn parse_state(raw: &str) -> Option<InstanceState> {
    raw.parse().ok()
}

/// Every invariant over one observation; empty means converged and correct.
pub fn check(db: &DbSnapshot, provider: &ProviderSnapshot, ledger: &Ledger) -> Vec<Violation> {
    let mut out = Vec::new();
    let rows: BTreeMap<Uuid, &DbInstance> = db.instances.iter().map(|i| (i.id, i)).collect();
    let machines: BTreeMap<&str, &ProviderMachine> = provider
        .machines
        .iter()
        .map(|m| (m.id.as_str(), m))
        .collect();
    let is_terminated =
        |row: &DbInstance| parse_state(&row.state) == Some(InstanceState::Terminated);
    let is_live = |row: &DbInstance| {
        parse_state(&row.state).is_some_and(|s| InstanceState::LIVE.contains(&s))
    };

    // 0 lost: every acknowledged command took effect.
    for id in &ledger.provisioned {
        if ledger.terminated.contains(id) {
            continue;
        }
        let may_be_terminated = ledger.unsure.contains(id);
        match rows.get(id) {
            None => out.push(Violation::Lost {
                instance: *id,
                detail: "acknowledged Provision but no instance row".into(),
            }),
            Some(row) if may_be_terminated && row.desired_state == "terminated" => {}
            Some(row) if row.desired_state != "running" => out.push(Violation::Lost {
                instance: *id,
                detail: format!(
                    "acknowledged Provision, never terminated, but desired {}",
                    row.desired_state
                ),
            }),
            Some(row) if !is_live(row) => out.push(Violation::Lost {
                instance: *id,
                detail: format!("acknowledged Provision but state {}", row.state),
            }),
            Some(_) => {}
        }
    }
    for id in &ledger.terminated {
        match rows.get(id) {
            None => out.push(Violation::Lost {
                instance: *id,
                detail: "acknowledged Terminate but no instance row".into(),
            }),
            Some(row) if !is_terminated(row) => out.push(Violation::Lost {
                instance: *id,
                detail: format!("acknowledged Terminate but state {}", row.state),
            }),
            Some(_) => {}
        }
    }

    // 0 leaked: every live machine and volume belongs to a live row that
    // records it.
    for m in provider.machines.iter().filter(|m| m.is_live()) {
        let owner = m
            .instance_tag
            .as_deref()
            .and_then(|tag| Uuid::parse_str(tag).ok())
            .and_then(|id| rows.get(&id));
        let detail = match owner {
            None => Some(format!(
                "machine ({}) tagged {:?}, which no instance row has",
                m.state, m.instance_tag
            )),
            Some(row) if is_terminated(row) => Some(format!(
                "machine ({}) of terminated instance {}",
                m.state, row.id
            )),
            Some(row) if row.provider_machine_id.as_deref() != Some(m.id.as_str()) => {
                Some(format!(
                    "machine ({}) of instance {} which records {:?}",
                    m.state, row.id, row.provider_machine_id
                ))
            }
            Some(_) => None,
        };
        if let Some(detail) = detail {
            out.push(Violation::Leaked {
                resource: format!("machine {}", m.id),
                detail,
            });
        }
    }
    for v in provider.volumes.iter().filter(|v| v.is_live()) {
        let owner =
            flotilla_provider::fly::instance_of_volume(&v.name).and_then(|id| rows.get(&id.0));
        let detail = match owner {
            None => Some(format!("volume {:?} names no instance row", v.name)),
            Some(row) if is_terminated(row) => {
                Some(format!("volume of terminated instance {}", row.id))
            }
            Some(_) => None,
        };
        if let Some(detail) = detail {
            out.push(Violation::Leaked {
                resource: format!("volume {}", v.id),
                detail,
            });
        }
    }

    // 0 duplicated.
    out.extend(duplicates(provider));

    // Database equals provider, and nothing is half-way.
    for row in &db.instances {
        match parse_state(&row.state) {
            Some(InstanceState::Terminated) => {}
            Some(s) if InstanceState::LIVE.contains(&s) => {
                let machine = row
                    .provider_machine_id
                    .as_deref()
                    .and_then(|id| machines.get(id));
                let detail = match machine {
                    None => Some(format!(
                        "{} but machine {:?} is unknown to the provider",
                        row.state, row.provider_machine_id
                    )),
                    Some(m) if m.state != "started" => {
                        Some(format!("{} but machine {} is {}", row.state, m.id, m.state))
                    }
                    Some(_) => None,
                };
                if let Some(detail) = detail {
                    out.push(Violation::Mismatch {
                        instance: row.id,
                        detail,
                    });
                }
            }
            _ => out.push(Violation::NotConverged {
                instance: row.id,
                state: row.state.clone(),
            }),
        }
    }
    let volumes: BTreeMap<&str, &ProviderVolume> = provider
        .volumes
        .iter()
        .map(|v| (v.id.as_str(), v))
        .collect();
    for vol in &db.volumes {
        let at_provider = vol
            .provider_volume_id
            .as_deref()
            .and_then(|id| volumes.get(id))
            .filter(|v| v.is_live());
        match (vol.state.as_str(), at_provider) {
            ("created", None) => out.push(Violation::Mismatch {
                instance: vol.instance_id,
                detail: format!(
                    "volume {:?} created in the database, absent at the provider",
                    vol.provider_volume_id
                ),
            }),
            ("deleted", Some(v)) => out.push(Violation::Mismatch {
                instance: vol.instance_id,
                detail: format!(
                    "volume {} deleted in the database, live at the provider",
                    v.id
                ),
            }),
            ("created" | "deleted", _) => {}
            (other, _) => out.push(Violation::NotConverged {
                instance: vol.instance_id,
                state: format!("volume {other}"),
            }),
        }
    }
    out.sort();
    out
}

/// Violations counted by class, for reports.
pub fn tally(violations: &[Violation]) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for v in violations {
        *counts.entry(v.class()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small consistent world: two running instances with a started
    /// machine each (one with a volume), one terminated instance whose
    /// machine and volume are destroyed; all three acknowledged.
    fn world() -> (DbSnapshot, ProviderSnapshot, Ledger) {
        let ids: Vec<Uuid> = (1..=3).map(Uuid::from_u128).collect();
        let row = |id: Uuid, state: &str, desired: &str, machine: &str| DbInstance {
            id,
            state: state.into(),
            desired_state: desired.into(),
            provider_machine_id: Some(machine.into()),
        };
        let machine = |id: &str, state: &str, owner: Uuid| ProviderMachine {
            id: id.into(),
            state: state.into(),
            instance_tag: Some(owner.to_string()),
        };
        let vol_name = |id: Uuid| {
            flotilla_provider::fly::volume_name("flotilla", flotilla_core::InstanceId(id))
        };
        let db = DbSnapshot {
            instances: vec![
                row(ids[0], "booting", "running", "m1"),
                row(ids[1], "ready", "running", "m2"),
                row(ids[2], "terminated", "terminated", "m3"),
            ],
            volumes: vec![
                DbVolume {
                    instance_id: ids[1],
                    provider_volume_id: Some("vol_2".into()),
                    state: "created".into(),
                },
                DbVolume {
                    instance_id: ids[2],
                    provider_volume_id: Some("vol_3".into()),
                    state: "deleted".into(),
                },
            ],
        };
        let provider = ProviderSnapshot {
            machines: vec![
                machine("m1", "started", ids[0]),
                machine("m2", "started", ids[1]),
                machine("m3", "destroyed", ids[2]),
            ],
            volumes: vec![
                ProviderVolume {
                    id: "vol_2".into(),
                    name: vol_name(ids[1]),
                    state: "created".into(),
                },
                ProviderVolume {
                    id: "vol_3".into(),
                    name: vol_name(ids[2]),
                    state: "destroyed".into(),
                },
            ],
        };
        let ledger = Ledger {
            provisioned: ids.iter().copied().collect(),
            terminated: [ids[2]].into_iter().collect(),
            unsure: BTreeSet::new(),
        };
        (db, provider, ledger)
    }

    fn classes(v: &[Violation]) -> Vec<&'static str> {
        v.iter().map(Violation::class).collect()
    }

    #[test]
    fn a_consistent_world_has_no_violation() {
        let (db, provider, ledger) = world();
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn an_acknowledged_provision_without_its_row_is_lost() {
        let (db, provider, mut ledger) = world();
        ledger.provisioned.insert(Uuid::from_u128(99));
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["lost"]);
    }

    #[test]
    fn an_acknowledged_provision_that_failed_is_lost() {
        let (mut db, mut provider, ledger) = world();
        db.instances[0].state = "provisioning_failed".into();
        provider.machines[0].state = "destroyed".into();
        let found = check(&db, &provider, &ledger);
        assert!(classes(&found).contains(&"lost"), "{found:?}");
    }

    #[test]
    fn an_acknowledged_terminate_still_running_is_lost() {
        let (db, provider, mut ledger) = world();
        ledger.terminated.insert(db.instances[1].id);
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["lost"]);
    }

    #[test]
    fn a_machine_of_a_terminated_instance_is_leaked() {
        let (db, mut provider, ledger) = world();
        provider.machines[2].state = "stopped".into();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn a_machine_no_row_owns_is_leaked() {
        let (db, mut provider, ledger) = world();
        provider.machines.push(ProviderMachine {
            id: "m9".into(),
            state: "started".into(),
            instance_tag: Some(Uuid::from_u128(9).to_string()),
        });
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn a_volume_of_a_terminated_instance_is_leaked() {
        let (mut db, mut provider, ledger) = world();
        provider.volumes[1].state = "created".into();
        db.volumes.pop();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["leaked"]);
    }

    #[test]
    fn two_live_machines_for_one_instance_are_a_duplicate() {
        let (db, mut provider, ledger) = world();
        let owner = db.instances[0].id;
        provider.machines.push(ProviderMachine {
            id: "m1b".into(),
            state: "started".into(),
            instance_tag: Some(owner.to_string()),
        });
        let found = check(&db, &provider, &ledger);
        // The second machine is also not the one the row records.
        assert_eq!(classes(&found), ["leaked", "duplicated"]);
        assert_eq!(duplicates(&provider).len(), 1);
    }

    #[test]
    fn a_live_row_whose_machine_is_stopped_is_a_mismatch() {
        let (db, mut provider, ledger) = world();
        provider.machines[1].state = "stopped".into();
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["mismatch"]);
    }

    #[test]
    fn a_created_volume_missing_at_the_provider_is_a_mismatch() {
        let (db, mut provider, ledger) = world();
        provider.volumes.remove(0);
        assert_eq!(classes(&check(&db, &provider, &ledger)), ["mismatch"]);
    }

    #[test]
    fn an_unanswered_terminate_allows_either_end_state() {
        let (mut db, mut provider, mut ledger) = world();
        let id = db.instances[0].id;
        ledger.unsure.insert(id);
        assert_eq!(check(&db, &provider, &ledger), vec![]);
        db.instances[0].state = "terminated".into();
        db.instances[0].desired_state = "terminated".into();
        provider.machines[0].state = "destroyed".into();
        assert_eq!(check(&db, &provider, &ledger), vec![]);
    }

    #[test]
    fn a_row_half_way_through_teardown_is_not_converged() {
        let (mut db, provider, ledger) = world();
        let id = Uuid::from_u128(7);
        db.instances.push(DbInstance {
            id,
            state: "draining".into(),
            desired_state: "terminated".into(),
            provider_machine_id: None,
        });
        assert_eq!(
            check(&db, &provider, &ledger),
            [Violation::NotConverged {
                instance: id,
                state: "draining".into()
            }]
        );
    }
}
