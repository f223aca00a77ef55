//! Random numbers from the kernel (getrandom(2)): tokens, multipart
//! boundaries, BREACH padding lengths and retry jitter all take theirs here.

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
}
