//! Input format shared by the fuzz targets: text lines of `name: value`,
//! like an HTTP header block, so seeds are readable and the fuzzer mutates
//! realistic field values. Any bytes are a valid input.

/// `name: value` lines (`\n` or `\r\n`). The name is lower-cased; one space
/// after the colon is dropped; a line without a colon is a name with an
/// empty value.
pub fn fields(data: &[u8]) -> Vec<(String, &[u8])> {
    data.split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = match line.iter().position(|&b| b == b':') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => (line, &[][..]),
            };
            let value = value.strip_prefix(b" ").unwrap_or(value);
            let name = String::from_utf8_lossy(name.trim_ascii()).to_ascii_lowercase();
            (name, value)
        })
        .collect()
}

/// The values of every `name` line.
pub fn values<'a>(fields: &[(String, &'a [u8])], name: &str) -> Vec<&'a [u8]> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .collect()
}

/// The last `name` line's value.
pub fn value<'a>(fields: &[(String, &'a [u8])], name: &str) -> Option<&'a [u8]> {
    values(fields, name).pop()
}

/// The leading decimal digits of a value, saturating; 0 without any.
pub fn number(value: &[u8]) -> u64 {
    value
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |n, &d| {
            n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
        })
}

/// A header map of the `(field, header)` pairs present, lines that are not
/// valid header values skipped.
pub fn headers(fields: &[(String, &[u8])], names: &[(&str, http::HeaderName)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in fields {
        let Some((_, header)) = names.iter().find(|(n, _)| n == name) else {
            continue;
        };
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            map.append(header.clone(), value);
        }
    }
    map
}
