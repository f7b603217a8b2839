//! The gRPC `Provider` service: validates, routes to the configured
//! provider behind its guard, and maps outcomes to the closed set of
//! status codes.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::status::{invalid_field, provider_error_to_status};
use flotilla_proto::v1;
use flotilla_proto::v1::provider_server::Provider;
use flotilla_provider::guard::Guarded;
use flotilla_provider::registry::{AnyProvider, Registry};
use flotilla_provider::{
    Machine, MachineProvider, MachineSpec, MachineState, PageRequest, ProviderError, SpecCheck,
    Volume, VolumeSpec, VolumeState,
};
use tonic::{Request, Response, Status};

use crate::validate;

#[derive(Debug, Clone)]
pub struct ProviderService {
    registry: Arc<Registry>,
}

impl ProviderService {
    pub fn new(registry: Arc<Registry>) -> Self {
        ProviderService { registry }
    }

    fn provider(
        &self,
        target: Option<&v1::ProviderTarget>,
    ) -> Result<(validate::Target, Arc<Guarded<AnyProvider>>), Status> {
        let t = validate::target(target, &self.registry.kinds())?;
        let p = self
            .registry
            .get(&t.provider, &t.region)
            .ok_or_else(|| Status::internal("configured provider missing from registry"))?;
        Ok((t, p))
    }
}

fn status(e: ProviderError) -> Status {
    provider_error_to_status(&e)
}

fn timestamp(t: Option<chrono::DateTime<chrono::Utc>>) -> Option<prost_types::Timestamp> {
    t.map(|t| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

pub fn machine_to_proto(m: Machine) -> v1::Machine {
    let state = match m.state {
        MachineState::Created => v1::MachineState::Created,
        MachineState::Starting => v1::MachineState::Starting,
        MachineState::Started => v1::MachineState::Started,
        MachineState::Stopping => v1::MachineState::Stopping,
        MachineState::Stopped => v1::MachineState::Stopped,
        MachineState::Suspending => v1::MachineState::Suspending,
        MachineState::Suspended => v1::MachineState::Suspended,
        MachineState::Replacing => v1::MachineState::Replacing,
        MachineState::Destroying => v1::MachineState::Destroying,
        MachineState::Destroyed => v1::MachineState::Destroyed,
        MachineState::Failed => v1::MachineState::Failed,
        MachineState::Creating => v1::MachineState::Creating,
        MachineState::Restarting => v1::MachineState::Restarting,
        MachineState::LaunchFailed => v1::MachineState::LaunchFailed,
        MachineState::Updating => v1::MachineState::Updating,
        MachineState::Replaced => v1::MachineState::Replaced,
        MachineState::Migrated => v1::MachineState::Migrated,
        MachineState::Unknown => v1::MachineState::Unknown,
    };
    v1::Machine {
        id: m.id,
        name: m.name,
        state: state as i32,
        provider_state: m.provider_state,
        region: m.region,
        instance_type: m.instance_type,
        tags: m.tags.into_iter().collect(),
        created_at: timestamp(m.created_at),
        private_ip: m.private_ip,
    }
}

pub fn volume_to_proto(v: Volume) -> v1::Volume {
    let state = match v.state {
        VolumeState::Creating => v1::VolumeState::Creating,
        VolumeState::Available => v1::VolumeState::Available,
        VolumeState::Attached => v1::VolumeState::Attached,
        VolumeState::Destroying => v1::VolumeState::Destroying,
        VolumeState::Destroyed => v1::VolumeState::Destroyed,
        VolumeState::Failed => v1::VolumeState::Failed,
        VolumeState::Unknown => v1::VolumeState::Unspecified,
    };
    let mut tags: std::collections::HashMap<String, String> = v.tags.into_iter().collect();
    if let Some(id) = v.instance_id {
        tags.entry(flotilla_provider::TAG_INSTANCE.to_owned())
            .or_insert_with(|| id.to_string());
    }
    v1::Volume {
        id: v.id,
        name: v.name,
        state: state as i32,
        provider_state: v.provider_state,
        size_gb: v.size_gb,
        region: v.region,
        attached_machine_id: v.attached_machine_id.unwrap_or_default(),
        tags,
        created_at: timestamp(v.created_at),
    }
}

fn page(size: u32, token: &str) -> Result<PageRequest, Status> {
    Ok(PageRequest {
        size: validate::page_size(size)?,
        token: (!token.is_empty()).then(|| token.to_owned()),
    })
}

#[tonic::async_trait]
impl Provider for ProviderService {
    #[tracing::instrument(skip_all, fields(instance_id = %req.get_ref().instance_id))]
    async fn create_machine(
        &self,
        req: Request<v1::CreateMachineRequest>,
    ) -> Result<Response<v1::Machine>, Status> {
        let r = req.into_inner();
        let instance_id = validate::instance_id(&r.instance_id)?;
        validate::name(&r.name)?;
        validate::non_empty("instance_type", &r.instance_type, 64)?;
        validate::non_empty("image", &r.image, 512)?;
        validate::env(&r.env)?;
        validate::tags(&r.tags)?;
        validate::volume_ids(&r.volume_ids)?;
        let (t, p) = self.provider(r.target.as_ref())?;
        let spec = MachineSpec {
            instance_id,
            name: r.name,
            pool: t.pool,
            region: t.region,
            instance_type: r.instance_type,
            image: r.image,
            env: r.env.into_iter().collect(),
            tags: r.tags.into_iter().collect(),
            volume_ids: r.volume_ids,
            start: r.start,
        };
        let m = p.create_machine(&spec).await.map_err(status)?;
        tracing::info!(machine_id = %m.id, "machine created");
        Ok(Response::new(machine_to_proto(m)))
    }

    #[tracing::instrument(skip_all, fields(machine_id = %req.get_ref().machine_id))]
    async fn prepare_machine(
        &self,
        req: Request<v1::PrepareMachineRequest>,
    ) -> Result<Response<v1::PrepareMachineResponse>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        validate::env(&r.env)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let env = r.env.into_iter().collect();
        let applied = p.prepare_machine(id, &env).await.map_err(status)?;
        Ok(Response::new(v1::PrepareMachineResponse { applied }))
    }

    async fn start_machine(
        &self,
        req: Request<v1::MachineRef>,
    ) -> Result<Response<v1::Machine>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let m = p.start_machine(id).await.map_err(status)?;
        Ok(Response::new(machine_to_proto(m)))
    }

    async fn stop_machine(
        &self,
        req: Request<v1::StopMachineRequest>,
    ) -> Result<Response<v1::Machine>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        let grace = validate::duration(
            "grace",
            r.grace.as_ref(),
            Duration::from_secs(10),
            Duration::ZERO,
            Duration::from_secs(300),
        )?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let m = if r.suspend {
            p.suspend_machine(id).await
        } else {
            p.stop_machine(id, grace).await
        }
        .map_err(status)?;
        Ok(Response::new(machine_to_proto(m)))
    }

    async fn wait_machine(
        &self,
        req: Request<v1::WaitMachineRequest>,
    ) -> Result<Response<v1::Machine>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        let state = validate::wait_state(r.state)?;
        let timeout = validate::duration(
            "timeout",
            r.timeout.as_ref(),
            Duration::from_secs(30),
            Duration::from_secs(1),
            Duration::from_secs(60),
        )?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let m = p.wait_machine(id, state, timeout).await.map_err(status)?;
        Ok(Response::new(machine_to_proto(m)))
    }

    async fn delete_machine(
        &self,
        req: Request<v1::DeleteMachineRequest>,
    ) -> Result<Response<v1::DeleteMachineResponse>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        p.delete_machine(id, r.force).await.map_err(status)?;
        Ok(Response::new(v1::DeleteMachineResponse {}))
    }

    async fn get_machine(
        &self,
        req: Request<v1::MachineRef>,
    ) -> Result<Response<v1::Machine>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("machine_id", &r.machine_id)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let m = p.get_machine(id).await.map_err(status)?;
        Ok(Response::new(machine_to_proto(m)))
    }

    async fn list_machines(
        &self,
        req: Request<v1::ListMachinesRequest>,
    ) -> Result<Response<v1::ListMachinesResponse>, Status> {
        let r = req.into_inner();
        let page = page(r.page_size, &r.page_token)?;
        if !r.instance_id.is_empty() {
            let instance = validate::instance_id(&r.instance_id)?;
            let (_, p) = self.provider(r.target.as_ref())?;
            let found = p.find_machines(instance).await.map_err(status)?;
            return Ok(Response::new(v1::ListMachinesResponse {
                machines: found.into_iter().map(machine_to_proto).collect(),
                next_page_token: String::new(),
            }));
        }
        let (_, p) = self.provider(r.target.as_ref())?;
        let got = p.list_machines(&page).await.map_err(status)?;
        Ok(Response::new(v1::ListMachinesResponse {
            machines: got.items.into_iter().map(machine_to_proto).collect(),
            next_page_token: got.next.unwrap_or_default(),
        }))
    }

    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let instance_id = validate::instance_id(&r.instance_id)?;
        let size_gb = validate::size_gb(r.size_gb)?;
        validate::tags(&r.tags)?;
        let (t, p) = self.provider(r.target.as_ref())?;
        let spec = VolumeSpec {
            instance_id,
            pool: t.pool,
            region: t.region,
            size_gb,
        };
        let v = p.create_volume(&spec).await.map_err(status)?;
        Ok(Response::new(volume_to_proto(v)))
    }

    async fn delete_volume(
        &self,
        req: Request<v1::VolumeRef>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = validate::resource_id("volume_id", &r.volume_id)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        p.delete_volume(id).await.map_err(status)?;
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn list_volumes(
        &self,
        req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let page = page(r.page_size, &r.page_token)?;
        let (_, p) = self.provider(r.target.as_ref())?;
        let got = p.list_volumes(&page).await.map_err(status)?;
        Ok(Response::new(v1::ListVolumesResponse {
            volumes: got.items.into_iter().map(volume_to_proto).collect(),
            next_page_token: got.next.unwrap_or_default(),
        }))
    }

    /// The provider's own rules for a pool's shape, decided locally (no
    /// call to the cloud, no rate limit spent): a refusal names the field.
    #[tracing::instrument(skip_all, fields(provider = req.get_ref().target.as_ref().map_or("", |t| t.provider.as_str())))]
    async fn check_spec(
        &self,
        req: Request<v1::CheckSpecRequest>,
    ) -> Result<Response<v1::CheckSpecResponse>, Status> {
        let r = req.into_inner();
        let (t, p) = self.provider(r.target.as_ref())?;
        validate::non_empty("instance_type", &r.instance_type, 64)?;
        validate::non_empty("image", &r.image, 512)?;
        if r.volume_size_gb != 0 {
            validate::size_gb(r.volume_size_gb).map_err(|_| {
                invalid_field(
                    "volume_size_gb",
                    format!(
                        "{} is outside 1..={}",
                        r.volume_size_gb,
                        validate::MAX_VOLUME_GB
                    ),
                )
            })?;
        }
        p.check_spec(&SpecCheck {
            region: t.region,
            instance_type: r.instance_type,
            image: r.image,
            volume_size_gb: r.volume_size_gb,
        })
        .map_err(|e| match e {
            // The provider's message already starts with the field.
            ProviderError::InvalidArgument(m) => Status::invalid_argument(m),
            e => status(e),
        })?;
        Ok(Response::new(v1::CheckSpecResponse {}))
    }
}
