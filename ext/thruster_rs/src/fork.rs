//! Fork safety. A Puma master forks workers while the proxy runs, and a
//! child inherits the proxy's memory and fds but none of its threads:
//! - every entry point asks [`is_owner`] first and does nothing in a child,
//!   which must neither serve on nor tear down a runtime it cannot drive;
//! - a `pthread_atfork` child handler closes every socket the proxy owns, so
//!   a worker that forks without exec (app-level `fork`, `fork_worker`)
//!   does not keep the proxy's ports or app connections open. CLOEXEC only
//!   covers exec.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use thruster_core::sys::fd_registry;

/// The pid that started the running proxy (0: none). A pid rather than a
/// flag, so a child sees at once that the proxy is not its own.
static OWNER_PID: AtomicU32 = AtomicU32::new(0);
static ATFORK_INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the fork handlers once per process image (they survive fork, so
/// a child that starts its own proxy does not stack a second set).
pub fn install_handlers() {
    if !ATFORK_INSTALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: registering plain extern "C" functions.
        unsafe {
            libc::pthread_atfork(
                Some(hold_socket_creation),
                Some(release_socket_creation),
                Some(close_proxy_fds_in_child),
            )
        };
    }
}

/// Whether this process started the proxy it holds (false in its children).
pub fn is_owner() -> bool {
    OWNER_PID.load(Ordering::SeqCst) == std::process::id()
}

pub fn claim() {
    OWNER_PID.store(std::process::id(), Ordering::SeqCst);
}

pub fn release() {
    OWNER_PID.store(0, Ordering::SeqCst);
}

extern "C" fn close_proxy_fds_in_child() {
    // Only atomics and close(2): this runs between fork and the child's
    // first instruction, when other threads' locks may be held.
    if OWNER_PID.load(Ordering::SeqCst) != 0 {
        fd_registry::close_all_after_fork();
    }
    fd_registry::after_fork();
}

/// Before fork: wait out any socket between creation and registration, so
/// the child's handler sees (and closes) every one.
extern "C" fn hold_socket_creation() {
    fd_registry::before_fork();
}

extern "C" fn release_socket_creation() {
    fd_registry::after_fork();
}
