//! Generates `include/webpubsub_client.h` from `src/ffi/` with cbindgen.
//!
//! The header is rewritten only when its content changed, so builds do not touch
//! the committed file needlessly. With `WPS_CHECK_HEADER=1` the build fails instead
//! of rewriting a stale header (used by `tests/c/run.sh` to check the committed copy).

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let header = crate_dir.join("include").join("webpubsub_client.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=include/webpubsub_client.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=WPS_CHECK_HEADER");

    let mut config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("read cbindgen.toml");
    let version = env::var("CARGO_PKG_VERSION").expect("CARGO_PKG_VERSION");
    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("major");
    let minor = env::var("CARGO_PKG_VERSION_MINOR").expect("minor");
    let patch = env::var("CARGO_PKG_VERSION_PATCH").expect("patch");
    config.after_includes = Some(format!(
        "\n/** Version of this header; `wps_version()` returns the library's. */\n\
         #define WPS_VERSION \"{version}\"\n\
         #define WPS_VERSION_MAJOR {major}\n\
         #define WPS_VERSION_MINOR {minor}\n\
         #define WPS_VERSION_PATCH {patch}\n"
    ));

    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed to generate the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);

    let current = fs::read(&header).unwrap_or_default();
    if current == generated {
        return;
    }
    if env::var_os("WPS_CHECK_HEADER").is_some_and(|v| v == "1") {
        panic!(
            "{} differs from the generated header: build without WPS_CHECK_HEADER and commit it",
            header.display()
        );
    }
    fs::create_dir_all(header.parent().expect("include dir")).expect("create include/");
    fs::write(&header, generated).expect("write the header");
}
