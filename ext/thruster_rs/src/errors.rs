//! The Ruby exceptions the binding raises: `Thruster::ConfigError` for a
//! value that is not accepted, `Thruster::Error` for anything else.
//!
//! lib/thruster.rb defines both before it loads the extension, so they are
//! looked up once, when the extension loads, not on every error. Loaded on
//! its own (without lib/thruster.rb) the extension raises RuntimeError.

use std::borrow::Cow;

use magnus::value::Lazy;
use magnus::{Error, ExceptionClass, Module, RModule, Ruby};

static ERROR: Lazy<ExceptionClass> = Lazy::new(|ruby| thruster_class(ruby, "Error"));
static CONFIG_ERROR: Lazy<ExceptionClass> = Lazy::new(|ruby| thruster_class(ruby, "ConfigError"));

fn thruster_class(ruby: &Ruby, name: &str) -> ExceptionClass {
    ruby.class_object()
        .const_get::<_, RModule>("Thruster")
        .and_then(|m| m.const_get::<_, ExceptionClass>(name))
        .unwrap_or_else(|_| ruby.exception_runtime_error())
}

/// Resolves the classes while loading, where lib/thruster.rb has just
/// defined them.
pub fn init(ruby: &Ruby) {
    Lazy::force(&ERROR, ruby);
    Lazy::force(&CONFIG_ERROR, ruby);
}

pub fn config_error(ruby: &Ruby, message: impl Into<Cow<'static, str>>) -> Error {
    Error::new(ruby.get_inner(&CONFIG_ERROR), message)
}

pub fn error(ruby: &Ruby, message: impl Into<Cow<'static, str>>) -> Error {
    Error::new(ruby.get_inner(&ERROR), message)
}
