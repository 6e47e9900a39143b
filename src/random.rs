//! Randomness, passed into the pure parts as a value so that tests and the fuzzer can make
//! it deterministic while the daemon uses a CSPRNG: the operating system's for key secrets
//! ([`OsRandom`]), and for the per-stanza draws (token salts, random picks) a ChaCha20
//! generator seeded and periodically reseeded from it ([`ChaChaRandom`]), which spares a
//! system call per value. Why that keeps tokens unique: SECURITY.md, "Cryptographic design".

use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

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

/// Bytes a [`ChaChaRandom`] hands out under one seed before it draws a new one from the OS:
/// at the ~24 bytes a proxied stanza draws (a 16-byte salt, an 8-byte pick), one `getrandom`
/// per ~40,000 stanzas — invisible in the cost — while a copy of the generator's state
/// (a read of the process's memory) predicts or recovers at most this much of its output.
pub const RESEED_AFTER: usize = 1024 * 1024;

/// A userspace CSPRNG for the daemon's per-stanza draws: ChaCha20 (`rand_chacha`'s
/// `ChaCha20Rng`, 256-bit key, the full 20 rounds) keyed with 32 bytes from the OS CSPRNG
/// when made, and rekeyed from it every [`RESEED_AFTER`] bytes of output. Each process makes
/// its own (an in-place upgrade `exec`s a new image, which seeds a new one; the daemon never
/// forks), so no two streams share a seed. Key-file secrets do not come from here but
/// straight from [`OsRandom`].
pub struct ChaChaRandom {
    os: SystemRandom,
    rng: ChaCha20Rng,
    /// Bytes handed out since the last seed.
    since_seed: usize,
    /// Output after which to reseed.
    reseed_after: usize,
}

impl ChaChaRandom {
    /// A generator seeded from the OS, reseeded every [`RESEED_AFTER`] bytes.
    pub fn new() -> Self {
        Self::with_reseed_after(RESEED_AFTER)
    }

    /// A generator seeded from the OS, reseeded every `bytes` bytes of output (at least 1).
    fn with_reseed_after(bytes: usize) -> Self {
        let os = SystemRandom::new();
        let rng = seeded(&os);
        ChaChaRandom {
            os,
            rng,
            since_seed: 0,
            reseed_after: bytes.max(1),
        }
    }
}

impl Default for ChaChaRandom {
    fn default() -> Self {
        Self::new()
    }
}

/// A ChaCha20 generator keyed with 32 bytes from the OS CSPRNG.
fn seeded(os: &SystemRandom) -> ChaCha20Rng {
    let mut seed = Zeroizing::new([0u8; 32]);
    // As in `OsRandom::fill`: without secure randomness, carrying on would be worse.
    os.fill(&mut seed[..])
        .expect("the system CSPRNG (getrandom) failed");
    ChaCha20Rng::from_seed(*seed)
}

impl Random for ChaChaRandom {
    fn fill(&mut self, buf: &mut [u8]) {
        if self.since_seed >= self.reseed_after {
            self.rng = seeded(&self.os);
            self.since_seed = 0;
        }
        self.rng.fill_bytes(buf);
        self.since_seed = self.since_seed.saturating_add(buf.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_draw_different_streams() {
        let (mut a, mut b) = (ChaChaRandom::new(), ChaChaRandom::new());
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_ne!(x, y);
        // And one instance does not repeat itself.
        let mut z = [0u8; 32];
        a.fill(&mut z);
        assert_ne!(x, z);
    }

    #[test]
    fn reseeds_after_its_budget() {
        let mut r = ChaChaRandom::with_reseed_after(100);
        let mut buf = [0u8; 40];
        for _ in 0..3 {
            r.fill(&mut buf); // 40, 80, 120 bytes: past the budget only after the third
        }
        assert_eq!(r.since_seed, 120, "no reseed within the budget");
        r.fill(&mut buf);
        assert_eq!(r.since_seed, 40, "reseeded before the fourth draw");
    }

    #[test]
    fn any_length_and_below_work() {
        let mut r = ChaChaRandom::with_reseed_after(1);
        for len in [0, 1, 7, 16, 64, 65, 1000, RESEED_AFTER + 3] {
            let mut buf = vec![0u8; len];
            r.fill(&mut buf);
            if len >= 16 {
                assert!(buf.iter().any(|&b| b != 0));
            }
        }
        for n in [1, 2, 3, 1000, usize::MAX] {
            assert!(r.below(n) < n);
        }
    }
}
