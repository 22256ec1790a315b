//! Fréchet distance between two sets of feature vectors (FID when the features are a
//! classifier's penultimate activations):
//!
//! ```text
//! FID = |mu_1 - mu_2|^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^(1/2))
//! ```
//!
//! with unbiased sample covariances. `Tr((S_1 S_2)^(1/2))` is computed as
//! `Tr((S_1^(1/2) S_2 S_1^(1/2))^(1/2))`, the same value from two symmetric
//! eigen-decompositions (no general matrix square root needed), in f64.

use crate::error::{Error, Result};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Mean and unbiased covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureStats {
    /// The mean vector.
    pub mean: DVector<f64>,
    /// The covariance matrix (divided by `n - 1`).
    pub cov: DMatrix<f64>,
    /// Number of vectors.
    pub count: usize,
}

impl FeatureStats {
    /// Statistics of `features`, `count` rows of `dim` values each (row-major).
    pub fn new(features: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || features.is_empty() || !features.len().is_multiple_of(dim) {
            return Err(Error::InvalidParameter {
                name: "features",
                message: format!("{} values do not form rows of {dim}", features.len()),
            });
        }
        let n = features.len() / dim;
        if n < 2 {
            return Err(Error::InvalidParameter {
                name: "features",
                message: "need at least two feature vectors".into(),
            });
        }
        let x = DMatrix::from_row_slice(n, dim, features).map(f64::from);
        let mean = x.row_mean().transpose();
        let mut centered = x;
        for mut row in centered.row_iter_mut() {
            row -= mean.transpose();
        }
        let cov = centered.transpose() * &centered / (n as f64 - 1.0);
        Ok(Self {
            mean,
            cov,
            count: n,
        })
    }
}

/// Square root of a symmetric positive semi-definite matrix (negative eigenvalues from
/// rounding are clamped to 0).
fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(m.clone());
    let roots = eig.eigenvalues.map(|v| v.max(0.0).sqrt());
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

/// The Fréchet distance between two feature distributions.
pub fn frechet_distance(a: &FeatureStats, b: &FeatureStats) -> Result<f64> {
    if a.mean.len() != b.mean.len() {
        return Err(Error::InvalidParameter {
            name: "features",
            message: format!("dimensions differ: {} and {}", a.mean.len(), b.mean.len()),
        });
    }
    let diff = &a.mean - &b.mean;
    let s1h = sqrt_psd(&a.cov);
    let mut m = &s1h * &b.cov * &s1h;
    // Symmetrise against rounding before the eigen-decomposition.
    m = (&m + m.transpose()) * 0.5;
    let tr_covmean: f64 = SymmetricEigen::new(m)
        .eigenvalues
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum();
    Ok(diff.dot(&diff) + a.cov.trace() + b.cov.trace() - 2.0 * tr_covmean)
}
