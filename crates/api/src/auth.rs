//! Who is calling. The fleet API accepts configured API tokens, checked by
//! an interceptor before any handler runs; the worker API accepts the token
//! issued for one instance, and only for that instance.
//!
//! Design notes: tokens are never stored, only their SHA-256, so a leaked
//! configuration or database does not leak credentials. Hashes are compared
//! in constant time (`subtle`) and every configured API token is compared
//! on every call, so response timing does not tell an attacker how much of a
//! guess was right. A failed check returns before the handler runs (fleet)
//! or before its first write (worker): a refused call writes nothing.

use std::sync::Arc;

use flotilla_core::InstanceId;
use flotilla_store::worker::{WorkerView, worker_get, worker_token_hash_exists};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::error::store_status;

/// The SHA-256 of a token, as configured and as stored.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// One accepted API token: a name for the audit log and the token's hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    name: String,
    hash: [u8; 32],
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .finish()
    }
}

impl ApiToken {
    /// Parses one `name:sha256hex` entry of `API_TOKENS`.
    pub fn parse(entry: &str) -> Result<ApiToken, String> {
        let (name, hex_hash) = entry
            .trim()
            .split_once(':')
            .ok_or("expected name:sha256hex")?;
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(format!(
                "token name {name:?}: 1-64 letters, digits, '-', '_' or '.'"
            ));
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| {
            format!(
                "token {name}: the hash must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)"
            )
        })?;
        Ok(ApiToken {
            name: name.to_owned(),
            hash,
        })
    }

    /// An accepted token given in plain text (tests, tools); only its hash is kept.
    pub fn from_plain(name: &str, token: &str) -> ApiToken {
        ApiToken {
            name: name.to_owned(),
            hash: token_hash(token),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The authenticated caller of a fleet API request, put into the request's
/// extensions by [`FleetAuth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_name: String,
}

impl Caller {
    /// The actor recorded in action logs.
    pub fn actor(&self) -> String {
        format!("api:{}", self.token_name)
    }
}

/// The token of `authorization: Bearer <token>`, if the header has one.
pub fn bearer(md: &MetadataMap) -> Option<&str> {
    let value = md.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthenticated() -> Status {
    Status::unauthenticated("missing or invalid API token")
}

/// FleetService interceptor: the API token. (The correlation id was made
/// sure of by the server's layer before any interceptor runs.)
#[derive(Debug, Clone)]
pub struct FleetAuth {
    tokens: Arc<[ApiToken]>,
}

impl FleetAuth {
    pub fn new(tokens: Arc<[ApiToken]>) -> Self {
        FleetAuth { tokens }
    }

    fn caller(&self, md: &MetadataMap) -> Option<Caller> {
        let hash = token_hash(bearer(md)?);
        let mut found = None;
        // No early exit: the time taken does not depend on which token matched.
        for t in self.tokens.iter() {
            if bool::from(t.hash.ct_eq(&hash)) && found.is_none() {
                found = Some(t);
            }
        }
        found.map(|t| Caller {
            token_name: t.name.clone(),
        })
    }
}

impl tonic::service::Interceptor for FleetAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.caller(req.metadata()).ok_or_else(unauthenticated)?;
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// The caller [`FleetAuth`] authenticated. A request that reached a handler
/// without one was not served through the interceptor: refused, not trusted.
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(unauthenticated)
}

/// Checks that the request's worker token is the one issued for `id` and
/// returns the instance as its agent sees it. No token, an unknown instance
/// or one without a token is UNAUTHENTICATED; a token issued for another
/// instance is PERMISSION_DENIED.
pub async fn authenticate_worker(
    conn: &mut PgConnection,
    md: &MetadataMap,
    id: InstanceId,
) -> Result<WorkerView, Status> {
    let refused = || Status::unauthenticated("missing or invalid worker token");
    let hash = token_hash(bearer(md).ok_or_else(refused)?);
    let view = worker_get(conn, id).await.map_err(store_status)?;
    let Some(view) = view else {
        return Err(refused());
    };
    let Some(stored) = view.worker_token_hash.as_deref() else {
        return Err(refused());
    };
    if bool::from(stored.ct_eq(&hash[..])) {
        return Ok(view);
    }
    if worker_token_hash_exists(conn, &hash)
        .await
        .map_err(store_status)?
    {
        Err(Status::permission_denied(
            "the worker token was issued for another instance",
        ))
    } else {
        Err(refused())
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::MetadataValue;
    use tonic::service::Interceptor;

    use super::*;

    fn request(auth: Option<&'static str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(v) = auth {
            req.metadata_mut()
                .insert("authorization", MetadataValue::from_static(v));
        }
        req
    }

    #[test]
    fn the_hash_of_a_token_matches_sha256sum() {
        // printf %s test | sha256sum
        assert_eq!(
            hex::encode(token_hash("test")),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn a_configured_token_names_the_caller_and_others_are_refused() {
        let tokens: Arc<[ApiToken]> = vec![
            ApiToken::from_plain("ci", "s3cret"),
            ApiToken::from_plain("ops", "other"),
        ]
        .into();
        let mut auth = FleetAuth::new(tokens);
        let ok = auth.call(request(Some("Bearer other"))).expect("accepted");
        assert_eq!(caller(&ok).expect("caller").actor(), "api:ops");
        let ok = auth.call(request(Some("bearer s3cret"))).expect("accepted");
        assert_eq!(caller(&ok).expect("caller").token_name, "ci");
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("Bearer "),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            let err = auth.call(request(bad)).expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn a_request_that_skipped_the_interceptor_has_no_caller() {
        assert_eq!(
            caller(&Request::new(())).expect_err("no caller").code(),
            tonic::Code::Unauthenticated
        );
    }
}
