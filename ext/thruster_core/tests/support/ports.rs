//! Ports for servers the tests start, shared by the integration tests and
//! the library's own tests (included there with `#[path]`).

/// A port nothing listens on, for a server a test starts. Taken below the
/// kernel's ephemeral range (32768 and up), in turn from a place set by the
/// process id: a port the kernel picked for `:0` could be handed again as
/// the local port of an outgoing connection before the server bound it
/// (seen as AddrInUse on a loaded machine), and tests running at once in
/// this process never get the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(397) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (FIRST + (start + n) % SPAN) as u16;
        let free = |addr: &str| std::net::TcpListener::bind((addr, port)).is_ok();
        if free("127.0.0.1") && (free("::") || std::net::TcpListener::bind("[::1]:0").is_err()) {
            return port;
        }
    }
}
