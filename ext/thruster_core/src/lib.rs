//! thruster-rs core: a zero-config HTTP proxy for Rack app servers.
//!
//! Pure Rust, no Ruby symbols: the `thrust` wrapper binary and the Ruby
//! extension both drive it through [`server::Server`].

pub mod config;
pub mod conn;
pub mod files;
pub mod http;
pub mod log;
pub mod metrics;
pub mod pipeline;
pub mod server;
pub mod sys;
pub mod tls;
pub mod upstream;

pub use config::{Config, ConfigError};
pub use server::{Server, ServerError, ServerOptions};

/// The version shared by the gem, the extension and the `thrust` binary.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
