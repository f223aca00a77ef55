//! `Config::from_source` over an arbitrary map of variable names (plain,
//! `THRUSTER_`-prefixed or unknown) to values, and the keyword layer of the
//! Ruby API (`Layered`) on top of it.
//!
//! Invariants: no panic; an error names the variable that won the lookup and
//! quotes its value; an accepted value is what the value parsers say it is.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use thruster_core::config::{
    normalize_domain, parse_bool, parse_int, parse_list, prefixed_lookup, setting_for_keyword,
    Config, ConfigError, Layered, RawSetting, SettingSource, SETTINGS,
};

struct Map(HashMap<String, String>);

impl SettingSource for Map {
    fn get(&self, name: &str) -> Option<RawSetting> {
        prefixed_lookup(name, |key| self.0.get(key).cloned())
    }
}

/// The error names the winning variable of some setting, with its value.
fn check_error(source: &dyn SettingSource, err: &ConfigError) {
    let winner = SETTINGS.iter().any(|setting| {
        source
            .get(setting.name)
            .is_some_and(|raw| raw.source_name == err.source_name && raw.value == err.value)
    });
    assert!(winner, "error does not name a winning setting: {err:?}");
    assert!(
        !err.value.is_empty(),
        "empty values count as unset: {err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&err.source_name),
        "message lacks the name: {text}"
    );
    assert!(
        text.contains(err.accepted),
        "message lacks what is accepted: {text}"
    );
}

/// Spot checks that accepted values are what the parsers say.
fn check_config(source: &dyn SettingSource, c: &Config) {
    let raw = |name: &str| source.get(name).map(|s| s.value);
    for (name, value) in [
        ("HTTP_PORT", c.http_port),
        ("HTTPS_PORT", c.https_port),
        ("TARGET_PORT", c.target_port),
    ] {
        if let Some(v) = raw(name) {
            assert_eq!(parse_int(&v), Some(i64::from(value)), "{name}={v:?}");
        }
    }
    assert!(c.target_port >= 1);
    for (name, value) in [
        ("X_SENDFILE_ENABLED", c.x_sendfile_enabled),
        ("GZIP_COMPRESSION_ENABLED", c.gzip_compression_enabled),
        ("REQUEST_BUFFERING", c.request_buffering),
        ("RESPONSE_BUFFERING", c.response_buffering),
        ("H2C_ENABLED", c.h2c_enabled),
        ("LOG_REQUESTS", c.log_requests),
        ("DEBUG", c.debug),
    ] {
        if let Some(v) = raw(name) {
            assert_eq!(parse_bool(&v), Some(value), "{name}={v:?}");
        }
    }
    match raw("TLS_DOMAIN") {
        // Each listed name normalised (IDNA, lower case, no trailing dot),
        // first occurrence kept; an invalid name would have been an error.
        Some(v) => {
            let mut expected: Vec<String> = Vec::new();
            for item in parse_list(&v) {
                let name = normalize_domain(&item).expect("accepted names are valid");
                if !expected.contains(&name) {
                    expected.push(name);
                }
            }
            assert_eq!(c.tls_domains, expected);
        }
        None => assert!(c.tls_domains.is_empty()),
    }
    if raw("FORWARD_HEADERS").is_none() {
        assert_eq!(c.forward_headers, !c.tls_enabled());
    }
    assert!(c.gzip_compression_jitter < 65534);
    assert!(c.max_request_body.is_none_or(|n| n > 0));
    if raw("X_SENDFILE_ROOTS").is_some() {
        assert!(!c.x_sendfile_roots.is_empty());
        assert!(c.x_sendfile_roots.iter().all(|r| r.is_absolute()));
    }
}

fn check_parsers(value: &str) {
    // parse_int: exactly an optional sign and ASCII digits, in i64 range.
    let digits = value.strip_prefix(['+', '-']).unwrap_or(value);
    let well_formed = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    match parse_int(value) {
        Some(n) => {
            assert!(well_formed, "parse_int accepted {value:?}");
            assert_eq!(value.parse::<i64>().ok(), Some(n));
        }
        None => assert!(!well_formed || value.parse::<i64>().is_err()),
    }
    if let Some(b) = parse_bool(value) {
        assert_eq!(parse_bool(if b { "true" } else { "false" }), Some(b));
    }
    for item in parse_list(value) {
        assert!(!item.is_empty() && !item.contains(',') && item.trim() == item);
    }
}

// Input: lines of `NAME=value` (the environment; any name) and
// `--keyword=value` (keyword arguments; any keyword).
fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut env = HashMap::new();
    let mut keywords = Vec::new();
    for line in text.lines() {
        let (name, value) = line.split_once('=').unwrap_or((line, ""));
        match name.strip_prefix("--") {
            Some(keyword) => keywords.push((keyword.to_string(), value.to_string())),
            None => {
                env.insert(name.to_string(), value.to_string());
            }
        }
        check_parsers(value);
    }
    let env = Map(env);
    match Config::from_source(&env) {
        Ok(c) => check_config(&env, &c),
        Err(e) => check_error(&env, &e),
    }

    let all_known = keywords
        .iter()
        .all(|(k, _)| setting_for_keyword(k).is_some());
    match Layered::new(keywords, &env) {
        Ok(layered) => {
            assert!(all_known, "an unknown keyword was accepted");
            match Config::from_source(&layered) {
                Ok(c) => check_config(&layered, &c),
                Err(e) => check_error(&layered, &e),
            }
        }
        Err(unknown) => {
            assert!(!all_known, "a known keyword was refused: {unknown}");
            assert!(setting_for_keyword(&unknown.0).is_none());
        }
    }
});
