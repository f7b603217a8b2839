//! The connection to the api: one channel (TLS for `https://`, plaintext
//! only to loopback unless allowed), the bearer token on every call, and
//! every failure turned into a [`CliError`] that says what to do.

use std::time::Duration;

use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_telemetry::tls::ClientTls;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::error::{CliError, error_chain};

/// A connected FleetService client.
#[derive(Clone)]
pub struct Api {
    client: FleetServiceClient<Channel>,
    bearer: AsciiMetadataValue,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").field("url", &self.url).finish()
    }
}

/// `host:port` is accepted for convenience and means plain-text HTTP/2.
pub fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

impl Api {
    /// Checks the token is there before dialling, so a missing token is
    /// reported as such even when the api is down too.
    pub async fn connect(
        url: &str,
        tls: &ClientTls,
        token: Option<&str>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Api, CliError> {
        let token = token
            .filter(|t| !t.is_empty())
            .ok_or(CliError::MissingToken)?;
        let mut bearer: AsciiMetadataValue = MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| {
                CliError::Invalid("token: holds characters not allowed in a header".into())
            })?;
        bearer.set_sensitive(true);
        let url = normalize_url(url);
        let endpoint = tls
            .endpoint(&url)
            .map_err(|e| CliError::Invalid(e.to_string()))?
            .connect_timeout(connect_timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| CliError::Unreachable {
                url: url.clone(),
                detail: error_chain(&e),
            })?;
        Ok(Api {
            client: FleetServiceClient::new(channel),
            bearer,
            url,
            timeout,
        })
    }

    /// A unary request: authenticated and bounded by the request timeout.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut r = self.stream_request(message);
        r.set_timeout(self.timeout);
        r
    }

    /// A streaming request: authenticated, never cut by a timeout.
    pub fn stream_request<T>(&self, message: T) -> Request<T> {
        let mut r = Request::new(message);
        r.metadata_mut()
            .insert("authorization", self.bearer.clone());
        r
    }

    pub fn client(&self) -> FleetServiceClient<Channel> {
        self.client.clone()
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn error(&self, status: Status) -> CliError {
        CliError::from_status(&self.url, &status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_telemetry::test_support::hanging_address;

    #[tokio::test]
    async fn an_api_that_never_accepts_is_unreachable_after_the_connect_timeout_given() {
        let (_listener, _held, addr) = hanging_address();
        let tls = ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "FLOTILLA_ALLOW_PLAINTEXT",
        );
        let url = format!("http://{addr}");
        let connect = Api::connect(
            &url,
            &tls,
            Some("token"),
            Duration::from_millis(300),
            Duration::from_secs(60),
        );
        let err = tokio::time::timeout(Duration::from_secs(4), connect)
            .await
            .expect("given up after the 300 ms connect timeout, not the 5 s default")
            .expect_err("nothing accepts");
        assert!(matches!(err, CliError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.exit_code(), crate::exit::UNREACHABLE);
    }
}
