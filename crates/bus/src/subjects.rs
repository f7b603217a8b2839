//! Subject names. Code speaks logical subjects (`CMD.provision`); the
//! namespace, when set, is prepended on the wire so installations and tests
//! can share a NATS server.

/// The logical subjects are defined in `flotilla_core` (the store writes
/// them too) and used from here.
pub use flotilla_core::subjects::{
    EVENTS, INSTANCE_EVENTS, PROVISION, RECONCILE, TERMINATE, instance_event,
};

/// Header names.
pub mod headers {
    pub use flotilla_core::ids::CORRELATION_HEADER as CORRELATION;
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const DEAD_REASON: &str = "Flotilla-Dead-Reason";
    pub const ORIGINAL_SUBJECT: &str = "Flotilla-Original-Subject";
    pub const DELIVERIES: &str = "Flotilla-Deliveries";
}

/// A validated namespace: empty, or letters, digits and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace(String);

impl Namespace {
    pub fn new(ns: &str) -> Option<Namespace> {
        let ok = ns.len() <= 32 && ns.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        ok.then(|| Namespace(ns.to_owned()))
    }

    /// Stream name on the server: `CMD` or `<ns>_CMD`.
    pub fn stream(&self, base: &str) -> String {
        if self.0.is_empty() {
            base.to_owned()
        } else {
            format!("{}_{base}", self.0)
        }
    }

    /// Subject on the wire: `CMD.x` or `<ns>.CMD.x`.
    pub fn subject(&self, logical: &str) -> String {
        if self.0.is_empty() {
            logical.to_owned()
        } else {
            format!("{}.{logical}", self.0)
        }
    }

    /// The logical subject of a wire subject.
    pub fn logical<'a>(&self, wire: &'a str) -> &'a str {
        if self.0.is_empty() {
            wire
        } else {
            wire.strip_prefix(&self.0)
                .and_then(|s| s.strip_prefix('.'))
                .unwrap_or(wire)
        }
    }

    /// Consumer names share the namespace too (they are per stream, but the
    /// prefix keeps `nats consumer ls` readable).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_prefix_streams_and_subjects_and_strip_back() {
        let ns = Namespace::new("t42").expect("valid");
        assert_eq!(ns.stream("CMD"), "t42_CMD");
        assert_eq!(ns.subject(PROVISION), "t42.CMD.provision");
        assert_eq!(ns.logical("t42.CMD.provision"), PROVISION);
        let ready = instance_event(flotilla_core::InstanceState::Ready);
        assert_eq!(ns.subject(&ready), "t42.EVT.instance.ready");
        assert_eq!(ns.subject(EVENTS), "t42.EVT.>");
        let none = Namespace::default();
        assert_eq!(none.stream("EVT"), "EVT");
        assert_eq!(none.subject(PROVISION), PROVISION);
        assert!(Namespace::new("a.b").is_none());
        assert!(Namespace::new("a b").is_none());
        assert!(Namespace::new("a>").is_none());
    }
}
