//! Builds the C test program (`tests/c/api_test.c`) and the C/C++ examples against
//! libesddpm with the system compiler, runs them on the shipped models, and checks
//! that the C API's bytes equal the Rust API's; checks the header itself (C99 and
//! C++17 with -Wall -Wextra -Werror, double include, version macros vs Cargo.toml).
//!
//! Sanitizer runs (AddressSanitizer + UBSan, Valgrind) are in `.ci/run`, through
//! `ffi/tests/sanitize.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The folder of the built libraries: `target/<profile>/`, found from this test's path
/// (`target/<profile>/deps/c_api-*`).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Makes sure libesddpm.a / .so are built and fresh (cargo builds only the rlib-less
/// crate's test harness for `cargo test`).
fn build_libs() -> PathBuf {
    let dir = lib_dir();
    let profile = dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug")
        .to_string();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-p", "esddpm-ffi"]).current_dir(root());
    if profile == "release" {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build -p esddpm-ffi failed");
    assert!(
        dir.join("libesddpm.a").is_file(),
        "no libesddpm.a in {}",
        dir.display()
    );
    dir
}

/// The system libraries a Rust staticlib needs on Linux.
const STATIC_LIBS: &[&str] = &[
    "-lpthread",
    "-ldl",
    "-lm",
    "-lrt",
    "-lutil",
    "-lgcc_s",
    "-lc",
];

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn compile_c(src: &Path, exe: &Path, lib: &Path, shared: bool) {
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(src)
        .arg("-o")
        .arg(exe);
    if shared {
        cmd.arg(format!("-L{}", lib.display()))
            .arg("-lesddpm")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
    } else {
        cmd.arg(lib.join("libesddpm.a"));
    }
    cmd.args(STATIC_LIBS);
    run(&mut cmd);
}

fn models() -> PathBuf {
    root().join("models/fashion")
}

/// The Rust API's bytes for the C test's fixed generation.
fn rust_bytes() -> Vec<u8> {
    use esddpm_runtime::*;
    let p = Pipeline::from_folder(
        models(),
        &LoadOptions {
            threads: Some(1),
            ..Default::default()
        },
    )
    .unwrap();
    let images = p
        .generate(&GenerateOptions {
            seed: 42,
            batch: 2,
            start: Start::EarlyStop { t_prime: Some(100) },
            sampler: SamplerChoice::Ddim { eta: 0.0 },
            steps: Some(3),
            ..Default::default()
        })
        .unwrap();
    (0..images.len()).flat_map(|i| images.to_u8(i)).collect()
}

#[test]
fn c_test_program_passes_static_and_shared_and_matches_rust() {
    let lib = build_libs();
    let tmp = tempfile::tempdir().unwrap();
    let src = root().join("ffi/tests/c/api_test.c");
    let expect = rust_bytes();
    for shared in [false, true] {
        let exe = tmp
            .path()
            .join(if shared { "api_shared" } else { "api_static" });
        compile_c(&src, &exe, &lib, shared);
        let out_file = tmp.path().join("bytes.bin");
        let text = run(Command::new(&exe).arg(models()).arg(&out_file));
        assert!(text.contains(" 0 failures"), "{text}");
        let got = std::fs::read(&out_file).unwrap();
        assert_eq!(got, expect, "the C API's bytes differ from the Rust API's");
    }
}

#[test]
fn header_compiles_alone_as_c99_and_cpp17_and_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let inc = root().join("include");
    let src_c = tmp.path().join("h.c");
    std::fs::write(
        &src_c,
        "#include \"esddpm.h\"\n#include \"esddpm.h\"\nint main(void) { return ESD_VERSION > 0 ? 0 : 1; }\n",
    )
    .unwrap();
    let src_cpp = tmp.path().join("h.cpp");
    std::fs::copy(&src_c, &src_cpp).unwrap();
    for (compiler, std, src) in [("cc", "-std=c99", &src_c), ("c++", "-std=c++17", &src_cpp)] {
        run(Command::new(compiler)
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
                "-I",
            ])
            .arg(&inc)
            .arg(src));
    }
}

#[test]
fn header_version_macros_match_cargo_toml() {
    let toml = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let version = toml
        .lines()
        .skip_while(|l| l.trim() != "[workspace.package]")
        .find_map(|l| l.trim().strip_prefix("version = "))
        .expect("workspace version")
        .trim_matches('"')
        .to_string();
    let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap()).collect();
    let header = std::fs::read_to_string(root().join("include/esddpm.h")).unwrap();
    let mac = |name: &str| {
        header
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("no {name}"))
            .trim()
            .to_string()
    };
    assert_eq!(mac("ESD_VERSION_MAJOR"), parts[0].to_string());
    assert_eq!(mac("ESD_VERSION_MINOR"), parts[1].to_string());
    assert_eq!(mac("ESD_VERSION_PATCH"), parts[2].to_string());
    assert_eq!(mac("ESD_VERSION_STRING"), format!("\"{version}\""));
    // The computed macro, evaluated by the C compiler.
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("v.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include \"esddpm.h\"\nint main(void) { printf(\"%d\", ESD_VERSION); return 0; }\n",
    )
    .unwrap();
    let exe = tmp.path().join("v");
    run(Command::new("cc")
        .arg("-I")
        .arg(root().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe));
    let printed = run(&mut Command::new(&exe));
    assert_eq!(
        printed,
        (parts[0] * 10000 + parts[1] * 100 + parts[2]).to_string()
    );
}

#[test]
fn examples_build_and_run_and_pkg_config_works() {
    let lib = build_libs();
    let tmp = tempfile::tempdir().unwrap();
    // Install with the pkg-config file, then build the C example through pkg-config.
    let prefix = tmp.path().join("prefix");
    run(Command::new(root().join("ffi/install.sh"))
        .arg(&prefix)
        .arg(&lib));
    let pc = prefix.join("lib/pkgconfig");
    let flags = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", &pc)
        .args(["--cflags", "--libs", "--static", "esddpm"]));
    let version = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", &pc)
        .args(["--modversion", "esddpm"]));
    assert_eq!(version.trim(), env!("CARGO_PKG_VERSION"));
    let exe = tmp.path().join("generate");
    let mut cc = Command::new("cc");
    cc.args(["-std=c99", "-Wall", "-Wextra", "-Werror"])
        .arg(root().join("examples/c/generate.c"))
        .arg("-o")
        .arg(&exe)
        .arg("-static-libgcc");
    // pkg-config's -lesddpm would pick the .so; link the archive explicitly instead.
    for f in flags.split_whitespace().filter(|f| *f != "-lesddpm") {
        cc.arg(f);
    }
    cc.arg(prefix.join("lib/libesddpm.a"));
    cc.args(STATIC_LIBS);
    run(&mut cc);
    let pgm = tmp.path().join("out.pgm");
    let text = run(Command::new(&exe).arg(models()).arg(&pgm).arg("3"));
    assert!(text.contains("16 images, seed 3"), "{text}");
    let bytes = std::fs::read(&pgm).unwrap();
    assert!(bytes.starts_with(b"P5\n256 64\n255\n"));
    assert_eq!(bytes.len(), "P5\n256 64\n255\n".len() + 256 * 64);

    // The C++ session example, with the RAII wrapper.
    let exe = tmp.path().join("session");
    run(Command::new("c++")
        .args(["-std=c++17", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root().join("include"))
        .arg(root().join("examples/cpp/session.cpp"))
        .arg("-o")
        .arg(&exe)
        .arg(lib.join("libesddpm.a"))
        .args(STATIC_LIBS));
    let pgm = tmp.path().join("s.pgm");
    let text = run(Command::new(&exe).arg(models()).arg(&pgm).arg("5"));
    assert!(text.contains("frame 10: step 10/10"), "{text}");
    assert!(text.contains("seed 5, 10 frames"), "{text}");
    assert!(std::fs::read(&pgm)
        .unwrap()
        .starts_with(b"P5\n128 32\n255\n"));
}
