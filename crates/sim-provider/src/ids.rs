//! Identifiers shaped like Fly's, so clients that parse or store them are
//! exercised with realistic values.

use rand::Rng;

/// 14 lowercase hex characters, like `3d8d9e0b4c1789`.
pub(crate) fn machine_id() -> String {
    format!("{:014x}", rand::random::<u64>() >> 8)
}

/// 26 Crockford base32 characters with a millisecond timestamp first, like
/// a ULID (Fly's instance ids are ULIDs).
pub(crate) fn instance_id() -> String {
    const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let value = uuid::Uuid::now_v7().as_u128();
    (0..26)
        .map(|i| {
            // 26 characters carry 130 bits; the first one holds the top 3.
            let shift = 125 - 5 * i;
            char::from(CROCKFORD[((value >> shift) & 0x1f) as usize])
        })
        .collect()
}

/// A 6PN address in Fly's private `fdaa::/16` range.
pub(crate) fn private_ip() -> String {
    let mut rng = rand::rng();
    format!(
        "fdaa:0:{:x}:a7b:{:x}:{:x}:{:x}:2",
        rng.random::<u16>(),
        rng.random::<u16>(),
        rng.random::<u16>(),
        rng.random::<u16>()
    )
}

/// `vol_` and 16 lowercase alphanumerics.
pub(crate) fn volume_id() -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..16)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("vol_{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_fly_shapes() {
        let machine = machine_id();
        assert_eq!(machine.len(), 14);
        assert!(machine.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(instance_id().len(), 26);
        let volume = volume_id();
        assert!(volume.starts_with("vol_") && volume.len() == 20);
    }
}
