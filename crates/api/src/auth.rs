//! Who is calling, and what they may do. The fleet API accepts configured
//! API tokens, each with a scope (read-only or admin), checked by
//! [`FleetAuth`] around the service before any handler runs; the worker
//! API accepts the token issued for one instance, and only for that
//! instance.
//!
//! Design notes: tokens are never stored, only their SHA-256, so a leaked
//! configuration or database does not leak credentials
//! (`flotilla_core::token`: constant-time, every token compared on every
//! call). What a scope allows is one table here, by method name:
//! [`READ_ONLY_METHODS`] may be called with a read-only token, everything
//! else needs admin, so a new RPC is admin-only until someone decides
//! otherwise; the tests check the table against the service descriptor,
//! so a new RPC fails them until it is classified. The check is a tower
//! wrapper rather than a tonic interceptor because only the wrapper sees
//! the method's path. A failed check returns before the handler runs
//! (fleet) or before its first write (worker): a refused call writes
//! nothing.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_core::InstanceId;
use flotilla_core::token::{HashedToken, find_token};
use flotilla_store::worker::{WorkerView, worker_get, worker_token_hash_exists};
use sqlx::PgConnection;
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tonic::{Request, Status};

pub use flotilla_core::token::token_hash;

use crate::error::store_status;

/// What an API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The [`READ_ONLY_METHODS`]: dashboards, humans on call.
    Read,
    /// Every method.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }
}

/// FleetService methods a read-only token may call: each reads and
/// changes nothing. Every other method needs an admin token.
pub const READ_ONLY_METHODS: &[&str] = &[
    "GetInstance",
    "ListInstances",
    "GetInstanceHistory",
    "WatchEvents",
    "GetPool",
    "ListPools",
];

/// FleetService methods that change something: admin tokens only. Listed
/// (not just "the rest") so that the tests can require every method of
/// the service descriptor to be in exactly one of the two lists.
pub const ADMIN_METHODS: &[&str] = &[
    "Provision",
    "Terminate",
    "Drain",
    "Uncordon",
    "CreatePool",
    "UpdatePool",
    "AbandonInstance",
    "DeletePool",
];

/// The scope `method` needs. Unknown methods need admin.
pub fn required_scope(method: &str) -> Scope {
    if READ_ONLY_METHODS.contains(&method) {
        Scope::Read
    } else {
        Scope::Admin
    }
}

/// One accepted API token: a name for the audit log, its hash and its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    token: HashedToken,
    scope: Scope,
}

impl ApiToken {
    /// Parses one `name:sha256hex[:admin|read]` entry of `API_TOKENS`;
    /// without a scope the token is admin (as every token was before
    /// scopes existed).
    pub fn parse(entry: &str) -> Result<ApiToken, String> {
        let (token, extra) = HashedToken::parse(entry)?;
        let scope = match extra.map(str::trim) {
            None | Some("admin") => Scope::Admin,
            Some("read") => Scope::Read,
            Some(other) => {
                return Err(format!(
                    "token {}: scope {other:?} is neither admin nor read",
                    token.name()
                ));
            }
        };
        Ok(ApiToken { token, scope })
    }

    /// An admin token given in plain text (tests, tools); only its hash is kept.
    pub fn from_plain(name: &str, token: &str) -> ApiToken {
        ApiToken::scoped(name, token, Scope::Admin)
    }

    /// A token of `scope` given in plain text; only its hash is kept.
    pub fn scoped(name: &str, token: &str, scope: Scope) -> ApiToken {
        ApiToken {
            token: HashedToken::from_plain(name, token),
            scope,
        }
    }

    pub fn name(&self) -> &str {
        self.token.name()
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }
}

/// The authenticated caller of a fleet API request, put into the request's
/// extensions by [`FleetAuth`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_name: String,
    pub scope: Scope,
}

impl Caller {
    /// The actor recorded in action logs.
    pub fn actor(&self) -> String {
        format!("api:{}", self.token_name)
    }
}

/// The token of `authorization: Bearer <token>`, if the header has one.
pub fn bearer(md: &MetadataMap) -> Option<&str> {
    bearer_value(md.get("authorization")?.to_str().ok()?)
}

fn bearer_value(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthenticated() -> Status {
    Status::unauthenticated("missing or invalid API token")
}

/// Who presents `authorization` (the header's value) and whether they may
/// call `method`: UNAUTHENTICATED for no or an unknown token,
/// PERMISSION_DENIED for a token whose scope does not cover the method.
pub fn authorize(
    tokens: &[ApiToken],
    authorization: Option<&str>,
    method: &str,
) -> Result<Caller, Status> {
    let presented = authorization
        .and_then(bearer_value)
        .ok_or_else(unauthenticated)?;
    let token = find_token(tokens, |t| &t.token, presented).ok_or_else(unauthenticated)?;
    if token.scope == Scope::Read && required_scope(method) == Scope::Admin {
        return Err(Status::permission_denied(format!(
            "the API token {:?} is read-only; {method} needs an admin token",
            token.name()
        )));
    }
    Ok(Caller {
        token_name: token.name().to_owned(),
        scope: token.scope,
    })
}

/// Wraps the FleetService: authenticates and authorizes every call by its
/// method (the last segment of the path) before it reaches the service.
/// (The correlation id was made sure of by the server's layer first.)
#[derive(Debug, Clone)]
pub struct FleetAuth<S> {
    inner: S,
    tokens: Arc<[ApiToken]>,
}

impl<S> FleetAuth<S> {
    pub fn new(inner: S, tokens: Arc<[ApiToken]>) -> Self {
        FleetAuth { inner, tokens }
    }
}

impl<S: NamedService> NamedService for FleetAuth<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for FleetAuth<S>
where
    S: tower_service::Service<
            http::Request<B>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or_default();
        let authorization = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match authorize(&self.tokens, authorization, method) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
                Box::pin(self.inner.call(req))
            }
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

/// The caller [`FleetAuth`] authenticated. A request that reached a handler
/// without one was not served through it: refused, not trusted.
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
    use super::*;

    fn tokens() -> Arc<[ApiToken]> {
        vec![
            ApiToken::from_plain("ci", "s3cret"),
            ApiToken::from_plain("ops", "other"),
            ApiToken::scoped("dash", "look", Scope::Read),
        ]
        .into()
    }

    #[test]
    fn a_configured_token_names_the_caller_and_others_are_refused() {
        let tokens = tokens();
        let ok = authorize(&tokens, Some("Bearer other"), "Provision").expect("accepted");
        assert_eq!(ok.actor(), "api:ops");
        let ok = authorize(&tokens, Some("bearer s3cret"), "Provision").expect("accepted");
        assert_eq!(ok.token_name, "ci");
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("Bearer "),
            Some("Basic s3cret"),
            Some("s3cret"),
        ] {
            let err = authorize(&tokens, bad, "ListPools").expect_err("refused");
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn a_read_only_token_reads_and_is_denied_everything_else() {
        let tokens = tokens();
        for m in READ_ONLY_METHODS {
            let c = authorize(&tokens, Some("Bearer look"), m).expect("reads");
            assert_eq!((c.token_name.as_str(), c.scope), ("dash", Scope::Read));
        }
        for m in ADMIN_METHODS.iter().chain(&["SomethingNew"]) {
            let err = authorize(&tokens, Some("Bearer look"), m).expect_err("denied");
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{m}");
            assert!(
                err.message().contains("dash") && err.message().contains(m),
                "{err:?}"
            );
            authorize(&tokens, Some("Bearer s3cret"), m).expect("admin may");
        }
    }

    #[test]
    fn entries_take_an_optional_scope_and_default_to_admin() {
        let hash = flotilla_core::token::token_hash_hex("test");
        assert_eq!(
            ApiToken::parse(&format!("ci:{hash}"))
                .expect("parse")
                .scope(),
            Scope::Admin
        );
        assert_eq!(
            ApiToken::parse(&format!("ci:{hash}:admin"))
                .expect("parse")
                .scope(),
            Scope::Admin
        );
        assert_eq!(
            ApiToken::parse(&format!("d:{hash}:read"))
                .expect("parse")
                .scope(),
            Scope::Read
        );
        assert!(ApiToken::parse(&format!("d:{hash}:write")).is_err());
    }

    #[test]
    fn no_method_is_in_both_lists() {
        for m in READ_ONLY_METHODS {
            assert!(!ADMIN_METHODS.contains(m), "{m}");
        }
    }

    #[test]
    fn a_request_that_skipped_the_wrapper_has_no_caller() {
        assert_eq!(
            caller(&Request::new(())).expect_err("no caller").code(),
            tonic::Code::Unauthenticated
        );
    }
}
