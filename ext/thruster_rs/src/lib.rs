//! Ruby binding of thruster-rs: converts Ruby values, starts and stops the
//! core's server inside the Ruby process (the Puma master), and keeps that
//! safe across `fork`. No proxy logic lives here.
//!
//! The server lives in a Rust static, never in a Ruby object: Ruby's
//! teardown in a forked worker would otherwise drop the inherited runtime,
//! whose threads did not survive the fork, and deadlock. See `fork.rs` for
//! the rest of the fork rules.

mod errors;
mod fork;
mod nogvl;

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use magnus::{function, prelude::*, Error, RHash, Ruby, Value};
use thruster_core::config::{Environment, Layered};
use thruster_core::sys::fd_registry;
use thruster_core::upstream::UpstreamAddr;
use thruster_core::{Config, Server, ServerOptions};

use crate::fork::is_owner;
use crate::nogvl::without_gvl;

static PROXY: Mutex<Option<Server>> = Mutex::new(None);

fn proxy_slot() -> MutexGuard<'static, Option<Server>> {
    // A panic while holding the lock must not make the API unusable.
    PROXY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn parse_binds(ruby: &Ruby, binds: Vec<String>) -> Result<Vec<SocketAddr>, Error> {
    binds
        .iter()
        .map(|b| {
            b.parse::<SocketAddr>().map_err(|_| {
                errors::config_error(
                    ruby,
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
    fork::install_handlers();
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
        .map_err(|e| errors::config_error(ruby, e.to_string()))?;
    let config =
        Config::from_source(&source).map_err(|e| errors::config_error(ruby, e.to_string()))?;
    let upstream = upstream
        .parse::<UpstreamAddr>()
        .map_err(|e| errors::config_error(ruby, e.to_string()))?;
    let http_binds = parse_binds(ruby, binds)?;
    let https_binds = parse_binds(ruby, https_binds)?;

    let mut slot = proxy_slot();
    if slot.is_some() && is_owner() {
        return Err(errors::error(
            ruby,
            "the proxy is already running in this process; call Thruster.stop first",
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
        admin_token: thruster_core::server::admin_token_from_env_or_new(),
        worker_threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(2)),
    };
    let server = Server::start(config, options).map_err(|e| match e {
        thruster_core::ServerError::Tls(_) | thruster_core::ServerError::SharedCache(_) => {
            errors::config_error(ruby, e.to_string())
        }
        _ => errors::error(ruby, e.to_string()),
    })?;
    let addrs = server
        .http_addrs()
        .iter()
        .chain(server.https_addrs())
        .map(|a| a.to_string())
        .collect();
    *slot = Some(server);
    fork::claim();
    Ok(addrs)
}

fn take_owned_server() -> Option<Server> {
    if !is_owner() {
        return None;
    }
    let server = proxy_slot().take();
    fork::release();
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
    let fds = server
        .handoff_fds()
        .map_err(|e| errors::error(ruby, format!("could not hand over the listeners: {e}")))?;
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

/// `Thruster::Native.admin_endpoint`: `[url, token]` of the admin listener
/// (for `THRUSTER_RS_ADMIN_URL`/`_TOKEN`), nil when no proxy runs here.
fn admin_endpoint() -> Option<(String, String)> {
    if !is_owner() {
        return None;
    }
    proxy_slot()
        .as_ref()
        .map(|server| (server.admin_url(), server.admin_token().to_owned()))
}

fn running() -> bool {
    is_owner() && proxy_slot().is_some()
}

fn setting_names() -> Vec<&'static str> {
    thruster_core::config::SETTINGS
        .iter()
        .map(|s| s.name)
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
    errors::init(ruby);
    let thruster = ruby.define_module("Thruster")?;
    let native = thruster.define_module("Native")?;
    native.define_singleton_method("core_version", function!(core_version, 0))?;
    native.define_singleton_method("setting_names", function!(setting_names, 0))?;
    native.define_singleton_method("start", function!(start, 5))?;
    native.define_singleton_method("stop", function!(stop, 1))?;
    native.define_singleton_method("handoff_begin", function!(handoff_begin, 0))?;
    native.define_singleton_method("stop_accepting", function!(stop_accepting, 0))?;
    native.define_singleton_method("running?", function!(running, 0))?;
    native.define_singleton_method("admin_endpoint", function!(admin_endpoint, 0))?;
    native.define_singleton_method("owned_fd_count", function!(owned_fd_count, 0))?;
    Ok(())
}
