//! Provider HTTP calls: the shared client setup
//! (`flotilla_telemetry::http_client`), and one classification of every
//! failure into a `ProviderError`.

use std::time::Duration;

/// The client setup is shared with the scheduler's health checks.
pub use flotilla_telemetry::http_client::client_builder;

use flotilla_core::ProviderError;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;

/// Longest provider message kept in an error.
const MAX_MESSAGE: usize = 300;

/// Classifies a non-success HTTP answer by its status code. The body is
/// only quoted for humans: the outcome never depends on its wording, and
/// nothing but a 404 ever means "gone".
pub fn classify_status(status: StatusCode, headers: &HeaderMap, body: &str) -> ProviderError {
    let message = format!("HTTP {}: {}", status.as_u16(), truncate(body));
    match status.as_u16() {
        404 => ProviderError::NotFound(message),
        409 | 412 => ProviderError::FailedPrecondition(message),
        408 => ProviderError::DeadlineExceeded(message),
        429 => ProviderError::ResourceExhausted {
            message,
            retry_after: retry_after(headers),
        },
        401 => ProviderError::Unauthenticated(message),
        403 => ProviderError::PermissionDenied(message),
        500..=599 => ProviderError::Unavailable(message),
        400..=499 => ProviderError::InvalidArgument(message),
        // 1xx/3xx where a final 2xx was expected: the call's effect is unknown.
        _ => ProviderError::Unavailable(message),
    }
}

/// Classifies a transport failure (no HTTP answer).
pub fn classify_transport(e: &reqwest::Error) -> ProviderError {
    // `without_url` keeps query strings (which may hold filters) out of logs.
    let text = truncate(&strip_url(e));
    if e.is_timeout() {
        ProviderError::DeadlineExceeded(text)
    } else if e.is_decode() {
        ProviderError::Unavailable(format!("unreadable answer: {text}"))
    } else {
        ProviderError::Unavailable(text)
    }
}

fn strip_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), url.path());
    }
    s
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs; ignored).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Sends a request and decodes a JSON success, classifying every failure.
pub async fn send_json<T: serde::de::DeserializeOwned>(
    req: reqwest::RequestBuilder,
) -> Result<T, ProviderError> {
    let body = send(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ProviderError::Unavailable(format!("unexpected answer from provider: {e}")))
}

/// Sends a request; a non-2xx answer becomes its classified error. The
/// call is a client span carrying the current trace context to the
/// provider (`traceparent`), the last hop of a command's trace.
pub async fn send(req: reqwest::RequestBuilder) -> Result<bytes::Bytes, ProviderError> {
    use tracing::Instrument;
    let (client, built) = req.build_split();
    let mut request = built.map_err(|e| classify_transport(&e))?;
    let span = tracing::info_span!(
        "provider.http",
        otel.name = %format!("HTTP {}", request.method()),
        otel.kind = "client",
        http.request.method = %request.method(),
        server.address = request.url().host_str().unwrap_or_default(),
        url.path = request.url().path(),
        http.response.status_code = tracing::field::Empty,
    );
    let call = async move {
        for (k, v) in flotilla_telemetry::propagation::current_trace_headers() {
            if let (Ok(name), Ok(value)) = (
                reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                reqwest::header::HeaderValue::from_str(&v),
            ) {
                request.headers_mut().insert(name, value);
            }
        }
        let resp = client
            .execute(request)
            .await
            .map_err(|e| classify_transport(&e))?;
        tracing::Span::current().record("http.response.status_code", resp.status().as_u16());
        Ok::<_, ProviderError>(resp)
    };
    let resp = call.instrument(span).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.map_err(|e| classify_transport(&e))?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(classify_status(
            status,
            &headers,
            &String::from_utf8_lossy(&body),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(code: u16) -> &'static str {
        classify_status(
            StatusCode::from_u16(code).expect("valid"),
            &HeaderMap::new(),
            "machine not found",
        )
        .kind()
    }

    #[test]
    fn only_404_means_gone_whatever_the_body_says() {
        assert_eq!(class(404), "not_found");
        for code in [500, 502, 503, 504, 429, 401, 403, 400, 412] {
            assert_ne!(class(code), "not_found", "{code}");
        }
        assert_eq!(class(412), "failed_precondition");
        assert_eq!(class(503), "unavailable");
        assert_eq!(class(401), "unauthenticated");
        assert_eq!(class(422), "invalid_argument");
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "2".parse().expect("value"));
        let e = classify_status(StatusCode::TOO_MANY_REQUESTS, &h, "");
        assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
        h.insert(reqwest::header::RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn long_bodies_are_cut_on_a_char_boundary() {
        let body = "é".repeat(400);
        let e = classify_status(StatusCode::BAD_GATEWAY, &HeaderMap::new(), &body);
        assert!(e.to_string().len() < 700);
    }
}
