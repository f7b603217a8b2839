//! The machine's environment as cloud-init user data: Scaleway has no
//! per-server environment, and tags are readable by anyone with the
//! project's read access, so the environment (which carries the worker
//! token) travels as a `#cloud-config` document set through
//! `PATCH /servers/{id}/user_data/cloud-init`.

use std::collections::BTreeMap;

use crate::{ProviderError, ProviderResult};

/// Where cloud-init writes the machine's environment, readable by root only.
pub const ENV_FILE: &str = "/etc/flotilla/env";

fn is_env_name(k: &str) -> bool {
    let mut bytes = k.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// One `#cloud-config` document writing a shell env file
/// (`set -a; . /etc/flotilla/env`). The file is base64-encoded in the YAML
/// so no value can break out of it, and each value is single-quoted so none
/// is expanded by the shell. Error messages name keys, never values: values
/// are often secrets.
pub fn cloud_config(env: &BTreeMap<String, String>) -> ProviderResult<String> {
    let mut file = String::new();
    for (k, v) in env {
        if !is_env_name(k) {
            return Err(ProviderError::InvalidArgument(format!(
                "env: {k:?} is not a valid variable name"
            )));
        }
        if v.contains('\0') {
            return Err(ProviderError::InvalidArgument(format!(
                "env: the value of {k} contains a NUL byte"
            )));
        }
        file.push_str(k);
        file.push_str("='");
        file.push_str(&v.replace('\'', r"'\''"));
        file.push_str("'\n");
    }
    Ok(format!(
        "#cloud-config\n\
         write_files:\n  \
           - path: {ENV_FILE}\n    \
             owner: root:root\n    \
             permissions: '0600'\n    \
             encoding: b64\n    \
             content: {}\n",
        base64(file.as_bytes())
    ))
}

/// Standard base64 with padding (RFC 4648 §4), as cloud-init's `b64`
/// encoding expects.
fn base64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded);
        }
    }

    #[test]
    fn env_is_refused_by_key_without_quoting_the_value() {
        let env = BTreeMap::from([("1BAD".to_owned(), "hunter2".to_owned())]);
        let e = cloud_config(&env).expect_err("bad key");
        assert!(e.to_string().contains("1BAD") && !e.to_string().contains("hunter2"));
        let env = BTreeMap::from([("OK".to_owned(), "a\0b".to_owned())]);
        assert!(
            !cloud_config(&env)
                .expect_err("nul")
                .to_string()
                .contains("a\0b")
        );
    }
}
