//! Ruby binding of thruster-rs: converts Ruby values, starts and stops the
//! core's server inside the Ruby process (the Puma master), and keeps that
//! safe across `fork`. No proxy logic lives here.
//!
//! Fork safety (a Puma master forks workers while the proxy runs):
//! - the server lives in a Rust static, never in a Ruby object, so Ruby's
//!   teardown in a worker never drops (and deadlocks on) the inherited
//!   runtime;
//! - every entry point checks that it runs in the process that started the
//!   proxy; in a child it does nothing;
//! - a `pthread_atfork` child handler closes every socket the proxy owns,
//!   using only async-signal-safe calls.

use std::ffi::c_void;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use magnus::{function, prelude::*, Error, ExceptionClass, RHash, RModule, Ruby, Value};
use thruster_core::config::{Environment, Layered};
use thruster_core::sys::fd_registry;
use thruster_core::upstream::UpstreamAddr;
use thruster_core::{Config, Server, ServerOptions};

static PROXY: Mutex<Option<Server>> = Mutex::new(None);
/// The pid that started the running proxy (0: none).
static OWNER_PID: AtomicU32 = AtomicU32::new(0);
static ATFORK_INSTALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn close_proxy_fds_in_child() {
    // Only atomics and close(2): this runs between fork and the child's
    // first instruction, when other threads' locks may be held.
    if OWNER_PID.load(Ordering::SeqCst) != 0 {
        fd_registry::close_all_after_fork();
    }
    fd_registry::after_fork();
}

/// Before fork: wait out any socket between creation and registration.
extern "C" fn hold_socket_creation() {
    fd_registry::before_fork();
}

extern "C" fn release_socket_creation() {
    fd_registry::after_fork();
}

fn is_owner() -> bool {
    OWNER_PID.load(Ordering::SeqCst) == std::process::id()
}

fn proxy_slot() -> MutexGuard<'static, Option<Server>> {
    // A panic while holding the lock must not make the API unusable.
    PROXY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `f` without the GVL so other Ruby threads keep running while the
/// proxy drains. `f` must not touch Ruby.
fn without_gvl<F: FnOnce() -> R, R>(f: F) -> R {
    struct Call<F, R> {
        f: Option<F>,
        result: Option<std::thread::Result<R>>,
    }
    unsafe extern "C" fn trampoline<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
        // SAFETY: `data` is the `Call` passed below, alive for the call.
        let call = unsafe { &mut *(data as *mut Call<F, R>) };
        if let Some(f) = call.f.take() {
            // Never unwind into C.
            call.result = Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
        }
        std::ptr::null_mut()
    }
    let mut call = Call {
        f: Some(f),
        result: None,
    };
    // SAFETY: the trampoline only touches `call`, which outlives the call;
    // no unblocking function is given, so Ruby waits for it to return.
    unsafe {
        rb_sys::rb_thread_call_without_gvl(
            Some(trampoline::<F, R>),
            &mut call as *mut Call<F, R> as *mut c_void,
            None,
            std::ptr::null_mut(),
        );
    }
    match call.result.expect("the trampoline ran") {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn thruster_error(ruby: &Ruby, class: &str, message: String) -> Error {
    let class = ruby
        .class_object()
        .const_get::<_, RModule>("Thruster")
        .and_then(|m| m.const_get::<_, ExceptionClass>(class))
        .unwrap_or_else(|_| ruby.exception_runtime_error());
    Error::new(class, message)
}

fn parse_upstream(ruby: &Ruby, text: &str) -> Result<UpstreamAddr, Error> {
    if let Some(path) = text.strip_prefix("unix:") {
        return Ok(UpstreamAddr::Unix(path.trim_start_matches("//").into()));
    }
    let addr = text.strip_prefix("tcp://").unwrap_or(text);
    addr.parse::<SocketAddr>().map(UpstreamAddr::Tcp).map_err(|_| {
        thruster_error(
            ruby,
            "ConfigError",
            format!("invalid upstream {text:?}: expected \"unix:/path/to.sock\" or \"IP:PORT\" (e.g. \"127.0.0.1:3000\")"),
        )
    })
}

fn parse_binds(ruby: &Ruby, binds: Vec<String>) -> Result<Vec<SocketAddr>, Error> {
    binds
        .iter()
        .map(|b| {
            b.parse::<SocketAddr>().map_err(|_| {
                thruster_error(
                    ruby,
                    "ConfigError",
                    format!("invalid bind {b:?}: expected \"IP:PORT\" (e.g. \"0.0.0.0:80\" or \"[::]:80\")"),
                )
            })
        })
        .collect()
}

/// `Thruster::Native.start(options, upstream, binds, https_binds,
/// inherited_fds)`: starts the proxy; returns the addresses it listens on
/// (HTTP first, then HTTPS in TLS mode).
fn start(
    ruby: &Ruby,
    options: RHash,
    upstream: String,
    binds: Vec<String>,
    https_binds: Vec<String>,
    inherited_fds: Vec<RawFd>,
) -> Result<Vec<String>, Error> {
    if !ATFORK_INSTALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: registering a plain extern "C" function.
        unsafe {
            libc::pthread_atfork(
                Some(hold_socket_creation),
                Some(release_socket_creation),
                Some(close_proxy_fds_in_child),
            )
        };
    }
    let mut keywords = Vec::new();
    options.foreach(|key: Value, value: Value| {
        let key = key.to_r_string()?.to_string()?;
        let value = if value.is_nil() {
            String::new()
        } else {
            value.to_r_string()?.to_string()?
        };
        keywords.push((key, value));
        Ok(magnus::r_hash::ForEach::Continue)
    })?;
    let source = Layered::new(keywords, &Environment)
        .map_err(|e| thruster_error(ruby, "ConfigError", e.to_string()))?;
    let config = Config::from_source(&source)
        .map_err(|e| thruster_error(ruby, "ConfigError", e.to_string()))?;
    let upstream = parse_upstream(ruby, &upstream)?;
    let http_binds = parse_binds(ruby, binds)?;
    let https_binds = parse_binds(ruby, https_binds)?;

    let mut slot = proxy_slot();
    if slot.is_some() && is_owner() {
        return Err(thruster_error(
            ruby,
            "Error",
            "the proxy is already running in this process; call Thruster.stop first".into(),
        ));
    }
    // Inherited from the parent across fork: its threads are gone and
    // dropping its runtime would deadlock, so it is forgotten, not dropped.
    if let Some(inherited) = slot.take() {
        std::mem::forget(inherited);
    }
    let options = ServerOptions {
        upstream,
        http_binds,
        https_binds,
        inherited_fds,
        sendfile_token: thruster_core::pipeline::sendfile::token_from_env_or_new(),
        worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(2)),
    };
    let server = Server::start(config, options).map_err(|e| {
        let class = match e {
            thruster_core::ServerError::Tls(_) => "ConfigError",
            _ => "Error",
        };
        thruster_error(ruby, class, e.to_string())
    })?;
    let addrs = server
        .http_addrs()
        .iter()
        .chain(server.https_addrs())
        .map(|a| a.to_string())
        .collect();
    *slot = Some(server);
    OWNER_PID.store(std::process::id(), Ordering::SeqCst);
    Ok(addrs)
}

fn take_owned_server() -> Option<Server> {
    if !is_owner() {
        return None;
    }
    let server = proxy_slot().take();
    OWNER_PID.store(0, Ordering::SeqCst);
    server
}

fn drain_duration(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::from_secs(5))
}

/// `Thruster::Native.stop(timeout_seconds)`: drains and stops; false if no
/// proxy runs in this process.
fn stop(timeout: f64) -> bool {
    match take_owned_server() {
        Some(server) => {
            without_gvl(move || server.stop(drain_duration(timeout)));
            true
        }
        None => false,
    }
}

/// `Thruster::Native.handoff_begin`: duplicates the listening sockets into
/// fds that survive exec and stops accepting; in-flight requests go on until
/// `stop`. Returns `["fd:addr", ...]` for the next process image (Puma's hot
/// restart). Quick and lock-light: Puma calls it from a signal trap.
fn handoff_begin(ruby: &Ruby) -> Result<Vec<String>, Error> {
    if !is_owner() {
        return Ok(Vec::new());
    }
    let slot = proxy_slot();
    let Some(server) = slot.as_ref() else {
        return Ok(Vec::new());
    };
    let fds = server.handoff_fds().map_err(|e| {
        thruster_error(
            ruby,
            "Error",
            format!("could not hand over the listeners: {e}"),
        )
    })?;
    server.begin_shutdown();
    Ok(fds
        .into_iter()
        .map(|(fd, addr)| format!("{fd}:{addr}"))
        .collect())
}

/// `Thruster::Native.stop_accepting`: closes the listeners and lets
/// connections finish their current request; `stop` then waits for them.
fn stop_accepting() -> bool {
    if !is_owner() {
        return false;
    }
    match proxy_slot().as_ref() {
        Some(server) => {
            server.begin_shutdown();
            true
        }
        None => false,
    }
}

fn running() -> bool {
    is_owner() && proxy_slot().is_some()
}

fn setting_names() -> Vec<&'static str> {
    thruster_core::config::SETTINGS
        .iter()
        .map(|(name, _)| *name)
        .collect()
}

/// The core version the extension was built from, so Ruby can detect a stale
/// compiled extension next to newer Ruby files.
fn core_version() -> &'static str {
    thruster_core::VERSION
}

/// Test hook: the fds of this process that the proxy owns.
fn owned_fd_count() -> usize {
    (0..4096)
        .filter(|&fd| fd_registry::is_registered(fd))
        .count()
}

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let thruster = ruby.define_module("Thruster")?;
    let native = thruster.define_module("Native")?;
    native.define_singleton_method("core_version", function!(core_version, 0))?;
    native.define_singleton_method("setting_names", function!(setting_names, 0))?;
    native.define_singleton_method("start", function!(start, 5))?;
    native.define_singleton_method("stop", function!(stop, 1))?;
    native.define_singleton_method("handoff_begin", function!(handoff_begin, 0))?;
    native.define_singleton_method("stop_accepting", function!(stop_accepting, 0))?;
    native.define_singleton_method("running?", function!(running, 0))?;
    native.define_singleton_method("owned_fd_count", function!(owned_fd_count, 0))?;
    Ok(())
}
