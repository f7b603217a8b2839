//! Who may call the adapter: only holders of a configured service token
//! (`PROVIDER_ADAPTER_TOKENS`, hashes only). The adapter holds the cloud
//! credentials and can delete any machine, so it serves no anonymous call:
//! a call without a known token is answered UNAUTHENTICATED before any
//! handler (and so any provider call) runs. Health and reflection are
//! separate services without this check, so orchestrators can probe.

use std::sync::Arc;

use flotilla_core::token::{HashedToken, find_token};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The caller a service token named, in the request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceCaller(pub String);

/// The Provider service's interceptor.
#[derive(Debug, Clone)]
pub struct ServiceAuth {
    tokens: Arc<[HashedToken]>,
}

impl ServiceAuth {
    pub fn new(tokens: Arc<[HashedToken]>) -> Self {
        ServiceAuth { tokens }
    }
}

impl Interceptor for ServiceAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let refused = || Status::unauthenticated("missing or invalid service token");
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(refused)?;
        let name = find_token(&self.tokens, |t| t, presented)
            .ok_or_else(refused)?
            .name()
            .to_owned();
        req.extensions_mut().insert(ServiceCaller(name));
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;

    use super::*;

    #[test]
    fn only_a_configured_service_token_passes() {
        let mut auth = ServiceAuth::new(vec![HashedToken::from_plain("scheduler", "tok")].into());
        let mut req = Request::new(());
        req.metadata_mut()
            .insert("authorization", MetadataValue::from_static("Bearer tok"));
        let ok = auth.call(req).expect("accepted");
        assert_eq!(
            ok.extensions().get::<ServiceCaller>(),
            Some(&ServiceCaller("scheduler".into()))
        );
        for bad in [None, Some("Bearer nope"), Some("tok"), Some("Bearer ")] {
            let mut req = Request::new(());
            if let Some(v) = bad {
                req.metadata_mut()
                    .insert("authorization", MetadataValue::try_from(v).expect("ascii"));
            }
            let err = auth.call(req).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }
}
