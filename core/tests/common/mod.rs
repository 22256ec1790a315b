//! Helpers shared by the integration tests: loading the reference vectors that
//! `tools/reference/make_core_vectors.py` generates with diffusers.
#![allow(dead_code)]

use serde_json::Value;
use std::path::PathBuf;

/// Parses `core/tests/data/<name>`.
pub fn load(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON in {name}: {e}"))
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Values that the generator made exactly f32-representable.
pub fn f32s(v: &Value) -> Vec<f32> {
    f64s(v)
        .into_iter()
        .map(|x| {
            let f = x as f32;
            assert_eq!(f64::from(f), x, "reference input {x} is not an f32 value");
            f
        })
        .collect()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("integer") as u32)
        .collect()
}

pub fn usize_of(v: &Value) -> usize {
    v.as_u64().expect("integer") as usize
}

/// Normwise relative error `max |a - b| / max(1, max |b|)` of an f32 result against an
/// f64 reference. The floor of 1 keeps values near 0 from inflating the ratio.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((f64::from(*x) - y).abs()));
    diff / scale
}

/// Elementwise relative error of f64 values, `|a - b| <= tol * |b|` (exact 0 must match
/// within `tol` absolutely).
pub fn assert_close_f64(a: f64, b: f64, tol: f64, what: &str) {
    let ok = if b == 0.0 {
        a.abs() <= tol
    } else {
        ((a - b) / b).abs() <= tol
    };
    assert!(
        ok,
        "{what}: got {a:e}, reference {b:e}, relative tolerance {tol:e}"
    );
}
