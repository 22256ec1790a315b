//! Winograd convolutions, F(2 × 2, 3 × 3), for the large 3 × 3 convolutions (issue 6,
//! lever 18 in `docs/PERFORMANCE.md`).
//!
//! tract runs a 3 × 3 convolution as a matrix product over an im2col of its input: 9
//! multiply-adds per output, input channel and output channel. Winograd's minimal
//! filtering computes each 2 × 2 block of outputs from the 4 × 4 block of (zero-padded)
//! input around it with 16 (Lavin and Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016):
//!
//! ```text
//! Y = Aᵀ [ Σ_c (G g_oc Gᵀ) ⊙ (Bᵀ d_c B) ] A
//!
//!       ⎡1  0 -1  0⎤        ⎡ 1    0    0 ⎤
//! Bᵀ =  ⎢0  1  1  0⎥    G = ⎢1/2  1/2  1/2⎥    Aᵀ = ⎡1  1  1  0⎤
//!       ⎢0 -1  1  0⎥        ⎢1/2 -1/2  1/2⎥         ⎣0  1 -1 -1⎦
//!       ⎣0  1  0 -1⎦        ⎣ 0    0    1 ⎦
//! ```
//!
//! with `g_oc` the 3 × 3 kernel from input channel `c` to output channel `o` and `d_c`
//! the input block of channel `c`. So a convolution becomes three passes:
//!
//! 1. the input transform `V_ξ[c][t] = (Bᵀ d_c,t B)_ξ` of every 2 × 2 tile `t` of the
//!    output, for the 16 positions `ξ` of a 4 × 4 block;
//! 2. 16 matrix products `M_ξ = U_ξ V_ξ`, `U_ξ[o][c] = (G g_oc Gᵀ)_ξ` transformed once
//!    at load time: 16 multiply-adds per tile, output and input channel, where the
//!    im2col product has 36, so 2.25x fewer;
//! 3. the output transform `Y = Aᵀ M A + b` per tile and output channel.
//!
//! The products run in an AVX2 register tile of 6 output channels × 16 tiles, summing
//! over the input channels in order with FMA from zero; the transforms are fixed sums.
//! The result is the same bit for bit whatever the thread count (the passes are split
//! by input channels, positions and output channels, each element computed alike); it
//! differs from tract's by the transforms' rounding (tested within 1e-5 of the
//! outputs' scale).
//!
//! [`use_winograd`] swaps it in at load time: f32, NCHW, one group, a 3 × 3 kernel,
//! stride and dilation 1, one zero row and column of padding on every side, an even
//! output of [`MIN_PIXELS`] (32 × 32) or more, 32 input channels or more, constant
//! weights, a constant bias or one given at run time, on an x86-64 CPU with AVX2 and
//! FMA. It runs after [`crate::direct_conv::use_direct_convs`], which keeps the small
//! convolutions it runs faster.
//!
//! The transformed weights `U` take 16/9 of the kernel's memory. The pixel floor spends
//! that where a weight does the most work: on the cifar-size U-Net the 32 × 32
//! convolutions hold 11 MB of its 143 MB of weights and half of its multiply-adds.
//! Taking its 16 × 16 and 8 × 8 ones too was measured faster still (its forward 0.65x
//! of tract's instead of ~0.8x) but raised the peak memory from 1.34x to 1.9x the
//! weights (`docs/PERFORMANCE.md`, lever 18).

use crate::direct_conv::{bias_values, c_order_f32, replace_convs, PlainConv};
use crate::fusion::{same_bits, same_optional_bits};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Output channels per register tile of the products.
const CO: usize = 6;
/// Tiles per vector: AVX2's 8 lanes.
const LANE: usize = 8;
/// Positions of a 4 × 4 input block.
const XI: usize = 16;
/// The fewest output pixels taken (module docs: the memory the transformed weights
/// add is spent where each weight is used most).
pub const MIN_PIXELS: usize = 1024;
/// The fewest input channels taken.
pub const MIN_INPUT_CHANNELS: usize = 32;

/// `G g Gᵀ` of one 3 × 3 kernel `g` (row-major), row-major: `G`'s rows are `g₀`,
/// `(g₀ + g₁ + g₂) / 2`, `(g₀ − g₁ + g₂) / 2` and `g₂` of what it multiplies (module
/// docs).
fn filter_transform(g: &[f32]) -> [f32; XI] {
    let rows = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    // G g, one column of g at a time.
    let cols: [[f32; 4]; 3] = std::array::from_fn(|j| rows(g[j], g[3 + j], g[6 + j]));
    // (G g) Gᵀ, one row of G g at a time.
    let mut u = [0f32; XI];
    for (i, out) in u.chunks_exact_mut(4).enumerate() {
        out.copy_from_slice(&rows(cols[0][i], cols[1][i], cols[2][i]));
    }
    u
}

/// Whether this CPU runs the products' kernel (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A 3 × 3 convolution (stride 1, one zero of padding on each side) by Winograd's
/// F(2 × 2, 3 × 3) (module docs). Its inputs are the image batch and, when the bias
/// is not constant, the bias (one value, or one per output channel).
#[derive(Debug, Clone)]
pub struct WinogradConv {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input (and output) height and width, both even.
    pub side: [usize; 2],
    /// `U_ξ`, laid out `[ξ][⌈cout / 6⌉][cin][6]`, zero past `cout`.
    u: Arc<Vec<f32>>,
    /// `None`: the bias is the op's second input.
    bias: Option<Arc<Vec<f32>>>,
}

/// Two ops are equal when they compute the same thing: same sizes and values (compared
/// bit for bit, so that the relation is an equivalence, as tract needs).
impl PartialEq for WinogradConv {
    fn eq(&self, other: &Self) -> bool {
        (self.cin, self.cout, self.side) == (other.cin, other.cout, other.side)
            && same_bits(&self.u, &other.u)
            && same_optional_bits(
                self.bias.as_deref().map(|b| &b[..]),
                other.bias.as_deref().map(|b| &b[..]),
            )
    }
}

impl Eq for WinogradConv {}

impl WinogradConv {
    /// Makes the op from OIHW `weights` (`cout · cin · 9` values) and a constant `bias`
    /// (one value per output channel), or `None` for a bias given at run time. Fails
    /// when this CPU lacks the kernel ([`available`]) or the sizes do not fit.
    pub fn new(
        cin: usize,
        cout: usize,
        side: [usize; 2],
        weights: &[f32],
        bias: Option<&[f32]>,
    ) -> TractResult<Self> {
        ensure!(
            available(),
            "the Winograd kernel needs x86-64 with AVX2 and FMA"
        );
        ensure!(
            cin >= 1 && cout >= 1,
            "{cin} input and {cout} output channels"
        );
        ensure!(
            side.iter().all(|&s| s >= 2 && s.is_multiple_of(2)),
            "a Winograd convolution needs an even output, not {side:?}"
        );
        ensure!(
            weights.len() == cout * cin * 9,
            "expected {} weights",
            cout * cin * 9
        );
        if let Some(bias) = bias {
            ensure!(bias.len() == cout, "expected {cout} biases");
        }
        let blocks = cout.div_ceil(CO);
        let mut u = vec![0f32; XI * blocks * CO * cin];
        for (o, per_output) in weights.chunks_exact(cin * 9).enumerate() {
            for (c, g) in per_output.chunks_exact(9).enumerate() {
                for (xi, value) in filter_transform(g).into_iter().enumerate() {
                    u[((xi * blocks + o / CO) * cin + c) * CO + o % CO] = value;
                }
            }
        }
        Ok(WinogradConv {
            cin,
            cout,
            side,
            u: Arc::new(u),
            bias: bias.map(|b| Arc::new(b.to_vec())),
        })
    }

    /// Multiply-adds per image of the convolution it computes (`cout · h · w · cin ·
    /// 9`, as tract counts a convolution, so that rates compare).
    pub fn macs_per_image(&self) -> usize {
        self.cout * self.side[0] * self.side[1] * self.cin * 9
    }

    /// Runs the convolution on the op's inputs: a batch `x` (`[n, cin, h, w]`, f32),
    /// then the bias when it is not constant, with this thread's buffers (one set per
    /// thread, shared by every Winograd convolution run on it: they run one at a time,
    /// so a plan holds the largest one's, not the sum of all of theirs).
    pub fn run(&self, inputs: &[TValue]) -> TractResult<Tensor> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.run_in(&mut scratch, inputs),
            // Entered again on this thread while it runs one (a pool thread that took
            // another plan's work while waiting): buffers of its own.
            Err(_) => self.run_in(&mut WinogradScratch::default(), inputs),
        })
    }

    /// [`Self::run`] with the buffers of `scratch` (grown as needed, then reused).
    pub fn run_in(&self, scratch: &mut WinogradScratch, inputs: &[TValue]) -> TractResult<Tensor> {
        bias_values(
            self.bias.as_deref().map(|b| &b[..]),
            inputs,
            self.cout,
            &mut scratch.bias,
        )?;
        let x = &*inputs[0];
        ensure!(
            x.datum_type() == f32::datum_type(),
            "input is {:?}",
            x.datum_type()
        );
        let shape = x.shape();
        let [h, w] = self.side;
        ensure!(
            shape.len() == 4 && shape[1] == self.cin && shape[2..] == self.side,
            "input shape {shape:?} for a convolution of {} channels at {:?}",
            self.cin,
            self.side
        );
        let input = c_order_f32(x)?;
        let n = shape[0];
        let mut y = Tensor::zero::<f32>(&[n, self.cout, h, w])?;
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for (image, out) in input
                .chunks_exact(self.cin * h * w)
                .zip(out.chunks_exact_mut(self.cout * h * w))
            {
                self.run_image(image, out, scratch);
            }
        }
        Ok(y)
    }

    /// One image (`[cin, h, w]`) into `out` (`[cout, h, w]`), the three passes each
    /// split across the threads [`op_threads`] has here.
    fn run_image(&self, x: &[f32], out: &mut [f32], sc: &mut WinogradScratch) {
        let [h, w] = self.side;
        let tiles = (h / 2) * (w / 2);
        let tp = tiles.next_multiple_of(LANE);
        let cout_p = self.cout.div_ceil(CO) * CO;
        sc.v.resize(self.cin * XI * tp, 0.0);
        sc.m.resize(XI * cout_p * tp, 0.0);
        let parts = op_threads::threads().max(1);
        if sc.rows.len() < parts {
            sc.rows.resize_with(parts, Vec::new);
        }
        let (cin, cout) = (self.cin, self.cout);

        // 1. The input transform, by blocks of input channels.
        let per = cin.div_ceil(parts);
        let work =
            sc.v.chunks_mut(per * XI * tp)
                .zip(x.chunks(per * h * w))
                .zip(sc.rows.iter_mut());
        op_threads::for_each(work, |((v, x), rows)| {
            for (v, x) in v.chunks_exact_mut(XI * tp).zip(x.chunks_exact(h * w)) {
                kernels::input(x, h, w, v, tp, rows);
            }
        });

        // 2. The 16 products, by blocks of positions.
        let per = XI.div_ceil(parts);
        let (u, v) = (&self.u[..], &sc.v[..]);
        let work =
            sc.m.chunks_mut(per * cout_p * tp)
                .zip(sc.rows.iter_mut())
                .enumerate();
        op_threads::for_each(work, |(p, (m, panel))| {
            for (k, m) in m.chunks_exact_mut(cout_p * tp).enumerate() {
                let xi = p * per + k;
                let u = &u[xi * cout_p * cin..][..cout_p * cin];
                kernels::product(u, v, xi, m, cout_p, cin, tp, panel);
            }
        });

        // 3. The output transform and the bias, by blocks of output channels.
        let per = cout.div_ceil(parts);
        let (m, bias) = (&sc.m[..], &sc.bias[..]);
        let work = out
            .chunks_mut(per * h * w)
            .zip(bias.chunks(per))
            .enumerate();
        op_threads::for_each(work, |(p, (out, bias))| {
            for (k, (out, &b)) in out.chunks_exact_mut(h * w).zip(bias).enumerate() {
                kernels::output(m, p * per + k, cout_p, tp, h, w, b, out);
            }
        });
    }
}

thread_local! {
    /// This thread's buffers for [`WinogradConv::run`].
    static SCRATCH: std::cell::RefCell<WinogradScratch> = std::cell::RefCell::default();
}

/// A [`WinogradConv`]'s buffers: the transformed input `V` (`[cin][ξ][tiles]`), the
/// products `M` (`[ξ][cout][tiles]`), the bias, and each thread part's room for the
/// input transform's rows and the products' panels.
#[derive(Debug, Clone, Default)]
pub struct WinogradScratch {
    v: Vec<f32>,
    m: Vec<f32>,
    bias: Vec<f32>,
    rows: Vec<Vec<f32>>,
}

impl Op for WinogradConv {
    fn name(&self) -> StaticName {
        "EsddpmWinogradConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} -> {} channels at {:?}",
            self.cin, self.cout, self.side
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for WinogradConv {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(&inputs)?.into_tvalue()))
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(tvec!(self.run(&inputs)?.into_tvalue())))
    }
}

impl TypedOp for WinogradConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + usize::from(self.bias.is_none()) && inputs[0].rank() == 4);
        let n = inputs[0].shape[0].clone();
        Ok(tvec!(f32::fact([
            n,
            self.cout.to_dim(),
            self.side[0].to_dim(),
            self.side[1].to_dim()
        ])))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = inputs[0].shape[0].clone();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            n * self.macs_per_image()
        )))
    }
}

/// The three passes, compiled for AVX2 and FMA.
mod kernels {
    use super::{CO, LANE, XI};

    /// The input transform of one channel `x` (`[h, w]`) into `v` (`[ξ][tp]`), with
    /// `rows` as room for the padded rows and their column transforms.
    pub fn input(x: &[f32], h: usize, w: usize, v: &mut [f32], tp: usize, rows: &mut Vec<f32>) {
        // SAFETY: the op exists only where `super::available` found the features.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            input_avx2(x, h, w, v, tp, rows)
        }
        #[cfg(not(target_arch = "x86_64"))]
        input_any(x, h, w, v, tp, rows)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn input_avx2(
        x: &[f32],
        h: usize,
        w: usize,
        v: &mut [f32],
        tp: usize,
        rows: &mut Vec<f32>,
    ) {
        input_any(x, h, w, v, tp, rows)
    }

    #[inline(always)]
    fn input_any(x: &[f32], h: usize, w: usize, v: &mut [f32], tp: usize, rows: &mut Vec<f32>) {
        let tw = w / 2;
        // A padded row (w + 2), its even and odd columns (tw + 1 each), and the column
        // transforms of a tile row's four input rows (4 × 4 × tw). The loops run over
        // zipped slices: no bounds checks inside them.
        rows.resize(w + 2 + 2 * (tw + 1) + XI * tw, 0.0);
        let (padded, rest) = rows.split_at_mut(w + 2);
        let (even, rest) = rest.split_at_mut(tw + 1);
        let (odd, rest) = rest.split_at_mut(tw + 1);
        let e = &mut rest[..XI * tw];
        for ty in 0..h / 2 {
            for (i, e) in e.chunks_exact_mut(4 * tw).enumerate() {
                // Padded row 2ty + i is input row 2ty + i − 1.
                let row = (2 * ty + i).checked_sub(1).filter(|&r| r < h);
                padded[0] = 0.0;
                padded[w + 1] = 0.0;
                match row {
                    Some(r) => padded[1..=w].copy_from_slice(&x[r * w..(r + 1) * w]),
                    None => padded[1..=w].fill(0.0),
                }
                for ((ev, od), pair) in even
                    .iter_mut()
                    .zip(odd.iter_mut())
                    .zip(padded.chunks_exact(2))
                {
                    *ev = pair[0];
                    *od = pair[1];
                }
                // d B over the columns: a tile's columns are even[tx], odd[tx],
                // even[tx + 1], odd[tx + 1].
                let (e0, rest) = e.split_at_mut(tw);
                let (e1, rest) = rest.split_at_mut(tw);
                let (e2, e3) = rest.split_at_mut(tw);
                let cols = even
                    .iter()
                    .zip(&odd[..])
                    .zip(even[1..].iter().zip(&odd[1..]));
                let outs = e0
                    .iter_mut()
                    .zip(e1.iter_mut())
                    .zip(e2.iter_mut().zip(e3.iter_mut()));
                for (((a0, a1), (a2, a3)), ((o0, o1), (o2, o3))) in cols.zip(outs) {
                    *o0 = a0 - a2;
                    *o1 = a1 + a2;
                    *o2 = a2 - a1;
                    *o3 = a1 - a3;
                }
            }
            // Bᵀ (d B) over the rows.
            for j in 0..4 {
                let d = |i: usize| &e[(i * 4 + j) * tw..][..tw];
                let rows_in = d(0).iter().zip(d(1)).zip(d(2).iter().zip(d(3)));
                let (v0, rest) = v[j * tp + ty * tw..].split_at_mut(4 * tp);
                let (v1, rest) = rest.split_at_mut(4 * tp);
                let (v2, v3) = rest.split_at_mut(4 * tp);
                let outs = v0[..tw]
                    .iter_mut()
                    .zip(&mut v1[..tw])
                    .zip(v2[..tw].iter_mut().zip(&mut v3[..tw]));
                for (((d0, d1), (d2, d3)), ((o0, o1), (o2, o3))) in rows_in.zip(outs) {
                    *o0 = d0 - d2;
                    *o1 = d1 + d2;
                    *o2 = d2 - d1;
                    *o3 = d1 - d3;
                }
            }
        }
    }

    /// `M_ξ = U_ξ V_ξ`: `u` is `U_ξ` (`[cout_p / 6][cin][6]`), `v` all of `V`
    /// (`[cin][ξ][tp]`), `m` receives `M_ξ` (`[cout_p][tp]`); `panel` is room for 16
    /// tiles of `V_ξ` packed contiguously (the kernel's reads of `V` from its layout
    /// would be a power-of-two stride apart, which the caches alias).
    #[allow(clippy::too_many_arguments)]
    pub fn product(
        u: &[f32],
        v: &[f32],
        xi: usize,
        m: &mut [f32],
        cout_p: usize,
        cin: usize,
        tp: usize,
        panel: &mut Vec<f32>,
    ) {
        assert!(u.len() == cout_p * cin && m.len() == cout_p * tp && v.len() == cin * XI * tp);
        assert!(xi < XI && cout_p.is_multiple_of(CO) && tp.is_multiple_of(LANE));
        panel.resize(cin * 2 * LANE, 0.0);
        let mut t0 = 0;
        while t0 < tp {
            let n = if tp - t0 >= 2 * LANE { 2 } else { 1 };
            let width = n * LANE;
            for (c, out) in panel.chunks_exact_mut(width).take(cin).enumerate() {
                out.copy_from_slice(&v[(c * XI + xi) * tp + t0..][..width]);
            }
            // SAFETY: the op exists only where `super::available` found the features;
            // the sizes were checked above.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if n == 2 {
                    x86::tile::<2>(u, panel, m, cout_p, cin, tp, t0)
                } else {
                    x86::tile::<1>(u, panel, m, cout_p, cin, tp, t0)
                }
            }
            t0 += width;
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Winograd kernel off x86-64")
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::{CO, LANE};
        use std::arch::x86_64::*;

        /// [`super::output`]: 8 tiles at a time, the rest one by one, with the same
        /// operations in the same order.
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn output(
            m: &[f32],
            o: usize,
            cout_p: usize,
            tp: usize,
            h: usize,
            w: usize,
            bias: f32,
            out: &mut [f32],
        ) {
            let tw = w / 2;
            let xs = cout_p * tp;
            let b = _mm256_set1_ps(bias);
            for ty in 0..h / 2 {
                let base = m.as_ptr().add(o * tp + ty * tw);
                let top = out.as_mut_ptr().add(2 * ty * w);
                let bottom = top.add(w);
                let mut tx = 0;
                while tx + LANE <= tw {
                    let ld = |xi: usize| _mm256_loadu_ps(base.add(xi * xs + tx));
                    // Aᵀ M: row 0 is M₀ + M₁ + M₂, row 1 is M₁ − M₂ − M₃ (rows of 4).
                    let mut c = [[_mm256_setzero_ps(); 4]; 2];
                    let [c0, c1] = &mut c;
                    for (j, (t, b)) in c0.iter_mut().zip(c1.iter_mut()).enumerate() {
                        let (m0, m1, m2, m3) = (ld(j), ld(4 + j), ld(8 + j), ld(12 + j));
                        *t = _mm256_add_ps(_mm256_add_ps(m0, m1), m2);
                        *b = _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3);
                    }
                    // (Aᵀ M) A: column 0 is C₀ + C₁ + C₂, column 1 is C₁ − C₂ − C₃;
                    // the two interleaved into the output row.
                    for (row, c) in [top, bottom].into_iter().zip(&c) {
                        let y0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c[0], c[1]), c[2]), b);
                        let y1 = _mm256_add_ps(_mm256_sub_ps(_mm256_sub_ps(c[1], c[2]), c[3]), b);
                        let lo = _mm256_unpacklo_ps(y0, y1);
                        let hi = _mm256_unpackhi_ps(y0, y1);
                        _mm256_storeu_ps(row.add(2 * tx), _mm256_permute2f128_ps(lo, hi, 0x20));
                        _mm256_storeu_ps(
                            row.add(2 * tx + LANE),
                            _mm256_permute2f128_ps(lo, hi, 0x31),
                        );
                    }
                    tx += LANE;
                }
                for tx in tx..tw {
                    let ld = |xi: usize| *base.add(xi * xs + tx);
                    let mut c = [[0f32; 4]; 2];
                    let [c0, c1] = &mut c;
                    for (j, (t, b)) in c0.iter_mut().zip(c1.iter_mut()).enumerate() {
                        let (m0, m1, m2, m3) = (ld(j), ld(4 + j), ld(8 + j), ld(12 + j));
                        *t = m0 + m1 + m2;
                        *b = m1 - m2 - m3;
                    }
                    for (row, c) in [top, bottom].into_iter().zip(&c) {
                        *row.add(2 * tx) = c[0] + c[1] + c[2] + bias;
                        *row.add(2 * tx + 1) = c[1] - c[2] - c[3] + bias;
                    }
                }
            }
        }

        /// Tiles `t0..t0 + 8N` of every output channel from `panel` (their `V_ξ`,
        /// `[cin][8N]`): 6 channels × 8N tiles in registers, summed over the input
        /// channels in order.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn tile<const N: usize>(
            u: &[f32],
            panel: &[f32],
            m: &mut [f32],
            cout_p: usize,
            cin: usize,
            tp: usize,
            t0: usize,
        ) {
            for block in 0..cout_p / CO {
                let ub = u.as_ptr().add(block * cin * CO);
                let mut vp = panel.as_ptr();
                let mut acc = [[_mm256_setzero_ps(); N]; CO];
                for c in 0..cin {
                    let mut vv = [_mm256_setzero_ps(); N];
                    for (k, x) in vv.iter_mut().enumerate() {
                        *x = _mm256_loadu_ps(vp.add(LANE * k));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let b = _mm256_broadcast_ss(&*ub.add(c * CO + r));
                        for (a, x) in row.iter_mut().zip(&vv) {
                            *a = _mm256_fmadd_ps(b, *x, *a);
                        }
                    }
                    vp = vp.add(LANE * N);
                }
                for (r, row) in acc.iter().enumerate() {
                    let out = m.as_mut_ptr().add((block * CO + r) * tp + t0);
                    for (k, a) in row.iter().enumerate() {
                        _mm256_storeu_ps(out.add(LANE * k), *a);
                    }
                }
            }
        }
    }

    /// The output transform of output channel `o` from `m` (`[ξ][cout_p][tp]`) into
    /// `out` (`[h, w]`), plus `bias`.
    #[allow(clippy::too_many_arguments)]
    pub fn output(
        m: &[f32],
        o: usize,
        cout_p: usize,
        tp: usize,
        h: usize,
        w: usize,
        bias: f32,
        out: &mut [f32],
    ) {
        assert!(m.len() >= XI * cout_p * tp && o < cout_p && out.len() >= h * w);
        assert!((h / 2) * (w / 2) <= tp && w.is_multiple_of(2));
        // SAFETY: the op exists only where `super::available` found the features; the
        // sizes were just checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::output(m, o, cout_p, tp, h, w, bias, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Winograd kernel off x86-64")
    }
}

/// The Winograd convolution for `node` (a tract `Conv` of `model`), or `None` where it
/// does not apply (module docs).
fn winograd_for(
    model: &TypedModel,
    node: &TypedNode,
    min_pixels: usize,
) -> TractResult<Option<WinogradConv>> {
    let Some(conv) = PlainConv::of(model, node)? else {
        return Ok(None);
    };
    let spec = conv.spec;
    let side = [conv.shape[2], conv.shape[3]];
    let padding = spec.computed_padding(&side);
    let same = padding
        .iter()
        .zip(side)
        .all(|(p, s)| p.pad_before == 1 && p.pad_after == 1 && p.convoluted == s);
    if spec.kernel_shape[..] != [3, 3]
        || spec.input_channels < MIN_INPUT_CHANNELS
        || !same
        || side[0] * side[1] < min_pixels
        || side.iter().any(|&s| !s.is_multiple_of(2))
    {
        return Ok(None);
    }
    let weights = c_order_f32(conv.kernel)?;
    let cout = spec.output_channels;
    WinogradConv::new(
        spec.input_channels,
        cout,
        side,
        &weights,
        conv.bias.as_deref(),
    )
    .map(Some)
}

/// Replaces every convolution of `model` (decluttered, before `optimize`) that the
/// Winograd kernel runs faster with a [`WinogradConv`] (module docs), on outputs of
/// [`MIN_PIXELS`] or more. Returns how many were replaced; none on a CPU without the
/// kernel.
pub fn use_winograd(model: &mut TypedModel) -> TractResult<usize> {
    use_winograd_with(model, MIN_PIXELS)
}

/// [`use_winograd`] with another floor of output pixels (for measuring the memory and
/// time of taking smaller maps: `64` takes cifar's 16 × 16 and 8 × 8 maps too).
pub fn use_winograd_with(model: &mut TypedModel, min_pixels: usize) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    replace_convs(model, |model, node| {
        Ok(winograd_for(model, node, min_pixels)?.map(|op| {
            let constant_bias = op.bias.is_some();
            (op, constant_bias)
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{conv_model, values};
    use tract_onnx::tract_core::ops::cnn::Conv;

    /// Runs `model` optimised, with or without the Winograd convolutions; returns the
    /// output and how many were used.
    fn run(model: &TypedModel, winograd: bool, inputs: &[Tensor]) -> (Vec<f32>, usize) {
        let mut m = model.clone();
        let replaced = if winograd {
            use_winograd(&mut m).unwrap()
        } else {
            0
        };
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        let y = plan
            .run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())
            .unwrap()
            .remove(0);
        let values = y
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        (values, replaced)
    }

    fn inputs(x_shape: [usize; 4], cout: usize, bias_input: bool) -> Vec<Tensor> {
        let x = Tensor::from_shape(&x_shape, &values(x_shape.iter().product(), 8)).unwrap();
        let mut inputs = vec![x];
        if bias_input {
            inputs.push(tensor1(&values(cout, 9)));
        }
        inputs
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// The largest difference, and the largest magnitude of `want`.
    fn diff(got: &[f32], want: &[f32]) -> (f32, f32) {
        assert_eq!(got.len(), want.len());
        let d = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        (d, want.iter().fold(1f32, |m, v| m.max(v.abs())))
    }

    #[test]
    fn matches_tract_on_the_shapes_it_takes() {
        for (x_shape, cout, bias_input) in [
            // The smallest taken; cifar's 32 × 32 one; a batch of 2 with channels off
            // the 6-channel tile, 16 × 17 tiles (off the 16 of the products' tile and
            // the 8 lanes of the output transform) and the bias an input; one output
            // channel.
            ([1, 32, 32, 32], 32, false),
            ([1, 128, 32, 32], 128, false),
            ([2, 40, 32, 34], 70, true),
            ([1, 64, 32, 32], 1, false),
        ] {
            let model = conv_model(x_shape, cout, [3, 3], (1, 1), 1, bias_input).unwrap();
            let ins = inputs(x_shape, cout, bias_input);
            let (want, _) = run(&model, false, &ins);
            let (got, replaced) = run(&model, true, &ins);
            assert_eq!(replaced, usize::from(available()), "{x_shape:?} → {cout}");
            let (d, scale) = diff(&got, &want);
            assert!(d <= 1e-5 * scale, "{x_shape:?} → {cout}: {d} of {scale}");
        }
    }

    /// `G g Gᵀ` by the matrix products of its definition, in f64.
    #[test]
    fn the_filter_transform_is_g_g_gt() {
        let gm = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0f64],
        ];
        let g = values(9, 11);
        let u = filter_transform(&g);
        for a in 0..4 {
            for b in 0..4 {
                let want: f64 = (0..3)
                    .flat_map(|i| (0..3).map(move |j| (i, j)))
                    .map(|(i, j)| gm[a][i] * f64::from(g[i * 3 + j]) * gm[b][j])
                    .sum();
                assert!((f64::from(u[a * 4 + b]) - want).abs() < 1e-6, "{a} {b}");
            }
        }
    }

    /// Two Winograd convolutions of other sizes in a row share this thread's buffers.
    #[test]
    fn consecutive_convolutions_share_the_buffers() {
        let x_shape = [1, 32, 32, 32];
        let mut model = conv_model(x_shape, 48, [3, 3], (1, 1), 1, false).unwrap();
        let first = model.output_outlets().unwrap()[0];
        let w = model
            .add_const(
                "w2",
                Tensor::from_shape(&[40, 48, 3, 3], &values(40 * 48 * 9, 5)).unwrap(),
            )
            .unwrap();
        let b = model.add_const("b2", tensor1(&values(40, 6))).unwrap();
        let mut op = model.node(first.node).op_as::<Conv>().unwrap().clone();
        op.pool_spec.input_channels = 48;
        op.pool_spec.output_channels = 40;
        let y = model.wire_node("conv2", op, &[first, w, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let ins = inputs(x_shape, 48, false);
        let (want, _) = run(&model, false, &ins);
        let (got, replaced) = run(&model, true, &ins);
        assert_eq!(replaced, 2 * usize::from(available()));
        let (d, scale) = diff(&got, &want);
        assert!(d <= 1e-5 * scale, "{d} of {scale}");
    }

    #[test]
    fn leaves_other_convolutions_to_tract() {
        for (x_shape, cout, kernel, pad, stride) in [
            ([1, 32, 64, 64], 32, [3, 3], (1, 1), 2),
            ([1, 32, 32, 32], 32, [3, 3], (0, 0), 1),
            ([1, 32, 32, 32], 32, [1, 1], (0, 0), 1),
            ([1, 16, 32, 32], 32, [3, 3], (1, 1), 1),
            ([1, 32, 16, 16], 32, [3, 3], (1, 1), 1),
            ([1, 32, 33, 34], 32, [3, 3], (1, 1), 1),
        ] {
            let mut model = conv_model(x_shape, cout, kernel, pad, stride, false).unwrap();
            assert_eq!(
                use_winograd(&mut model).unwrap(),
                0,
                "{x_shape:?} {kernel:?}"
            );
        }
    }

    /// A lower floor takes the smaller maps the default leaves (`--winograd all`).
    #[test]
    fn a_lower_floor_takes_smaller_maps() {
        let x_shape = [1, 32, 8, 8];
        let model = conv_model(x_shape, 32, [3, 3], (1, 1), 1, false).unwrap();
        assert_eq!(use_winograd(&mut model.clone()).unwrap(), 0);
        let mut low = model.clone();
        assert_eq!(
            use_winograd_with(&mut low, 0).unwrap(),
            usize::from(available())
        );
        let ins = inputs(x_shape, 32, false);
        let (want, _) = run(&model, false, &ins);
        let plan = low.into_optimized().unwrap().into_runnable().unwrap();
        let got = plan
            .run(ins.iter().map(|t| t.clone().into_tvalue()).collect())
            .unwrap();
        let got = got[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec();
        let (d, scale) = diff(&got, &want);
        assert!(d <= 1e-5 * scale, "{d} of {scale}");
    }

    #[test]
    fn two_threads_give_the_bits_of_one() {
        let x_shape = [1, 48, 32, 32];
        let model = conv_model(x_shape, 50, [3, 3], (1, 1), 1, false).unwrap();
        let ins = inputs(x_shape, 50, false);
        let (alone, _) = run(&model, true, &ins);
        let pool = tract_linalg::multithread::Executor::multithread(2);
        let (split, _) = op_threads::scope(&pool, || {
            assert_eq!(op_threads::threads(), 2);
            run(&model, true, &ins)
        });
        assert_eq!(bits(&alone), bits(&split));
    }

    #[test]
    fn the_plan_cache_form_is_taken_alike() {
        let x_shape = [1, 32, 32, 32];
        let model = conv_model(x_shape, 40, [3, 3], (1, 1), 1, true).unwrap();
        let nnef = tract_nnef::nnef().with_onnx();
        let mut tar = vec![];
        nnef.write_to_tar(&model, &mut tar).unwrap();
        let mut cached = nnef.model_for_read(&mut &tar[..]).unwrap();
        crate::rewrite::remove_identity_casts(&mut cached).unwrap();
        let ins = inputs(x_shape, 40, true);
        let (from_file, n) = run(&model, true, &ins);
        let (from_cache, m) = run(&cached, true, &ins);
        assert_eq!((n, m), (usize::from(available()), usize::from(available())));
        assert_eq!(bits(&from_file), bits(&from_cache));
    }

    #[test]
    fn bad_sizes_are_errors() {
        if !available() {
            assert!(WinogradConv::new(32, 8, [8, 8], &[0.0; 8 * 32 * 9], None).is_err());
            return;
        }
        let w = vec![0.0; 8 * 32 * 9];
        assert!(
            WinogradConv::new(32, 8, [9, 8], &w, None).is_err(),
            "odd side"
        );
        assert!(
            WinogradConv::new(32, 8, [8, 8], &w[1..], None).is_err(),
            "weights"
        );
        assert!(
            WinogradConv::new(32, 8, [8, 8], &w, Some(&[0.0; 7])).is_err(),
            "bias"
        );
        let op = WinogradConv::new(32, 8, [8, 8], &w, Some(&[1.0; 8])).unwrap();
        let wrong = Tensor::zero::<f32>(&[1, 31, 8, 8]).unwrap().into_tvalue();
        assert!(op.run(&[wrong]).is_err());
        let x = Tensor::zero::<f32>(&[1, 32, 8, 8]).unwrap().into_tvalue();
        let dynamic = WinogradConv::new(32, 8, [8, 8], &w, None).unwrap();
        assert!(dynamic.run(std::slice::from_ref(&x)).is_err(), "no bias");
        let five = tensor1(&[0f32; 5]).into_tvalue();
        assert!(dynamic.run(&[x.clone(), five]).is_err());
        let one = tensor1(&[2f32]).into_tvalue();
        let y = dynamic.run(&[x, one]).unwrap();
        let y = y.try_as_plain_ram().unwrap();
        assert!(y.as_slice::<f32>().unwrap().iter().all(|&v| v == 2.0));
    }
}
