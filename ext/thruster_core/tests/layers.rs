//! The layer rule of ARCHITECTURE.md, checked on the source: a module may
//! use its own submodules and modules of a lower layer, never one of its
//! own layer or above.
//!
//! ```text
//! server ─► tls, pipeline ─► files, upstream ─► { conn, config ─► http, sys ─► log }
//! ```
//!
//! It reads every `crate::…` path (grouped `use crate::{a, b}` included)
//! and every `super::` chain that climbs out of its top-level module.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules and their layer (higher may use lower). A new module
/// must be placed here, or this test fails.
const LAYERS: &[(&str, u8)] = &[
    ("log", 0),
    ("metrics", 0),
    ("http", 1),
    ("sys", 1),
    ("config", 2),
    ("conn", 2),
    ("files", 3),
    ("upstream", 3),
    ("pipeline", 4),
    ("tls", 4),
    ("server", 5),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/pipeline/cache/mod.rs` is
/// `[pipeline, cache]`, `src/pipeline/proxy.rs` is `[pipeline, proxy]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// Source text without comments, so a path named in prose is not a use.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let (mut in_string, mut block_depth) = (false, 0u32);
    while let Some(c) = chars.next() {
        if block_depth > 0 {
            if c == '*' && chars.peek() == Some(&'/') {
                chars.next();
                block_depth -= 1;
            } else if c == '/' && chars.peek() == Some(&'*') {
                chars.next();
                block_depth += 1;
            }
            continue;
        }
        if in_string {
            if c == '\\' {
                chars.next();
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                block_depth = 1;
            }
            // A char literal such as '"' must not open a string.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with("\"'") || rest.starts_with("\\\"") {
                    chars.next();
                }
                out.push(c);
            }
            _ => out.push(c),
        }
    }
    out
}

fn ident_at(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// Top-level modules a file's code refers to (besides its own).
fn references(module: &[String], code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c}`: the first segment of each top-level item.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        found.insert(ident_at(&group[i..]).to_string());
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident_at(rest).to_string());
        }
    }
    for (at, _) in code.match_indices("super::") {
        // Only the start of a chain: `super::super::x` counts once.
        if code[..at].ends_with("super::") {
            continue;
        }
        let mut rest = &code[at..];
        let mut up = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            up += 1;
            rest = r;
        }
        // A `mod tests` block inside a file is one level below the file.
        let depth = module.len();
        if up >= depth {
            found.insert(ident_at(rest).to_string());
        }
    }
    found.retain(|m| !m.is_empty() && m != &module[0] && m != "self");
    found
}

#[test]
fn no_module_uses_its_own_layer_or_a_higher_one() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut unplaced = BTreeSet::new();
    for file in &files {
        let module = module_path(&src, file);
        let Some(top) = module.first() else { continue };
        let Some(own) = layer(top) else {
            unplaced.insert(top.clone());
            continue;
        };
        let code = code_only(&std::fs::read_to_string(file).expect("readable source"));
        for used in references(&module, &code) {
            match layer(&used) {
                Some(l) if l < own => {}
                Some(_) => violations.push(format!(
                    "{} ({top}, layer {own}) uses {used} (layer {})",
                    file.strip_prefix(&src).unwrap().display(),
                    layer(&used).unwrap()
                )),
                // Not a module of ours (an item re-exported at the root, a
                // macro): nothing to check.
                None => {}
            }
        }
    }
    assert!(
        unplaced.is_empty(),
        "top-level modules without a layer in tests/layers.rs: {unplaced:?}"
    );
    assert!(
        violations.is_empty(),
        "imports against the layer rule (see ARCHITECTURE.md):\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_plain_and_super_paths() {
    let module = vec!["files".to_string(), "body".to_string()];
    let code = code_only(
        "use crate::{server::conn_io::ConnState, log};\n\
         // use crate::tls::x;\n\
         let x = crate::pipeline::full_body(1);\n\
         type E = super::super::upstream::X;\n\
         use super::range;\n\
         let s = \"crate::config\";",
    );
    let found = references(&module, &code);
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["log", "pipeline", "server", "upstream"]
    );
}
