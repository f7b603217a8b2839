//! Flotilla's contracts: the generated protobuf messages and tonic services
//! of package `flotilla.v1` (fleet, worker and provider APIs, bus payloads),
//! plus the one place where domain errors become gRPC statuses and back,
//! the codec the servers decode requests with, and the one client type of
//! the provider-adapter (`client`).

// Generated code follows prost/tonic conventions, not ours.
#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
    // The clients, generated apart (see build.rs) to keep tonic-prost's codec.
    include!(concat!(env!("OUT_DIR"), "/clients/flotilla.v1.rs"));

    /// Encoded descriptors of every `flotilla.v1` file, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));
}

pub mod client;
pub mod codec;
pub mod convert;
pub mod status;
