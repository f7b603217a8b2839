//! The Fly Machines client against the simulated cloud (same API): the full
//! machine and volume lifecycle, every refusal, and the guard layer.

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
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fly.delete_volume(id).await {
            Ok(()) => return,
            Err(ProviderError::FailedPrecondition(m)) if Instant::now() < deadline => {
                assert!(m.contains("bound to machine"), "{m}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("volume {id} not deleted: {e}"),
        }
    }
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
    tokio::time::sleep(Duration::from_millis(200)).await;
    let err = fly.get_machine(&m.id).await.unwrap_err();
    assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
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
    sim.sim().set_faults(fast()).unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    guarded
        .list_machines(&PageRequest::default())
        .await
        .unwrap();
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
