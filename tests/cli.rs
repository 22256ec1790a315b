//! The `esddpm` command line on the random-weight test models.

use std::path::PathBuf;
use std::process::Command;

fn tiny() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/models/tiny")
        .display()
        .to_string()
}

fn esddpm(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_esddpm"))
        .args(args)
        .output()
        .expect("run esddpm");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_is_reproducible_and_reports_the_seed() {
    let tiny = tiny();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    let prior = dir.path().join("prior.png");
    for (out, extra) in [
        (&a, vec!["--prior-out", prior.to_str().unwrap()]),
        (&b, vec![]),
    ] {
        let mut args = vec![
            "generate",
            "--model",
            &tiny,
            "--seed",
            "5",
            "--batch",
            "3",
            "--start",
            "10",
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let (ok, stdout, stderr) = esddpm(&args);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("seed: 5"), "{stdout}");
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(prior.is_file());
    assert_ne!(std::fs::read(&a).unwrap(), std::fs::read(&prior).unwrap());
    // A negative seed picks one and reports it.
    let c = dir.path().join("c.png");
    let (ok, stdout, _) = esddpm(&[
        "generate",
        "--model",
        &tiny,
        "--seed",
        "-1",
        "--batch",
        "1",
        "--start",
        "5",
        "--out",
        c.to_str().unwrap(),
    ]);
    assert!(ok);
    let seed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("seed: "))
        .expect("seed line")
        .trim()
        .parse()
        .unwrap();
    let d = dir.path().join("d.png");
    let seed_s = seed.to_string();
    let (ok, _, _) = esddpm(&[
        "generate",
        "--model",
        &tiny,
        "--seed",
        &seed_s,
        "--batch",
        "1",
        "--start",
        "5",
        "--out",
        d.to_str().unwrap(),
    ]);
    assert!(ok);
    assert_eq!(std::fs::read(&c).unwrap(), std::fs::read(&d).unwrap());
}

#[test]
fn img2img_inpaint_interpolate_and_info() {
    let tiny = tiny();
    let dir = tempfile::tempdir().unwrap();
    let g = dir.path().join("g.png");
    let (ok, _, e) = esddpm(&[
        "generate",
        "--model",
        &tiny,
        "--seed",
        "1",
        "--batch",
        "1",
        "--start",
        "5",
        "--out",
        g.to_str().unwrap(),
    ]);
    assert!(ok, "{e}");
    // The 1-image grid has a 2-pixel border; make a 16x16 input from scratch instead.
    let init = dir.path().join("init.png");
    let mask = dir.path().join("mask.png");
    for (path, f) in [(&init, 0usize), (&mask, 1)] {
        let file = std::fs::File::create(path).unwrap();
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), 16, 16);
        enc.set_color(png::ColorType::Grayscale);
        let px: Vec<u8> = (0..256)
            .map(|i| {
                if f == 0 {
                    (i % 16 * 16) as u8
                } else if i < 128 {
                    0
                } else {
                    255
                }
            })
            .collect();
        enc.write_header().unwrap().write_image_data(&px).unwrap();
    }
    let out = dir.path().join("o.png");
    let o = out.to_str().unwrap();
    for args in [
        vec![
            "img2img",
            "--model",
            &tiny,
            "--seed",
            "1",
            "--batch",
            "2",
            "--init",
            init.to_str().unwrap(),
            "--strength",
            "0.1",
            "--sampler",
            "ddim",
            "--steps",
            "20",
            "--out",
            o,
        ],
        vec![
            "inpaint",
            "--model",
            &tiny,
            "--seed",
            "1",
            "--batch",
            "2",
            "--init",
            init.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--start",
            "10",
            "--out",
            o,
        ],
        vec![
            "interpolate",
            "--model",
            &tiny,
            "--seed",
            "1",
            "--seed-b",
            "2",
            "--frames",
            "3",
            "--start",
            "5",
            "--out",
            o,
        ],
    ] {
        let (ok, stdout, stderr) = esddpm(&args);
        assert!(ok, "{args:?}: {stderr}");
        assert!(stdout.contains("wrote"), "{stdout}");
    }
    let (ok, stdout, _) = esddpm(&["info", "--model", &tiny]);
    assert!(ok);
    assert!(
        stdout.contains("prior mlp (default)") && stdout.contains("1000 steps"),
        "{stdout}"
    );
    // Errors are reported, not panics.
    let (ok, _, stderr) = esddpm(&["generate", "--model", "/nonexistent", "--out", o]);
    assert!(!ok && stderr.contains("error:"), "{stderr}");
    let (ok, _, stderr) = esddpm(&[
        "img2img",
        "--model",
        &tiny,
        "--init",
        g.to_str().unwrap(),
        "--out",
        o,
    ]);
    assert!(!ok && stderr.contains("the model needs 16x16"), "{stderr}");
}

#[test]
fn eval_lists_its_rows_and_rejects_bad_ones() {
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/fashion");
    let shipped = shipped.to_str().unwrap();
    let (ok, out, err) = esddpm(&["eval", "--model", shipped, "--list"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 23, "{out}");
    assert!(
        out.contains("ddpm-1000") && out.contains("1000 U-Net calls"),
        "{out}"
    );
    assert!(
        out.contains("es-vae-ddim10-300") && out.contains("10 U-Net calls"),
        "{out}"
    );
    let (ok, _, err) = esddpm(&["eval", "--model", shipped, "--rows", "nope", "--list"]);
    assert!(!ok && err.contains("no row \"nope\""), "{err}");
    // A data folder without Fashion-MNIST is an error naming the file.
    let empty = tempfile::tempdir().unwrap();
    let (ok, _, err) = esddpm(&[
        "eval",
        "--model",
        shipped,
        "--data",
        empty.path().to_str().unwrap(),
        "--n",
        "4",
        "--rows",
        "gan",
        "--no-cache",
    ]);
    assert!(!ok && err.contains("t10k-images-idx3-ubyte"), "{err}");
}
