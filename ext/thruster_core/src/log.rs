//! JSON-lines logging to stdout in Thruster's shape:
//! `{"time":"…","level":"INFO","msg":"…", <fields in order>}`.
//!
//! Each line is written with one `write_all` on a locked stdout so lines never
//! interleave with each other, and rarely with the child's own output that
//! shares the stream.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde_json::Value;

static DEBUG: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    /// Service degraded but correct (a cache tier turned off, a disk full).
    Warn,
    Error,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

/// `DEBUG=1` turns on debug lines for the whole process.
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level != Level::Debug || DEBUG.load(Ordering::Relaxed)
}

/// Renders one log line (with its trailing newline).
pub fn format_line(level: Level, msg: &str, fields: &[(&str, Value)]) -> String {
    let mut line = String::with_capacity(128);
    line.push_str("{\"time\":\"");
    line.push_str(&humantime::format_rfc3339_nanos(SystemTime::now()).to_string());
    line.push_str("\",\"level\":\"");
    line.push_str(level.as_str());
    line.push_str("\",\"msg\":");
    push_json(&mut line, &Value::from(msg));
    for (key, value) in fields {
        line.push(',');
        push_json(&mut line, &Value::from(*key));
        line.push(':');
        push_json(&mut line, value);
    }
    line.push_str("}\n");
    line
}

fn push_json(out: &mut String, value: &Value) {
    // Serialising a Value into a String cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_default());
}

pub fn log(level: Level, msg: &str, fields: &[(&str, Value)]) {
    if !enabled(level) {
        return;
    }
    let line = format_line(level, msg, fields);
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the proxy down.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

pub fn info(msg: &str, fields: &[(&str, Value)]) {
    log(Level::Info, msg, fields)
}

pub fn warn(msg: &str, fields: &[(&str, Value)]) {
    log(Level::Warn, msg, fields)
}

pub fn error(msg: &str, fields: &[(&str, Value)]) {
    log(Level::Error, msg, fields)
}

pub fn debug(msg: &str, fields: &[(&str, Value)]) {
    log(Level::Debug, msg, fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_is_json_with_thrusters_leading_keys_in_order() {
        let line = format_line(
            Level::Info,
            "Server started",
            &[("http", Value::from(":80")), ("n", Value::from(3))],
        );
        assert!(line.ends_with("}\n"));
        let parsed: serde_json::Map<String, Value> = serde_json::from_str(&line).unwrap();
        let keys: Vec<&str> = parsed.keys().map(String::as_str).collect();
        // serde_json's Map is ordered by key unless preserve_order; check the raw text.
        assert_eq!(keys.len(), 5);
        let t = line.find("\"time\"").unwrap();
        let l = line.find("\"level\"").unwrap();
        let m = line.find("\"msg\"").unwrap();
        let h = line.find("\"http\"").unwrap();
        assert!(t < l && l < m && m < h);
        assert_eq!(parsed["level"], "INFO");
        assert_eq!(parsed["msg"], "Server started");
        assert_eq!(parsed["n"], 3);
        assert!(humantime::parse_rfc3339(parsed["time"].as_str().unwrap()).is_ok());
    }

    #[test]
    fn strings_are_escaped() {
        let line = format_line(
            Level::Error,
            "a \"quoted\"\nmsg",
            &[("p", Value::from("\\"))],
        );
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["msg"], "a \"quoted\"\nmsg");
        assert_eq!(parsed["p"], "\\");
    }
}
