//! Ruby binding of thruster-rs. Converts Ruby values and reports on the core;
//! all proxy logic lives in `thruster_core`.

use magnus::{function, prelude::*, Error, Ruby};

/// The core version the extension was built from, so Ruby can detect a stale
/// compiled extension next to newer Ruby files.
fn core_version() -> &'static str {
    thruster_core::VERSION
}

#[magnus::init]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let thruster = ruby.define_module("Thruster")?;
    let native = thruster.define_module("Native")?;
    native.define_singleton_method("core_version", function!(core_version, 0))?;
    Ok(())
}
