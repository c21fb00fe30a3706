//! Synthetic data for tests and benchmarks.

/// `len` deterministic pseudo-random bytes from `seed` (xorshift64, the seed spread by the
/// golden-ratio constant so that nearby seeds give unrelated streams): incompressible, and
/// the same on every machine, so a test can rebuild what it wrote.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn noise_is_deterministic_and_incompressible_looking() {
        let a = super::noise(4096, 7);
        assert_eq!(a, super::noise(4096, 7));
        assert_ne!(a, super::noise(4096, 8));
        assert_ne!(super::noise(64, 0), super::noise(64, 1));
        let distinct: std::collections::HashSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 200);
    }
}
