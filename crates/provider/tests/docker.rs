//! The docker provider against the real Docker Engine of this machine:
//! containers of `flotilla-base:bookworm` (built by scripts/images.sh when
//! missing; nothing is pulled) running `sleep` under tini. Each test has a
//! control-plane id of its own, and a `Cleanup` that removes (with the
//! docker CLI, not the code under test) every container and volume
//! carrying it, even when an assertion fails.
//!
//! Without a Docker socket the tests are skipped, unless CI is set: there a
//! missing engine is a failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use flotilla_core::InstanceId;
use flotilla_provider::docker::{DockerConfig, DockerProvider, LABEL_REGION};
use flotilla_provider::{
    MachineProvider, MachineSpec, MachineState, PageRequest, ProviderError, SpecCheck,
    TAG_CONTROL_PLANE, TAG_INSTANCE, TAG_POOL, VolumeSpec, VolumeState,
};

const SOCKET: &str = "/var/run/docker.sock";
const IMAGE: &str = "flotilla-base:bookworm";
/// Generous: two cores shared with other builds.
const SETTLE: Duration = Duration::from_secs(30);

/// Whether the engine is there; builds the base image once if it is not.
fn engine() -> bool {
    if !Path::new(SOCKET).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but there is no Docker socket at {SOCKET}"
        );
        eprintln!("skipped: no Docker socket at {SOCKET}");
        return false;
    }
    static IMAGES: Once = Once::new();
    IMAGES.call_once(|| {
        let present = Command::new("docker")
            .args(["image", "inspect", IMAGE])
            .output()
            .expect("docker runs")
            .status
            .success();
        if !present {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/images.sh");
            let out = Command::new("bash")
                .arg(script)
                .output()
                .expect("scripts/images.sh runs");
            assert!(
                out.status.success(),
                "scripts/images.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
    true
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// One control-plane id; dropping it removes whatever carries it.
struct Cleanup {
    control_plane: String,
}

impl Cleanup {
    fn new() -> Self {
        Cleanup {
            control_plane: format!(
                "cp-docker-test-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        }
    }

    fn filter(&self) -> String {
        format!("label={TAG_CONTROL_PLANE}={}", self.control_plane)
    }

    fn provider(&self) -> DockerProvider {
        DockerProvider::new(config(&self.control_plane)).expect("provider")
    }

    /// Containers the engine holds with our label, by the CLI.
    fn containers(&self) -> Vec<String> {
        docker(&["ps", "-aq", "--no-trunc", "--filter", &self.filter()])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn volumes(&self) -> Vec<String> {
        docker(&["volume", "ls", "-q", "--filter", &self.filter()])
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in self.containers() {
            docker(&["rm", "-f", "-v", &c]);
        }
        for v in self.volumes() {
            docker(&["volume", "rm", "-f", &v]);
        }
    }
}

fn config(control_plane: &str) -> DockerConfig {
    let mut config = DockerConfig::new(control_plane);
    config.host = format!("unix://{SOCKET}");
    config.stop_grace_default = Duration::from_secs(2);
    config
}

fn spec(pool: &str, command: &str) -> MachineSpec {
    let instance_id = InstanceId::new();
    MachineSpec {
        instance_id,
        name: format!(
            "flotilla-test-{}",
            &instance_id.0.simple().to_string()[..12]
        ),
        pool: pool.into(),
        region: "local".into(),
        instance_type: "1x256".into(),
        image: format!("{IMAGE} {command}"),
        env: BTreeMap::from([("WORKER_GREETING".to_owned(), "hello".to_owned())]),
        tags: BTreeMap::from([("purpose".to_owned(), "test".to_owned())]),
        volume_ids: Vec::new(),
        start: false,
    }
}

fn all() -> PageRequest {
    PageRequest {
        size: 1000,
        token: None,
    }
}

#[tokio::test]
async fn a_container_lives_its_whole_life_with_our_labels_at_the_engine() {
    if !engine() {
        return;
    }
    let cleanup = Cleanup::new();
    let p = cleanup.provider();
    let spec = spec("demo", "tini -- sleep 600");

    let m = p.create_machine(&spec).await.expect("create");
    assert_eq!(m.state, MachineState::Created, "{m:?}");
    assert_eq!(m.name, spec.name);
    assert_eq!(m.instance_id(), Some(spec.instance_id));
    // The labels as the engine holds them, read with the CLI.
    let labels: BTreeMap<String, String> = serde_json::from_str(&docker(&[
        "inspect",
        "-f",
        "{{json .Config.Labels}}",
        &m.id,
    ]))
    .expect("labels are JSON");
    assert_eq!(labels[TAG_INSTANCE], spec.instance_id.to_string());
    assert_eq!(labels[TAG_POOL], "demo");
    assert_eq!(labels[TAG_CONTROL_PLANE], cleanup.control_plane);
    assert_eq!(labels["purpose"], "test");
    assert_eq!(labels[LABEL_REGION], "local");
    let env = docker(&["inspect", "-f", "{{json .Config.Env}}", &m.id]);
    assert!(env.contains("WORKER_GREETING=hello"), "{env}");
    assert_eq!(
        docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.Memory}}",
            &m.id
        ]),
        format!("no {}", 256 * 1024 * 1024)
    );

    let m = p.start_machine(&m.id).await.expect("start");
    assert_eq!(m.state, MachineState::Started, "{m:?}");
    assert!(
        !m.private_ip.is_empty(),
        "a running container has an address"
    );
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Status}}", &m.id]),
        "running"
    );

    // Listed by our control plane, and by its instance; not by another's.
    let listed = p.list_machines(&all()).await.expect("list");
    assert_eq!(
        listed
            .items
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        [m.id.as_str()]
    );
    assert_eq!(listed.items[0].state, MachineState::Started);
    let found = p.find_machines(spec.instance_id).await.expect("find");
    assert_eq!(found.len(), 1);
    assert!(
        p.find_machines(InstanceId::new())
            .await
            .expect("find")
            .is_empty()
    );
    let other = Cleanup::new();
    let q = other.provider();
    assert!(
        q.list_machines(&all())
            .await
            .expect("list")
            .items
            .is_empty()
    );
    let e = q.get_machine(&m.id).await.expect_err("not theirs");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");
    let e = q.delete_machine(&m.id, true).await.expect_err("not theirs");
    assert!(matches!(e, ProviderError::InvalidArgument(_)), "{e}");

    // A running container is not removed without force, like Fly's 412.
    let e = p.delete_machine(&m.id, false).await.expect_err("running");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");

    let stopped = p
        .stop_machine(&m.id, Duration::from_secs(5))
        .await
        .expect("stop");
    assert_eq!(stopped.state, MachineState::Stopped, "{stopped:?}");
    assert_eq!(stopped.provider_state, "exited");
    // tini passed SIGTERM on: sleep died of it (143), not of the kill (137).
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &m.id]),
        "143"
    );
    let waited = p
        .wait_machine(&m.id, MachineState::Stopped, SETTLE)
        .await
        .expect("wait");
    assert_eq!(waited.state, MachineState::Stopped);

    // Started again, then removed by force while running.
    p.start_machine(&m.id).await.expect("start again");
    p.delete_machine(&m.id, true).await.expect("force delete");
    assert!(cleanup.containers().is_empty(), "the engine still has it");
    let e = p.get_machine(&m.id).await.expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
    let e = p.delete_machine(&m.id, true).await.expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
    let gone = p
        .wait_machine(&m.id, MachineState::Destroyed, SETTLE)
        .await
        .expect("wait destroyed");
    assert_eq!(gone.state, MachineState::Destroyed);
    assert!(
        p.list_machines(&all())
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn a_stop_that_is_ignored_turns_into_a_kill_after_the_grace() {
    if !engine() {
        return;
    }
    let cleanup = Cleanup::new();
    let p = cleanup.provider();
    // `sleep` as PID 1 has no handler: SIGTERM does nothing to it.
    let mut spec = spec("demo", "sleep 600");
    spec.start = true;
    let m = p.create_machine(&spec).await.expect("create and start");
    assert_eq!(m.state, MachineState::Started);
    let t = std::time::Instant::now();
    let stopped = p
        .stop_machine(&m.id, Duration::from_secs(1))
        .await
        .expect("stop");
    assert_eq!(stopped.state, MachineState::Stopped);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.ExitCode}}", &m.id]),
        "137"
    );
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
    // A stopped container is removed without force.
    p.delete_machine(&m.id, false).await.expect("delete");
    assert!(cleanup.containers().is_empty());
}

#[tokio::test]
async fn volumes_carry_our_labels_mount_at_data_and_are_refused_while_in_use() {
    if !engine() {
        return;
    }
    let cleanup = Cleanup::new();
    let p = cleanup.provider();
    let instance = InstanceId::new();
    let v = p
        .create_volume(&VolumeSpec {
            instance_id: instance,
            pool: "demo".into(),
            region: "local".into(),
            size_gb: 3,
        })
        .await
        .expect("create volume");
    assert_eq!(v.instance_id, Some(instance));
    assert_eq!(v.size_gb, 3);
    assert_eq!(cleanup.volumes(), std::slice::from_ref(&v.id));
    let labels: BTreeMap<String, String> = serde_json::from_str(&docker(&[
        "volume",
        "inspect",
        "-f",
        "{{json .Labels}}",
        &v.id,
    ]))
    .expect("labels are JSON");
    assert_eq!(labels[TAG_INSTANCE], instance.to_string());
    assert_eq!(labels[TAG_POOL], "demo");
    assert_eq!(labels[TAG_CONTROL_PLANE], cleanup.control_plane);
    let other = Cleanup::new();
    assert!(
        other
            .provider()
            .list_volumes(&all())
            .await
            .expect("list")
            .items
            .is_empty()
    );

    // A volume that does not exist is never created on the fly by a mount.
    let mut bad = spec("demo", "tini -- sleep 600");
    bad.volume_ids = vec!["flotilla-no-such-volume".into()];
    let e = p.create_machine(&bad).await.expect_err("no such volume");
    assert!(
        matches!(&e, ProviderError::InvalidArgument(m) if m.contains("volume_ids")),
        "{e}"
    );
    assert!(
        docker(&[
            "volume",
            "ls",
            "-q",
            "--filter",
            "name=flotilla-no-such-volume"
        ])
        .is_empty()
    );

    let mut with = spec("demo", "tini -- sleep 600");
    with.volume_ids = vec![v.id.clone()];
    with.start = true;
    let m = p.create_machine(&with).await.expect("create with volume");
    let mounts = docker(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Name}}:{{.Destination}} {{end}}",
        &m.id,
    ]);
    assert_eq!(mounts, format!("{}:/data", v.id));
    let listed = p.list_volumes(&all()).await.expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].state, VolumeState::Attached);
    assert_eq!(
        listed.items[0].attached_machine_id.as_deref(),
        Some(m.id.as_str())
    );

    let e = p.delete_volume(&v.id).await.expect_err("in use");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    p.delete_machine(&m.id, true).await.expect("delete machine");
    let listed = p.list_volumes(&all()).await.expect("list");
    assert_eq!(listed.items[0].state, VolumeState::Available);
    p.delete_volume(&v.id).await.expect("delete volume");
    assert!(cleanup.volumes().is_empty());
    let e = p.delete_volume(&v.id).await.expect_err("gone");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e}");
    assert!(p.list_volumes(&all()).await.expect("list").items.is_empty());
}

#[tokio::test]
async fn an_engine_that_does_not_answer_is_unavailable_never_not_found() {
    // No engine needed: a socket nobody listens on.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
    let mut config = config("cp-unreachable");
    config.host = format!("unix://{}", path.display());
    let p = DockerProvider::new(config).expect("provider");
    for e in [
        p.get_machine("abc123").await.expect_err("no engine"),
        p.delete_machine("abc123", true)
            .await
            .expect_err("no engine"),
        p.list_machines(&all()).await.expect_err("no engine"),
        p.delete_volume("flotilla-x").await.expect_err("no engine"),
        p.check().await.expect_err("no engine"),
    ] {
        assert!(matches!(e, ProviderError::Unavailable(_)), "{e}");
    }
    // A socket that is not there at all is a configuration error at start.
    let mut config = DockerConfig::new("cp");
    config.host = format!("unix://{}", dir.path().join("missing.sock").display());
    let e = DockerProvider::new(config).expect_err("missing socket");
    assert!(e.to_string().contains("DOCKER_HOST"), "{e}");
    let mut config = DockerConfig::new("cp");
    config.host = "tcp://127.0.0.1:2375".into();
    let e = DockerProvider::new(config).expect_err("tcp");
    assert!(e.to_string().contains("DOCKER_HOST"), "{e}");
}

#[tokio::test]
async fn a_missing_image_or_network_is_a_refusal_not_a_vanished_machine() {
    if !engine() {
        return;
    }
    let cleanup = Cleanup::new();
    let p = cleanup.provider();
    let mut s = spec("demo", "sleep 600");
    s.image = "flotilla-no-such-image:never sleep 600".into();
    let e = p.create_machine(&s).await.expect_err("no image");
    assert!(
        matches!(&e, ProviderError::FailedPrecondition(m) if m.contains("flotilla-no-such-image")),
        "{e}"
    );
    let mut config = config(&cleanup.control_plane);
    config.network = "flotilla-no-such-network".into();
    let q = DockerProvider::new(config).expect("provider");
    let e = q.check().await.expect_err("no network");
    assert!(
        matches!(&e, ProviderError::FailedPrecondition(m) if m.contains("DOCKER_NETWORK")),
        "{e}"
    );
    // The engine creates the container and refuses its start with a 404
    // about the network: that 404 is not the container's.
    let m = q
        .create_machine(&spec("demo", "sleep 600"))
        .await
        .expect("created");
    let e = q.start_machine(&m.id).await.expect_err("no network");
    assert!(matches!(e, ProviderError::FailedPrecondition(_)), "{e}");
    q.delete_machine(&m.id, false).await.expect("delete");
    p.check().await.expect("the engine answers");
    assert!(cleanup.containers().is_empty());

    // Shapes are checked before any call.
    for (instance_type, image, field) in [
        ("huge", IMAGE, "instance_type"),
        ("container", "", "image"),
        ("container", "Not/An:Image", "image"),
    ] {
        let e = p
            .check_spec(&SpecCheck {
                region: "local".into(),
                instance_type: instance_type.into(),
                image: image.into(),
                volume_size_gb: 0,
            })
            .expect_err(field);
        assert!(e.to_string().contains(field), "{e}");
    }
}
