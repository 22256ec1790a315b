//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)]

use serde_json::Value;

/// A JSON list of numbers as f32.
pub fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON list")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// The largest absolute difference of two equally long slices.
pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}
