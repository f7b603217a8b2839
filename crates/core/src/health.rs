//! The health check URL template a pool gives for its workers: what it may
//! contain (checked by the API before anything is stored) and how it is
//! filled in for one instance (by the scheduler before each probe).

use std::collections::BTreeMap;

/// Longest template accepted (the schema's CHECK says the same).
pub const MAX_LEN: usize = 512;

/// The placeholders a template may use.
pub const PLACEHOLDERS: &[&str] = &["machine_id", "instance_id", "name", "private_ip"];

/// Why a template was refused; the message is shown to the API caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("at most {MAX_LEN} characters")]
    TooLong,
    #[error("must start with http:// or https://")]
    Scheme,
    #[error("must name a host after the scheme")]
    NoHost,
    #[error("whitespace and control characters are not allowed")]
    BadCharacter,
    #[error("unclosed '{{'")]
    Unclosed,
    #[error(
        "unknown placeholder {{{0}}}; known: {{machine_id}}, {{instance_id}}, {{name}}, {{private_ip}}"
    )]
    UnknownPlaceholder(String),
}

/// A checked template. An empty template means "no active checks".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HealthUrl(String);

impl HealthUrl {
    pub fn parse(s: &str) -> Result<HealthUrl, TemplateError> {
        if s.is_empty() {
            return Ok(HealthUrl::default());
        }
        if s.len() > MAX_LEN {
            return Err(TemplateError::TooLong);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TemplateError::BadCharacter);
        }
        let rest = s
            .strip_prefix("http://")
            .or_else(|| s.strip_prefix("https://"))
            .ok_or(TemplateError::Scheme)?;
        if rest.is_empty() || rest.starts_with('/') {
            return Err(TemplateError::NoHost);
        }
        for name in placeholders(s)? {
            if !PLACEHOLDERS.contains(&name) {
                return Err(TemplateError::UnknownPlaceholder(name.to_owned()));
            }
        }
        Ok(HealthUrl(s.to_owned()))
    }

    pub fn is_enabled(&self) -> bool {
        !self.0.is_empty()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether filling the template needs the machine's private address
    /// (which costs a provider call the first time).
    pub fn needs_private_ip(&self) -> bool {
        self.0.contains("{private_ip}")
    }

    /// The template with each placeholder replaced by its value in `vars`
    /// (a missing value becomes empty).
    pub fn render(&self, vars: &BTreeMap<&str, &str>) -> String {
        let mut out = String::with_capacity(self.0.len() + 32);
        let mut rest = self.0.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            // Parsing proved every '{' is closed.
            let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
            let name = &rest[open + 1..close];
            out.push_str(vars.get(name).copied().unwrap_or_default());
            rest = rest.get(close + 1..).unwrap_or_default();
        }
        out.push_str(rest);
        out
    }
}

fn placeholders(s: &str) -> Result<Vec<&str>, TemplateError> {
    let mut names = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or(TemplateError::Unclosed)? + open;
        names.push(&rest[open + 1..close]);
        rest = &rest[close + 1..];
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_is_filled_in_for_one_instance() {
        let t = HealthUrl::parse("http://{private_ip}:8080/healthz?m={machine_id}&i={instance_id}")
            .unwrap();
        let vars = BTreeMap::from([
            ("private_ip", "10.0.0.7"),
            ("machine_id", "m1"),
            ("instance_id", "i1"),
        ]);
        assert_eq!(t.render(&vars), "http://10.0.0.7:8080/healthz?m=m1&i=i1");
        assert!(t.needs_private_ip());
        let plain = HealthUrl::parse("https://h/_sim/workers/{machine_id}/healthz").unwrap();
        assert!(!plain.needs_private_ip());
        assert_eq!(
            plain.render(&BTreeMap::from([("machine_id", "abc")])),
            "https://h/_sim/workers/abc/healthz"
        );
    }

    #[test]
    fn an_empty_template_turns_checks_off() {
        assert!(!HealthUrl::parse("").unwrap().is_enabled());
    }

    #[test]
    fn bad_templates_say_what_is_wrong() {
        use TemplateError::*;
        for (bad, why) in [
            ("ftp://x/", Scheme),
            ("x/healthz", Scheme),
            ("http://", NoHost),
            ("http:///path", NoHost),
            ("http://h/ x", BadCharacter),
            ("http://h/\n", BadCharacter),
            ("http://h/{machine_id", Unclosed),
            ("http://h/{secret}", UnknownPlaceholder("secret".into())),
        ] {
            assert_eq!(HealthUrl::parse(bad), Err(why), "{bad}");
        }
        assert_eq!(
            HealthUrl::parse(&format!("http://h/{}", "a".repeat(MAX_LEN))),
            Err(TooLong)
        );
    }
}
