//! The provider-adapter as its callers (scheduler, terminator, watchdog,
//! api) hold it: one client type, [`AdapterClient`], that puts the
//! caller's service token on every call. Built from a channel by
//! [`adapter_client`]; the channel's TLS is the caller's concern
//! (`flotilla_telemetry::tls`).

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::v1::provider_client::ProviderClient;

/// The one type of an authenticated provider-adapter client.
pub type AdapterClient = ProviderClient<InterceptedService<Channel, ServiceToken>>;

/// Adds `authorization: Bearer <service token>` to every outgoing call.
/// The header value is marked sensitive, so HTTP/2 never indexes it and
/// its `Debug` hides it.
#[derive(Clone, Default)]
pub struct ServiceToken {
    bearer: Option<AsciiMetadataValue>,
}

impl std::fmt::Debug for ServiceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceToken")
            .field("set", &self.bearer.is_some())
            .finish()
    }
}

impl ServiceToken {
    /// The interceptor for `token`. An error (a character not allowed in a
    /// header) does not repeat the token.
    pub fn new(token: &str) -> Result<ServiceToken, String> {
        let mut bearer = AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "the service token holds characters not allowed in a header".to_owned())?;
        bearer.set_sensitive(true);
        Ok(ServiceToken {
            bearer: Some(bearer),
        })
    }

    /// Sends no credential: the adapter answers UNAUTHENTICATED. For tests
    /// of exactly that.
    pub fn none() -> ServiceToken {
        ServiceToken { bearer: None }
    }
}

impl Interceptor for ServiceToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(b) = &self.bearer {
            req.metadata_mut().insert("authorization", b.clone());
        }
        Ok(req)
    }
}

/// An adapter client over `channel` that authenticates with `token`.
pub fn adapter_client(channel: Channel, token: ServiceToken) -> AdapterClient {
    ProviderClient::with_interceptor(channel, token)
}
