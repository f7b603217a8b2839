//! TLS for every Flotilla gRPC endpoint and client, in one place: a
//! server's certificate and key from its settings, a client's trust (a
//! configured CA bundle or the system's roots) for `https://` URLs, and
//! the rule that a credential never crosses the network in plaintext.
//!
//! Design notes: rustls through tonic (`tls-ring`), so no OpenSSL and no
//! second crypto library. A setting holding PEM may name a file or hold
//! the PEM itself (it starts with `-----BEGIN`), because the CA reaches a
//! worker through its environment, where there is no file to point at.
//! Plaintext is refused for every address but loopback unless the
//! caller's `*_ALLOW_PLAINTEXT` setting says otherwise: the bearer token
//! travels in every request's headers, so `http://` to another host hands
//! it to anyone on the path. Errors name the setting and the file, never
//! the contents (a key file's bytes must not reach a log).

use std::net::IpAddr;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Why TLS could not be set up, or why a connection was refused before it
/// was made. Each names the setting to change.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file a setting names could not be read.
    #[error("{setting}: cannot read {path}: {source}")]
    Read {
        setting: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// A setting's value is not what it must be (not PEM, half of a pair,
    /// not a URL).
    #[error("{setting}: {why}")]
    Invalid { setting: &'static str, why: String },
    /// `http://` to an address other than loopback while the caller sends
    /// a credential.
    #[error(
        "{url_setting} is {url}: a credential would be sent in plaintext to a non-loopback \
         address; use an https:// URL, or set {allow_setting}=true to allow plaintext"
    )]
    Plaintext {
        url_setting: &'static str,
        url: String,
        allow_setting: &'static str,
    },
}

/// The text of a PEM setting: the value itself when it is PEM, otherwise
/// the contents of the file it names.
pub fn pem_setting(setting: &'static str, value: &str) -> Result<String, TlsError> {
    let value = value.trim();
    if value.starts_with("-----BEGIN") {
        return Ok(value.to_owned());
    }
    std::fs::read_to_string(value).map_err(|source| TlsError::Read {
        setting,
        path: value.to_owned(),
        source,
    })
}

/// Every `(source)` of an error, so a handshake failure says why (an
/// unknown issuer, an expired certificate) and not only "transport error".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// A server's TLS, when both its certificate (chain) and key are set;
/// `None` when neither is (plaintext). One without the other is an error,
/// and so is a pair rustls cannot use: checked here, at startup, not at
/// the first handshake.
pub fn server_tls(
    cert: (&'static str, Option<&str>),
    key: (&'static str, Option<&str>),
) -> Result<Option<ServerTlsConfig>, TlsError> {
    let cert_value = cert.1.map(str::trim).filter(|v| !v.is_empty());
    let key_value = key.1.map(str::trim).filter(|v| !v.is_empty());
    let (cert_value, key_value) = match (cert_value, key_value) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(_), None) => {
            return Err(TlsError::Invalid {
                setting: key.0,
                why: format!("must be set together with {}", cert.0),
            });
        }
        (None, Some(_)) => {
            return Err(TlsError::Invalid {
                setting: cert.0,
                why: format!("must be set together with {}", key.0),
            });
        }
    };
    let cert_pem = pem_setting(cert.0, cert_value)?;
    let key_pem = pem_setting(key.0, key_value)?;
    if !cert_pem.contains("CERTIFICATE-----") {
        return Err(TlsError::Invalid {
            setting: cert.0,
            why: "holds no PEM certificate".into(),
        });
    }
    if !key_pem.contains("PRIVATE KEY-----") {
        return Err(TlsError::Invalid {
            setting: key.0,
            why: "holds no PEM private key".into(),
        });
    }
    let config = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    // Builds the acceptor once now, so a key that does not match or cannot
    // be parsed stops the service at startup.
    tonic::transport::Server::builder()
        .tls_config(config.clone())
        .map_err(|e| TlsError::Invalid {
            setting: cert.0,
            why: format!(
                "{} and {} are not a usable pair: {}",
                cert.0,
                key.0,
                error_chain(&e)
            ),
        })?;
    Ok(Some(config))
}

/// How a client reaches a server: which setting holds the URL, whom it
/// trusts for `https://`, and whether plaintext to another host is allowed.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The setting holding the URL (for error messages).
    pub url_setting: &'static str,
    /// The setting holding the CA bundle (for error messages).
    pub ca_setting: &'static str,
    /// PEM of the CAs trusted for `https://`; `None`: the system's roots.
    pub ca_pem: Option<String>,
    /// The setting that allows plaintext to a non-loopback address.
    pub allow_setting: &'static str,
    pub allow_plaintext: bool,
}

impl ClientTls {
    /// Trusts the system's roots, refuses plaintext beyond loopback.
    pub fn new(
        url_setting: &'static str,
        ca_setting: &'static str,
        allow_setting: &'static str,
    ) -> ClientTls {
        ClientTls {
            url_setting,
            ca_setting,
            ca_pem: None,
            allow_setting,
            allow_plaintext: false,
        }
    }

    /// Trusts the CA bundle of `value` (PEM, or a file of it) when set.
    pub fn with_ca(mut self, value: Option<&str>) -> Result<ClientTls, TlsError> {
        self.ca_pem = match value.map(str::trim).filter(|v| !v.is_empty()) {
            None => None,
            Some(v) => {
                let pem = pem_setting(self.ca_setting, v)?;
                if !pem.contains("CERTIFICATE-----") {
                    return Err(TlsError::Invalid {
                        setting: self.ca_setting,
                        why: "holds no PEM certificate".into(),
                    });
                }
                Some(pem)
            }
        };
        Ok(self)
    }

    pub fn allow_plaintext(mut self, allow: bool) -> ClientTls {
        self.allow_plaintext = allow;
        self
    }

    /// An endpoint for `url`: TLS for `https://` (verified against the CA
    /// bundle or the system roots), plaintext for `http://` only to
    /// loopback unless allowed.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint = Endpoint::from_shared(url.to_owned()).map_err(|e| TlsError::Invalid {
            setting: self.url_setting,
            why: format!("{url:?} is not a URL: {e}"),
        })?;
        let uri = endpoint.uri();
        match uri.scheme_str() {
            Some("https") => {
                let config = match &self.ca_pem {
                    Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                endpoint.tls_config(config).map_err(|e| TlsError::Invalid {
                    setting: self.url_setting,
                    why: format!("TLS for {url}: {}", error_chain(&e)),
                })
            }
            Some("http") => {
                let host = uri.host().unwrap_or_default();
                if is_loopback(host) || self.allow_plaintext {
                    Ok(endpoint)
                } else {
                    Err(TlsError::Plaintext {
                        url_setting: self.url_setting,
                        url: url.to_owned(),
                        allow_setting: self.allow_setting,
                    })
                }
            }
            other => Err(TlsError::Invalid {
                setting: self.url_setting,
                why: format!(
                    "{url:?}: the scheme must be https:// or http://, not {:?}",
                    other.unwrap_or_default()
                ),
            }),
        }
    }
}

/// Whether `host` (as in a URL, IPv6 in brackets) is this machine only.
pub fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> ClientTls {
        ClientTls::new(
            "FLOTILLA_API_URL",
            "FLOTILLA_API_CA",
            "AGENT_ALLOW_PLAINTEXT",
        )
    }

    #[test]
    fn loopback_is_told_from_other_hosts() {
        for host in ["127.0.0.1", "127.8.9.1", "[::1]", "localhost", "LOCALHOST"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "api", "example.com", "[2001:db8::1]", "0.0.0.0"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[tokio::test]
    async fn plaintext_beyond_loopback_is_refused_naming_the_setting_unless_allowed() {
        client()
            .endpoint("http://127.0.0.1:50051")
            .expect("loopback");
        let err = client()
            .endpoint("http://api.example.com:50051")
            .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("AGENT_ALLOW_PLAINTEXT") && text.contains("FLOTILLA_API_URL"),
            "{text}"
        );
        client()
            .allow_plaintext(true)
            .endpoint("http://api.example.com:50051")
            .expect("allowed");
        client()
            .endpoint("https://api.example.com:50051")
            .expect("TLS with the system roots");
        let err = client().endpoint("ftp://x").expect_err("scheme");
        assert!(err.to_string().contains("https://"), "{err}");
    }

    #[test]
    fn half_a_server_pair_or_a_missing_file_names_the_setting_not_the_contents() {
        assert!(
            server_tls(("C", None), ("K", None))
                .expect("none")
                .is_none()
        );
        let err =
            server_tls(("API_TLS_CERT", Some("/x.pem")), ("API_TLS_KEY", None)).expect_err("half");
        assert!(err.to_string().contains("API_TLS_KEY"), "{err}");
        let err = server_tls(
            ("API_TLS_CERT", Some("/nonexistent/cert.pem")),
            ("API_TLS_KEY", Some("/nonexistent/key.pem")),
        )
        .expect_err("missing");
        assert!(
            err.to_string().contains("API_TLS_CERT") && err.to_string().contains("/nonexistent"),
            "{err}"
        );
        let err = client()
            .with_ca(Some(
                "-----BEGIN PRIVATE KEY-----\nsecretbytes\n-----END PRIVATE KEY-----",
            ))
            .expect_err("not a certificate");
        assert!(!err.to_string().contains("secretbytes"), "{err}");
    }
}
