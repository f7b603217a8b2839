//! The ownership tags: the provider metadata keys that tie a machine or
//! volume back to its instance row. They are part of the contract with
//! every resource already created, so their spelling never changes.
//!
//! They live here, not in the provider layer, because the services that
//! read provider listings (scheduler, watchdog) match on them too, and only
//! the provider-adapter links provider code.

/// Key holding the instance id: the orphan scan uses it to tie a machine
/// back to its row.
pub const TAG_INSTANCE: &str = "flotilla_instance_id";
/// Key holding the pool name.
pub const TAG_POOL: &str = "flotilla_pool";
/// Key holding the control plane id, so two Flotilla installations sharing
/// an account never touch each other's machines.
pub const TAG_CONTROL_PLANE: &str = "flotilla_control_plane";
/// Key saying what a volume the provider made for a machine is for (a
/// Scaleway server's root volume says `root`); the data volumes Flotilla
/// asks for carry none.
pub const TAG_VOLUME_ROLE: &str = "flotilla_volume_role";

/// Prefix of every tag Flotilla sets; callers may not set tags with it.
pub const RESERVED_PREFIX: &str = "flotilla_";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_keep_their_spelling_and_the_reserved_prefix() {
        // Resources created by earlier releases carry these exact keys.
        let all = [TAG_INSTANCE, TAG_POOL, TAG_CONTROL_PLANE, TAG_VOLUME_ROLE];
        assert_eq!(
            all,
            [
                "flotilla_instance_id",
                "flotilla_pool",
                "flotilla_control_plane",
                "flotilla_volume_role"
            ]
        );
        for tag in all {
            assert!(tag.starts_with(RESERVED_PREFIX), "{tag}");
        }
    }
}
