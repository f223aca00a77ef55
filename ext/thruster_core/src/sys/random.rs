//! Random numbers from the kernel (getrandom(2)): tokens, multipart
//! boundaries, BREACH padding lengths and retry jitter all take theirs here.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Fills `buf` from the kernel's CSPRNG. It only fails before the kernel's
/// pool is initialised at boot, which a running server never sees; that
/// would be a broken system, so it panics rather than hand out zeros.
pub fn fill(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the remaining length into our own buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

pub fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_ne_bytes(bytes)
}

/// Unpredictable words without a syscall each, for values made per request
/// (request ids, BREACH padding lengths): SipHash, keyed once per process
/// from the kernel's CSPRNG (std's `RandomState`), over a counter. A keyed
/// PRF: the words cannot be told from random ones without the key, and
/// never repeat within a process. Tokens that guard something (secrets,
/// file names others could guess) take [`fill`]'s instead.
pub struct Draw(u64);

/// The next draw: each gives distinct words.
pub fn draw() -> Draw {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    Draw(COUNTER.fetch_add(1, Ordering::Relaxed))
}

impl Draw {
    /// This draw's word number `lane`.
    pub fn word(&self, lane: u64) -> u64 {
        static KEYS: OnceLock<RandomState> = OnceLock::new();
        let mut h = KEYS.get_or_init(RandomState::new).build_hasher();
        h.write_u64(lane);
        h.write_u64(self.0);
        h.finish()
    }
}

/// A uniform fraction in [0, 1).
pub fn fraction() -> f64 {
    // 53 random bits: every representable value in [0, 1) at that spacing.
    (u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// `bytes` random bytes as lower-case hex (twice as many characters).
pub fn hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    fill(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_differ_and_have_their_shape() {
        let (a, b) = (super::hex(32), super::hex(32));
        assert_eq!(a.len(), 64);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        for _ in 0..1000 {
            let f = super::fraction();
            assert!((0.0..1.0).contains(&f));
        }
    }

    #[test]
    fn draws_differ_between_draws_and_lanes() {
        let words: std::collections::HashSet<u64> = (0..1000)
            .flat_map(|_| {
                let d = super::draw();
                [d.word(0), d.word(1)]
            })
            .collect();
        assert_eq!(words.len(), 2000);
        // Spread over the bits, not a counter in disguise: every bit is
        // set in some words and clear in others.
        let (any, all) = words.iter().fold((0u64, !0u64), |(a, b), w| (a | w, b & w));
        assert_eq!((any, all), (!0, 0));
    }
}
