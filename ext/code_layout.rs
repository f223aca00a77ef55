//! The build script of both front ends (`build = "../code_layout.rs"` in
//! `ext/thruster_rs` and `ext/thrust`): links the extension and the `thrust`
//! executable with `ext/code_layout.ld`, which gathers the code the proxy
//! runs once started into one place (see that file and
//! `bench/code_layout.rb`).

fn main() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../code_layout.ld");
    println!("cargo:rerun-if-changed={script}");
    println!("cargo:rerun-if-env-changed=THRUSTER_NO_CODE_LAYOUT");
    // Linux only (an ELF linker script); it needs a linker that takes
    // `INSERT` (GNU ld and lld, the defaults): not gold or mold, so not
    // when RUSTFLAGS name them, and THRUSTER_NO_CODE_LAYOUT=1 builds
    // without it for any other.
    let linux = std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let other_linker = flags.contains("gold") || flags.contains("mold");
    if linux
        && !other_linker
        && std::env::var_os("THRUSTER_NO_CODE_LAYOUT").is_none()
        && std::path::Path::new(script).exists()
    {
        // Each package has one linked target (the extension's cdylib, the
        // `thrust` bin), which this link argument reaches.
        println!("cargo:rustc-link-arg=-Wl,-T,{script}");
    }
}
