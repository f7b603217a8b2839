//! The chaos of a storm as a timeline: which fault falls when, computed up
//! front from the run's size ([`plan`]), and the executor that applies each
//! step at its time and logs it ([`run`]).
//!
//! Design notes: every fault with a length is two steps (cut and heal,
//! pause and resume, lie and truth), so the timeline is a flat, sorted
//! list of instantaneous acts and windows overlap exactly as planned; the
//! shape of a run is reproducible while its victims (which service is
//! killed or paused, which NATS node) stay random. The faults are the ones
//! a control plane meets in production:
//!
//! - `kill -9` of random services, NATS killed and restarted, PostgreSQL
//!   crashed (immediate stop) and restarted;
//! - partitions through the fault proxies ([`crate::proxy`]):
//!   scheduler-1 from PostgreSQL for longer than its lease, the
//!   provider-adapter from the cloud, terminator-1 from NATS;
//! - a scheduler or terminator paused (`SIGSTOP`) for two leases, then
//!   resumed;
//! - listings that lie (empty, then partial, then stale) and, in a later
//!   window that does not overlap it, machine GETs answering 404 for
//!   machines that exist: each is one lying signal, which Flotilla must
//!   never act on alone (ARCHITECTURE.md, promise 7);
//! - every PostgreSQL connection taken by a holder, a replica that uses
//!   the database killed once the server is full (it must start against
//!   a full server), then the connections given back.

use std::time::{Duration, Instant};

use flotilla_sim_provider::{Faults, Listing};
use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use crate::cluster::{Cluster, LEASE_SECONDS, Link};
use crate::exhaust::ConnectionHog;
use crate::report::ChaosEvent;
use crate::run::ChaosConfig;

/// One instantaneous act of the chaos.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// `kill -9` a random service, started again after `down`.
    Kill { down: Duration },
    /// `kill -9` a random NATS node.
    NatsDown,
    /// Start the killed NATS node again.
    NatsUp,
    /// Stop PostgreSQL in immediate mode (a crash).
    PostgresCrash,
    /// Start PostgreSQL again (WAL recovery).
    PostgresStart,
    /// Partition a link.
    Cut(Link),
    /// Heal a link.
    Heal(Link),
    /// `SIGSTOP` a random scheduler or terminator replica.
    Pause,
    /// `SIGCONT` the paused replica.
    Resume,
    /// Machine listings answer this from now on (`Normal`: the truth).
    Listing(Listing),
    /// This share of machine GETs answers 404 from now on (0: none).
    NotFound(f64),
    /// Take every PostgreSQL connection.
    Hog,
    /// Once the server is full, `kill -9` a random service that uses the
    /// database: it must start again against a full server.
    KillDbClient,
    /// Give them back.
    Release,
}

/// A step and when it falls, since the storm began.
pub type Timed = (Duration, Step);

/// Share of machine GETs answered 404 during the 404 window.
const NOT_FOUND_RATE: f64 = 0.5;
/// Share of matching machines a partial listing leaves out (below the
/// watchdog's storm fraction, so its verdicts are not simply held).
const PARTIAL_HIDDEN: f64 = 0.3;
/// Most PostgreSQL connections the holder takes: more than the server
/// allows, so it is the server that stops it.
const HOG_CAP: usize = 2 * crate::infra::MAX_CONNECTIONS;
/// Longest wait for the holder to fill the server before a database
/// client is killed anyway (the timeline waits meanwhile).
const HOG_FILL_LIMIT: Duration = Duration::from_secs(5);

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

/// The whole timeline of a run, sorted by time.
pub fn plan(config: &ChaosConfig) -> Vec<Timed> {
    let d = config.duration.as_secs_f64();
    let w = config.fault_window;
    let lease = Duration::from_secs(LEASE_SECONDS);
    let at = |share: f64| secs(d * share);
    let mut steps: Vec<Timed> = Vec::new();
    let window = |steps: &mut Vec<Timed>, from: Duration, len: Duration, begin: Step, end: Step| {
        steps.push((from, begin));
        steps.push((from + len, end));
    };

    // Partitions: scheduler-1 from PostgreSQL for longer than its lease, so
    // its claims are taken over while its writes are held in the network.
    window(
        &mut steps,
        at(0.10),
        w.max(lease + Duration::from_secs(2)),
        Step::Cut(Link::SchedulerPostgres),
        Step::Heal(Link::SchedulerPostgres),
    );
    window(
        &mut steps,
        at(0.45),
        w,
        Step::Cut(Link::AdapterProvider),
        Step::Heal(Link::AdapterProvider),
    );
    window(
        &mut steps,
        at(0.75),
        w,
        Step::Cut(Link::TerminatorNats),
        Step::Heal(Link::TerminatorNats),
    );
    // A replica paused for two leases: it wakes up without its claims.
    window(&mut steps, at(0.20), 2 * lease, Step::Pause, Step::Resume);
    // NATS down: a cluster keeps serving on two nodes for a while; a
    // single node is simply down.
    let nats_down = if config.nats_nodes > 1 {
        secs((d * 0.2).max(5.0))
    } else {
        Duration::from_secs(2)
    };
    window(
        &mut steps,
        at(0.30),
        nats_down,
        Step::NatsDown,
        Step::NatsUp,
    );
    window(
        &mut steps,
        at(0.60),
        Duration::from_secs(2),
        Step::PostgresCrash,
        Step::PostgresStart,
    );
    // Lying listings: empty, then partial, then stale (hiding what was
    // created in the last two windows' time), then the truth.
    let lies = at(0.35);
    let lag = u64::try_from((2 * w).as_millis()).unwrap_or(u64::MAX);
    steps.push((lies, Step::Listing(Listing::Empty)));
    steps.push((
        lies + w,
        Step::Listing(Listing::Partial {
            hidden_fraction: PARTIAL_HIDDEN,
        }),
    ));
    steps.push((lies + 2 * w, Step::Listing(Listing::Stale { lag_ms: lag })));
    let truth = lies + 3 * w;
    steps.push((truth, Step::Listing(Listing::Normal)));
    // 404s for machines that exist, once the listings have told the truth
    // for a while: a lie the listing can expose. The gap outlasts a
    // watchdog's scan still judging by a listing taken while it lied.
    let not_found = at(0.70).max(truth + 2 * w);
    window(
        &mut steps,
        not_found,
        w,
        Step::NotFound(NOT_FOUND_RATE),
        Step::NotFound(0.0),
    );
    // Every connection taken; a replica killed meanwhile starts against a
    // full server.
    let hog = at(0.85);
    window(&mut steps, hog, w, Step::Hog, Step::Release);
    steps.push((hog + w / 4, Step::KillDbClient));

    // Kills spread over the storm, one per slot at a random point in it.
    let mut rng = rand::rng();
    for k in 0..config.kills {
        let slot = d / f64::from(config.kills);
        let when = slot * f64::from(k) + rng.random_range(0.0..slot);
        let down = Duration::from_millis(rng.random_range(200..2500));
        steps.push((secs(when), Step::Kill { down }));
    }
    steps.sort_by_key(|(at, _)| *at);
    steps
}

/// What is faulty right now, so that every window can be closed.
#[derive(Default)]
struct Live {
    nats_down: Option<usize>,
    paused: Option<String>,
    hog: Option<ConnectionHog>,
    listing: Listing,
    not_found: f64,
}

/// Applies `steps` to `cluster`, each at its time after `started`; returns
/// what it did. Whatever is still faulty at the end is healed.
pub async fn run(cluster: &mut Cluster, steps: Vec<Timed>, started: Instant) -> Vec<ChaosEvent> {
    let mut events = Vec::new();
    let mut log = |what: String| {
        eprintln!("chaos: t+{:.1}s {what}", started.elapsed().as_secs_f64());
        events.push(ChaosEvent {
            at: started.elapsed(),
            what,
        });
    };
    // The faults the sim was started with; windows add their lie on top.
    let base = match cluster.admin.faults().await {
        Ok(f) => Some(f),
        Err(e) => {
            log(format!("reading the sim's faults FAILED: {e:#}"));
            None
        }
    };
    let killable = cluster.supervisor.killable();
    let pausable: Vec<String> = killable
        .iter()
        .filter(|n| n.starts_with("scheduler-") || n.starts_with("terminator-"))
        .cloned()
        .collect();
    let mut live = Live::default();
    for (at, step) in steps {
        tokio::time::sleep_until((started + at).into()).await;
        let what = apply(
            cluster,
            &mut live,
            base.as_ref(),
            &killable,
            &pausable,
            step,
        )
        .await;
        log(what);
    }
    for what in heal_all(cluster, &mut live, base.as_ref()).await {
        log(what);
    }
    events
}

async fn apply(
    cluster: &mut Cluster,
    live: &mut Live,
    base: Option<&Faults>,
    killable: &[String],
    pausable: &[String],
    step: Step,
) -> String {
    match step {
        Step::Kill { down } => {
            // A paused replica stays paused: its waking up is the test.
            let victims: Vec<&String> = killable
                .iter()
                .filter(|n| live.paused.as_ref() != Some(*n))
                .collect();
            match victims.choose(&mut rand::rng()) {
                Some(victim) => {
                    cluster.supervisor.kill9(victim, down);
                    format!("kill -9 {victim} (restarted after {down:?})")
                }
                None => "kill -9: nothing to kill".into(),
            }
        }
        Step::KillDbClient => {
            let full = match &live.hog {
                Some(hog) => hog.wait_full(HOG_FILL_LIMIT).await,
                None => false,
            };
            let victims: Vec<&String> = killable
                .iter()
                .filter(|n| *n != "provider-adapter" && live.paused.as_ref() != Some(*n))
                .collect();
            match victims.choose(&mut rand::rng()) {
                Some(victim) => {
                    cluster.supervisor.kill9(victim, Duration::from_millis(200));
                    let server = if full { "full" } else { "NOT YET FULL" };
                    format!("kill -9 {victim} while PostgreSQL is {server} (restarted after 200ms)")
                }
                None => "kill -9: no database client to kill".into(),
            }
        }
        Step::NatsDown => {
            let i = rand::rng().random_range(0..cluster.nats.len());
            cluster.nats.kill(i).await;
            live.nats_down = Some(i);
            format!("kill -9 nats-server {}", cluster.nats.node_name(i))
        }
        Step::NatsUp => nats_up(cluster, live),
        Step::PostgresCrash => match cluster.pg.crash().await {
            Ok(()) => "PostgreSQL stopped in immediate mode (crash)".into(),
            Err(e) => format!("PostgreSQL crash FAILED: {e:#}"),
        },
        Step::PostgresStart => match cluster.pg.start_server().await {
            Ok(()) => "PostgreSQL started again (WAL recovery)".into(),
            Err(e) => format!("PostgreSQL restart FAILED: {e:#}"),
        },
        Step::Cut(link) => {
            let proxy = cluster.link(link);
            proxy.cut();
            format!(
                "partition {} (open connections silent, new ones held; {} connections so far)",
                proxy.name(),
                proxy.connections()
            )
        }
        Step::Heal(link) => {
            let proxy = cluster.link(link);
            proxy.heal();
            format!("healed {}", proxy.name())
        }
        Step::Pause => {
            // The first one that runs, in random order: the one drawn may be
            // down after a kill -9 just then, and a pause that pauses nothing
            // would leave the run without its pause.
            let mut order: Vec<&String> = pausable.iter().collect();
            order.shuffle(&mut rand::rng());
            match order
                .into_iter()
                .find(|victim| cluster.supervisor.pause(victim, true))
            {
                Some(victim) => {
                    live.paused = Some(victim.clone());
                    format!("SIGSTOP {victim} (for two leases)")
                }
                None if pausable.is_empty() => {
                    "SIGSTOP: no scheduler or terminator to pause".into()
                }
                None => "SIGSTOP: no scheduler or terminator running, nothing paused".into(),
            }
        }
        Step::Resume => resume(cluster, live),
        Step::Listing(listing) => {
            live.listing = listing;
            let lie = match listing {
                Listing::Normal => "machine listings tell the truth again".to_owned(),
                Listing::Empty => "machine listings answer [] (a lie)".to_owned(),
                Listing::Partial { hidden_fraction } => format!(
                    "machine listings hide {:.0} % of the machines (a lie)",
                    hidden_fraction * 100.0
                ),
                Listing::Stale { lag_ms } => {
                    format!("machine listings lag {lag_ms} ms behind creates (a lie)")
                }
            };
            set_faults(cluster, live, base, lie).await
        }
        Step::NotFound(rate) => {
            live.not_found = rate;
            let lie = if rate > 0.0 {
                format!(
                    "{:.0} % of machine GETs answer 404 for machines that exist (a lie)",
                    rate * 100.0
                )
            } else {
                "machine GETs tell the truth again".to_owned()
            };
            set_faults(cluster, live, base, lie).await
        }
        Step::Hog => {
            // In the background: the timeline goes on while it fills.
            live.hog = Some(ConnectionHog::start(&cluster.pg.url("flotilla"), HOG_CAP));
            "taking every PostgreSQL connection".into()
        }
        Step::Release => release(live).await,
    }
}

fn nats_up(cluster: &mut Cluster, live: &mut Live) -> String {
    let Some(i) = live.nats_down.take() else {
        return "nats-server: none down".into();
    };
    let name = cluster.nats.node_name(i).to_owned();
    match cluster.nats.restart(i) {
        Ok(()) => format!("nats-server {name} started again"),
        Err(e) => format!("nats-server {name} restart FAILED: {e:#}"),
    }
}

fn resume(cluster: &Cluster, live: &mut Live) -> String {
    match live.paused.take() {
        // Killed and restarted meanwhile, the new process gets a harmless
        // SIGCONT.
        Some(victim) => {
            cluster.supervisor.pause(&victim, false);
            format!("SIGCONT {victim}")
        }
        None => "SIGCONT: nothing paused".into(),
    }
}

async fn release(live: &mut Live) -> String {
    match live.hog.take() {
        Some(hog) => {
            let r = hog.release().await;
            format!(
                "gave back the {} PostgreSQL connections held (the server was full after {:.1}s: {})",
                r.held,
                r.filled_in.as_secs_f64(),
                r.stopped_by
            )
        }
        None => "no PostgreSQL connections held".into(),
    }
}

async fn set_faults(cluster: &Cluster, live: &Live, base: Option<&Faults>, lie: String) -> String {
    let Some(base) = base else {
        return format!("{lie}: NOT APPLIED (the sim's faults are unknown)");
    };
    let faults = Faults {
        listing: live.listing,
        get_not_found_rate: live.not_found,
        ..base.clone()
    };
    match cluster.admin.set_faults(&faults).await {
        Ok(()) => lie,
        Err(e) => format!("{lie}: setting the sim's faults FAILED: {e:#}"),
    }
}

/// Closes every window still open (none, when the plan is whole).
async fn heal_all(cluster: &mut Cluster, live: &mut Live, base: Option<&Faults>) -> Vec<String> {
    let mut done = Vec::new();
    for link in Link::ALL {
        cluster.link(link).heal();
    }
    if live.paused.is_some() {
        done.push(resume(cluster, live));
    }
    if live.nats_down.is_some() {
        done.push(nats_up(cluster, live));
    }
    if live.hog.is_some() {
        done.push(release(live).await);
    }
    if live.listing != Listing::Normal || live.not_found > 0.0 {
        live.listing = Listing::Normal;
        live.not_found = 0.0;
        done.push(set_faults(cluster, live, base, "the sim tells the truth again".into()).await);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(duration: u64, window: u64) -> ChaosConfig {
        ChaosConfig {
            duration: Duration::from_secs(duration),
            fault_window: Duration::from_secs(window),
            ..ChaosConfig::reduced(std::path::PathBuf::new())
        }
    }

    /// When the first `begin` falls, and the first `end` after it.
    fn window_of(
        steps: &[Timed],
        begin: impl Fn(&Step) -> bool,
        end: impl Fn(&Step) -> bool,
    ) -> (Duration, Duration) {
        let from = steps
            .iter()
            .find(|(_, s)| begin(s))
            .map(|(at, _)| *at)
            .expect("the window opens");
        let to = steps
            .iter()
            .find(|(at, s)| *at >= from && end(s))
            .map(|(at, _)| *at)
            .expect("the window closes");
        (from, to)
    }

    #[test]
    fn every_window_that_opens_closes_and_the_timeline_is_sorted() {
        for (d, w) in [(30, 4), (300, 10)] {
            let steps = plan(&config(d, w));
            assert!(steps.windows(2).all(|p| p[0].0 <= p[1].0), "sorted");
            for link in Link::ALL {
                let (cut, heal) = window_of(
                    &steps,
                    |s| *s == Step::Cut(link),
                    |s| *s == Step::Heal(link),
                );
                assert!(heal > cut, "{link:?}");
            }
            let pairs: [(Step, Step); 4] = [
                (Step::Pause, Step::Resume),
                (Step::Hog, Step::Release),
                (Step::NatsDown, Step::NatsUp),
                (Step::PostgresCrash, Step::PostgresStart),
            ];
            for (begin, end) in pairs {
                let (from, to) = window_of(&steps, |s| *s == begin, |s| *s == end);
                assert!(to > from, "{begin:?}");
            }
            let (hog, release) = window_of(&steps, |s| *s == Step::Hog, |s| *s == Step::Release);
            let (kill, _) = window_of(&steps, |s| *s == Step::KillDbClient, |_| true);
            assert!(
                hog < kill && kill < release,
                "a replica dies while the server is full"
            );
            let last = steps.iter().rev().find_map(|(_, s)| match s {
                Step::Listing(l) => Some(*l),
                _ => None,
            });
            assert_eq!(last, Some(Listing::Normal), "listings end truthful");
            let kills = steps
                .iter()
                .filter(|(_, s)| matches!(s, Step::Kill { .. }))
                .count();
            assert_eq!(kills, config(d, w).kills as usize);
        }
    }

    #[test]
    fn the_scheduler_partition_and_the_pause_outlast_a_lease() {
        let steps = plan(&config(30, 1));
        let lease = Duration::from_secs(LEASE_SECONDS);
        let link = Link::SchedulerPostgres;
        let (cut, heal) = window_of(
            &steps,
            |s| *s == Step::Cut(link),
            |s| *s == Step::Heal(link),
        );
        assert!(heal - cut > lease);
        let (pause, resume) = window_of(&steps, |s| *s == Step::Pause, |s| *s == Step::Resume);
        assert!(resume - pause > lease);
    }

    #[test]
    fn the_404_window_opens_only_after_the_listings_tell_the_truth() {
        for (d, w) in [(30, 4), (30, 10), (300, 10)] {
            let steps = plan(&config(d, w));
            let (_, truth) = window_of(
                &steps,
                |s| *s == Step::Listing(Listing::Empty),
                |s| *s == Step::Listing(Listing::Normal),
            );
            let (lying, honest) = window_of(
                &steps,
                |s| matches!(s, Step::NotFound(r) if *r > 0.0),
                |s| *s == Step::NotFound(0.0),
            );
            assert!(lying >= truth + Duration::from_secs(2 * w), "d={d} w={w}");
            assert!(honest > lying);
        }
    }
}
