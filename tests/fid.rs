//! The Fréchet distance against numpy + scipy.linalg.sqrtm
//! (`tools/reference/make_fid_vectors.py` -> `tests/data/fid.json`).

use esddpm::fid::{frechet_distance, FeatureStats};

#[test]
fn frechet_distance_matches_scipy() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/fid.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    let floats = |x: &serde_json::Value| -> Vec<f32> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_f64().unwrap() as f32)
            .collect()
    };
    for c in cases {
        let dim = c["dim"].as_u64().unwrap() as usize;
        let a = FeatureStats::new(&floats(&c["a"]), dim).unwrap();
        let b = FeatureStats::new(&floats(&c["b"]), dim).unwrap();
        let expect = c["fid"].as_f64().unwrap();
        let got = frechet_distance(&a, &b).unwrap();
        assert!(
            (got - expect).abs() <= 1e-6 * expect.abs().max(1.0),
            "FID {got} vs scipy {expect}"
        );
        let same = frechet_distance(&a, &a).unwrap();
        assert!(same.abs() < 1e-6, "FID of a set with itself: {same}");
        assert!((same - c["fid_same"].as_f64().unwrap()).abs() < 1e-6);
    }
    assert!(FeatureStats::new(&[1.0, 2.0, 3.0], 2).is_err());
    assert!(FeatureStats::new(&[1.0, 2.0], 2).is_err());
}
