//! Winograd convolutions, F(2 × 2, 3 × 3), for the large 3 × 3 convolutions (issue 6,
//! levers 18 to 20 in `docs/PERFORMANCE.md`).
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
//! the input block of channel `c`. So a convolution becomes:
//!
//! 1. the input transform `V_ξ[c][t] = (Bᵀ d_c,t B)_ξ` of every 2 × 2 tile `t` of the
//!    output, for the 16 positions `ξ` of a 4 × 4 block, stored in panels of 16 tiles;
//! 2. then, for a group of 4 blocks of 6 output channels at a time:
//!    - their filter transform `U_ξ[o][c] = (G g_oc Gᵀ)_ξ`,
//!    - the 16 matrix products `M_ξ = U_ξ V_ξ`: 16 multiply-adds per tile, output and
//!      input channel, where the im2col product has 36, so 2.25x fewer,
//!    - the output transform `Y = Aᵀ M A + b` per tile and output channel.
//!
//! The op keeps the kernels, arranged in place by blocks (taken out of the model's
//! constant, so without a copy), and `U` only where it is small ([`STORED_U_MAX`]):
//! `U` takes 16/9 of the kernels' memory, which on the cifar-size U-Net raised the peak
//! memory from 1.34x to 1.9x the weights when every map was taken. Made per group, `U`
//! costs 9 loads and 16 stores per kernel and stays in the L2 cache while the products
//! use it. Measured on that U-Net against a stored `U`: the same time over its 33
//! Winograd convolutions, the 8 × 8 ones (16 tiles per kernel) ~1.2x slower, the largest
//! 32 × 32 ones ~0.93x. The shipped Fashion-MNIST U-Net's kernels are small, and its
//! Winograd convolutions keep their `U`: ~15% faster than making it as they run.
//!
//! The input transform writes V's panels in place, 4 or 8 tiles to a vector, each
//! input row's column transform made once (maps whose rows of tiles are not a multiple
//! of 4 take a row-by-row path with the same bits). With AVX-512 the input and output
//! transforms take 16 tiles to a vector where a map's rows of tiles are 4, 8 or a
//! multiple of 16 tiles long (lever 23), with the same operations per value.
//!
//! The products run in an AVX2 register tile of 6 output channels × 16 tiles, summing
//! over the input channels in order with FMA from zero; with AVX-512, in tiles of 6
//! channels × 32 tiles and, for a last panel of 16 tiles, 12 channels × 16 (lever 22:
//! 12 registers of 16 lanes where AVX2 fills 12 of 8), each value summed alike, so the
//! same bits on either ISA. The transforms are fixed sums.
//! The result is the same bit for bit whatever the thread count (each element is
//! computed alike however the work is split: for a large convolution the input
//! transform by input channels, the rest by output channels; for a small one, whose
//! `U` is kept, everything by bands of rows of tiles); it differs from tract's by the
//! transforms' rounding (tested within 1e-5 of the outputs' scale).
//!
//! [`use_winograd`] swaps it in at load time: f32, NCHW, one group, a 3 × 3 kernel,
//! stride and dilation 1, one zero row and column of padding on every side, an even
//! output of [`MIN_PIXELS`] (8 × 8) or more, [`MIN_INPUT_CHANNELS`] (16) input and
//! [`MIN_OUTPUT_CHANNELS`] (8) output channels or more, constant weights, a constant
//! bias or one given at run time, on an x86-64 CPU with AVX2 and FMA. It runs before
//! [`crate::direct_conv::use_direct_convs`], which takes the convolutions it leaves:
//! on the shipped Fashion-MNIST U-Net (16 to 128 input channels, 16 to 64 output, 8 × 8
//! to 32 × 32 maps) every convolution it takes ran 1.2-1.9x faster than the direct
//! kernel (lever 20 in `docs/PERFORMANCE.md`). Below 8 × 8 there are too few tiles per
//! kernel: the 4 × 4 maps were measured no faster than tract's.

use crate::direct_conv::{bias_values, c_order_f32, image_values, replace_convs, PlainConv};
use crate::fusion::{same_bits, same_optional_bits};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::konst::Const;

/// Output channels per register tile of the products.
const CO: usize = 6;
/// Tiles per vector: AVX2's 8 lanes.
const LANE: usize = 8;
/// Positions of a 4 × 4 input block.
const XI: usize = 16;
/// The fewest output pixels taken: 8 × 8 (module docs).
pub const MIN_PIXELS: usize = 64;
/// The fewest input channels taken (the shipped Fashion-MNIST U-Net's 16-channel
/// convolutions ran ~1.3x faster than the direct kernel).
pub const MIN_INPUT_CHANNELS: usize = 16;
/// The fewest output channels taken: a block of 6 output channels is the products'
/// unit, and a 1- or 3-channel output (`conv_out`) would waste most of it.
pub const MIN_OUTPUT_CHANNELS: usize = 8;

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
    /// The kernels by blocks of 6 output channels: block `b` (output channels `6b ..
    /// 6b + rows`, `rows` = 6 but in the last) laid out `[9][cin][rows]` where the OIHW
    /// kernels had it `[rows][cin][9]`: in the same place, so that the kernels are
    /// arranged in place ([`arrange`]). A block's `U` is made from them when needed.
    g: Arc<Tensor>,
    /// Every block's `U` (`[ξ][block][cin][6]`), made once at load where it takes at
    /// most [`STORED_U_MAX`] bytes; `None` where each group makes its own as it runs.
    u: Option<Arc<Vec<f32>>>,
    /// `None`: the bias is the op's second input.
    bias: Option<Arc<Vec<f32>>>,
}

/// Two ops are equal when they compute the same thing: same sizes and values (compared
/// bit for bit, so that the relation is an equivalence, as tract needs).
impl PartialEq for WinogradConv {
    fn eq(&self, other: &Self) -> bool {
        (self.cin, self.cout, self.side) == (other.cin, other.cout, other.side)
            && same_bits(self.kernels(), other.kernels())
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
            weights.len() == cout * cin * 9,
            "expected {} weights",
            cout * cin * 9
        );
        let kernel = Tensor::from_shape(&[weights.len()], weights)?;
        Self::from_kernel(cin, cout, side, Arc::new(kernel), bias)
    }

    /// [`Self::new`] from the OIHW `kernel` tensor, arranged in place where nothing else
    /// holds it (else in a copy).
    fn from_kernel(
        cin: usize,
        cout: usize,
        side: [usize; 2],
        mut kernel: Arc<Tensor>,
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
            kernel.datum_type() == f32::datum_type() && kernel.len() == cout * cin * 9,
            "expected {} f32 weights",
            cout * cin * 9
        );
        if let Some(bias) = bias {
            ensure!(bias.len() == cout, "expected {cout} biases");
        }
        if kernel.strides() != &*Tensor::natural_strides(kernel.shape()) {
            let values = c_order_f32(&kernel)?.into_owned();
            kernel = Arc::new(Tensor::from_shape(&[values.len()], &values)?);
        }
        {
            let kernel = Arc::make_mut(&mut kernel);
            let mut view = kernel.try_as_plain_ram_mut()?;
            arrange(view.as_slice_mut::<f32>()?, cin);
        }
        let mut op = WinogradConv {
            cin,
            cout,
            side,
            g: kernel,
            u: None,
            bias: bias.map(|b| Arc::new(b.to_vec())),
        };
        let blocks = cout.div_ceil(CO);
        if XI * blocks * cin * CO * std::mem::size_of::<f32>() <= STORED_U_MAX {
            let mut u = vec![0f32; XI * blocks * cin * CO];
            op.filters(0, blocks, &mut u, blocks * cin * CO);
            op.u = Some(Arc::new(u));
        }
        Ok(op)
    }

    /// `U` of blocks `first .. first + blocks` into `u`, position ξ at `u[ξ · stride..]`
    /// (`[blocks][cin][6]`).
    fn filters(&self, first: usize, blocks: usize, u: &mut [f32], stride: usize) {
        let (cin, g) = (self.cin, self.kernels());
        for b in 0..blocks {
            let start = (first + b) * CO;
            let rows = (self.cout - start).min(CO);
            let g = &g[start * cin * 9..][..rows * cin * 9];
            kernels::filters(g, rows, cin, &mut u[b * cin * CO..], stride);
        }
    }

    /// The kernels as [`arrange`] left them.
    fn kernels(&self) -> &[f32] {
        // `from_kernel` made them plain f32 memory in C order.
        self.g
            .try_as_plain_ram()
            .and_then(|g| g.as_slice::<f32>())
            .unwrap_or(&[])
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
        let [h, w] = self.side;
        let input = image_values(x, self.cin, self.side)?;
        let n = x.shape()[0];
        // SAFETY: f32 has no invalid values, and the output transform writes every
        // value (each output channel's rows of tiles are one part's).
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[n, self.cout, h, w])? };
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

    /// One image (`[cin, h, w]`) into `out` (`[cout, h, w]`) in two passes, each split
    /// across the threads [`op_threads`] has here: the input transform by blocks of
    /// input channels, then the rest by blocks of output channels (module docs).
    fn run_image(&self, x: &[f32], out: &mut [f32], sc: &mut WinogradScratch) {
        let [h, w] = self.side;
        let tp = ((h / 2) * (w / 2)).next_multiple_of(LANE);
        let (cin, cout) = (self.cin, self.cout);
        let parts = op_threads::threads().max(1);
        if sc.parts.len() < parts {
            sc.parts.resize_with(parts, PartScratch::default);
        }
        if let Some(u) = self.u.as_deref().filter(|_| kernels::panels_fit(w)) {
            return self.run_bands(x, out, u, &sc.bias, &mut sc.parts[..parts]);
        }
        sc.v.resize(XI * v_stride(cin, tp), 0.0);

        // 1. The input transform, by blocks of input channels, into V's panels.
        let per = cin.div_ceil(parts);
        let v = Panels::new(&mut sc.v, cin, tp);
        let work = x.chunks(per * h * w).zip(sc.parts.iter_mut()).enumerate();
        let in_place = kernels::panels_fit(w);
        op_threads::for_each(work, |(p, (x, part))| {
            for (k, x) in x.chunks_exact(h * w).enumerate() {
                let c = p * per + k;
                // SAFETY (both): each part writes only its own input channels' values.
                if in_place {
                    unsafe { v.transform(c, x, [h, w], 0..h / 2, &mut part.rows) };
                } else {
                    part.v.resize(XI * tp, 0.0);
                    kernels::input(x, h, w, &mut part.v, tp, &mut part.rows);
                    unsafe { v.store(c, &part.v) };
                }
            }
        });

        // 2. By blocks of output channels: their U, the products and the output
        //    transform.
        let per = cout.div_ceil(CO).div_ceil(parts) * CO;
        let (v, bias, vs) = (&sc.v[..], &sc.bias[..], v_stride(cin, tp));
        let work = out
            .chunks_mut(per * h * w)
            .zip(sc.parts.iter_mut())
            .enumerate();
        op_threads::for_each(work, |(p, (out, part))| {
            let first = p * per / CO;
            for (k, out) in out.chunks_mut(GROUP * CO * h * w).enumerate() {
                let block = first + k * GROUP;
                let channels = out.len() / (h * w);
                self.run_group(block, channels, v, vs, tp, &bias[block * CO..], out, part);
            }
        });
    }

    /// [`Self::run_image`] for a convolution that keeps its `U` (a small one): each
    /// thread part takes a band of rows of tiles through all three passes, with a V
    /// and products of its own, so that no part reads what another wrote and the parts
    /// meet once. Split by channels instead, two threads ran the shipped U-Net's
    /// convolutions slower than one (V crossing between the cores, and a second
    /// meeting).
    fn run_bands(
        &self,
        x: &[f32],
        out: &mut [f32],
        u: &[f32],
        bias: &[f32],
        parts: &mut [PartScratch],
    ) {
        let [h, w] = self.side;
        let (cin, cout, th, tw) = (self.cin, self.cout, h / 2, w / 2);
        let per = th.div_ceil(parts.len());
        let out = Bands::new(out, cout, h * w);
        let work = parts.iter_mut().enumerate().filter(|(p, _)| p * per < th);
        op_threads::for_each(work, |(p, part)| {
            let band = p * per..((p + 1) * per).min(th);
            let tp = (band.len() * tw).next_multiple_of(LANE);
            let vs = v_stride(cin, tp);
            part.v.resize(XI * vs, 0.0);
            let v = Panels::new(&mut part.v, cin, tp);
            for (c, x) in x.chunks_exact(h * w).enumerate() {
                // SAFETY: the panels are this part's own.
                unsafe { v.transform(c, x, self.side, band.clone(), &mut part.rows) };
            }
            let (size, blocks) = (cin * CO, cout.div_ceil(CO));
            let rows = 2 * band.len();
            for first in (0..blocks).step_by(GROUP) {
                let n = (blocks - first).min(GROUP);
                grow(&mut part.m, n * CO * XI * tp);
                for xi in 0..XI {
                    let u = &u[(xi * blocks + first) * size..][..n * size];
                    kernels::product(u, &part.v[xi * vs..][..cin * tp], xi, &mut part.m, cin, tp);
                }
                let channels = first * CO..((first + n) * CO).min(cout);
                for (o, &bias) in channels.clone().zip(&bias[channels]) {
                    let m = &part.m[(o - first * CO) * XI * tp..][..XI * tp];
                    // SAFETY: the band's rows of channel `o` are this part's alone.
                    let y = unsafe { out.rows(o, 2 * band.start * w, rows * w) };
                    kernels::output(m, tp, rows, w, bias, y);
                }
            }
        });
    }

    /// Output channels `6 · block ..` (`channels` of them, at most [`GROUP`] blocks) of
    /// one image into `out`, from `v` (all of V, in panels, positions `vs` apart): `U`
    /// of the group's blocks, the 16 products `M_ξ = U_ξ V_ξ` for them, and the output transform plus `bias`.
    #[allow(clippy::too_many_arguments)]
    fn run_group(
        &self,
        block: usize,
        channels: usize,
        v: &[f32],
        vs: usize,
        tp: usize,
        bias: &[f32],
        out: &mut [f32],
        part: &mut PartScratch,
    ) {
        let [h, w] = self.side;
        let cin = self.cin;
        let blocks = channels.div_ceil(CO);
        let size = cin * CO;
        grow(&mut part.m, blocks * CO * XI * tp);
        let (u, stride) = match &self.u {
            Some(u) => (&u[block * size..], self.cout.div_ceil(CO) * size),
            None => {
                let stride = blocks * size + PAD;
                grow(&mut part.u, XI * stride);
                self.filters(block, blocks, &mut part.u, stride);
                (&part.u[..], stride)
            }
        };
        for xi in 0..XI {
            let u = &u[xi * stride..][..blocks * size];
            kernels::product(u, &v[xi * vs..][..cin * tp], xi, &mut part.m, cin, tp);
        }
        for (o, out) in out.chunks_exact_mut(h * w).enumerate() {
            let m = &part.m[o * XI * tp..][..XI * tp];
            kernels::output(m, tp, h, w, bias[o], out);
        }
    }
}

/// Makes `buffer` at least `len` long. Buffers whose use varies in length within a
/// run (the last group of output channels is smaller) only grow, so that they are not
/// refilled with zeros on every run; their users read only what they wrote.
fn grow(buffer: &mut Vec<f32>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
}

/// The most bytes of `U` an op keeps, made once at load ([`WinogradConv`]'s `u`): up to
/// this, 16/9 of the kernels' memory more buys each run its filter transforms, which
/// cost the most beside the products on small maps (on the 8 × 8 ones, 16 tiles per
/// kernel). The shipped Fashion-MNIST U-Net's convolutions all keep theirs (at most
/// 540 KB, 4.1 MB in all, for 2.6 MB of weights); the cifar-size U-Net's, 1.1-8.5 MB
/// each, make theirs as they run.
pub const STORED_U_MAX: usize = 1 << 20;

/// Blocks of output channels whose `U` is made at once: the products reuse each panel
/// of `V` for all of them while it is in the L1 cache, and the group's `U` and `M` stay
/// small (at cin = 256 and a 32 × 32 output: 393 KB and 393 KB).
const GROUP: usize = 4;

/// Floats of padding after each position's rows of a group's `U`, and of V
/// ([`v_stride`]): they would be a multiple of 4 KiB apart at common channel counts,
/// which maps the transforms' 16 streams of stores onto the same cache sets.
const PAD: usize = 16;

/// Arranges OIHW kernels (`[cout][cin][9]`) in place by blocks of 6 output channels:
/// each block's `[rows][cin][9]` becomes `[9][cin][rows]` in the same place, so that
/// the filter transform reads each of the 9 kernel positions as one run of `cin · 6`.
fn arrange(g: &mut [f32], cin: usize) {
    // The blocks on two threads (`load_threads`): each is arranged alike wherever.
    crate::load_threads::for_each_chunk_mut(g, CO * cin * 9, |chunk| {
        let rows = chunk.len() / (cin * 9);
        let block = chunk.to_vec();
        for (r, kernels) in block.chunks_exact(cin * 9).enumerate() {
            for (c, kernel) in kernels.chunks_exact(9).enumerate() {
                for (j, &value) in kernel.iter().enumerate() {
                    chunk[(j * cin + c) * rows + r] = value;
                }
            }
        }
    });
}

/// Floats from one position's panels of V to the next: `cin · tp` and [`PAD`], so that
/// the 16 values of a tile, one per position, are not a multiple of 4 KiB apart (at
/// cin = 64 and an 8 × 8 output they were 4 KiB apart exactly, and the input
/// transform's stores of a tile met in one cache set).
fn v_stride(cin: usize, tp: usize) -> usize {
    cin * tp + PAD
}

/// Where tile `t` of input channel `c` at position `xi` lies in V (`[ξ][tp / 16][cin]
/// [16]`, positions `xs` apart, the last panel 8 wide where `tp` is not a multiple of
/// 16): the tiles after it in its panel follow it.
#[inline(always)]
fn panel_index(cin: usize, tp: usize, xs: usize, xi: usize, c: usize, t: usize) -> usize {
    let t0 = t & !(2 * LANE - 1);
    let width = (tp - t0).min(2 * LANE);
    xi * xs + cin * t0 + c * width + (t - t0)
}

/// A buffer that the parts of one run share, each writing values no other part
/// touches, borrowed mutably for as long as it lives.
struct Shared<'a> {
    base: *mut f32,
    len: usize,
    buffer: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: its users write disjoint values ([`Shared::values`]).
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    fn new(buffer: &'a mut [f32]) -> Self {
        Shared {
            base: buffer.as_mut_ptr(),
            len: buffer.len(),
            buffer: std::marker::PhantomData,
        }
    }

    /// Values `start .. start + len`.
    ///
    /// # Safety
    /// No other thread may use the same values while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn values(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start <= self.len && len <= self.len - start);
        std::slice::from_raw_parts_mut(self.base.add(start), len)
    }
}

/// V (`[ξ][tp / 16][cin][16]`, positions [`v_stride`] apart: for each position, the
/// tiles in panels of 16, the last 8 wide where `tp` is not a multiple of 16) shared by
/// the input transform's parts, each writing its own input channels.
struct Panels<'a> {
    v: Shared<'a>,
    cin: usize,
    tp: usize,
}

impl<'a> Panels<'a> {
    fn new(v: &'a mut [f32], cin: usize, tp: usize) -> Self {
        assert!(v.len() >= XI * v_stride(cin, tp) && tp.is_multiple_of(LANE));
        Panels {
            v: Shared::new(v),
            cin,
            tp,
        }
    }

    /// Stores input channel `c`'s transform (`[ξ][tp]`) into its rows of the panels.
    ///
    /// # Safety
    /// No other thread may store the same channel meanwhile, nor read V.
    unsafe fn store(&self, c: usize, values: &[f32]) {
        let (cin, tp) = (self.cin, self.tp);
        assert!(c < cin && values.len() >= XI * tp);
        for (xi, values) in values.chunks_exact(tp).take(XI).enumerate() {
            let mut t0 = 0;
            while t0 < tp {
                let width = (tp - t0).min(2 * LANE);
                let at = panel_index(cin, tp, v_stride(cin, tp), xi, c, t0);
                // SAFETY: channel `c`'s values, this caller's alone.
                let row = self.v.values(at, width);
                row.copy_from_slice(&values[t0..t0 + width]);
                t0 += width;
            }
        }
    }

    /// Input channel `c`'s transform over the rows of tiles `band`, from its values `x`
    /// (`[h, w]`), written straight into its rows of the panels (the band's first tile
    /// as tile 0; [`kernels::input_panels`], `rows` its room for the column
    /// transforms). Only where [`kernels::panels_fit`] takes the width.
    ///
    /// # Safety
    /// No other thread may write the same channel meanwhile, nor read V.
    unsafe fn transform(
        &self,
        c: usize,
        x: &[f32],
        [h, w]: [usize; 2],
        band: std::ops::Range<usize>,
        rows: &mut Vec<f32>,
    ) {
        assert!(c < self.cin && x.len() == h * w && h.is_multiple_of(2));
        assert!(band.start < band.end && band.end <= h / 2);
        assert!(kernels::panels_fit(w) && band.len() * (w / 2) <= self.tp);
        let at = kernels::PanelAt {
            base: self.v.base,
            cin: self.cin,
            tp: self.tp,
            xs: v_stride(self.cin, self.tp),
            c,
        };
        kernels::input_panels(x, [h, w], band, rows, at);
    }
}

/// An image's output (`[cout][h · w]`) shared by the parts of
/// [`WinogradConv::run_bands`], each writing its own band of rows of every channel.
struct Bands<'a> {
    out: Shared<'a>,
    plane: usize,
}

impl<'a> Bands<'a> {
    fn new(out: &'a mut [f32], channels: usize, plane: usize) -> Self {
        assert!(out.len() == channels * plane);
        Bands {
            out: Shared::new(out),
            plane,
        }
    }

    /// Values `start .. start + len` of channel `o`.
    ///
    /// # Safety
    /// No other thread may use the same values while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn rows(&self, o: usize, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.plane);
        self.out.values(o * self.plane + start, len)
    }
}

thread_local! {
    /// This thread's buffers for [`WinogradConv::run`].
    static SCRATCH: std::cell::RefCell<WinogradScratch> = std::cell::RefCell::default();
}

/// A [`WinogradConv`]'s buffers: the transformed input `V` in panels, the bias, and
/// each thread part's own.
#[derive(Debug, Clone, Default)]
pub struct WinogradScratch {
    v: Vec<f32>,
    bias: Vec<f32>,
    parts: Vec<PartScratch>,
}

/// One thread part's buffers: the input transform's rows and one channel's `V`, and a
/// group's `U` (`[ξ][blocks][cin][6]`) and products `M` (`[channel][ξ][tp]`).
#[derive(Debug, Clone, Default)]
struct PartScratch {
    rows: Vec<f32>,
    v: Vec<f32>,
    u: Vec<f32>,
    m: Vec<f32>,
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

    /// Whether [`input_panels`] takes a map `w` wide: its tiles come 4 or 8 to a
    /// vector, so the tiles of a row must be a multiple of 4.
    pub fn panels_fit(w: usize) -> bool {
        w.is_multiple_of(2) && (w / 2).is_multiple_of(4)
    }

    /// Where the values of one input channel go in V's panels (`[ξ][tp / 16][cin][16]`,
    /// positions `xs` apart, the last panel 8 wide where `tp` is not a multiple of 16).
    #[derive(Debug, Clone, Copy)]
    pub struct PanelAt {
        /// V's first value.
        pub base: *mut f32,
        /// Input channels.
        pub cin: usize,
        /// Tiles per position, padded to a multiple of 8.
        pub tp: usize,
        /// Floats from one position to the next (`cin · tp` or more).
        pub xs: usize,
        /// The channel.
        pub c: usize,
    }

    impl PanelAt {
        /// Tile `t`'s value at position `xi`; tiles `t .. t + 4` (from a multiple of 4)
        /// follow it, and so do `t .. t + 8` from a multiple of 8.
        ///
        /// # Safety
        /// `xi < 16`, `t < tp`, `c < cin` and V holds `16 · xs` values.
        #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
        #[inline(always)]
        unsafe fn ptr(self, xi: usize, t: usize) -> *mut f32 {
            let at = super::panel_index(self.cin, self.tp, self.xs, xi, self.c, t);
            self.base.add(at)
        }
    }

    /// The input transform of one channel `x` (`[h, w]`, `w` taken by [`panels_fit`])
    /// over the rows of tiles `band` (tile `(ty, tx)` as tile `(ty − band.start) · w / 2
    /// + tx`), written straight into its rows of V's panels at `at`, 4 or 8 tiles to a
    /// vector: first the column transforms `d B` of the band's padded rows (into `rows`;
    /// each input row once, where [`input`] makes each twice), read from the input
    /// without a padded copy, then the row transforms `Bᵀ (d B)` of each row of tiles.
    /// The same operations on the same values as [`input`], so the same bits.
    ///
    /// # Safety
    /// `at` must describe V (see [`PanelAt::ptr`]) with the band's tiles `≤ tp`, and no
    /// other thread may write channel `at.c` or read V meanwhile.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub unsafe fn input_panels(
        x: &[f32],
        [h, w]: [usize; 2],
        band: std::ops::Range<usize>,
        rows: &mut Vec<f32>,
        at: PanelAt,
    ) {
        assert!(panels_fit(w) && h.is_multiple_of(2) && x.len() == h * w);
        assert!(band.start < band.end && band.end <= h / 2);
        assert!(at.c < at.cin && band.len() * (w / 2) <= at.tp);
        #[cfg(target_arch = "x86_64")]
        x86::input_panels(x, [h, w], band, rows, at);
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Winograd kernel off x86-64")
    }

    /// `U` of one block of `rows` output channels: `g` is its kernels (`[9][cin][rows]`),
    /// and position ξ goes to `u[ξ · stride..][..cin · 6]` as `[cin][6]`, zero past
    /// `rows` (`G g Gᵀ` as [`super::filter_transform`] computes it: same operations,
    /// same order, same bits).
    pub fn filters(g: &[f32], rows: usize, cin: usize, u: &mut [f32], stride: usize) {
        let n = cin * CO;
        assert!((1..=CO).contains(&rows) && g.len() == 9 * cin * rows);
        assert!(n <= stride && u.len() >= (XI - 1) * stride + n);
        if rows < CO {
            // The last block of a channel count off the 6: one kernel at a time.
            for c in 0..cin {
                for r in 0..CO {
                    let values = if r < rows {
                        let kernel: [f32; 9] = std::array::from_fn(|j| g[(j * cin + c) * rows + r]);
                        super::filter_transform(&kernel)
                    } else {
                        [0.0; XI]
                    };
                    for (xi, x) in values.into_iter().enumerate() {
                        u[xi * stride + c * CO + r] = x;
                    }
                }
            }
            return;
        }
        // SAFETY: the op exists only where `super::available` found the features; the
        // sizes were just checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::filters(g, n, u, stride)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Winograd kernel off x86-64")
    }

    /// `M_ξ = U_ξ V_ξ` for a group of blocks of output channels: `u` is their `U_ξ`
    /// (`[blocks][cin][6]`), `v` is `V_ξ` in panels (`[tp / 16][cin][16]`, the last 8
    /// wide where `tp` is not a multiple of 16), and `m` the group's products
    /// (`[channel][ξ][tp]`), written at position `xi`. Each panel (or pair of panels,
    /// with AVX-512) is used for every block while it is in the L1 cache.
    // Off x86-64 the op never exists, and the kernel's arguments go unused.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn product(u: &[f32], v: &[f32], xi: usize, m: &mut [f32], cin: usize, tp: usize) {
        let blocks = u.len() / (cin * CO);
        assert!(u.len() == blocks * cin * CO && v.len() == cin * tp);
        assert!(xi < XI && tp.is_multiple_of(LANE) && m.len() >= blocks * CO * XI * tp);
        let mut t0 = 0;
        // With AVX-512, two panels (32 tiles) at a time: the same multiply-adds in the
        // same order per value, so the same bits as the AVX2 tile.
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            const WIDE: usize = 4 * LANE;
            while t0 + WIDE <= tp {
                let panels = &v[cin * t0..][..cin * WIDE];
                for b in 0..blocks {
                    let u = &u[b * cin * CO..][..cin * CO];
                    let at = (b * CO * XI + xi) * tp + t0;
                    // SAFETY: detected; the sizes were checked above.
                    unsafe { x86::tile32(u, panels, m, cin, at, XI * tp) }
                }
                t0 += WIDE;
            }
            // A last panel of 16 tiles, two blocks of channels at a time (12 registers).
            if t0 + 2 * LANE <= tp {
                let panel = &v[cin * t0..][..cin * 2 * LANE];
                for b in (0..blocks & !1).step_by(2) {
                    let u = &u[b * cin * CO..][..2 * cin * CO];
                    let at = (b * CO * XI + xi) * tp + t0;
                    // SAFETY: detected; the sizes were checked above.
                    unsafe { x86::tile16x12(u, panel, m, cin, at, XI * tp) }
                }
                if blocks % 2 == 1 {
                    let b = blocks - 1;
                    let u = &u[b * cin * CO..][..cin * CO];
                    let at = (b * CO * XI + xi) * tp + t0;
                    // SAFETY: as above.
                    unsafe { x86::tile::<2>(u, panel, m, cin, at, XI * tp) }
                }
                t0 += 2 * LANE;
            }
        }
        while t0 < tp {
            let width = (tp - t0).min(2 * LANE);
            let panel = &v[cin * t0..][..cin * width];
            for b in 0..blocks {
                let u = &u[b * cin * CO..][..cin * CO];
                let at = (b * CO * XI + xi) * tp + t0;
                // SAFETY: the op exists only where `super::available` found the
                // features; the sizes were checked above.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    if width == 2 * LANE {
                        x86::tile::<2>(u, panel, m, cin, at, XI * tp)
                    } else {
                        x86::tile::<1>(u, panel, m, cin, at, XI * tp)
                    }
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

        /// Whether the AVX-512 transforms take a map `2 tw` wide: 16 tiles to a vector,
        /// from one row of tiles (`tw` a multiple of 16), two (8) or four (4).
        fn wide_fits(tw: usize) -> bool {
            tw.is_multiple_of(16) || tw == 8 || tw == 4
        }

        /// [`super::output`]: with AVX-512, 16 tiles at a time where [`wide_fits`]
        /// takes the width ([`output16`]); the rest 8 tiles at a time, then one by
        /// one, with the same operations in the same order (so the same bits).
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn output(m: &[f32], tp: usize, h: usize, w: usize, bias: f32, out: &mut [f32]) {
            let (th, tw) = (h / 2, w / 2);
            let mut done = 0;
            if wide_fits(tw) && is_x86_feature_detected!("avx512f") {
                done = output16(m, tp, th, tw, bias, out);
            }
            output_rows(m, tp, done..th, tw, bias, out);
        }

        /// The output transform of the first `16 · ⌊th · tw / 16⌋` tiles, 16 to a
        /// vector (a row of tiles or part of one, or 2 or 4 whole rows: [`wide_fits`]),
        /// each value computed as [`output_rows`] computes it; returns the rows of
        /// tiles done.
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn output16(
            m: &[f32],
            xs: usize,
            th: usize,
            tw: usize,
            bias: f32,
            out: &mut [f32],
        ) -> usize {
            const W: usize = 2 * LANE;
            let w = 2 * tw;
            let groups = th * tw / W;
            let b = _mm512_set1_ps(bias);
            // Tiles 0..8 and 8..16 of the two columns, interleaved.
            let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
            let second =
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
            for t0 in (0..groups * W).step_by(W) {
                let ld = |xi: usize| _mm512_loadu_ps(m.as_ptr().add(xi * xs + t0));
                let mut c = [[_mm512_setzero_ps(); 4]; 2];
                let [c0, c1] = &mut c;
                for (j, (t, b)) in c0.iter_mut().zip(c1.iter_mut()).enumerate() {
                    let (m0, m1, m2, m3) = (ld(j), ld(4 + j), ld(8 + j), ld(12 + j));
                    *t = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                    *b = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
                }
                for (r, c) in c.iter().enumerate() {
                    let y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(c[0], c[1]), c[2]), b);
                    let y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(c[1], c[2]), c[3]), b);
                    for (k, idx) in [(0, first), (LANE, second)] {
                        // 8 tiles' 16 outputs of row `r` of their tiles.
                        let y = _mm512_permutex2var_ps(y0, idx, y1);
                        let t = t0 + k;
                        let at = |t: usize| (2 * (t / tw) + r) * w + 2 * (t % tw);
                        if tw >= LANE {
                            _mm512_storeu_ps(out.as_mut_ptr().add(at(t)), y);
                        } else {
                            let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(y));
                            _mm256_storeu_ps(
                                out.as_mut_ptr().add(at(t)),
                                _mm512_castps512_ps256(y),
                            );
                            _mm256_storeu_ps(out.as_mut_ptr().add(at(t + 4)), _mm256_castpd_ps(hi));
                        }
                    }
                }
            }
            groups * W / tw
        }

        /// The output transform of the rows of tiles `rows`: 8 tiles at a time, the
        /// rest one by one.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn output_rows(
            m: &[f32],
            xs: usize,
            rows: std::ops::Range<usize>,
            tw: usize,
            bias: f32,
            out: &mut [f32],
        ) {
            let w = 2 * tw;
            let b = _mm256_set1_ps(bias);
            for ty in rows {
                let base = m.as_ptr().add(ty * tw);
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

        /// [`super::input_panels`] (its checks done).
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn input_panels(
            x: &[f32],
            [h, w]: [usize; 2],
            band: std::ops::Range<usize>,
            rows: &mut Vec<f32>,
            at: super::PanelAt,
        ) {
            let tw = w / 2;
            // The column transforms of the band's padded rows `2 · band.start ..= 2 ·
            // band.end + 1`, `[row][j][tw]`; padded rows 0 and h + 1 (the zero padding)
            // are zeros, padded row `r` is input row `r − 1`.
            let line = 4 * tw;
            let first = 2 * band.start;
            let count = 2 * band.len() + 2;
            rows.resize(count * line, 0.0);
            let (x, cols) = (x.as_ptr(), rows.as_mut_ptr());
            let wide = is_x86_feature_detected!("avx512f");
            for (k, padded) in (first..first + count).enumerate() {
                let out = cols.add(k * line);
                if padded == 0 || padded == h + 1 {
                    std::ptr::write_bytes(out, 0, line);
                } else if wide && tw.is_multiple_of(2 * LANE) {
                    columns16(x.add((padded - 1) * w), out, tw);
                } else if tw.is_multiple_of(LANE) {
                    columns8(x.add((padded - 1) * w), out, tw);
                } else {
                    columns4(x.add((padded - 1) * w), out, tw);
                }
            }
            // With AVX-512, 16 tiles to a vector (from 1, 2 or 4 rows of tiles) as far
            // as they go, then the rows of tiles left 8 or 4 tiles to a vector.
            let mut done = 0;
            if wide && wide_fits(tw) {
                let groups = band.len() * tw / (2 * LANE);
                for t0 in (0..groups).map(|g| g * 2 * LANE) {
                    match tw {
                        4 => rows16::<4>(cols, line, tw, t0, at),
                        8 => rows16::<2>(cols, line, tw, t0, at),
                        _ => rows16::<1>(cols, line, tw, t0, at),
                    }
                }
                done = groups * 2 * LANE / tw;
            }
            for ty in done..band.len() {
                let d = cols.add(2 * ty * line);
                if tw.is_multiple_of(LANE) {
                    rows8(d, tw, ty, at);
                } else {
                    rows4(d, tw, ty, at);
                }
            }
        }

        /// The even and odd values of `p[0..16]`.
        #[inline(always)]
        unsafe fn split8(p: *const f32) -> (__m256, __m256) {
            let (lo, hi) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(LANE)));
            let order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            (
                order(_mm256_shuffle_ps::<0b10_00_10_00>(lo, hi)),
                order(_mm256_shuffle_ps::<0b11_01_11_01>(lo, hi)),
            )
        }

        /// The even and odd values of `p[0..32]`.
        #[inline(always)]
        unsafe fn split16(p: *const f32) -> (__m512, __m512) {
            let (lo, hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(2 * LANE)));
            let evens =
                _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            (
                _mm512_permutex2var_ps(lo, evens, hi),
                _mm512_permutex2var_ps(lo, odds, hi),
            )
        }

        /// The even and odd values of `p[0..8]`.
        #[inline(always)]
        unsafe fn split4(p: *const f32) -> (__m128, __m128) {
            let (lo, hi) = (_mm_loadu_ps(p), _mm_loadu_ps(p.add(4)));
            (
                _mm_shuffle_ps::<0b10_00_10_00>(lo, hi),
                _mm_shuffle_ps::<0b11_01_11_01>(lo, hi),
            )
        }

        /// Defines `$name(x, out, tw)`: `d B` of one input row `x` (`2 tw` values) into
        /// `out` (`[j][tw]`), `$n` tiles to a vector (`$v`, with `$split` and the
        /// intrinsics named after it). Tile `tx` reads padded columns `2tx .. 2tx + 4`,
        /// input columns `2tx − 1 .. 2tx + 3`: `a1`, `a2` are the evens and odds of the
        /// input from `2tx`, `a0` the odds moved one tile right by `$right` (the
        /// previous group's last, or the left padding's zero, coming in), `a3` the evens
        /// moved one tile left by `$left` (the next group's first, or the right
        /// padding's zero).
        macro_rules! columns {
            ($name:ident, $features:literal, $n:expr, $v:ty, $split:ident, $zero:ident,
             $store:ident, $add:ident, $sub:ident, $right:expr, $left:expr) => {
                #[target_feature(enable = $features)]
                unsafe fn $name(x: *const f32, out: *mut f32, tw: usize) {
                    let (right, left) = ($right, $left);
                    let zero: $v = $zero();
                    let (mut last_odds, (mut evens, mut odds)) = (zero, $split(x));
                    for tx in (0..tw).step_by($n) {
                        let (next_evens, next_odds) = if tx + $n < tw {
                            $split(x.add(2 * (tx + $n)))
                        } else {
                            (zero, zero)
                        };
                        let (a0, a3) = (right(odds, last_odds), left(evens, next_evens));
                        let (a1, a2) = (evens, odds);
                        $store(out.add(tx), $sub(a0, a2));
                        $store(out.add(tw + tx), $add(a1, a2));
                        $store(out.add(2 * tw + tx), $sub(a2, a1));
                        $store(out.add(3 * tw + tx), $sub(a1, a3));
                        (last_odds, evens, odds) = (odds, next_evens, next_odds);
                    }
                }
            };
        }

        columns!(
            columns16,
            "avx512f,avx2,fma",
            2 * LANE,
            __m512,
            split16,
            _mm512_setzero_ps,
            _mm512_storeu_ps,
            _mm512_add_ps,
            _mm512_sub_ps,
            // `b`'s last value, then `a`'s first fifteen; `a`'s last fifteen, then
            // `b`'s first.
            |a: __m512, b: __m512| {
                let i = _mm512_setr_epi32(31, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14);
                _mm512_permutex2var_ps(a, i, b)
            },
            |a: __m512, b: __m512| {
                let i = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
                _mm512_permutex2var_ps(a, i, b)
            }
        );

        columns!(
            columns8,
            "avx2,fma",
            LANE,
            __m256,
            split8,
            _mm256_setzero_ps,
            _mm256_storeu_ps,
            _mm256_add_ps,
            _mm256_sub_ps,
            // `b`'s last value, then `a`'s first seven; `a`'s last seven, then `b`'s
            // first.
            |a: __m256, b: __m256| {
                let i = _mm256_setr_epi32(7, 0, 1, 2, 3, 4, 5, 6);
                _mm256_blend_ps::<0b0000_0001>(
                    _mm256_permutevar8x32_ps(a, i),
                    _mm256_permutevar8x32_ps(b, i),
                )
            },
            |a: __m256, b: __m256| {
                let i = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 0);
                _mm256_blend_ps::<0b1000_0000>(
                    _mm256_permutevar8x32_ps(a, i),
                    _mm256_permutevar8x32_ps(b, i),
                )
            }
        );

        columns!(
            columns4,
            "avx2,fma",
            4,
            __m128,
            split4,
            _mm_setzero_ps,
            _mm_storeu_ps,
            _mm_add_ps,
            _mm_sub_ps,
            // `b`'s last value, then `a`'s first three; `a`'s last three, then `b`'s
            // first.
            |a: __m128, b: __m128| {
                _mm_castsi128_ps(_mm_alignr_epi8::<12>(
                    _mm_castps_si128(a),
                    _mm_castps_si128(b),
                ))
            },
            |a: __m128, b: __m128| {
                _mm_castsi128_ps(_mm_alignr_epi8::<4>(
                    _mm_castps_si128(b),
                    _mm_castps_si128(a),
                ))
            }
        );

        /// Defines `$name(d, tw, ty, at)`: `Bᵀ (d B)` of tile row `ty` from `d` (the
        /// column transforms of its 4 padded rows, `[i][j][tw]`) into the panels, `$n`
        /// tiles to a vector (the intrinsics named).
        macro_rules! rows {
            ($name:ident, $n:expr, $load:ident, $store:ident, $add:ident, $sub:ident) => {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn $name(d: *const f32, tw: usize, ty: usize, at: super::PanelAt) {
                    for tx in (0..tw).step_by($n) {
                        let p = at.ptr(0, ty * tw + tx);
                        for j in 0..4 {
                            let ld = |i: usize| $load(d.add((i * 4 + j) * tw + tx));
                            let (d0, d1, d2, d3) = (ld(0), ld(1), ld(2), ld(3));
                            $store(p.add(j * at.xs), $sub(d0, d2));
                            $store(p.add((4 + j) * at.xs), $add(d1, d2));
                            $store(p.add((8 + j) * at.xs), $sub(d2, d1));
                            $store(p.add((12 + j) * at.xs), $sub(d1, d3));
                        }
                    }
                }
            };
        }

        /// 16 values of the column transforms from `Q` rows of tiles (`16 / Q` values
        /// of each, rows `step` apart).
        #[inline(always)]
        unsafe fn load16<const Q: usize>(p: *const f32, step: usize) -> __m512 {
            match Q {
                1 => _mm512_loadu_ps(p),
                2 => {
                    let lo = _mm512_castps256_ps512(_mm256_loadu_ps(p));
                    let hi = _mm256_castps_pd(_mm256_loadu_ps(p.add(step)));
                    _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castps_pd(lo), hi))
                }
                _ => {
                    let v = _mm512_castps128_ps512(_mm_loadu_ps(p));
                    let v = _mm512_insertf32x4::<1>(v, _mm_loadu_ps(p.add(step)));
                    let v = _mm512_insertf32x4::<2>(v, _mm_loadu_ps(p.add(2 * step)));
                    _mm512_insertf32x4::<3>(v, _mm_loadu_ps(p.add(3 * step)))
                }
            }
        }

        /// `Bᵀ (d B)` of the band's tiles `t0 .. t0 + 16` (`t0` a multiple of 16, the
        /// tiles of one panel) from the column transforms `cols` (`[padded row][j][tw]`,
        /// rows `line` apart) into the panels: `Q` rows of tiles (`tw = 16 / Q`), or
        /// part of one (`Q = 1`, `tw` a multiple of 16). The same operations as
        /// `rows8`'s, 16 tiles to a vector.
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn rows16<const Q: usize>(
            cols: *const f32,
            line: usize,
            tw: usize,
            t0: usize,
            at: super::PanelAt,
        ) {
            let (ty, tx) = (t0 / tw, t0 % tw);
            let d = cols.add(2 * ty * line + tx);
            let p = at.ptr(0, t0);
            for j in 0..4 {
                let ld = |i: usize| load16::<Q>(d.add((i * 4 + j) * tw), 2 * line);
                let (d0, d1, d2, d3) = (ld(0), ld(1), ld(2), ld(3));
                _mm512_storeu_ps(p.add(j * at.xs), _mm512_sub_ps(d0, d2));
                _mm512_storeu_ps(p.add((4 + j) * at.xs), _mm512_add_ps(d1, d2));
                _mm512_storeu_ps(p.add((8 + j) * at.xs), _mm512_sub_ps(d2, d1));
                _mm512_storeu_ps(p.add((12 + j) * at.xs), _mm512_sub_ps(d1, d3));
            }
        }

        rows!(
            rows8,
            LANE,
            _mm256_loadu_ps,
            _mm256_storeu_ps,
            _mm256_add_ps,
            _mm256_sub_ps
        );
        rows!(
            rows4,
            4,
            _mm_loadu_ps,
            _mm_storeu_ps,
            _mm_add_ps,
            _mm_sub_ps
        );

        /// [`super::filters`]: 8 values at a time, the rest one by one.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn filters(g: &[f32], n: usize, u: &mut [f32], stride: usize) {
            let half = _mm256_set1_ps(0.5);
            // `G`'s rows applied to a, b, c (`super::super::filter_transform`).
            let rows = |a: __m256, b: __m256, c: __m256| {
                let sum = _mm256_mul_ps(half, _mm256_add_ps(_mm256_add_ps(a, b), c));
                let diff = _mm256_mul_ps(half, _mm256_add_ps(_mm256_sub_ps(a, b), c));
                [a, sum, diff, c]
            };
            let (gp, up) = (g.as_ptr(), u.as_mut_ptr());
            let mut e = 0;
            while e + LANE <= n {
                let ld = |j: usize| _mm256_loadu_ps(gp.add(j * n + e));
                let [c0, c1, c2]: [[__m256; 4]; 3] =
                    std::array::from_fn(|j| rows(ld(j), ld(3 + j), ld(6 + j)));
                for (i, ((&a, &b), &c)) in c0.iter().zip(&c1).zip(&c2).enumerate() {
                    let row = rows(a, b, c);
                    for (k, x) in row.into_iter().enumerate() {
                        _mm256_storeu_ps(up.add((i * 4 + k) * stride + e), x);
                    }
                }
                e += LANE;
            }
            for e in e..n {
                let kernel: [f32; 9] = std::array::from_fn(|j| *gp.add(j * n + e));
                for (xi, x) in super::super::filter_transform(&kernel)
                    .into_iter()
                    .enumerate()
                {
                    *up.add(xi * stride + e) = x;
                }
            }
        }

        /// Tiles `t0..t0 + 8N` of one block of 6 output channels: `u` is their `U_ξ`
        /// (`[cin][6]`), `panel` the tiles' `V_ξ` (`[cin][8N]`); 6 channels × 8N tiles
        /// in registers, summed over the input channels in order, then stored at
        /// `m[at + r · stride..]` for channel `r`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn tile<const N: usize>(
            u: &[f32],
            panel: &[f32],
            m: &mut [f32],
            cin: usize,
            at: usize,
            stride: usize,
        ) {
            let ub = u.as_ptr();
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
                let out = m.as_mut_ptr().add(at + r * stride);
                for (k, a) in row.iter().enumerate() {
                    _mm256_storeu_ps(out.add(LANE * k), *a);
                }
            }
        }

        /// [`tile`] for two blocks of channels with AVX-512: `u` holds both blocks'
        /// `U_ξ` (`[2][cin][6]`), `panel` one panel of 16 tiles (`[cin][16]`); 12
        /// channels × 16 tiles in 12 registers, each value summed like [`tile`]'s (so
        /// the same bits), stored at `m[at + r · stride..][..16]` for channel `r` of
        /// the two blocks (the second block's channels follow the first's).
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub unsafe fn tile16x12(
            u: &[f32],
            panel: &[f32],
            m: &mut [f32],
            cin: usize,
            at: usize,
            stride: usize,
        ) {
            const W: usize = 2 * LANE;
            debug_assert!(u.len() >= 2 * cin * CO && panel.len() >= cin * W);
            let (u0, u1) = (u.as_ptr(), u.as_ptr().add(cin * CO));
            let mut vp = panel.as_ptr();
            let mut acc = [[_mm512_setzero_ps(); CO]; 2];
            for c in 0..cin {
                let x = _mm512_loadu_ps(vp);
                for (ub, row) in [u0, u1].into_iter().zip(acc.iter_mut()) {
                    for (r, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(*ub.add(c * CO + r)), x, *a);
                    }
                }
                vp = vp.add(W);
            }
            for (r, a) in acc.iter().flatten().enumerate() {
                _mm512_storeu_ps(m.as_mut_ptr().add(at + r * stride), *a);
            }
        }

        /// [`tile`] for 32 tiles `t0..t0 + 32` with AVX-512: `panels` holds their two
        /// panels of 16 (`[2][cin][16]`); 6 channels × 2 panels in 12 registers of 16
        /// lanes, each value summed like [`tile`]'s (so the same bits), stored at
        /// `m[at + r · stride..][..32]` for channel `r`.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub unsafe fn tile32(
            u: &[f32],
            panels: &[f32],
            m: &mut [f32],
            cin: usize,
            at: usize,
            stride: usize,
        ) {
            const W: usize = 2 * LANE;
            debug_assert!(u.len() >= cin * CO && panels.len() >= 2 * cin * W);
            let ub = u.as_ptr();
            let (mut p0, mut p1) = (panels.as_ptr(), panels.as_ptr().add(cin * W));
            let mut acc = [[_mm512_setzero_ps(); 2]; CO];
            for c in 0..cin {
                let vv = [_mm512_loadu_ps(p0), _mm512_loadu_ps(p1)];
                for (r, row) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*ub.add(c * CO + r));
                    for (a, x) in row.iter_mut().zip(&vv) {
                        *a = _mm512_fmadd_ps(b, *x, *a);
                    }
                }
                p0 = p0.add(W);
                p1 = p1.add(W);
            }
            for (r, row) in acc.iter().enumerate() {
                let out = m.as_mut_ptr().add(at + r * stride);
                for (k, a) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.add(W * k), *a);
                }
            }
        }
    }

    /// The output transform of one output channel from its `m` (`[ξ][tp]`) into `out`
    /// (`[h, w]`), plus `bias`.
    // Off x86-64 the op never exists, and the kernel's arguments go unused.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn output(m: &[f32], tp: usize, h: usize, w: usize, bias: f32, out: &mut [f32]) {
        assert!(m.len() >= XI * tp && out.len() >= h * w);
        assert!((h / 2) * (w / 2) <= tp && w.is_multiple_of(2));
        // SAFETY: the op exists only where `super::available` found the features; the
        // sizes were just checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::output(m, tp, h, w, bias, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no Winograd kernel off x86-64")
    }

    #[cfg(all(test, target_arch = "x86_64"))]
    mod tests {
        use super::{x86, CO, LANE, XI};
        use crate::test_values::values;

        #[test]
        fn the_avx512_tiles_give_the_avx2_tiles_bits() {
            let has = |f: &str| match f {
                "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
                _ => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
            };
            if !has("avx512f") || !has("avx2") {
                return;
            }
            // Two blocks of channels, two panels of 16 tiles, 19 input channels.
            let (cin, w, stride) = (19, 2 * LANE, 40);
            let (u, v) = (values(2 * cin * CO, 1), values(2 * cin * w, 2));
            let (mut avx2, mut wide, mut pairs) = (vec![0f32; 12 * stride], vec![], vec![]);
            wide.resize(avx2.len(), 0.0);
            pairs.resize(avx2.len(), 0.0);
            // SAFETY: the features were detected; every tile stays inside the buffers.
            unsafe {
                for b in 0..2 {
                    let ub = &u[b * cin * CO..];
                    for p in 0..2 {
                        let at = b * CO * stride + p * w;
                        x86::tile::<2>(ub, &v[p * cin * w..], &mut avx2, cin, at, stride);
                    }
                    x86::tile32(ub, &v, &mut wide, cin, b * CO * stride, stride);
                }
                for p in 0..2 {
                    x86::tile16x12(&u, &v[p * cin * w..], &mut pairs, cin, p * w, stride);
                }
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(avx2.iter().any(|&x| x != 0.0));
            assert_eq!(bits(&avx2), bits(&wide), "32 tiles");
            assert_eq!(bits(&avx2), bits(&pairs), "two blocks of 16 tiles");
        }

        /// `Aᵀ M A + b` per tile, each sum in the kernels' order: what every path of
        /// [`super::output`] must give, bit for bit (with AVX-512, 16 tiles from one,
        /// two or four rows of tiles; else 8 tiles, then one by one).
        #[test]
        fn the_output_transform_gives_the_bits_of_its_sums() {
            if !super::super::available() {
                return;
            }
            // Rows of 4, 8, 12, 16, 20 and 32 tiles; 1 to 16 rows of tiles.
            let shapes = [
                (8, 8),
                (2, 8),
                (6, 8),
                (10, 8),
                (16, 16),
                (6, 16),
                (2, 24),
                (32, 32),
                (4, 40),
                (4, 64),
            ];
            for (h, w) in shapes {
                let (th, tw): (usize, usize) = (h / 2, w / 2);
                let tp = (th * tw).next_multiple_of(LANE) + LANE;
                let (m, bias) = (values(XI * tp, 7), 0.37f32);
                let mut got = vec![0f32; h * w];
                super::output(&m, tp, h, w, bias, &mut got);
                let mut want = vec![0f32; h * w];
                for (ty, tx) in (0..th).flat_map(|ty| (0..tw).map(move |tx| (ty, tx))) {
                    let ld = |xi: usize| m[xi * tp + ty * tw + tx];
                    let c: [[f32; 4]; 2] = [
                        std::array::from_fn(|j| ld(j) + ld(4 + j) + ld(8 + j)),
                        std::array::from_fn(|j| ld(4 + j) - ld(8 + j) - ld(12 + j)),
                    ];
                    for (r, c) in c.iter().enumerate() {
                        let row = &mut want[(2 * ty + r) * w..];
                        row[2 * tx] = c[0] + c[1] + c[2] + bias;
                        row[2 * tx + 1] = c[1] - c[2] - c[3] + bias;
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{h} x {w}");
            }
        }
    }
}

/// The Winograd convolution for node `id` (a tract `Conv` of `model`), or `None` where
/// it does not apply (module docs). Its kernel is taken out of `model` ([`take_kernel`])
/// to be arranged in place.
fn winograd_for(
    model: &mut TypedModel,
    id: usize,
    min_pixels: usize,
) -> TractResult<Option<WinogradConv>> {
    let node = model.node(id);
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
        || spec.output_channels < MIN_OUTPUT_CHANNELS
        || !same
        || side[0] * side[1] < min_pixels
        || side.iter().any(|&s| !s.is_multiple_of(2))
    {
        return Ok(None);
    }
    let (cin, cout, bias) = (spec.input_channels, spec.output_channels, conv.bias);
    let kernel = take_kernel(model, node.inputs[1])?;
    WinogradConv::from_kernel(cin, cout, side, kernel, bias.as_deref()).map(Some)
}

/// The kernel of the constant at `outlet`, taken out of `model` where the convolution
/// about to be replaced is its only user (no other node, not an output of the model):
/// the constant is left an empty tensor, so
/// that the kernel returned is the only reference to its memory and is arranged in
/// place. Copying it instead, with tract freeing the replaced constants only at
/// codegen, raised the peak memory at load by 26 MB on the cifar-size U-Net.
pub(crate) fn take_kernel(model: &mut TypedModel, outlet: OutletId) -> TractResult<Arc<Tensor>> {
    let kernel = model
        .outlet_fact(outlet)?
        .konst
        .clone()
        .context("a constant kernel")?;
    let node = model.node(outlet.node);
    let only_user = node.outputs.len() == 1
        && node.outputs[0].successors.len() == 1
        && !model.output_outlets()?.contains(&outlet);
    if node.op_is::<Const>() && only_user {
        let empty = Arc::new(Tensor::zero::<f32>(&[0])?);
        let (op, fact) = (Const::new(empty.clone())?, TypedFact::try_from(empty)?);
        let node = model.node_mut(outlet.node);
        node.op = Box::new(op);
        node.outputs[0].fact = fact;
    }
    Ok(kernel)
}

/// Replaces every convolution of `model` (decluttered, before `optimize`) that the
/// Winograd kernel runs faster with a [`WinogradConv`] (module docs), on outputs of
/// [`MIN_PIXELS`] or more. Returns how many were replaced; none on a CPU without the
/// kernel.
pub fn use_winograd(model: &mut TypedModel) -> TractResult<usize> {
    use_winograd_with(model, MIN_PIXELS)
}

/// [`use_winograd`] with another floor of output pixels (for measuring what the floor
/// gains: `4` takes cifar's 4 × 4 and 2 × 2 maps too, `1024` only its 32 × 32 ones).
pub fn use_winograd_with(model: &mut TypedModel, min_pixels: usize) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    replace_convs(model, |model, id| {
        Ok(winograd_for(model, id, min_pixels)?.map(|op| {
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

    /// Runs `model` optimised as it is; returns every output's values.
    fn run_plan(model: TypedModel, inputs: &[Tensor]) -> Vec<Vec<f32>> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        let outs = plan
            .run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())
            .unwrap();
        outs.iter().map(|y| f32s(y).to_vec()).collect()
    }

    /// Runs `model` optimised, with or without the Winograd convolutions; returns the
    /// output and how many were used.
    fn run(model: &TypedModel, winograd: bool, inputs: &[Tensor]) -> (Vec<f32>, usize) {
        let mut m = model.clone();
        let replaced = if winograd {
            use_winograd(&mut m).unwrap()
        } else {
            0
        };
        (run_plan(m, inputs).remove(0), replaced)
    }

    fn inputs(x_shape: [usize; 4], cout: usize, bias_input: bool) -> Vec<Tensor> {
        let x = Tensor::from_shape(&x_shape, &values(x_shape.iter().product(), 8)).unwrap();
        let mut inputs = vec![x];
        if bias_input {
            inputs.push(tensor1(&values(cout, 9)));
        }
        inputs
    }

    /// The values of an f32 tensor in plain memory.
    fn f32s(t: &Tensor) -> &[f32] {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()
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
            // The smallest map and channel counts taken; one of cifar's 32 × 32 ones
            // and one of its 8 × 8 ones (`U` made as they run; the others keep theirs);
            // a batch of 2 with channels off the 6-channel tile and the groups of 24,
            // 16 × 17 tiles (off the 8 lanes of the output transform, and of the input
            // transform's in-place path) and the bias an input; 4 × 6 tiles (a panel of
            // 16 and one of 8) with 33 input channels (off the filter transform's 8
            // lanes); 4 tiles to a row (the in-place input transform's 4-wide vectors).
            ([1, 16, 8, 8], 8, false),
            ([1, 128, 32, 32], 128, false),
            ([1, 256, 8, 8], 256, false),
            ([2, 40, 32, 34], 70, true),
            ([1, 33, 8, 12], 70, true),
            ([1, 64, 16, 8], 9, false),
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
    fn the_input_transform_in_place_gives_the_bits_of_the_rows() {
        // Widths of 4 tiles (one 4-wide vector), 8, 12 (three 4-wide), 16, 20 and 32
        // tiles; heights down to one row of tiles; 8 and 16 wide last panels.
        // With AVX-512: 16 tiles from 4 rows of 4, 2 of 8, or part of a row of 16 or 32.
        let shapes = [
            (8, 8, 3),
            (16, 16, 2),
            (2, 24, 2),
            (32, 32, 2),
            (6, 40, 3),
            (6, 64, 2),
        ];
        for (h, w, cin) in shapes {
            assert!(kernels::panels_fit(w));
            let tp = ((h / 2) * (w / 2)).next_multiple_of(LANE);
            let x = values(cin * h * w, 4);
            let len = XI * v_stride(cin, tp);
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            let (mut rows, mut v) = (Vec::new(), vec![0f32; XI * tp]);
            let panels = Panels::new(&mut a, cin, tp);
            for (c, x) in x.chunks_exact(h * w).enumerate() {
                kernels::input(x, h, w, &mut v, tp, &mut rows);
                // SAFETY: one thread.
                unsafe { panels.store(c, &v) };
            }
            let panels = Panels::new(&mut b, cin, tp);
            for (c, x) in x.chunks_exact(h * w).enumerate() {
                // SAFETY: one thread.
                unsafe { panels.transform(c, x, [h, w], 0..h / 2, &mut rows) };
            }
            assert!(a.iter().any(|&v| v != 0.0));
            assert_eq!(bits(&a), bits(&b), "{h} x {w}, {cin} channels");
            // Every band of rows of tiles: its tiles as the whole image's.
            let (th, tw) = (h / 2, w / 2);
            let at = |v: &[f32], tp: usize, xi: usize, c: usize, t: usize| {
                v[panel_index(cin, tp, v_stride(cin, tp), xi, c, t)]
            };
            for start in 0..th {
                for end in start + 1..=th {
                    let tpb = ((end - start) * tw).next_multiple_of(LANE);
                    let mut band = vec![0f32; XI * v_stride(cin, tpb)];
                    let panels = Panels::new(&mut band, cin, tpb);
                    for (c, x) in x.chunks_exact(h * w).enumerate() {
                        // SAFETY: one thread.
                        unsafe { panels.transform(c, x, [h, w], start..end, &mut rows) };
                    }
                    for (xi, c, t) in (0..XI).flat_map(|xi| {
                        (0..cin).flat_map(move |c| (0..(end - start) * tw).map(move |t| (xi, c, t)))
                    }) {
                        let (got, want) =
                            (at(&band, tpb, xi, c, t), at(&a, tp, xi, c, start * tw + t));
                        assert_eq!(
                            got.to_bits(),
                            want.to_bits(),
                            "{h} x {w}, tiles {start}..{end}"
                        );
                    }
                }
            }
        }
        // Rows of tiles off the multiples of 4 take the other path.
        assert!(!kernels::panels_fit(12) && !kernels::panels_fit(20) && !kernels::panels_fit(7));
    }

    #[test]
    fn a_kept_u_gives_the_bits_of_one_made_per_group() {
        if !available() {
            return;
        }
        // 70 output channels: 12 blocks, the last of 4, in groups of 4 blocks.
        let (cin, cout, side) = (40, 70, [8, 16]);
        let weights = values(cout * cin * 9, 3);
        let bias = values(cout, 5);
        let kept = WinogradConv::new(cin, cout, side, &weights, Some(&bias)).unwrap();
        let u = kept.u.as_deref().expect("a small U is kept");
        assert_eq!(u.len(), XI * 12 * cin * CO);
        let mut made = kept.clone();
        made.u = None;
        let x = Tensor::from_shape(&[2, cin, 8, 16], &values(2 * cin * 128, 6)).unwrap();
        let run = |op: &WinogradConv| {
            let y = op.run(&[x.clone().into_tvalue()]).unwrap();
            bits(f32s(&y))
        };
        assert_eq!(run(&kept), run(&made));
        // A large one makes its U as it runs.
        let big = WinogradConv::new(128, 128, [8, 8], &values(128 * 128 * 9, 3), None).unwrap();
        assert!(big.u.is_none());
    }

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

    /// `arrange` puts each value where the filter transform reads it (`[9][cin][rows]`
    /// per block of 6 output channels), on one thread and on two (`load_threads`, for
    /// kernels of 1 MiB or more).
    #[test]
    fn arrange_puts_each_value_in_its_place() {
        // 2.3 MB with a last block of 4 rows; 7 KB.
        for (cin, cout) in [(128, 508), (8, 25)] {
            let g = values(cout * cin * 9, 6);
            let mut got = g.clone();
            arrange(&mut got, cin);
            let mut want = vec![0.0; g.len()];
            for o in 0..cout {
                let (block, r) = (o / CO, o % CO);
                let rows = (cout - block * CO).min(CO);
                for c in 0..cin {
                    for j in 0..9 {
                        want[block * CO * cin * 9 + (j * cin + c) * rows + r] =
                            g[(o * cin + c) * 9 + j];
                    }
                }
            }
            assert_eq!(got, want, "{cin} -> {cout}");
        }
    }

    /// The kernel is arranged where the model's constant had it (no copy at load);
    /// one shared by two convolutions, by a clone of the model or by the model's
    /// outputs is copied.
    #[test]
    fn kernels_are_arranged_in_place_unless_shared() {
        if !available() {
            return;
        }
        let x_shape = [1, 32, 8, 8];
        let mut model = conv_model(x_shape, 32, [3, 3], (1, 1), 1, false).unwrap();
        let conv = model.output_outlets().unwrap()[0].node;
        let w = model.node(conv).inputs[1];
        let original = model.outlet_fact(w).unwrap().konst.clone().unwrap();
        let at = f32s(&original).as_ptr();
        drop(original);
        // A second convolution of the first's output with the same kernel (a model of
        // its own: a clone of `model` would share its kernel).
        let mut shared = conv_model(x_shape, 32, [3, 3], (1, 1), 1, false).unwrap();
        let op = shared.node(conv).op.clone();
        let b = shared.node(conv).inputs[2];
        let y = shared
            .wire_node("conv2", op, &[OutletId::new(conv, 0), w, b])
            .unwrap();
        shared.select_output_outlets(&y).unwrap();

        assert_eq!(use_winograd(&mut model).unwrap(), 1);
        let ops: Vec<&WinogradConv> = model.nodes().iter().filter_map(|n| n.op_as()).collect();
        assert_eq!(ops[0].kernels().as_ptr(), at, "the kernel was copied");

        let ins = inputs(x_shape, 32, false);
        let (want, _) = run(&shared, false, &ins);
        let (got, replaced) = run(&shared, true, &ins);
        assert_eq!(replaced, 2);
        let (d, scale) = diff(&got, &want);
        assert!(d <= 1e-5 * scale, "{d} of {scale}");
        // `run` takes Winograd in a clone, which shares the model's kernels: the
        // model's own are left as they were.
        assert_eq!(bits(&run(&shared, false, &ins).0), bits(&want));

        // A kernel that is also an output of the model stays one, unchanged.
        let mut exposed = conv_model(x_shape, 32, [3, 3], (1, 1), 1, false).unwrap();
        let y = exposed.output_outlets().unwrap()[0];
        let w = exposed.node(y.node).inputs[1];
        let kernel = f32s(&exposed.outlet_fact(w).unwrap().konst.clone().unwrap()).to_vec();
        exposed.select_output_outlets(&[y, w]).unwrap();
        assert_eq!(use_winograd(&mut exposed).unwrap(), 1);
        let got = run_plan(exposed, &ins).remove(1);
        assert_eq!(bits(&got), bits(&kernel));
    }

    #[test]
    fn leaves_other_convolutions_to_tract() {
        for (x_shape, cout, kernel, pad, stride) in [
            ([1, 32, 64, 64], 32, [3, 3], (1, 1), 2),
            ([1, 32, 32, 32], 32, [3, 3], (0, 0), 1),
            ([1, 32, 32, 32], 32, [1, 1], (0, 0), 1),
            ([1, 15, 32, 32], 32, [3, 3], (1, 1), 1),
            ([1, 32, 32, 32], 7, [3, 3], (1, 1), 1),
            ([1, 32, 4, 4], 32, [3, 3], (1, 1), 1),
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
        let x_shape = [1, 32, 4, 4];
        let model = conv_model(x_shape, 32, [3, 3], (1, 1), 1, false).unwrap();
        assert_eq!(use_winograd(&mut model.clone()).unwrap(), 0);
        let mut low = model.clone();
        assert_eq!(
            use_winograd_with(&mut low, 0).unwrap(),
            usize::from(available())
        );
        let ins = inputs(x_shape, 32, false);
        let (want, _) = run(&model, false, &ins);
        let got = run_plan(low, &ins).remove(0);
        let (d, scale) = diff(&got, &want);
        assert!(d <= 1e-5 * scale, "{d} of {scale}");
    }

    #[test]
    fn two_threads_give_the_bits_of_one() {
        // Small kernels (`U` kept: bands of rows of tiles, the second of 5 a shorter
        // one), and large ones (split by channels).
        for (x_shape, cout) in [
            ([1, 48, 32, 32], 50),
            ([1, 16, 10, 8], 8),
            ([1, 128, 8, 8], 128),
        ] {
            let model = conv_model(x_shape, cout, [3, 3], (1, 1), 1, false).unwrap();
            let ins = inputs(x_shape, cout, false);
            let (alone, replaced) = run(&model, true, &ins);
            assert_eq!(replaced, usize::from(available()));
            let pool = tract_linalg::multithread::Executor::multithread(2);
            let (split, _) = op_threads::scope(&pool, || {
                assert_eq!(op_threads::threads(), 2);
                run(&model, true, &ins)
            });
            assert_eq!(bits(&alone), bits(&split), "{x_shape:?} → {cout}");
        }
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
        assert!(f32s(&y).iter().all(|&v| v == 2.0));
    }
}
