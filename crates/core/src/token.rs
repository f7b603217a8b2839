//! Bearer tokens as Flotilla keeps them: only their SHA-256, under a name
//! for the audit log, compared in constant time. Shared by the api's
//! tokens (`API_TOKENS`) and the provider-adapter's service tokens
//! (`PROVIDER_ADAPTER_TOKENS`), which are configured the same way.
//!
//! Design notes: a leaked configuration, database or bookkeeping file
//! holds hashes, which do not authenticate. Every configured token is
//! compared on every call with no early exit, so the time an answer takes
//! does not tell which token (or how much of one) was right.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 of a token: what is configured and stored instead of it
/// (`printf %s "$TOKEN" | sha256sum`).
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The SHA-256 of a token in hex, as `sha256sum` prints it.
pub fn token_hash_hex(token: &str) -> String {
    hex::encode(token_hash(token))
}

/// One accepted token: its name and its hash, never the token.
#[derive(Clone, PartialEq, Eq)]
pub struct HashedToken {
    name: String,
    hash: [u8; 32],
}

impl std::fmt::Debug for HashedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HashedToken")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl HashedToken {
    /// Parses `name:sha256hex`, returning what follows a further `:` (a
    /// scope, for the api) separately.
    pub fn parse(entry: &str) -> Result<(HashedToken, Option<&str>), String> {
        let entry = entry.trim();
        let (name, rest) = entry.split_once(':').ok_or("expected name:sha256hex")?;
        let (hex_hash, extra) = match rest.split_once(':') {
            Some((h, e)) => (h, Some(e)),
            None => (rest, None),
        };
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
        // The message never repeats the value: a token pasted where its
        // hash belongs must not reach a log.
        hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| {
            format!(
                "token {name}: the hash must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)"
            )
        })?;
        Ok((
            HashedToken {
                name: name.to_owned(),
                hash,
            },
            extra,
        ))
    }

    /// A token given in plain text (tests, tools); only its hash is kept.
    pub fn from_plain(name: &str, token: &str) -> HashedToken {
        HashedToken {
            name: name.to_owned(),
            hash: token_hash(token),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `hash` is this token's, in constant time.
    pub fn matches(&self, hash: &[u8; 32]) -> bool {
        bool::from(self.hash.ct_eq(hash))
    }
}

/// The entry of `items` whose token is `presented`, comparing against
/// every entry (no early exit).
pub fn find_token<'a, T>(
    items: &'a [T],
    token_of: impl Fn(&T) -> &HashedToken,
    presented: &str,
) -> Option<&'a T> {
    let hash = token_hash(presented);
    let mut found = None;
    for item in items {
        if token_of(item).matches(&hash) && found.is_none() {
            found = Some(item);
        }
    }
    found
}

/// The entries of a token list as a setting or a file holds them:
/// separated by commas or newlines, blank lines and `#` comments ignored.
pub fn split_token_list(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn the_hash_of_a_token_matches_sha256sum() {
        // printf %s test | sha256sum
        assert_eq!(token_hash_hex("test"), HASH);
    }

    #[test]
    fn entries_parse_with_an_optional_extra_part() {
        let entry = format!(" ci:{HASH} ");
        let (t, extra) = HashedToken::parse(&entry).expect("parse");
        assert_eq!((t.name(), extra), ("ci", None));
        let entry = format!("dash:{HASH}:read");
        let (t, extra) = HashedToken::parse(&entry).expect("parse");
        assert_eq!((t.name(), extra), ("dash", Some("read")));
        assert!(t.matches(&token_hash("test")));
        for bad in ["ci".to_owned(), format!(":{HASH}"), "ci:abc".into()] {
            assert!(HashedToken::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pasted_token_is_not_echoed_by_the_error() {
        let err = HashedToken::parse("ci:plain-secret-token").expect_err("not a hash");
        assert!(!err.contains("plain-secret-token"), "{err}");
    }

    #[test]
    fn lists_split_on_commas_and_lines_and_skip_comments() {
        let text = "# rotated 2026-01\na:1, b:2\n\n c:3 ,\n";
        assert_eq!(
            split_token_list(text).collect::<Vec<_>>(),
            ["a:1", "b:2", "c:3"]
        );
    }

    #[test]
    fn the_matching_entry_is_found_among_several() {
        let list = [
            HashedToken::from_plain("old", "one"),
            HashedToken::from_plain("new", "two"),
        ];
        assert_eq!(
            find_token(&list, |t| t, "two").map(|t| t.name()),
            Some("new")
        );
        assert!(find_token(&list, |t| t, "three").is_none());
    }
}
