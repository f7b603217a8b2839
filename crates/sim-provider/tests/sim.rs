//! The sim as a Fly client sees it: real HTTP on a port-0 listener, checked
//! against the ground truth the sim exposes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use flotilla_sim_provider::{
    ErrorRates, Faults, Machine, MachineState, Operation, SimConfig, SimHandle, Volume,
    VolumeState, start,
};
use flotilla_test_utils::{DEADLINE, eventually, eventually_ok, eventually_some};
use futures::StreamExt;
use reqwest::{Response, StatusCode};
use serde_json::{Value, json};

const APP: &str = "flotilla-test";

/// Short timings so the suite runs in a few seconds; every rule stays on.
fn fast_faults() -> Faults {
    Faults {
        start_delay_ms: 20,
        stop_delay_ms: 20,
        destroy_delay_ms: 20,
        destroyed_linger_ms: 200,
        volume_release_delay_ms: 100,
        ..Faults::default()
    }
}

struct Fly {
    sim: SimHandle,
    http: reqwest::Client,
}

impl Fly {
    async fn start(faults: Faults) -> Fly {
        // The workspace's reqwest uses rustls without a built-in crypto
        // provider; the first test to get here installs ring (the sim itself
        // is plain HTTP, but reqwest builds its TLS config eagerly).
        rustls::crypto::ring::default_provider()
            .install_default()
            .ok();
        let sim = start(SimConfig {
            faults,
            apps: vec![APP.to_owned()],
            ..SimConfig::default()
        })
        .await
        .expect("sim starts");
        Fly {
            sim,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/apps/{APP}{path}", self.sim.url())
    }

    fn authed(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        request.bearer_auth(self.sim.token())
    }

    async fn get(&self, path: &str) -> Response {
        self.authed(self.http.get(self.url(path)))
            .send()
            .await
            .expect("sim answers")
    }

    async fn post(&self, path: &str, body: Value) -> Response {
        self.authed(self.http.post(self.url(path)).json(&body))
            .send()
            .await
            .expect("sim answers")
    }

    async fn delete(&self, path: &str) -> Response {
        self.authed(self.http.delete(self.url(path)))
            .send()
            .await
            .expect("sim answers")
    }

    async fn create(&self, body: Value) -> Response {
        self.post("/machines", body).await
    }

    async fn create_machine(&self) -> Machine {
        let response = self
            .create(json!({ "region": "ord", "config": { "image": "worker:1" } }))
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("machine json")
    }

    /// A wait as a correct client sends it: with the machine's current
    /// version (`instance_id`), which Fly requires for `stopped`.
    async fn wait(&self, id: &str, state: &str, timeout_secs: u64) -> Response {
        let version = self
            .sim
            .sim()
            .machine(id)
            .map(|m| m.machine.instance_id)
            .unwrap_or_default();
        self.get(&format!(
            "/machines/{id}/wait?state={state}&timeout={timeout_secs}&instance_id={version}"
        ))
        .await
    }

    async fn create_started(&self) -> Machine {
        let machine = self.create_machine().await;
        assert_eq!(self.wait(&machine.id, "started", 5).await.status(), 200);
        machine
    }

    async fn state_of(&self, id: &str) -> MachineState {
        self.sim
            .sim()
            .machine(id)
            .expect("machine in truth")
            .machine
            .state
    }

    /// Polls the truth until the machine is in `state`, for transitions no
    /// API call can wait on (a machine that fails instead of starting).
    async fn eventually_state(&self, id: &str, state: MachineState) {
        eventually_ok(
            &format!("machine {id} to reach {state}"),
            DEADLINE,
            || async {
                match self.state_of(id).await {
                    now if now == state => Ok(()),
                    now => Err(now),
                }
            },
        )
        .await
    }
}

async fn error_of(response: Response) -> String {
    let body: Value = response.json().await.expect("error json");
    body["error"].as_str().expect("error string").to_owned()
}

#[tokio::test]
async fn a_machine_goes_from_created_to_started_to_stopped_to_destroyed_and_then_is_not_found() {
    // A linger of a second, so the look at the lingering machine comes
    // inside it on a busy machine.
    let fly = Fly::start(Faults {
        destroyed_linger_ms: 1000,
        ..fast_faults()
    })
    .await;

    let response = fly
        .create(json!({
            "name": "w1",
            "region": "ord",
            "config": {
                "image": "worker:1",
                "env": { "MODE": "batch" },
                "guest": { "cpu_kind": "shared", "cpus": 1, "memory_mb": 256 },
                "restart": { "policy": "no" },
                "dns": { "skip_registration": true }
            }
        }))
        .await;
    assert_eq!(response.status(), 200);
    let created: Value = response.json().await.unwrap();
    assert_eq!(created["state"], "created");
    assert_eq!(created["name"], "w1");
    assert_eq!(created["region"], "ord");
    assert_eq!(created["config"]["env"]["MODE"], "batch");
    assert_eq!(created["config"]["dns"]["skip_registration"], true);
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 14);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(created["private_ip"].as_str().unwrap().starts_with("fdaa:"));
    assert!(chrono::DateTime::parse_from_rfc3339(created["created_at"].as_str().unwrap()).is_ok());

    assert_eq!(fly.wait(&id, "started", 5).await.status(), 200);
    let machine: Machine = fly
        .get(&format!("/machines/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(machine.state, MachineState::Started);

    let stop = fly
        .post(
            &format!("/machines/{id}/stop"),
            json!({ "signal": "SIGTERM", "timeout": "10s" }),
        )
        .await;
    assert_eq!(stop.status(), 200);
    assert_eq!(stop.json::<Value>().await.unwrap(), json!({ "ok": true }));
    assert_eq!(fly.wait(&id, "stopped", 5).await.status(), 200);
    assert_eq!(fly.state_of(&id).await, MachineState::Stopped);

    let delete = fly.delete(&format!("/machines/{id}")).await;
    assert_eq!(delete.status(), 200);
    assert_eq!(fly.wait(&id, "destroyed", 5).await.status(), 200);
    let lingering: Machine = fly
        .get(&format!("/machines/{id}"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(lingering.state, MachineState::Destroyed);
    let listed: Vec<Machine> = fly.get("/machines").await.json().await.unwrap();
    assert!(listed.is_empty(), "destroyed machines are not listed");

    // After the linger the machine answers 404. (Polled faster than Fly's
    // per-machine limit on reads allows: a 429 is a look that did not
    // count.)
    let gone = eventually_some("the destroyed machine gone", DEADLINE, || async {
        let r = fly.get(&format!("/machines/{id}")).await;
        match r.status().as_u16() {
            200 | 429 => None,
            _ => Some(r),
        }
    })
    .await;

    assert_eq!(gone.status(), 404);
    assert_eq!(error_of(gone).await, "machine not found");
    assert_eq!(fly.state_of(&id).await, MachineState::Destroyed);
}

#[tokio::test]
async fn deleting_a_started_machine_is_refused_and_the_machine_keeps_running() {
    let fly = Fly::start(fast_faults()).await;
    let machine = fly.create_started().await;

    let delete = fly.delete(&format!("/machines/{}", machine.id)).await;
    assert_eq!(delete.status(), 412);
    assert_eq!(
        error_of(delete).await,
        "failed_precondition: unable to destroy machine, not currently stopped, suspended or failed"
    );
    assert_eq!(
        fly.sim.sim().steps_scheduled(&machine.id),
        0,
        "a refused delete schedules nothing"
    );
    assert_eq!(fly.state_of(&machine.id).await, MachineState::Started);
    let listed: Vec<Machine> = fly.get("/machines").await.json().await.unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn starting_a_machine_that_is_still_stopping_is_refused_until_the_stop_settles() {
    // A stop of 1.5 s: the early start comes inside it on a busy machine.
    let fly = Fly::start(Faults {
        stop_delay_ms: 1500,

        ..fast_faults()
    })
    .await;
    let machine = fly.create_started().await;
    let id = &machine.id;

    let already_started = fly.post(&format!("/machines/{id}/start"), json!({})).await;
    assert_eq!(already_started.status(), 412);

    assert_eq!(
        fly.post(&format!("/machines/{id}/stop"), json!({}))
            .await
            .status(),
        200
    );
    assert_eq!(fly.state_of(id).await, MachineState::Stopping);
    let early = fly.post(&format!("/machines/{id}/start"), json!({})).await;
    assert_eq!(early.status(), 412);
    assert_eq!(
        error_of(early).await,
        "failed_precondition: machine still active, refusing to start"
    );

    assert_eq!(fly.wait(id, "stopped", 5).await.status(), 200);
    let start = fly.post(&format!("/machines/{id}/start"), json!({})).await;
    assert_eq!(start.status(), 200);
    assert_eq!(
        start.json::<Value>().await.unwrap(),
        json!({ "previous_state": "stopped", "migrated": false, "new_host": "" })
    );
    assert_eq!(fly.wait(id, "started", 5).await.status(), 200);
}

#[tokio::test]
async fn a_forced_delete_destroys_a_started_machine() {
    let fly = Fly::start(fast_faults()).await;
    let machine = fly.create_started().await;

    let delete = fly
        .delete(&format!("/machines/{}?force=true", machine.id))
        .await;
    assert_eq!(delete.status(), 200);
    assert_eq!(fly.wait(&machine.id, "destroyed", 5).await.status(), 200);
    assert_eq!(fly.state_of(&machine.id).await, MachineState::Destroyed);
}

#[tokio::test]
async fn wait_answers_200_once_the_state_is_reached_and_408_when_it_never_is() {
    let fly = Fly::start(Faults {
        start_delay_ms: 200,
        ..fast_faults()
    })
    .await;
    let machine = fly.create_machine().await;
    let id = &machine.id;

    let began = Instant::now();
    assert_eq!(fly.wait(id, "started", 5).await.status(), 200);
    assert!(
        began.elapsed() >= Duration::from_millis(150),
        "wait returned before the start delay"
    );

    let began = Instant::now();
    let timed_out = fly.wait(id, "stopped", 1).await;
    assert_eq!(timed_out.status(), 408);
    assert!(began.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        error_of(timed_out).await,
        "deadline_exceeded: timeout waiting for machine to be stopped"
    );

    assert_eq!(fly.wait(id, "sleeping", 1).await.status(), 400);
    assert_eq!(fly.wait(id, "started", 61).await.status(), 400);
    assert_eq!(fly.wait("00000000000000", "started", 1).await.status(), 404);
}

#[tokio::test]
async fn a_bound_volume_cannot_be_deleted_until_its_machine_is_fully_destroyed() {
    let fly = Fly::start(Faults {
        destroy_delay_ms: 300,
        ..fast_faults()
    })
    .await;
    let volume: Volume = fly
        .post(
            "/volumes",
            json!({ "name": "scratch_1", "region": "ord", "size_gb": 10 }),
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(volume.id.starts_with("vol_"));
    assert_eq!(volume.state, VolumeState::Created);
    assert_eq!(volume.attached_machine_id, None);

    let created = fly
        .create(json!({ "config": {
            "image": "worker:1",
            "mounts": [{ "volume": volume.id, "path": "/data" }]
        }}))
        .await;
    assert_eq!(created.status(), 200);
    let machine: Machine = created.json().await.unwrap();
    assert_eq!(
        machine.region, "ord",
        "a machine follows its volume's region"
    );
    let bound: Volume = fly
        .get(&format!("/volumes/{}", volume.id))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        bound.attached_machine_id.as_deref(),
        Some(machine.id.as_str())
    );

    assert_eq!(fly.wait(&machine.id, "started", 5).await.status(), 200);
    fly.post(&format!("/machines/{}/stop", machine.id), json!({}))
        .await;
    assert_eq!(fly.wait(&machine.id, "stopped", 5).await.status(), 200);
    assert_eq!(
        fly.delete(&format!("/machines/{}", machine.id))
            .await
            .status(),
        200
    );

    let refused = fly.delete(&format!("/volumes/{}", volume.id)).await;
    assert_eq!(refused.status(), 412);
    assert_eq!(
        error_of(refused).await,
        format!(
            "failed_precondition: volume is currently bound to machine: {}",
            machine.id
        )
    );

    assert_eq!(fly.wait(&machine.id, "destroyed", 5).await.status(), 200);
    let destroyed_at = Instant::now();
    // Fly: the volume stays bound a while after the destroy finished (our
    // estimate; the knob is `volume_release_delay_ms`, 100 ms here).
    let still_bound = fly.delete(&format!("/volumes/{}", volume.id)).await;
    assert_eq!(still_bound.status(), 412);
    let deleted = eventually_some("the volume released", DEADLINE, || async {
        let answer = fly.delete(&format!("/volumes/{}", volume.id)).await;
        (answer.status() != 412).then_some(answer)
    })
    .await;
    assert!(destroyed_at.elapsed() >= Duration::from_millis(90));
    assert_eq!(deleted.status(), 200);
    let deleted: Volume = deleted.json().await.unwrap();
    assert_eq!(deleted.state, VolumeState::Destroyed);
    assert_eq!(
        fly.get(&format!("/volumes/{}", volume.id)).await.status(),
        404
    );
    let listed: Vec<Volume> = fly.get("/volumes").await.json().await.unwrap();
    assert!(listed.is_empty());
}

#[tokio::test]
async fn calls_without_the_right_token_are_unauthorized() {
    let fly = Fly::start(fast_faults()).await;
    let url = fly.url("/machines");

    let missing = fly.http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(error_of(missing).await, "unauthorized");

    let wrong = fly
        .http
        .post(&url)
        .bearer_auth("not-the-token")
        .json(&json!({ "config": { "image": "worker:1" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(fly.sim.sim().machines().is_empty());
    assert_eq!(fly.sim.sim().stats().count(Operation::Create, 401), 1);
}

#[tokio::test]
async fn an_injected_429_carries_retry_after_and_creates_nothing() {
    let mut faults = fast_faults();
    faults.retry_after_secs = 7;
    faults.error_rate.insert(
        Operation::Create,
        ErrorRates {
            rate_429: 1.0,
            ..ErrorRates::default()
        },
    );
    let fly = Fly::start(faults).await;

    let limited = fly
        .create(json!({ "config": { "image": "worker:1" } }))
        .await;
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");
    assert_eq!(error_of(limited).await, "rate limited");
    assert!(fly.sim.sim().machines().is_empty());
    assert_eq!(
        fly.get("/machines").await.status(),
        200,
        "only create is limited"
    );
}

#[tokio::test]
async fn a_create_that_succeeds_but_errors_leaves_a_running_machine_behind() {
    let fly = Fly::start(Faults {
        create_succeeds_but_errors_rate: 1.0,
        ..fast_faults()
    })
    .await;

    let response = fly
        .create(json!({ "config": { "image": "worker:1", "metadata": { "instance": "i-1" } } }))
        .await;
    assert_eq!(response.status(), 500);

    let truth = fly.sim.sim().machines();
    assert_eq!(
        truth.len(),
        1,
        "the machine exists although the call failed"
    );
    assert_eq!(truth[0].app, APP);
    assert_eq!(truth[0].machine.config.metadata["instance"], "i-1");
    fly.eventually_state(&truth[0].machine.id, MachineState::Started)
        .await;
    let listed: Vec<Machine> = fly
        .get("/machines?metadata.instance=i-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "a client can find it by its metadata");
}

#[tokio::test]
async fn a_start_that_fails_answers_200_but_the_machine_never_runs() {
    let fly = Fly::start(Faults {
        start_fails_rate: 1.0,
        ..fast_faults()
    })
    .await;

    let launched = fly.create_machine().await;
    fly.eventually_state(&launched.id, MachineState::Failed)
        .await;

    let idle: Machine = fly
        .create(json!({ "config": { "image": "worker:1" }, "skip_launch": true }))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        fly.sim.sim().steps_scheduled(&idle.id),
        0,
        "skip_launch schedules no start"
    );
    assert_eq!(fly.state_of(&idle.id).await, MachineState::Created);
    let start = fly
        .post(&format!("/machines/{}/start", idle.id), json!({}))
        .await;
    assert_eq!(start.status(), 200);
    assert_eq!(
        start.json::<Value>().await.unwrap()["previous_state"],
        "created"
    );
    fly.eventually_state(&idle.id, MachineState::Failed).await;
}

#[tokio::test]
async fn listing_filters_on_every_metadata_pair_and_on_region() {
    let fly = Fly::start(fast_faults()).await;
    let specs = [
        ("ord", "pool-a", "i-1"),
        ("ord", "pool-a", "i-2"),
        ("ams", "pool-a", "i-3"),
        ("ord", "pool-b", "i-4"),
    ];
    for (region, pool, instance) in specs {
        let response = fly
            .create(json!({ "region": region, "config": {
                "image": "worker:1",
                "metadata": { "pool": pool, "instance": instance }
            }}))
            .await;
        assert_eq!(response.status(), 200);
    }
    let instances = |machines: Vec<Machine>| -> Vec<String> {
        let mut ids: Vec<String> = machines
            .into_iter()
            .map(|m| m.config.metadata["instance"].clone())
            .collect();
        ids.sort();
        ids
    };

    let pool_a: Vec<Machine> = fly
        .get("/machines?metadata.pool=pool-a")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(instances(pool_a), ["i-1", "i-2", "i-3"]);
    let both: Vec<Machine> = fly
        .get("/machines?metadata.pool=pool-a&metadata.instance=i-2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(instances(both), ["i-2"]);
    let in_ord: Vec<Machine> = fly
        .get("/machines?metadata.pool=pool-a&region=ord")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(instances(in_ord), ["i-1", "i-2"]);
    let none: Vec<Machine> = fly
        .get("/machines?metadata.pool=pool-c")
        .await
        .json()
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn two_thousand_machines_created_concurrently_are_all_there() {
    let fly = Fly::start(Faults::instant()).await;
    let statuses: Vec<StatusCode> = futures::stream::iter(0..2_000)
        .map(|i| {
            let fly = &fly;
            async move {
                fly.create(json!({ "config": {
                    "image": "worker:1",
                    "metadata": { "instance": format!("i-{i}") }
                }}))
                .await
                .status()
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));

    let listed: Vec<Machine> = fly.get("/machines").await.json().await.unwrap();
    assert_eq!(listed.len(), 2_000);
    let truth = fly.sim.sim().machines();
    let ids: HashSet<&str> = truth.iter().map(|t| t.machine.id.as_str()).collect();
    assert_eq!(ids.len(), 2_000, "every machine has its own id");
    let instances: HashSet<&str> = truth
        .iter()
        .map(|t| t.machine.config.metadata["instance"].as_str())
        .collect();
    assert_eq!(instances.len(), 2_000);
    assert!(
        truth
            .iter()
            .all(|t| t.machine.state == MachineState::Started)
    );
    assert_eq!(fly.sim.sim().stats().count(Operation::Create, 200), 2_000);
}

#[tokio::test]
async fn malformed_or_invalid_bodies_are_json_400s() {
    let fly = Fly::start(fast_faults()).await;

    let garbage = fly
        .authed(fly.http.post(fly.url("/machines")).body("{not json"))
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    assert!(error_of(garbage).await.starts_with("invalid request body"));

    let no_image = fly.create(json!({ "config": { "env": {} } })).await;
    assert_eq!(no_image.status(), 400);
    assert!(error_of(no_image).await.contains("image"));

    // Field names and types follow the published schema (OpenAPI
    // `CreateMachineRequest`, `api.MachineConfig`, `api.MachineGuest`,
    // `CreateVolumeRequest`, `StopRequest`): anything else is a 400 naming it.
    let strict = [
        (
            json!({ "config": { "image": "w:1", "metadta": {} } }),
            "config.metadta",
        ),
        (
            json!({ "skip_lanuch": true, "config": { "image": "w:1" } }),
            "skip_lanuch",
        ),
        (
            json!({ "config": { "image": "w:1", "guest": { "cpus": "1" } } }),
            "config.guest.cpus",
        ),
        (
            json!({ "config": { "image": "w:1", "auto_destroy": "false" } }),
            "config.auto_destroy",
        ),
        (
            json!({ "config": { "image": "w:1", "env": { "A": 1 } } }),
            "config.env.A",
        ),
    ];
    for (body, field) in strict {
        let response = fly.create(body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        assert!(error_of(response).await.contains(field), "{body}");
    }
    let typo = fly
        .post(
            "/volumes",
            json!({ "name": "ok", "region": "ord", "size_gb": 1, "encrypt": true }),
        )
        .await;
    assert_eq!(typo.status(), 400);
    assert!(error_of(typo).await.contains("encrypt"));

    let bad_volumes = [
        json!({ "name": "Has-Caps", "region": "ord", "size_gb": 1 }),
        json!({ "name": "a_name_that_is_far_too_long_for_fly", "region": "ord", "size_gb": 1 }),
        json!({ "name": "ok", "region": "ord", "size_gb": 0 }),
        json!({ "name": "ok", "region": "ord", "size_gb": 501 }),
        json!({ "name": "ok", "region": "ord" }),
    ];
    for body in bad_volumes {
        let response = fly.post("/volumes", body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        assert!(!error_of(response).await.is_empty());
    }
    assert!(fly.sim.sim().machines().is_empty());
    assert!(fly.sim.sim().volumes().is_empty());
}

#[tokio::test]
async fn an_injected_timeout_answers_504_only_after_the_client_gave_up() {
    let mut faults = fast_faults();
    faults.timeout_ms = 300;
    faults.error_rate.insert(
        Operation::Get,
        ErrorRates {
            rate_timeout: 1.0,
            ..ErrorRates::default()
        },
    );
    let fly = Fly::start(faults).await;
    let machine = fly.create_machine().await;

    let impatient = fly
        .authed(fly.http.get(fly.url(&format!("/machines/{}", machine.id))))
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(impatient.is_err_and(|err| err.is_timeout()));

    let began = Instant::now();
    let patient = fly.get(&format!("/machines/{}", machine.id)).await;
    assert_eq!(patient.status(), 504);
    assert!(began.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_machine_dies_by_itself_or_when_killed_and_faults_change_over_http() {
    let fly = Fly::start(fast_faults()).await;
    let admin = |path: &str| format!("{}/_sim{path}", fly.sim.url());

    let mut dying = fast_faults();
    dying.die_rate = 1.0;
    dying.die_after_ms = [30, 30];
    let put = fly
        .http
        .put(admin("/faults"))
        .json(&dying)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let read: Faults = fly
        .http
        .get(admin("/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(read, dying);
    let typo = fly
        .http
        .put(admin("/faults"))
        .json(&json!({ "die_rte": 1.0 }))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 400);

    let doomed = fly.create_started().await;
    assert_eq!(fly.wait(&doomed.id, "stopped", 5).await.status(), 200);

    fly.sim.sim().set_faults(fast_faults()).unwrap();
    let victim = fly.create_started().await;
    let killed = fly
        .http
        .post(admin(&format!("/machines/{}/kill", victim.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status(), 200);
    assert_eq!(fly.state_of(&victim.id).await, MachineState::Stopped);

    let truth: Vec<Value> = fly
        .http
        .get(admin("/machines"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(truth.len(), 2);
    assert!(
        truth
            .iter()
            .all(|m| m["app"] == APP && m["state"] == "stopped")
    );
    let stats: Value = fly
        .http
        .get(admin("/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["requests"]["create"]["200"], 2);

    let reset = fly.http.post(admin("/reset")).send().await.unwrap();
    assert_eq!(reset.status(), 200);
    assert!(fly.sim.sim().machines().is_empty());
    assert_eq!(fly.sim.sim().stats().total(Operation::Create), 0);
}

#[tokio::test]
async fn a_wait_for_stopped_needs_the_instance_id_and_a_wrong_one_never_matches() {
    // Fly docs, machines resource, "Wait for a Machine to reach a specified
    // state": instance_id is "Required when waiting for Machine to be in
    // stopped state"; the real answer without it is this 400.
    let fly = Fly::start(fast_faults()).await;
    let machine = fly.create_started().await;
    let id = &machine.id;
    fly.post(&format!("/machines/{id}/stop"), json!({})).await;
    let missing = fly
        .get(&format!("/machines/{id}/wait?state=stopped&timeout=1"))
        .await;
    assert_eq!(missing.status(), 400);
    assert_eq!(
        error_of(missing).await,
        "instance_id required when waiting for stopped machine"
    );
    let began = Instant::now();
    let wrong = fly
        .get(&format!(
            "/machines/{id}/wait?state=stopped&timeout=1&instance_id=01ARZ3NDEKTSV4RRFFQ69G5FAV"
        ))
        .await;
    assert_eq!(
        wrong.status(),
        408,
        "another version never reaches the state"
    );
    assert!(began.elapsed() >= Duration::from_secs(1));
    // fly-go's newer spelling (`version`, flaps_machines_wait.go) is the same.
    let version = fly.sim.sim().machine(id).unwrap().machine.instance_id;
    let by_version = fly
        .get(&format!(
            "/machines/{id}/wait?state=stopped&timeout=5&version={version}"
        ))
        .await;
    assert_eq!(by_version.status(), 200);
}

#[tokio::test]
async fn per_machine_actions_are_rate_limited_as_fly_publishes() {
    // Fly docs "Machines API rate limits": 1 request/s per action per
    // machine, burst 3; GET machine 5/s, burst 10; answered 429 + Retry-After.
    let fly = Fly::start(fast_faults()).await;
    let machine = fly.create_started().await;
    let id = &machine.id;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let stop = fly.post(&format!("/machines/{id}/stop"), json!({})).await;
        if stop.status() == 429 {
            assert_eq!(stop.headers()["retry-after"], "1");
        }
        statuses.push(stop.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429]);
    let path = format!("/machines/{id}");
    let gets = futures::future::join_all((0..12).map(|_| fly.get(&path))).await;
    let limited = gets.iter().filter(|r| r.status() == 429).count();
    assert!(limited >= 1, "more than the burst of 10 is refused");
    // Another machine has its own buckets.
    let other = fly.create_machine().await;
    let stop = fly
        .post(&format!("/machines/{}/stop", other.id), json!({}))
        .await;
    assert_eq!(stop.status(), 200);
}

#[tokio::test]
async fn an_unknown_app_is_a_404_for_the_app_and_apps_are_added_and_deleted_explicitly() {
    let fly = Fly::start(fast_faults()).await;
    let app = fly.get("").await;
    assert_eq!(app.status(), 200);
    assert_eq!(app.json::<Value>().await.unwrap()["name"], APP);
    let other = |path: &str| format!("{}/v1/apps/flotila-test{path}", fly.sim.url());
    for path in ["", "/machines", "/volumes", "/machines/0123456789abcd"] {
        let r = fly.authed(fly.http.get(other(path))).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(error_of(r).await, "app not found");
    }
    let create = fly
        .authed(fly.http.post(other("/machines")))
        .json(&json!({ "config": { "image": "worker:1" } }))
        .send()
        .await
        .unwrap();
    assert_eq!(create.status(), 404);
    assert!(
        fly.sim.sim().machines().is_empty(),
        "no app is created on the fly"
    );

    let admin = format!("{}/_sim/apps/flotila-test", fly.sim.url());
    assert_eq!(fly.http.put(&admin).send().await.unwrap().status(), 200);
    let r = fly
        .authed(fly.http.get(other("/machines")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let machine = fly.create_machine().await;
    assert_eq!(
        fly.http
            .delete(fly.sim.url().to_owned() + "/_sim/apps/" + APP)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let gone = fly.get(&format!("/machines/{}", machine.id)).await;
    assert_eq!(gone.status(), 404);
    assert_eq!(error_of(gone).await, "app not found");
}

#[tokio::test]
async fn transient_states_show_under_their_fault_before_started() {
    // Fly's machine states page: replacing, updating and restarting are
    // transient states a client may see.
    // A transient state of two seconds: long enough that polling sees it
    // on a busy machine.
    let fly = Fly::start(Faults {
        transient_state_rate: 1.0,
        transient_state_ms: 2000,
        ..fast_faults()
    })
    .await;
    let machine = fly.create_machine().await;
    let seen = eventually_ok("a transient state", DEADLINE, || async {
        match fly.state_of(&machine.id).await {
            state @ (MachineState::Replacing
            | MachineState::Updating
            | MachineState::Restarting) => Ok(state),
            state => Err(state),
        }
    })
    .await;
    let shown: Machine = fly
        .get(&format!("/machines/{}", machine.id))
        .await
        .json()
        .await
        .unwrap();
    assert!(shown.state == seen || shown.state == MachineState::Started);
    assert_eq!(fly.wait(&machine.id, "started", 5).await.status(), 200);
}

#[tokio::test]
async fn a_machine_takes_one_volume_and_a_guest_within_flys_memory_ranges() {
    let fly = Fly::start(fast_faults()).await;
    let volume = |name: &str| {
        let name = name.to_owned();
        let fly = &fly;
        async move {
            let v: Volume = fly
                .post(
                    "/volumes",
                    json!({ "name": name, "region": "ord", "size_gb": 1 }),
                )
                .await
                .json()
                .await
                .unwrap();
            v.id
        }
    };
    let (a, b) = (volume("a").await, volume("b").await);
    let two = fly
        .create(json!({ "config": { "image": "w:1", "mounts": [
            { "volume": a, "path": "/a" }, { "volume": b, "path": "/b" }
        ] } }))
        .await;
    assert_eq!(two.status(), 400);
    assert!(error_of(two).await.contains("mounts"));
    for guest in [
        json!({ "cpu_kind": "shared", "cpus": 1, "memory_mb": 4096 }),
        json!({ "cpu_kind": "performance", "cpus": 2, "memory_mb": 2048 }),
        json!({ "cpu_kind": "shared", "cpus": 2, "memory_mb": 1000 }),
        json!({ "cpu_kind": "performance", "cpus": 8, "memory_mb": 32768, "gpu_kind": "a100-40gb" }),
    ] {
        let r = fly
            .create(json!({ "config": { "image": "w:1", "guest": guest } }))
            .await;
        assert_eq!(r.status(), 400, "{guest}");
        assert!(error_of(r).await.contains("config.guest"), "{guest}");
    }
    let gpu = fly
        .create(json!({ "config": { "image": "w:1", "guest":
            { "cpu_kind": "performance", "cpus": 8, "memory_mb": 32768, "gpu_kind": "a100-pcie-40gb" } } }))
        .await;
    assert_eq!(gpu.status(), 200);
}

#[tokio::test]
async fn instant_faults_drop_the_delays_but_keep_every_refusal() {
    let fly = Fly::start(Faults::instant()).await;
    let machine = fly.create_started().await;
    let id = &machine.id;
    let no_version = fly
        .get(&format!("/machines/{id}/wait?state=stopped&timeout=1"))
        .await;
    assert_eq!(no_version.status(), 400);
    let unknown = fly
        .create(json!({ "config": { "image": "w:1", "imgae": "x" } }))
        .await;
    assert_eq!(unknown.status(), 400);
    let stop = format!("/machines/{id}/stop");
    let statuses: Vec<u16> = futures::future::join_all((0..4).map(|_| fly.post(&stop, json!({}))))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let r = fly
        .authed(
            fly.http
                .get(format!("{}/v1/apps/nope/machines", fly.sim.url())),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The `listing` fault: listings lie, `GET` of each machine stays true.
/// Fly documents the list and get endpoints separately (OpenAPI
/// `Machines_list`, `Machines_show`) with no promise that one reflects the
/// other at once; a client must survive a listing that is empty, short or
/// behind.
#[tokio::test]
async fn listings_lie_under_the_listing_fault_while_get_stays_truthful() {
    use flotilla_sim_provider::Listing;
    let fly = Fly::start(fast_faults()).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(fly.create_machine().await.id);
    }
    let listed = || async {
        let machines: Vec<Machine> = fly.get("/machines").await.json().await.unwrap();
        machines.into_iter().map(|m| m.id).collect::<Vec<String>>()
    };
    let lie = |listing: Listing| {
        fly.sim
            .sim()
            .update_faults(|f| f.listing = listing)
            .unwrap()
    };
    let all_get = || async {
        for id in &ids {
            assert_eq!(fly.get(&format!("/machines/{id}")).await.status(), 200);
        }
    };
    assert_eq!(listed().await, ids);

    lie(Listing::Empty);
    assert!(listed().await.is_empty());
    all_get().await;

    lie(Listing::Partial {
        hidden_fraction: 0.5,
    });
    let shown = listed().await;
    assert_eq!(
        shown,
        [ids[0].clone(), ids[2].clone()],
        "half, evenly spread"
    );
    assert_eq!(listed().await, shown, "the same ones on every call");
    all_get().await;

    // A listing 2 s behind (long enough that a busy machine still lists
    // before the young machine comes of age): the machines above show once
    // they are old enough, one created now does not.
    lie(Listing::Stale { lag_ms: 2000 });
    eventually("the old machines listed", DEADLINE, || async {
        listed().await == ids
    })
    .await;

    let young = fly.create_machine().await.id;
    assert_eq!(listed().await, ids, "the young machine is not listed yet");
    assert_eq!(fly.get(&format!("/machines/{young}")).await.status(), 200);

    lie(Listing::Normal);
    assert_eq!(listed().await.len(), 5);
}

/// Fly Machines API OpenAPI document, `CreateMachineRequest.skip_launch`:
/// the machine is created and not started (`created`) until `POST
/// /machines/{id}/start`; flyctl's `fly machine create` is "Create, but
/// don't start, a machine" (fly.io/docs/flyctl/machine). And a create
/// takes `create_delay_ms` before it answers.
#[tokio::test]
async fn a_machine_created_with_skip_launch_stays_created_until_started_and_creates_take_their_delay()
 {
    let fly = Fly::start(Faults {
        create_delay_ms: 300,
        ..fast_faults()
    })
    .await;
    let sent = Instant::now();
    let response = fly
        .create(json!({
            "region": "ord",
            "skip_launch": true,
            "config": { "image": "worker:1" }
        }))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        sent.elapsed() >= Duration::from_millis(300),
        "the create took its delay"
    );
    let machine: Machine = response.json().await.expect("machine json");
    // Ten start delays long, it never leaves `created` by itself.
    let left = flotilla_test_utils::wait::holds_within(Duration::from_millis(200), || async {
        fly.state_of(&machine.id).await != MachineState::Created
    })
    .await;
    assert!(
        !left,
        "a machine created with skip_launch started by itself"
    );
    let started = fly
        .post(&format!("/machines/{}/start", machine.id), json!({}))
        .await;
    assert_eq!(started.status(), StatusCode::OK);
    fly.eventually_state(&machine.id, MachineState::Started)
        .await;
    assert!(Faults::published_typical().validate().is_ok());
}
