//! The Fly Machines client against the simulated cloud (same API): the full
//! machine and volume lifecycle, every refusal, and the guard layer.

#[path = "docker.rs"]
mod docker;
#[path = "local.rs"]
mod local;
#[path = "scaleway.rs"]
mod scaleway;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_core::{InstanceId, ProviderError};
use flotilla_provider::fly::{FlyConfig, FlyProvider};
use flotilla_provider::guard::{BreakerState, GuardConfig, Guarded};
use flotilla_provider::{
    MachineProvider, MachineSpec, MachineState, PageRequest, TAG_CONTROL_PLANE, TAG_INSTANCE,
    VolumeSpec, VolumeState,
};
use flotilla_sim_provider::{ErrorRates, Faults, Operation, SimConfig, SimHandle};
use flotilla_test_utils::{DEADLINE, eventually, eventually_some};

const APP: &str = "fleet";

async fn sim(faults: Faults) -> SimHandle {
    flotilla_sim_provider::start(SimConfig {
        faults,
        apps: vec![APP.to_owned()],
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// Short timings; every rule of the simulated cloud stays on.
fn fast() -> Faults {
    Faults {
        start_delay_ms: 20,
        stop_delay_ms: 20,
        destroy_delay_ms: 10,
        destroyed_linger_ms: 100,
        volume_release_delay_ms: 100,
        ..Faults::default()
    }
}

fn fly_with(sim: &SimHandle, app: &str, control_plane: &str, timeout: Duration) -> FlyProvider {
    FlyProvider::new(FlyConfig {
        base_url: sim.url().to_string(),
        token: sim.token().to_string(),
        app: app.into(),
        control_plane_id: control_plane.into(),
        request_timeout: timeout,
        connect_timeout: Duration::from_secs(5),
        start_timeout: Duration::from_secs(5),
        kind: "sim",
    })
    .unwrap()
}

fn fly(sim: &SimHandle, timeout: Duration) -> FlyProvider {
    fly_with(sim, APP, "cp-test", timeout)
}

/// Deletes a volume, riding out Fly's 412 while it is still bound to a
/// machine being destroyed (or just destroyed), within a deadline.
async fn delete_volume_when_released(fly: &FlyProvider, id: &str) {
    eventually_some(
        &format!("volume {id} released and deleted"),
        DEADLINE,
        || async {
            match fly.delete_volume(id).await {
                Ok(()) => Some(()),
                Err(ProviderError::FailedPrecondition(m)) => {
                    assert!(m.contains("bound to machine"), "{m}");
                    None
                }
                Err(e) => panic!("volume {id} not deleted: {e}"),
            }
        },
    )
    .await
}

fn volume_spec(instance_id: InstanceId) -> VolumeSpec {
    VolumeSpec {
        instance_id,
        pool: "gpu".into(),
        region: "ams".into(),
        size_gb: 10,
    }
}

fn spec(start: bool) -> MachineSpec {
    MachineSpec {
        instance_id: InstanceId::new(),
        name: "w-1".into(),
        pool: "gpu".into(),
        region: "ams".into(),
        instance_type: "shared-cpu-1x".into(),
        image: "registry/worker:1".into(),
        env: BTreeMap::from([("FLOTILLA_TOKEN".into(), "t".into())]),
        tags: BTreeMap::new(),
        volume_ids: vec![],
        start,
    }
}

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_machine_goes_through_its_whole_lifecycle_and_is_then_gone() {
    let sim = sim(fast()).await;
    let fly = fly(&sim, Duration::from_secs(5));
    let s = spec(true);
    let m = fly.create_machine(&s).await.unwrap();
    assert_eq!(m.instance_id(), Some(s.instance_id));
    assert_eq!(m.tags[TAG_CONTROL_PLANE], "cp-test");
    // The ownership tag is at the provider, not just in our answer.
    let truth = sim.sim().machine(&m.id).unwrap();
    assert_eq!(
        truth.machine.config.metadata[TAG_INSTANCE],
        s.instance_id.to_string()
    );

    let m = fly
        .wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    assert_eq!(m.state, MachineState::Started);
    fly.stop_machine(&m.id, Duration::from_secs(1))
        .await
        .unwrap();
    let m = fly
        .wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .unwrap();
    assert_eq!(m.state, MachineState::Stopped);
    fly.delete_machine(&m.id, false).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .unwrap();
    // Destroyed shows briefly, then the machine is gone (404).
    eventually("the destroyed machine gone (404)", DEADLINE, || async {
        match fly.get_machine(&m.id).await {
            Ok(still) => {
                assert_eq!(still.state, MachineState::Destroyed);
                false
            }
            Err(ProviderError::NotFound(_)) => true,
            // Polled faster than Fly's per-machine read limit: not a look.
            Err(ProviderError::ResourceExhausted { .. }) => false,
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    let err = fly.delete_machine(&m.id, false).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
}

#[tokio::test]
async fn deleting_a_started_machine_is_a_precondition_failure_and_force_deletes_it() {
    let sim = sim(fast()).await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(true)).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    let err = fly.delete_machine(&m.id, false).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    assert_eq!(
        fly.get_machine(&m.id).await.unwrap().state,
        MachineState::Started,
        "a refused delete leaves the machine running"
    );
    fly.delete_machine(&m.id, true).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_start_that_does_not_start_is_an_error_not_a_success() {
    let sim = sim(Faults {
        start_fails_rate: 1.0,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(false)).await.unwrap();
    assert_eq!(m.state, MachineState::Created);
    let err = fly.start_machine(&m.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("did not start"), "{err}");
}

#[tokio::test]
async fn a_start_right_after_a_stop_is_refused_until_the_stop_settles() {
    let sim = sim(Faults {
        stop_delay_ms: 300,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(true)).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    fly.stop_machine(&m.id, Duration::from_secs(1))
        .await
        .unwrap();
    let err = fly.start_machine(&m.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    fly.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .unwrap();
    let m = fly.start_machine(&m.id).await.unwrap();
    assert_eq!(m.state, MachineState::Started);
}

#[tokio::test]
async fn rate_limits_server_errors_and_timeouts_are_classified_by_status() {
    let sim = sim(fast()).await;
    let fly = fly(&sim, Duration::from_millis(300));
    let only = |op, rates: ErrorRates| {
        let mut f = fast();
        f.retry_after_secs = 7;
        f.timeout_ms = 2_000;
        f.error_rate.insert(op, rates);
        f
    };

    sim.sim()
        .set_faults(only(
            Operation::Create,
            ErrorRates {
                rate_429: 1.0,
                ..Default::default()
            },
        ))
        .unwrap();
    let err = fly.create_machine(&spec(true)).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::ResourceExhausted { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
        "{err:?}"
    );

    sim.sim()
        .set_faults(only(
            Operation::Get,
            ErrorRates {
                rate_500: 1.0,
                ..Default::default()
            },
        ))
        .unwrap();
    // A 500 on a machine that does not exist is still not "gone".
    let err = fly.get_machine("0123456789abcd").await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");

    sim.sim()
        .set_faults(only(
            Operation::Get,
            ErrorRates {
                rate_timeout: 1.0,
                ..Default::default()
            },
        ))
        .unwrap();
    let started = Instant::now();
    let err = fly.get_machine("0123456789abcd").await.unwrap_err();
    assert!(matches!(err, ProviderError::DeadlineExceeded(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    let bad = FlyProvider::new(FlyConfig {
        base_url: sim.url().to_string(),
        token: "wrong-token-123".into(),
        app: APP.into(),
        control_plane_id: "cp".into(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        start_timeout: Duration::from_secs(5),
        kind: "sim",
    })
    .unwrap();
    sim.sim().set_faults(fast()).unwrap();
    let err = bad
        .list_machines(&PageRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unauthenticated(_)), "{err:?}");
    assert!(!err.to_string().contains("wrong-token-123"));
    assert!(!format!("{bad:?}").contains("wrong-token-123"));
}

#[tokio::test]
async fn a_create_that_succeeds_but_answers_an_error_leaves_a_findable_machine() {
    let sim = sim(Faults {
        create_succeeds_but_errors_rate: 1.0,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let s = spec(true);
    let err = fly.create_machine(&s).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err}");
    // The orphan scan finds it by its ownership tag.
    let listed = fly.list_machines(&PageRequest::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].instance_id(), Some(s.instance_id));
}

#[tokio::test]
async fn listing_returns_only_this_control_planes_machines() {
    let sim = sim(fast()).await;
    let ours = fly(&sim, Duration::from_secs(5));
    let theirs = fly_with(&sim, APP, "someone-else", Duration::from_secs(5));
    for _ in 0..3 {
        ours.create_machine(&spec(false)).await.unwrap();
    }
    theirs.create_machine(&spec(false)).await.unwrap();
    let page = ours.list_machines(&PageRequest::default()).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(
        page.items
            .iter()
            .all(|m| m.tags[TAG_CONTROL_PLANE] == "cp-test")
    );
}

#[tokio::test]
async fn a_volume_bound_to_a_machine_being_destroyed_is_refused_until_the_destroy_finishes() {
    let sim = sim(Faults {
        destroy_delay_ms: 400,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let instance = InstanceId::new();
    let vol = fly.create_volume(&volume_spec(instance)).await.unwrap();
    assert_eq!(vol.instance_id, Some(instance));
    let mut s = spec(true);
    s.instance_id = instance;
    s.volume_ids = vec![vol.id.clone()];
    let m = fly.create_machine(&s).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    fly.delete_machine(&m.id, true).await.unwrap();
    let err = fly.delete_volume(&vol.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    let listed = fly.list_volumes(&PageRequest::default()).await.unwrap();
    assert_eq!(listed.items[0].state, VolumeState::Attached);
    fly.wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .unwrap();
    delete_volume_when_released(&fly, &vol.id).await;
    let err = fly.delete_volume(&vol.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    assert!(
        fly.list_volumes(&PageRequest::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn the_breaker_stops_calls_to_a_failing_provider_and_resumes_after_it_recovers() {
    let sim = sim(fast()).await;
    let guarded = Guarded::new(
        fly(&sim, Duration::from_secs(2)),
        "sim/ams",
        GuardConfig {
            failure_threshold: 3,
            reset_timeout: Duration::from_millis(300),
            max_retries: 0,
            ..GuardConfig::default()
        },
    );
    let mut f = fast();
    f.error_rate_all = ErrorRates {
        rate_503: 1.0,
        ..Default::default()
    };
    sim.sim().set_faults(f).unwrap();
    for _ in 0..3 {
        let err = guarded
            .list_machines(&PageRequest::default())
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Unavailable(_)));
    }
    assert_eq!(guarded.breaker_state(), BreakerState::Open);
    let reached = sim.sim().stats().total(Operation::List);
    for _ in 0..20 {
        let err = guarded
            .list_machines(&PageRequest::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("circuit open"), "{err}");
    }
    assert_eq!(
        sim.sim().stats().total(Operation::List),
        reached,
        "no call reached the provider while the breaker was open"
    );

    // The provider recovers; after the reset timeout one probe closes it.
    // Until then every call is refused at the breaker (none reaches the
    // provider, as the count below shows).
    sim.sim().set_faults(fast()).unwrap();
    eventually("a probe after the reset timeout", DEADLINE, || async {
        match guarded.list_machines(&PageRequest::default()).await {
            Ok(_) => true,
            Err(e) => {
                assert!(e.to_string().contains("circuit open"), "{e}");
                false
            }
        }
    })
    .await;
    assert_eq!(guarded.breaker_state(), BreakerState::Closed);
    assert_eq!(sim.sim().stats().total(Operation::List), reached + 1);
}

#[tokio::test]
async fn safe_calls_are_retried_through_a_burst_of_errors_but_creates_never_are_without_rate_limits()
 {
    // Forty reads of one machine are more than Fly's per-machine GET limit
    // allows; this test is about retries of 5xx, so the sim is lenient here.
    let sim = sim(Faults {
        rate_limits: false,
        ..fast()
    })
    .await;
    let guarded = Guarded::new(
        fly(&sim, Duration::from_secs(2)),
        "sim/ams",
        GuardConfig {
            max_retries: 10,
            retry_min_delay: Duration::from_millis(5),
            retry_max_delay: Duration::from_millis(20),
            // This test is about retries; a run of failures must not open
            // the breaker (that is the previous test).
            failure_threshold: u32::MAX,
            ..GuardConfig::default()
        },
    );
    let m = guarded.create_machine(&spec(false)).await.unwrap();
    let mut f = fast();
    f.error_rate.insert(
        Operation::Get,
        ErrorRates {
            rate_500: 0.3,
            ..Default::default()
        },
    );
    f.error_rate.insert(
        Operation::Create,
        ErrorRates {
            rate_503: 1.0,
            ..Default::default()
        },
    );
    f.rate_limits = false;
    sim.sim().set_faults(f).unwrap();
    // With 30% of reads failing, eleven attempts all fail once in ~6e5
    // calls; forty calls see at least one failure all but always.
    let gets_before = sim.sim().stats().total(Operation::Get);
    for _ in 0..40 {
        guarded.get_machine(&m.id).await.unwrap();
    }
    assert!(
        sim.sim().stats().total(Operation::Get) > gets_before + 40,
        "failed reads were retried"
    );
    let before = sim.sim().stats().total(Operation::Create);
    guarded.create_machine(&spec(false)).await.unwrap_err();
    assert_eq!(
        sim.sim().stats().total(Operation::Create),
        before + 1,
        "a create is attempted exactly once"
    );
}

#[tokio::test]
async fn a_normal_stop_is_waited_for_with_the_machines_version_and_completes() {
    // Fly docs (machines resource, wait): instance_id is "Required when
    // waiting for Machine to be in stopped state"; the sim answers 400
    // without it, as Fly does.
    let sim = sim(Faults {
        stop_delay_ms: 300,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(true)).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    sim.sim().set_recording(true);
    fly.stop_machine(&m.id, Duration::from_secs(1))
        .await
        .unwrap();
    let stopped = fly
        .wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .unwrap();
    assert_eq!(stopped.state, MachineState::Stopped);
    let version = sim.sim().machine(&m.id).unwrap().machine.instance_id;
    let waits: Vec<_> = sim
        .sim()
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/wait"))
        .collect();
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert!(
        waits[0]
            .query
            .contains(&("instance_id".to_owned(), version.clone())),
        "{waits:?}"
    );
    assert_eq!(waits[0].status, 200);
}

#[tokio::test]
async fn a_wait_that_times_out_says_where_the_machine_still_is() {
    let sim = sim(fast()).await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(true)).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    // Fly answers 408 when the state is not reached in time: "not yet".
    let err = fly
        .wait_machine(&m.id, MachineState::Stopped, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::DeadlineExceeded(_)), "{err}");
    assert!(err.to_string().contains("still started"), "{err}");
    assert_eq!(sim.sim().stats().count(Operation::Wait, 408), 1);
}

#[tokio::test]
async fn a_start_survives_reads_that_are_rate_limited_in_passing() {
    let sim = sim(Faults {
        start_delay_ms: 200,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    let m = fly.create_machine(&spec(false)).await.unwrap();
    // Every read is refused (429, then 503) for the first 400 ms of the start.
    let mut limited = fast();
    limited.start_delay_ms = 200;
    limited.retry_after_secs = 0;
    limited.error_rate.insert(
        Operation::Get,
        ErrorRates {
            rate_429: 0.5,
            rate_503: 0.5,
            ..Default::default()
        },
    );
    sim.sim().set_faults(limited).unwrap();
    // Once a read has been refused, the reads recover.
    let healer = {
        let sim = sim.sim().clone();
        tokio::spawn(async move {
            eventually("a refused read", DEADLINE, || async {
                sim.stats().count(Operation::Get, 429) + sim.stats().count(Operation::Get, 503) > 0
            })
            .await;
            sim.update_faults(|f| f.error_rate.clear()).unwrap();
        })
    };

    let started = fly.start_machine(&m.id).await.unwrap();
    assert_eq!(started.state, MachineState::Started);
    healer.await.unwrap();
    let refused =
        sim.sim().stats().count(Operation::Get, 429) + sim.sim().stats().count(Operation::Get, 503);
    assert!(refused >= 1, "reads were refused in passing");
}

#[tokio::test]
async fn a_start_waits_through_flys_transient_states() {
    // Fly's machine states page: replacing, updating, restarting are
    // transient; a start that meets one is still on its way.
    let sim = sim(Faults {
        transient_state_rate: 1.0,
        transient_state_ms: 200,
        ..fast()
    })
    .await;
    let fly = fly(&sim, Duration::from_secs(5));
    for _ in 0..3 {
        let m = fly.create_machine(&spec(false)).await.unwrap();
        let started = fly.start_machine(&m.id).await.unwrap();
        assert_eq!(started.state, MachineState::Started);
    }
}

#[tokio::test]
async fn a_missing_app_never_makes_a_machine_or_volume_look_gone() {
    let sim = sim(fast()).await;
    let right = fly(&sim, Duration::from_secs(5));
    let m = right.create_machine(&spec(false)).await.unwrap();
    let vol = right
        .create_volume(&volume_spec(InstanceId::new()))
        .await
        .unwrap();
    // A mistyped FLY_APP_NAME: Fly answers 404 for everything in it.
    let typo = fly_with(&sim, "flet", "cp-test", Duration::from_secs(5));
    let err = typo.check_app().await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
    assert!(err.to_string().contains("\"flet\" is missing"), "{err}");
    for err in [
        typo.get_machine(&m.id).await.unwrap_err(),
        typo.delete_machine(&m.id, true).await.unwrap_err(),
        typo.stop_machine(&m.id, Duration::from_secs(1))
            .await
            .unwrap_err(),
        typo.wait_machine(&m.id, MachineState::Destroyed, WAIT)
            .await
            .unwrap_err(),
        typo.delete_volume(&vol.id).await.unwrap_err(),
        typo.list_machines(&PageRequest::default())
            .await
            .unwrap_err(),
        typo.list_volumes(&PageRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
        assert!(err.to_string().contains("FLY_APP_NAME"), "{err}");
    }
    // The right app still answers, and a machine that is really gone is.
    right.check_app().await.unwrap();
    let err = right.get_machine("0123456789abcd").await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    // The app is deleted behind our back: not "gone" either, once the
    // short-lived memory of having seen the app has been refreshed.
    let fresh = fly(&sim, Duration::from_secs(5));
    assert!(sim.sim().delete_app(APP));
    let err = fresh.get_machine(&m.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::FailedPrecondition(_)), "{err}");
}

#[tokio::test]
async fn two_installations_on_one_app_never_see_each_others_volumes() {
    let sim = sim(fast()).await;
    let ours = fly_with(&sim, APP, "cp-ours", Duration::from_secs(5));
    let theirs = fly_with(&sim, APP, "cp-theirs", Duration::from_secs(5));
    let mine = ours
        .create_volume(&volume_spec(InstanceId::new()))
        .await
        .unwrap();
    let other = theirs
        .create_volume(&volume_spec(InstanceId::new()))
        .await
        .unwrap();
    assert!(mine.name.len() <= 30 && other.name.len() <= 30);
    let listed = |p: &FlyProvider| {
        let p = p.clone();
        async move {
            p.list_volumes(&PageRequest::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|v| v.id)
                .collect::<Vec<_>>()
        }
    };
    // The orphan scan works from these lists: neither can delete the other's.
    assert_eq!(listed(&ours).await, vec![mine.id]);
    assert_eq!(listed(&theirs).await, vec![other.id]);
    assert_eq!(sim.sim().volumes().len(), 2, "both exist in the one app");
}

#[tokio::test]
async fn a_second_volume_and_a_size_outside_flys_ranges_are_refused_before_any_call() {
    let sim = sim(fast()).await;
    let fly = fly(&sim, Duration::from_secs(5));
    let mut two = spec(false);
    two.volume_ids = vec!["vol_a".into(), "vol_b".into()];
    let err = fly.create_machine(&two).await.unwrap_err();
    assert!(matches!(err, ProviderError::InvalidArgument(_)), "{err}");
    assert!(err.to_string().contains("volume_ids"), "{err}");
    let mut big = spec(false);
    big.instance_type = "1x4096".into();
    let err = fly.create_machine(&big).await.unwrap_err();
    assert!(err.to_string().contains("instance_type"), "{err}");
    assert_eq!(sim.sim().stats().total(Operation::Create), 0);
    // A GPU machine goes through with Fly's gpu_kind.
    let mut gpu = spec(false);
    gpu.instance_type = "a100-40gb".into();
    let m = fly.create_machine(&gpu).await.unwrap();
    let truth = sim.sim().machine(&m.id).unwrap().machine;
    assert_eq!(
        truth.config.guest.unwrap().extra["gpu_kind"],
        "a100-pcie-40gb"
    );
}

/// What the published documents allow, encoded by hand (the documents are
/// not copied): the Fly Machines OpenAPI document ("Fly Machines API" 1.0,
/// fly-openapi-sdk go/api/openapi.yaml at commit f0c59fb) for paths,
/// methods, query parameters and body fields; where it lags the API, the
/// Fly docs' machines resource page (`suspend`, `force` on delete,
/// `metadata.*` list filters) and fly-go flaps/flaps_machines_wait.go at
/// commit 22d6e51 (wait parameters `version`, `timeout`, `state`).
struct Operation_ {
    method: &'static str,
    /// Path after `/v1`, `{}` for one segment.
    path: &'static str,
    query: &'static [&'static str],
    /// Allowed top-level body fields; `None`: no body.
    body: Option<&'static [&'static str]>,
}

const PUBLISHED: &[Operation_] = &[
    // Apps_show
    Operation_ {
        method: "GET",
        path: "/apps/{}",
        query: &[],
        body: None,
    },
    // Machines_list (`region`, `include_deleted`; `metadata.*` from the docs page)
    Operation_ {
        method: "GET",
        path: "/apps/{}/machines",
        query: &["region", "include_deleted", "metadata.*"],
        body: None,
    },
    // Machines_create: CreateMachineRequest
    Operation_ {
        method: "POST",
        path: "/apps/{}/machines",
        query: &[],
        body: Some(&[
            "config",
            "lease_ttl",
            "lsvd",
            "name",
            "region",
            "skip_launch",
            "skip_service_registration",
        ]),
    },
    // Machines_show
    Operation_ {
        method: "GET",
        path: "/apps/{}/machines/{}",
        query: &[],
        body: None,
    },
    // Machines_delete (`force` from the docs page)
    Operation_ {
        method: "DELETE",
        path: "/apps/{}/machines/{}",
        query: &["force"],
        body: None,
    },
    // Machines_start
    Operation_ {
        method: "POST",
        path: "/apps/{}/machines/{}/start",
        query: &[],
        body: None,
    },
    // Machines_stop: StopRequest
    Operation_ {
        method: "POST",
        path: "/apps/{}/machines/{}/stop",
        query: &[],
        body: Some(&["signal", "timeout"]),
    },
    // Suspend (docs page; not in the 2024 document)
    Operation_ {
        method: "POST",
        path: "/apps/{}/machines/{}/suspend",
        query: &[],
        body: None,
    },
    // Machines_wait (`instance_id`, `timeout`, `state`)
    Operation_ {
        method: "GET",
        path: "/apps/{}/machines/{}/wait",
        query: &["instance_id", "timeout", "state"],
        body: None,
    },
    // Volumes_list
    Operation_ {
        method: "GET",
        path: "/apps/{}/volumes",
        query: &[],
        body: None,
    },
    // Volumes_create: CreateVolumeRequest
    Operation_ {
        method: "POST",
        path: "/apps/{}/volumes",
        query: &[],
        body: Some(&[
            "compute",
            "encrypted",
            "fstype",
            "machines_only",
            "name",
            "region",
            "require_unique_zone",
            "size_gb",
            "snapshot_id",
            "snapshot_retention",
            "source_volume_id",
        ]),
    },
    // Volume_delete
    Operation_ {
        method: "DELETE",
        path: "/apps/{}/volumes/{}",
        query: &[],
        body: None,
    },
];

/// `api.MachineConfig`, `api.MachineGuest`, `api.MachineMount`,
/// `api.MachineRestart` field names (same document).
const MACHINE_CONFIG: &[&str] = &[
    "auto_destroy",
    "checks",
    "disable_machine_autostart",
    "dns",
    "env",
    "files",
    "guest",
    "image",
    "init",
    "metadata",
    "metrics",
    "mounts",
    "processes",
    "restart",
    "schedule",
    "services",
    "size",
    "standbys",
    "statics",
    "stop_config",
];
const GUEST: &[&str] = &[
    "cpu_kind",
    "cpus",
    "gpu_kind",
    "host_dedication_id",
    "kernel_args",
    "memory_mb",
];
const MOUNT: &[&str] = &[
    "add_size_gb",
    "encrypted",
    "extend_threshold_percent",
    "name",
    "path",
    "size_gb",
    "size_gb_limit",
    "volume",
];
const RESTART: &[&str] = &["max_retries", "policy"];
/// Machines_wait `state` enum (document: started, stopped, destroyed; the
/// docs page adds suspended).
const WAIT_STATES: &[&str] = &["started", "stopped", "suspended", "destroyed"];

fn path_matches(pattern: &str, path: &str) -> bool {
    let (p, a): (Vec<_>, Vec<_>) = (pattern.split('/').collect(), path.split('/').collect());
    p.len() == a.len() && p.iter().zip(&a).all(|(p, a)| *p == "{}" || p == a)
}

fn fields_within(value: &serde_json::Value, allowed: &[&str], at: &str) -> Vec<String> {
    value
        .as_object()
        .map(|o| {
            o.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .map(|k| format!("{at}.{k}"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn every_request_of_a_full_lifecycle_matches_the_published_schema() {
    let sim = sim(fast()).await;
    sim.sim().set_recording(true);
    let fly = fly(&sim, Duration::from_secs(5));
    fly.check_app().await.unwrap();
    // A machine with a volume: created, started, suspended, stopped normally,
    // deleted, its volume deleted.
    let instance = InstanceId::new();
    let vol = fly.create_volume(&volume_spec(instance)).await.unwrap();
    let mut s = spec(false);
    s.instance_id = instance;
    s.volume_ids = vec![vol.id.clone()];
    let m = fly.create_machine(&s).await.unwrap();
    fly.start_machine(&m.id).await.unwrap();
    fly.suspend_machine(&m.id).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Suspended, WAIT)
        .await
        .unwrap();
    fly.start_machine(&m.id).await.unwrap();
    fly.stop_machine(&m.id, Duration::from_secs(1))
        .await
        .unwrap();
    fly.wait_machine(&m.id, MachineState::Stopped, WAIT)
        .await
        .unwrap();
    fly.delete_machine(&m.id, false).await.unwrap();
    fly.wait_machine(&m.id, MachineState::Destroyed, WAIT)
        .await
        .unwrap();
    delete_volume_when_released(&fly, &vol.id).await;
    // A forced termination of a running machine; listings; a gone machine.
    let forced = fly.create_machine(&spec(true)).await.unwrap();
    fly.wait_machine(&forced.id, MachineState::Started, WAIT)
        .await
        .unwrap();
    fly.list_machines(&PageRequest::default()).await.unwrap();
    fly.find_machines(instance).await.unwrap();
    fly.list_volumes(&PageRequest::default()).await.unwrap();
    fly.delete_machine(&forced.id, true).await.unwrap();
    fly.wait_machine(&forced.id, MachineState::Destroyed, WAIT)
        .await
        .unwrap();
    fly.get_machine("0123456789abcd").await.unwrap_err();

    let requests = sim.sim().requests();
    assert!(requests.len() > 20, "{}", requests.len());
    let mut wrong = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for r in &requests {
        let path = r.path.strip_prefix("/v1").unwrap_or("?");
        let Some(op) = PUBLISHED
            .iter()
            .find(|op| op.method == r.method && path_matches(op.path, path))
        else {
            wrong.push(format!("{} {path}: no such operation", r.method));
            continue;
        };
        used.insert((op.method, op.path));
        for (k, v) in &r.query {
            let known = op
                .query
                .iter()
                .any(|q| q == k || (q.ends_with(".*") && k.starts_with(q.trim_end_matches('*'))));
            if !known {
                wrong.push(format!("{} {path}: query {k}", r.method));
            }
            if op.path.ends_with("/wait") && k == "state" && !WAIT_STATES.contains(&v.as_str()) {
                wrong.push(format!("wait state {v}"));
            }
            if k == "timeout" && v.parse::<u64>().map_or(true, |t| !(1..=60).contains(&t)) {
                wrong.push(format!("wait timeout {v}"));
            }
        }
        if op.path.ends_with("/wait")
            && r.query.iter().any(|(k, v)| k == "state" && v == "stopped")
            && !r
                .query
                .iter()
                .any(|(k, v)| k == "instance_id" && v.len() == 26)
        {
            wrong.push("a wait for stopped without a 26-character instance_id".into());
        }
        match (&r.body, op.body) {
            (None, _) => {}
            (Some(_), None) => wrong.push(format!("{} {path}: a body", r.method)),
            (Some(body), Some(allowed)) => {
                wrong.extend(fields_within(body, allowed, "body"));
                if let Some(config) = body.get("config") {
                    wrong.extend(fields_within(config, MACHINE_CONFIG, "config"));
                    if let Some(g) = config.get("guest") {
                        wrong.extend(fields_within(g, GUEST, "config.guest"));
                    }
                    if let Some(r) = config.get("restart") {
                        wrong.extend(fields_within(r, RESTART, "config.restart"));
                    }
                    for m in config["mounts"].as_array().into_iter().flatten() {
                        wrong.extend(fields_within(m, MOUNT, "config.mounts[]"));
                    }
                }
            }
        }
        assert!(r.status < 500, "{r:?}");
    }
    assert!(
        wrong.is_empty(),
        "requests outside the published schema: {wrong:#?}"
    );
    // The lifecycle did exercise every operation Flotilla uses.
    assert_eq!(used.len(), PUBLISHED.len(), "{used:?}");
}

/// `connect_timeout` (HTTP_CONNECT_TIMEOUT_SECONDS) bounds the connect of
/// every call, long before the request timeout.
#[tokio::test]
async fn an_api_host_that_never_accepts_fails_the_call_after_the_connect_timeout() {
    let (_listener, _held, addr) = flotilla_telemetry::test_support::hanging_address();
    let fly = FlyProvider::new(FlyConfig {
        base_url: format!("http://{addr}"),
        token: "token".into(),
        app: APP.into(),
        control_plane_id: "cp".into(),
        request_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_millis(300),
        start_timeout: Duration::from_secs(5),
        kind: "sim",
    })
    .unwrap();
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(4), fly.get_machine("0123456789abcd"))
        .await
        .expect("given up after the 300 ms connect timeout, not the 60 s request timeout")
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProviderError::Unavailable(_) | ProviderError::DeadlineExceeded(_)
        ),
        "{err:?} after {:?}",
        started.elapsed()
    );
}
