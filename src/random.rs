//! Randomness, passed into the pure parts as a value so that tests and the fuzzer can make
//! it deterministic while the daemon uses the operating system's CSPRNG.

use ring::rand::{SecureRandom, SystemRandom};

/// A source of random bytes.
pub trait Random {
    /// Fills `buf` with random bytes.
    fn fill(&mut self, buf: &mut [u8]);

    /// A uniformly distributed number below `n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        // Rejection sampling: no modulo bias, whatever `n` is.
        let n = n as u64;
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let mut b = [0u8; 8];
            self.fill(&mut b);
            let v = u64::from_le_bytes(b);
            if v < zone {
                return (v % n) as usize;
            }
        }
    }
}

/// The operating system's CSPRNG (getrandom), through ring. Salts of tokens and key secrets
/// come from here in the daemon.
pub struct OsRandom(SystemRandom);

impl OsRandom {
    /// A handle to the system CSPRNG.
    pub fn new() -> Self {
        OsRandom(SystemRandom::new())
    }
}

impl Default for OsRandom {
    fn default() -> Self {
        Self::new()
    }
}

impl Random for OsRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        // getrandom does not fail on Linux once the pool is initialised; a failure here means
        // no secure randomness exists at all, and carrying on without it would be worse.
        self.0
            .fill(buf)
            .expect("the system CSPRNG (getrandom) failed");
    }
}

/// A deterministic generator (SplitMix64) for tests, benchmarks and fuzzing. Not secure, and
/// only with the `fuzzing` feature (as `invariants::SeededRandom`).
#[cfg(any(test, feature = "fuzzing"))]
pub struct SeededRandom(u64);

#[cfg(any(test, feature = "fuzzing"))]
impl SeededRandom {
    /// A generator whose output is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRandom(seed)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Random for SeededRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
    }
}
