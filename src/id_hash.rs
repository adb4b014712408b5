//! A map keyed by the integer ids this crate hands out (ackIds, operation ids).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map from ids to `V`, hashed with [`IdHasher`].
pub(crate) type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// Hashes ids with one multiply instead of SipHash, on the per-message path. The keys
/// are local, mostly sequential integers drawn by this client or chosen by its caller,
/// never by the service or another party, so flooding one bucket (HashDoS) is no concern.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b) ^ self.0.rotate_left(8));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ self.0)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(26);
    }
}
