//! Generates the C header with cbindgen (settings in cbindgen.toml) plus the version
//! macros, into OUT_DIR/esddpm.h; the `header_is_fresh` test compares it with the
//! committed include/esddpm.h. `ESD_WRITE_HEADER=1 cargo build -p esddpm-ffi` also
//! writes include/esddpm.h.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=ESD_WRITE_HEADER");
    let mut config =
        cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("ffi/cbindgen.toml");
    let v = |k: &str| std::env::var(k).expect("cargo sets the version");
    let (major, minor, patch) = (
        v("CARGO_PKG_VERSION_MAJOR"),
        v("CARGO_PKG_VERSION_MINOR"),
        v("CARGO_PKG_VERSION_PATCH"),
    );
    config.after_includes = Some(format!(
        "\n/* The version of this header; esd_version() gives the library's. */\n\
         #define ESD_VERSION_MAJOR {major}\n\
         #define ESD_VERSION_MINOR {minor}\n\
         #define ESD_VERSION_PATCH {patch}\n\
         #define ESD_VERSION_STRING \"{}\"\n\
         #define ESD_MAKE_VERSION(major, minor, patch) (((major) * 10000) + ((minor) * 100) + (patch))\n\
         #define ESD_VERSION ESD_MAKE_VERSION(ESD_VERSION_MAJOR, ESD_VERSION_MINOR, ESD_VERSION_PATCH)\n",
        v("CARGO_PKG_VERSION")
    ));
    let bindings = cbindgen::Builder::new()
        .with_crate(&dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it")).join("esddpm.h");
    bindings.write_to_file(&out);
    if std::env::var_os("ESD_WRITE_HEADER").is_some_and(|v| v == "1") {
        bindings.write_to_file(dir.join("../include/esddpm.h"));
    }
}
