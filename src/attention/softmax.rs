//! The attention's softmax, one row of scores at a time (lever 17 in
//! `docs/PERFORMANCE.md`).
//!
//! [`exp_row`] writes `p_j = exp(s_j − max_k s_k)` over the row in place and returns
//! `Σ_j p_j`; the attention divides its output rows by that sum (`O = (P V) / Σ p`),
//! one division per output value instead of one per score.
//!
//! The exponential of `x ≤ 0`, sixteen lanes at a time (two AVX2 registers, one
//! AVX-512 register):
//!
//! ```text
//! n = round(x / ln 2),  r = x − n · ln 2     (|r| ≤ ln 2 / 2; ln 2 in two parts, the
//!                                            first exact in f32: Cody and Waite)
//! exp(r) ≈ 1 + r + r² · P(r)                 (P of degree 5, Cephes' expf)
//! exp(x) = exp(r) · 2ⁿ                       (2ⁿ written into the exponent bits)
//! ```
//!
//! Within 1 ulp of `exp` on `[−87, 0]` (tested). `x < −87` gives 0: down to −87 the
//! result is a normal f32 (`exp(−87) ≈ 1.6e−38`, the smallest normal ≈ 1.2e−38), and
//! next to the row's largest term, `exp(0) = 1`, anything smaller is nothing. A NaN
//! score makes the sum NaN, so the whole row's output is NaN, as the formula's would be.
//!
//! Every lane runs the same operations in the same order on every path with FMA
//! (AVX2, AVX-512), and the sixteen partial sums are added in a fixed order: the same
//! bits whatever the CPU's vector width, the row's alignment or the thread count.
//! The generic path (no FMA) rounds its products separately.

use super::tiles::{fma, Isa};

/// Lanes of the vectorised loops.
const LANES: usize = 16;
/// Below this, the exponential is 0 (module docs).
const LOWEST: f32 = -87.0;
/// `1 / ln 2`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `1.5 · 2²³`: adding it rounds a float of magnitude < 2²² to the nearest integer,
/// which then sits in the low bits of the sum.
const ROUNDER: f32 = 12_582_912.0;
/// `ln 2 = LN2_HI + LN2_LO`, `LN2_HI` with few enough bits that `n · LN2_HI` is exact.
const LN2_HI: f32 = 0.693_359_4;
/// The rest of `ln 2`.
const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes' expf polynomial, highest degree first (its last, 0.50000001201, is 0.5 in f32).
const P: [f32; 6] = [
    1.987_569_2e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Writes `exp(s_j − max s)` over `row` in place and returns their sum (module docs),
/// with the kernels of `isa`. An empty row sums to 0.
pub(super) fn exp_row(isa: Isa, row: &mut [f32]) -> f32 {
    match isa {
        // SAFETY: `Isa::detect` found the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { exp_row_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { exp_row_avx2(row) },
        Isa::Generic => exp_row_any::<false>(row),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn exp_row_avx512(row: &mut [f32]) -> f32 {
    exp_row_any::<true>(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_row_avx2(row: &mut [f32]) -> f32 {
    exp_row_any::<true>(row)
}

#[inline(always)]
fn exp_row_any<const FMA: bool>(row: &mut [f32]) -> f32 {
    let max = row_max(row);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, sum) in chunk.iter_mut().zip(&mut sums) {
            *x = exp_nonpositive::<FMA>(*x - max);
            *sum += *x;
        }
    }
    // The tail goes to the first lanes, as a longer row's next chunk would.
    for (x, sum) in chunks.into_remainder().iter_mut().zip(&mut sums) {
        *x = exp_nonpositive::<FMA>(*x - max);
        *sum += *x;
    }
    add_lanes(sums)
}

/// The row's largest value; NaNs are skipped here and poison the sum instead.
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (&x, m) in chunk.iter().zip(&mut maxes) {
            *m = if x > *m { x } else { *m };
        }
    }
    for (&x, m) in chunks.remainder().iter().zip(&mut maxes) {
        *m = if x > *m { x } else { *m };
    }
    maxes
        .into_iter()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// The sixteen lanes' sum, pairwise in a fixed order.
#[inline(always)]
fn add_lanes(mut v: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            v[i] += v[i + width];
        }
        width /= 2;
    }
    v[0]
}

/// `exp(x)` for `x ≤ 0` (module docs); NaN stays NaN.
#[inline(always)]
fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
    // A comparison, not `max`, so that NaN passes through.
    let low = x < LOWEST;
    let xc = if low { LOWEST } else { x };
    let t = fma::<FMA>(xc, LOG2_E, ROUNDER);
    let n = t - ROUNDER;
    let r = fma::<FMA>(n, -LN2_HI, xc);
    let r = fma::<FMA>(n, -LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = fma::<FMA>(p, r, *c);
    }
    let y = fma::<FMA>(p, r * r, r) + 1.0;
    // t's low bits hold n (−126 ≤ n ≤ 0 here); 2ⁿ's biased exponent is n + 127.
    let n_bits = t.to_bits().wrapping_sub(ROUNDER.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    if low {
        0.0
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::values;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = f64::from(f32::from_bits(b32.to_bits() + 1) - b32);
        (f64::from(a) - b).abs() / ulp
    }

    #[test]
    fn the_exponential_is_within_an_ulp_down_to_minus_87() {
        let isa = Isa::detect();
        let mut worst = 0f64;
        let mut x = 0f32;
        while x > LOWEST {
            // The row's largest value is 0: its second value is exp(x).
            let mut row = [0.0, x];
            exp_row(isa, &mut row);
            let got = [
                exp_nonpositive::<true>(x),
                exp_nonpositive::<false>(x),
                row[1],
            ];
            for g in got {
                worst = worst.max(ulps(g, f64::from(x).exp()));
            }
            x -= 0.000_731;
        }
        assert!(worst <= 1.0, "worst error {worst} ulps");
        assert_eq!(exp_nonpositive::<true>(0.0), 1.0);
        assert_eq!(exp_nonpositive::<true>(-87.5), 0.0);
        assert_eq!(exp_nonpositive::<true>(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive::<true>(f32::NAN).is_nan());
    }

    #[test]
    fn a_row_is_the_shifted_exponentials_and_their_sum() {
        let isa = Isa::detect();
        for len in [1, 5, 16, 17, 64, 70, 256] {
            let scores: Vec<f32> = values(len, 7).iter().map(|v| v * 20.0).collect();
            let mut row = scores.clone();
            let sum = exp_row(isa, &mut row);
            let max = scores.iter().copied().fold(f32::MIN, f32::max);
            let mut want_sum = 0f64;
            for (p, s) in row.iter().zip(&scores) {
                // Of the f32 difference, the one the kernel takes.
                let want = f64::from(s - max).exp();
                assert!(ulps(*p, want) <= 2.0, "exp({s} - {max}) = {p}, want {want}");
                want_sum += want;
            }
            assert!(
                (f64::from(sum) - want_sum).abs() <= 1e-6 * want_sum,
                "row of {len}: sum {sum}, want {want_sum}"
            );
        }
        assert_eq!(exp_row(isa, &mut []), 0.0);
    }

    #[test]
    fn a_row_gives_the_same_bits_wherever_it_lies() {
        let isa = Isa::detect();
        let scores: Vec<f32> = values(250, 3).iter().map(|v| v * 9.0).collect();
        let mut first = scores.clone();
        let sum = exp_row(isa, &mut first);
        for offset in 1..8 {
            let mut buffer = vec![0.0; offset];
            buffer.extend_from_slice(&scores);
            let moved = exp_row(isa, &mut buffer[offset..]);
            assert_eq!(moved.to_bits(), sum.to_bits(), "offset {offset}");
            assert!(buffer[offset..]
                .iter()
                .zip(&first)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn a_nan_score_makes_the_sum_nan() {
        let isa = Isa::detect();
        let mut row = values(40, 5);
        row[21] = f32::NAN;
        assert!(exp_row(isa, &mut row).is_nan());
        let mut row = values(40, 5);
        row[3] = f32::INFINITY;
        assert!(exp_row(isa, &mut row).is_nan());
    }
}
