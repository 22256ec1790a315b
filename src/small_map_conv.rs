//! Convolutions on small maps with many channels, by streaming their weights once
//! (issue 6, lever 24 in `docs/PERFORMANCE.md`).
//!
//! The cifar-size U-Net's deepest blocks convolve 4 × 4 maps of 256 or 512 channels
//! with 3 × 3 kernels: 2.4-4.7 MB of weights for 16 output pixels. tract runs them as a
//! matrix product `W[Cout, Cin·kh·kw] · im2col(x)[Cin·kh·kw, 16]` whose kernels cover
//! 8 or 12 of the 16 columns at a time, so they read every weight twice (from memory:
//! a forward's 143 MB of weights leave none in the caches), and ran at 25-30 GFLOP/s on
//! the 2-vCPU Intel Xeon of levers 22 to 25. With at most 16 output pixels, one AVX-512
//! vector holds a channel's whole output. [`SmallMapConv`] gathers the image once (`B[k][p]`, `k = (c, dy, dx)`, the
//! 16 lanes the pixels `p`, zero past them), then for each block of 16 output channels
//! keeps their 16 outputs in 16 registers and streams its weights (`[block][k][16]`,
//! arranged at load) through them:
//!
//! ```text
//! y[o][p] = ( Σ_k W[o][k] · B[k][p] ) + b[o]
//! ```
//!
//! summed with fused multiply-adds in the order of `k` from zero (the padding's taps
//! included), then plus the bias: the order of [`crate::direct_conv`]'s kernels, and on
//! the cifar-size U-Net's convolutions the same bits as tract's (its output compared
//! byte for byte). Each weight is read once per image, prefetched a page ahead; the
//! blocks are split across the threads [`op_threads`] has. With the caches flushed
//! between runs, its 256-channel 4 × 4 convolution took 0.32-0.45 ms against tract's
//! 0.55-0.70 ms (the `timing` test; lever 24 in `docs/PERFORMANCE.md`).
//!
//! [`use_small_map_convs`] swaps it in at load time: f32, NCHW, one group, stride and
//! dilation 1, a kernel of 2 taps or more, at most [`MAX_PIXELS`] output pixels, one
//! image (the plan of batch 1: with more, tract's product reuses each weight across
//! the images), at least [`MIN_REDUCTION`] values per output (`Cin·kh·kw`) and
//! [`MIN_OUTPUT_CHANNELS`] output channels, constant weights, a constant bias or one
//! given at run time, on an x86-64 CPU with AVX-512F. It runs after
//! [`crate::winograd::use_winograd`] and before [`crate::direct_conv::use_direct_convs`]
//! (which takes no map this small with AVX-512).

use crate::direct_conv::{
    bias_values, c_order_f32, image_values, replace_convs, Geometry, PlainConv,
};
use crate::fusion::{same_bits, same_optional_bits};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Output channels per block: the registers of one tile.
const BLOCK: usize = 16;
/// The most output pixels taken: one 512-bit vector.
pub const MAX_PIXELS: usize = 16;
/// The fewest values summed per output taken (`Cin·kh·kw`): below it the weights are
/// few and tract's product is no slower.
pub const MIN_REDUCTION: usize = 1024;
/// The fewest output channels taken: one block.
pub const MIN_OUTPUT_CHANNELS: usize = BLOCK;

/// Whether this CPU runs the kernel (x86-64 with AVX-512F).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Values summed per output of a convolution of shape `g`: `Cin·kh·kw`.
fn reduction(g: &Geometry) -> usize {
    g.cin * g.kernel[0] * g.kernel[1]
}

/// Output pixels per image of a convolution of shape `g`.
fn pixels(g: &Geometry) -> usize {
    g.output[0] * g.output[1]
}

/// A convolution on a map of at most [`MAX_PIXELS`] output pixels, one image at a
/// time, its weights streamed once per image (module docs). Its inputs are the image
/// batch and, when the bias is not constant, the bias (one value, or one per output
/// channel).
#[derive(Debug, Clone)]
pub struct SmallMapConv {
    /// Its shape.
    pub geometry: Geometry,
    /// The weights by blocks of 16 output channels, `[block][k][16]`, zero past
    /// `cout` in the last block: plain f32 memory (see [`Self::weights`]).
    weights: Arc<Tensor>,
    /// `None`: the bias is the op's second input.
    bias: Option<Arc<Vec<f32>>>,
}

/// Two ops are equal when they compute the same thing: same shape and values
/// (compared bit for bit, so that the relation is an equivalence, as tract needs).
impl PartialEq for SmallMapConv {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && same_bits(self.weights(), other.weights())
            && same_optional_bits(
                self.bias.as_deref().map(|b| &b[..]),
                other.bias.as_deref().map(|b| &b[..]),
            )
    }
}

impl Eq for SmallMapConv {}

/// One thread's buffers: the gathered image `B` and the bias.
#[derive(Debug, Clone, Default)]
pub struct SmallMapScratch {
    gathered: Vec<f32>,
    bias: Vec<f32>,
}

thread_local! {
    /// This thread's buffers for [`SmallMapConv::run`].
    static SCRATCH: std::cell::RefCell<SmallMapScratch> = std::cell::RefCell::default();
}

impl SmallMapConv {
    /// Makes the op from OIHW `weights` (`cout · cin · kh · kw` values) and a constant
    /// `bias` (one value per output channel), or `None` for a bias given at run time.
    /// Fails when this CPU lacks the kernel ([`available`]) or the sizes do not fit.
    pub fn new(g: Geometry, weights: &[f32], bias: Option<&[f32]>) -> TractResult<Self> {
        check(&g, weights.len(), bias)?;
        let k = reduction(&g);
        let blocks = g.cout.div_ceil(BLOCK);
        let mut arranged = vec![0f32; blocks * k * BLOCK];
        for (o, kernel) in weights.chunks_exact(k).enumerate() {
            let block = &mut arranged[(o / BLOCK) * k * BLOCK..][..k * BLOCK];
            for (i, &w) in kernel.iter().enumerate() {
                block[i * BLOCK + o % BLOCK] = w;
            }
        }
        Ok(SmallMapConv {
            geometry: g,
            weights: Arc::new(tract_ndarray::Array1::from(arranged).into_tensor()),
            bias: bias.map(|b| Arc::new(b.to_vec())),
        })
    }

    /// [`Self::new`] from the kernel tensor (OIHW f32) itself: where the output
    /// channels fill whole blocks, the kernel is arranged in its own memory (a copy is
    /// made first only when it is shared or not in C order), so that loading neither
    /// allocates nor faults in a second copy of the weights. On the cifar-size U-Net
    /// (14 of these convolutions, 50 MB of weights), the load's small-map rewrite took
    /// 0.025 s with a copy (lever 26 in `docs/PERFORMANCE.md`).
    pub fn from_kernel(
        g: Geometry,
        mut kernel: Arc<Tensor>,
        bias: Option<&[f32]>,
    ) -> TractResult<Self> {
        let k = reduction(&g);
        let plain = kernel.datum_type() == f32::datum_type()
            && kernel.strides() == &*Tensor::natural_strides(kernel.shape());
        if !plain || !g.cout.is_multiple_of(BLOCK) || kernel.len() != g.cout * k {
            return Self::new(g, &c_order_f32(&kernel)?, bias);
        }
        check(&g, kernel.len(), bias)?;
        {
            let kernel = Arc::make_mut(&mut kernel);
            let mut view = kernel.try_as_plain_ram_mut()?;
            arrange_in_place(view.as_slice_mut::<f32>()?, k);
        }
        Ok(SmallMapConv {
            geometry: g,
            weights: kernel,
            bias: bias.map(|b| Arc::new(b.to_vec())),
        })
    }

    /// The arranged weights (`[block][k][16]`).
    fn weights(&self) -> &[f32] {
        // Both constructors made them plain f32 memory.
        self.weights
            .try_as_plain_ram()
            .and_then(|w| w.as_slice::<f32>())
            .unwrap_or(&[])
    }

    /// Runs the convolution on the op's inputs: a batch `x` (`[n, cin, h, w]`, f32),
    /// then the bias when it is not constant, with this thread's buffers.
    pub fn run(&self, inputs: &[TValue]) -> TractResult<Tensor> {
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => self.run_in(&mut scratch, inputs),
            // Entered again on this thread while it runs one: buffers of its own.
            Err(_) => self.run_in(&mut SmallMapScratch::default(), inputs),
        })
    }

    /// [`Self::run`] with the buffers of `scratch` (grown as needed, then reused).
    pub fn run_in(&self, scratch: &mut SmallMapScratch, inputs: &[TValue]) -> TractResult<Tensor> {
        let g = &self.geometry;
        bias_values(
            self.bias.as_deref().map(|b| &b[..]),
            inputs,
            g.cout,
            &mut scratch.bias,
        )?;
        let x = &*inputs[0];
        let input = image_values(x, g.cin, g.input)?;
        let [oh, ow] = g.output;
        let mut y = Tensor::zero::<f32>(&[x.shape()[0], g.cout, oh, ow])?;
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let plane = g.input[0] * g.input[1];
            for (image, out) in input
                .chunks_exact(g.cin * plane)
                .zip(out.chunks_exact_mut(g.cout * oh * ow))
            {
                self.gather(image, &mut scratch.gathered);
                self.products(&scratch.gathered, &scratch.bias, out);
            }
        }
        Ok(y)
    }

    /// `B[k][p]` of one image `x` (`[cin, h, w]`) into `b` (`[k][16]`): the input
    /// value under tap `(dy, dx)` of channel `c` (`k = (c · kh + dy) · kw + dx`) for
    /// output pixel `p`, zero in the padding and past the pixels.
    fn gather(&self, x: &[f32], b: &mut Vec<f32>) {
        let g = &self.geometry;
        let ([kh, kw], [h, w], [oh, ow]) = (g.kernel, g.input, g.output);
        let [py, px] = g.pad_before;
        b.clear();
        b.resize(reduction(g) * MAX_PIXELS, 0.0);
        let mut rows = b.chunks_exact_mut(MAX_PIXELS);
        for x in x.chunks_exact(h * w) {
            for dy in 0..kh {
                for dx in 0..kw {
                    let row = rows.next().expect("sized above");
                    for (oy, row) in row.chunks_mut(ow).take(oh).enumerate() {
                        let Some(iy) = (oy + dy).checked_sub(py).filter(|&i| i < h) else {
                            continue;
                        };
                        for (ox, v) in row.iter_mut().enumerate() {
                            if let Some(ix) = (ox + dx).checked_sub(px).filter(|&i| i < w) {
                                *v = x[iy * w + ix];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Every block of output channels of one image from its gathered `b`, plus `bias`,
    /// into `out` (`[cout][oh · ow]`): the blocks split across the threads.
    fn products(&self, b: &[f32], bias: &[f32], out: &mut [f32]) {
        let g = &self.geometry;
        let (k, pixels) = (reduction(g), pixels(g));
        let blocks = g.cout.div_ceil(BLOCK);
        let parts = if g.macs_per_image() >= crate::direct_conv::MIN_MACS_TO_SPLIT {
            op_threads::threads().clamp(1, blocks)
        } else {
            1
        };
        let per = blocks.div_ceil(parts);
        let work = out
            .chunks_mut(per * BLOCK * pixels)
            .zip(self.weights().chunks(per * k * BLOCK))
            .zip(bias.chunks(per * BLOCK));
        op_threads::for_each(work, |((out, weights), bias)| {
            for ((out, w), bias) in out
                .chunks_mut(BLOCK * pixels)
                .zip(weights.chunks_exact(k * BLOCK))
                .zip(bias.chunks(BLOCK))
            {
                kernels::block(w, b, k, bias, pixels, out);
            }
        });
    }
}

/// The checks of [`SmallMapConv::new`] on `g`, a count of `weights` and the bias.
fn check(g: &Geometry, weights: usize, bias: Option<&[f32]>) -> TractResult<()> {
    ensure!(
        available(),
        "the small-map convolution needs x86-64 with AVX-512F"
    );
    let [kh, kw] = g.kernel;
    ensure!(
        g.cin >= 1 && g.cout >= 1 && kh >= 1 && kw >= 1,
        "{} input channels, {} output channels, a {kh} × {kw} kernel",
        g.cin,
        g.cout
    );
    ensure!(
        (1..=MAX_PIXELS).contains(&pixels(g)),
        "{} output pixels: 1 to {MAX_PIXELS} are taken",
        pixels(g)
    );
    // Any padding after the input is consistent with the rest: the gather reads
    // only inside the input and leaves zeros elsewhere.
    let k = reduction(g);
    ensure!(weights == g.cout * k, "expected {} weights", g.cout * k);
    if let Some(bias) = bias {
        ensure!(bias.len() == g.cout, "expected {} biases", g.cout);
    }
    Ok(())
}

/// Arranges OIHW weights of whole blocks (`[cout][k]`, `cout` a multiple of 16) in
/// place: each block's `[16][k]` becomes `[k][16]` in the same memory, through a copy
/// of the block.
fn arrange_in_place(w: &mut [f32], k: usize) {
    // The blocks on two threads (`load_threads`): each is arranged alike wherever.
    crate::load_threads::for_each_chunk_mut(w, BLOCK * k, |chunk| {
        let block = chunk.to_vec();
        for (o, kernel) in block.chunks_exact(k).enumerate() {
            for (i, &value) in kernel.iter().enumerate() {
                chunk[i * BLOCK + o] = value;
            }
        }
    });
}

/// The register tile, compiled for AVX-512F.
mod kernels {
    use super::{BLOCK, MAX_PIXELS};

    /// One block of (up to) 16 output channels: `w` is its weights (`[k][16]`), `b`
    /// the gathered image (`[k][16]`); channel `r`'s `pixels` outputs go to
    /// `out[r · pixels..]` plus `bias[r]`, for the `bias.len()` channels of the block.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    pub fn block(w: &[f32], b: &[f32], k: usize, bias: &[f32], pixels: usize, out: &mut [f32]) {
        assert!(w.len() == k * BLOCK && b.len() >= k * MAX_PIXELS);
        assert!(bias.len() <= BLOCK && (1..=MAX_PIXELS).contains(&pixels));
        assert!(out.len() == bias.len() * pixels);
        // SAFETY: the op exists only where `super::available` found AVX-512F; the sizes
        // were just checked.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::block(w, b, k, bias, pixels, out)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("no small-map kernel off x86-64")
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use super::BLOCK;
        use std::arch::x86_64::*;

        /// How far ahead the weights are prefetched, in steps of `k` (cache lines of
        /// 16 weights): 4 KB, a page. The weights come from memory (a U-Net's pass
        /// through 143 MB of them leaves none in the caches), and the hardware
        /// prefetchers stop at page boundaries. Measured on the 2-vCPU Intel Xeon with
        /// the caches flushed between runs (the `timing` test): the 256-channel 4 × 4
        /// convolution 0.55 ms without, 0.32-0.37 ms with 16 to 256 lines ahead.
        const AHEAD: usize = 64;

        /// [`super::block`] (its checks done): 16 channels × 16 pixels in 16
        /// registers, summed over `k` in order from zero, then plus the bias.
        #[target_feature(enable = "avx512f,avx2,fma")]
        pub unsafe fn block(
            w: &[f32],
            b: &[f32],
            k: usize,
            bias: &[f32],
            pixels: usize,
            out: &mut [f32],
        ) {
            let (mut wp, mut bp) = (w.as_ptr(), b.as_ptr());
            let mut acc = [_mm512_setzero_ps(); BLOCK];
            for _ in 0..k {
                // A prefetch never faults: past the weights' end it is only wasted.
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(AHEAD * BLOCK).cast());
                let x = _mm512_loadu_ps(bp);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(r)), x, *a);
                }
                wp = wp.add(BLOCK);
                bp = bp.add(BLOCK);
            }
            let mask: __mmask16 = ((1u32 << pixels) - 1) as u16;
            for (r, (&bias, a)) in bias.iter().zip(&acc).enumerate() {
                let y = _mm512_add_ps(*a, _mm512_set1_ps(bias));
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(r * pixels), mask, y);
            }
        }
    }
}

impl Op for SmallMapConv {
    fn name(&self) -> StaticName {
        "EsddpmSmallMapConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "{} -> {} channels, {:?} kernel, {:?} -> {:?}",
            g.cin, g.cout, g.kernel, g.input, g.output
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for SmallMapConv {
    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(tvec!(self.run(&inputs)?.into_tvalue()))
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        Ok(Some(tvec!(self.run(&inputs)?.into_tvalue())))
    }
}

impl TypedOp for SmallMapConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 + usize::from(self.bias.is_none()) && inputs[0].rank() == 4);
        let g = &self.geometry;
        Ok(tvec!(f32::fact([
            inputs[0].shape[0].clone(),
            g.cout.to_dim(),
            g.output[0].to_dim(),
            g.output[1].to_dim()
        ])))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let n = inputs[0].shape[0].clone();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            n * self.geometry.macs_per_image()
        )))
    }
}

/// The small-map convolution for node `id` (a tract `Conv` of `model`), or `None`
/// where it does not apply (module docs).
fn small_map_for(model: &mut TypedModel, id: usize) -> TractResult<Option<SmallMapConv>> {
    let node = model.node(id);
    let Some(conv) = PlainConv::of(model, node)? else {
        return Ok(None);
    };
    let geometry = conv.geometry();
    if conv.shape[0] != 1
        || geometry.kernel[0] * geometry.kernel[1] < 2
        || pixels(&geometry) > MAX_PIXELS
        || reduction(&geometry) < MIN_REDUCTION
        || geometry.cout < MIN_OUTPUT_CHANNELS
    {
        return Ok(None);
    }
    let bias = conv.bias;
    let kernel = crate::winograd::take_kernel(model, node.inputs[1])?;
    SmallMapConv::from_kernel(geometry, kernel, bias.as_deref()).map(Some)
}

/// Replaces every convolution of `model` (decluttered, before `optimize`) that the
/// small-map kernel takes with a [`SmallMapConv`] (module docs). Returns how many
/// were replaced; none on a CPU without AVX-512F.
pub fn use_small_map_convs(model: &mut TypedModel) -> TractResult<usize> {
    if !available() {
        return Ok(0);
    }
    replace_convs(model, |model, id| {
        Ok(small_map_for(model, id)?.map(|op| {
            let constant_bias = op.bias.is_some();
            (op, constant_bias)
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{bits, conv_model, values};

    /// Runs `model` optimised, with or without the small-map convolutions; returns the
    /// output and how many were used.
    fn run(model: &TypedModel, small_maps: bool, inputs: &[Tensor]) -> (Tensor, usize) {
        let mut m = model.clone();
        let replaced = if small_maps {
            use_small_map_convs(&mut m).unwrap()
        } else {
            0
        };
        let plan = m.into_optimized().unwrap().into_runnable().unwrap();
        let y = plan
            .run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())
            .unwrap()
            .remove(0)
            .into_tensor();
        (y, replaced)
    }

    fn inputs(x_shape: [usize; 4], cout: usize, bias_input: bool) -> Vec<Tensor> {
        let x = Tensor::from_shape(&x_shape, &values(x_shape.iter().product(), 8)).unwrap();
        let mut inputs = vec![x];
        if bias_input {
            inputs.push(tensor1(&values(cout, 9)));
        }
        inputs
    }

    fn f32s(t: &Tensor) -> &[f32] {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()
    }

    /// `y[o][p] = (Σ_k W[o][k] · B[k][p]) + b[o]`, fused multiply-adds in the order of
    /// `k` from zero: what the kernel must give, bit for bit.
    fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        [cin, h, wd]: [usize; 3],
        kernel: [usize; 2],
        (pad, after): (usize, usize),
    ) -> Vec<f32> {
        let [kh, kw] = kernel;
        let (oh, ow) = (h + pad + after + 1 - kh, wd + pad + after + 1 - kw);
        let mut y = vec![];
        for (o, bias) in b.iter().enumerate() {
            for (oy, ox) in (0..oh).flat_map(|oy| (0..ow).map(move |ox| (oy, ox))) {
                let mut acc = 0f32;
                for (c, dy, dx) in (0..cin)
                    .flat_map(|c| (0..kh).flat_map(move |dy| (0..kw).map(move |dx| (c, dy, dx))))
                {
                    let (iy, ix) = (
                        (oy + dy) as isize - pad as isize,
                        (ox + dx) as isize - pad as isize,
                    );
                    let v = if (0..h as isize).contains(&iy) && (0..wd as isize).contains(&ix) {
                        x[(c * h + iy as usize) * wd + ix as usize]
                    } else {
                        0.0
                    };
                    acc = w[((o * cin + c) * kh + dy) * kw + dx].mul_add(v, acc);
                }
                y.push(acc + bias);
            }
        }
        y
    }

    #[test]
    fn gives_the_bits_of_its_sums_and_tracts_values() {
        if !available() {
            return;
        }
        // cifar's 4 × 4 maps (256 channels); 512 input channels with a bias input; 2 × 2
        // (a partial vector) with 40 output channels (a partial block); a 3 × 5 map.
        // ... and padding only after the input, or only before it (the output 4 × 4).
        for (x_shape, cout, kernel, bias_input, pad) in [
            ([1, 256, 4, 4], 256, [3, 3], false, (1, 1)),
            ([1, 512, 4, 4], 64, [3, 3], true, (1, 1)),
            ([1, 300, 2, 2], 40, [3, 3], true, (1, 1)),
            ([1, 128, 3, 5], 16, [3, 3], false, (1, 1)),
            ([1, 128, 4, 4], 16, [3, 3], false, (0, 2)),
            ([1, 128, 4, 4], 16, [3, 3], true, (2, 0)),
        ] {
            let model = conv_model(x_shape, cout, kernel, pad, 1, bias_input).unwrap();
            let ins = inputs(x_shape, cout, bias_input);
            let (ours, n) = run(&model, true, &ins);
            let (tracts, _) = run(&model, false, &ins);
            assert_eq!(n, 1, "{x_shape:?}");
            let [_, cin, h, w] = x_shape;
            let weights = values(cout * cin * 9, 1);
            let bias = if bias_input {
                values(cout, 9)
            } else {
                values(cout, 2)
            };
            let x = f32s(&ins[0]);
            let want = reference(x, &weights, &bias, [cin, h, w], kernel, pad);
            let got = f32s(&ours);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{x_shape:?}"
            );
            let scale = f32s(&tracts).iter().fold(1f32, |m, v| m.max(v.abs()));
            let d = got
                .iter()
                .zip(f32s(&tracts))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d <= 1e-5 * scale, "{x_shape:?}: {d} against {scale}");
        }
    }

    #[test]
    fn two_threads_give_the_bits_of_one() {
        if !available() {
            return;
        }
        let x_shape = [1, 256, 4, 4];
        let model = conv_model(x_shape, 256, [3, 3], (1, 1), 1, false).unwrap();
        let ins = inputs(x_shape, 256, false);
        let (one, _) = run(&model, true, &ins);
        let pool = tract_linalg::multithread::Executor::multithread(2);
        let (two, _) =
            tract_linalg::multithread::multithread_tract_scope(pool, || run(&model, true, &ins));
        assert_eq!(bits(&one), bits(&two));
    }

    #[test]
    fn leaves_what_it_does_not_take() {
        // Larger maps, batches of 2, few channels or few values per output, strides.
        for (x_shape, cout, stride) in [
            ([1, 256, 8, 8], 256, 1),
            ([2, 256, 4, 4], 256, 1),
            ([1, 256, 4, 4], 8, 1),
            ([1, 64, 4, 4], 64, 1),
            ([1, 256, 8, 8], 256, 2),
        ] {
            let model = conv_model(x_shape, cout, [3, 3], (1, 1), stride, false).unwrap();
            let mut m = model.clone();
            assert_eq!(
                use_small_map_convs(&mut m).unwrap(),
                0,
                "{x_shape:?} {cout}"
            );
        }
    }

    #[test]
    fn the_plan_cache_form_is_taken_alike() {
        let x_shape = [1, 256, 4, 4];
        let model = conv_model(x_shape, 32, [3, 3], (1, 1), 1, true).unwrap();
        let nnef = tract_nnef::nnef().with_onnx();
        let mut tar = vec![];
        nnef.write_to_tar(&model, &mut tar).unwrap();
        let mut cached = nnef.model_for_read(&mut &tar[..]).unwrap();
        crate::rewrite::remove_identity_casts(&mut cached).unwrap();
        let ins = inputs(x_shape, 32, true);
        let (from_file, n) = run(&model, true, &ins);
        let (from_cache, m) = run(&cached, true, &ins);
        assert_eq!((n, m), (usize::from(available()), usize::from(available())));
        assert_eq!(bits(&from_file), bits(&from_cache));
    }

    /// A same-padded 3 × 3 convolution of a 4 × 4 map.
    fn same_3x3_on_4x4(cin: usize, cout: usize) -> Geometry {
        Geometry {
            cin,
            cout,
            kernel: [3, 3],
            input: [4, 4],
            pad_before: [1, 1],
            output: [4, 4],
        }
    }

    #[test]
    fn bad_sizes_are_errors() {
        let g = same_3x3_on_4x4(4, 16);
        let w = values(16 * 4 * 9, 1);
        if !available() {
            assert!(SmallMapConv::new(g, &w, None).is_err());
            return;
        }
        assert!(SmallMapConv::new(g, &w, None).is_ok());
        assert!(SmallMapConv::new(g, &w[1..], None).is_err());
        assert!(SmallMapConv::new(g, &w, Some(&[0.0; 3])).is_err());
        let big = Geometry {
            input: [5, 4],
            output: [5, 4],
            ..g
        };
        assert!(SmallMapConv::new(big, &values(16 * 4 * 9, 1), None).is_err());
        let op = SmallMapConv::new(g, &w, None).unwrap();
        let x = Tensor::zero::<f32>(&[1, 3, 4, 4]).unwrap().into_tvalue();
        assert!(op.run(&[x]).is_err());
    }

    /// `from_kernel` gives the op `new` gives (its weights compared bit for bit), in
    /// the kernel's own memory where the kernel is the only reference to it and the
    /// output channels fill whole blocks; a shared kernel is left as it was; partial
    /// blocks and errors go through `new`.
    #[test]
    fn the_kernel_is_arranged_in_place_as_new_arranges_it() {
        if !available() {
            return;
        }
        // 4 blocks of 16 outputs, 1152 values each: 295 KB (one thread), and 64 blocks
        // of 2304: 9.4 MB (both threads, `load_threads`).
        for (cin, cout) in [(128, 64), (256, 1024)] {
            let g = same_3x3_on_4x4(cin, cout);
            let w = values(cout * cin * 9, 3);
            let bias = values(cout, 4);
            let want = SmallMapConv::new(g, &w, Some(&bias)).unwrap();
            let kernel = Arc::new(Tensor::from_shape(&[cout, cin, 3, 3], &w).unwrap());
            let at = f32s(&kernel).as_ptr();
            let op = SmallMapConv::from_kernel(g, kernel, Some(&bias)).unwrap();
            assert_eq!(op, want, "{cin} -> {cout}");
            assert_eq!(op.weights().as_ptr(), at, "the kernel was copied");
            // Shared: arranged in a copy, the other holder's values unchanged.
            let kernel = Arc::new(Tensor::from_shape(&[cout, cin, 3, 3], &w).unwrap());
            let op = SmallMapConv::from_kernel(g, kernel.clone(), Some(&bias)).unwrap();
            assert_eq!(op, want);
            assert_eq!(f32s(&kernel), &w[..]);
        }
        // 24 outputs: a partial block, made by `new` (zeros past them).
        let g = same_3x3_on_4x4(128, 24);
        let w = values(24 * 128 * 9, 5);
        let kernel = Arc::new(Tensor::from_shape(&[24, 128, 3, 3], &w).unwrap());
        let op = SmallMapConv::from_kernel(g, kernel, None).unwrap();
        assert_eq!(op, SmallMapConv::new(g, &w, None).unwrap());
        assert_eq!(op.weights().len(), 2 * 128 * 9 * BLOCK);
        // The checks of `new`: a kernel of the wrong size, a bias of the wrong length.
        let short = Arc::new(tensor1(&w[1..]));
        assert!(SmallMapConv::from_kernel(g, short, None).is_err());
        let kernel = Arc::new(Tensor::from_shape(&[24, 128, 3, 3], &w).unwrap());
        assert!(SmallMapConv::from_kernel(g, kernel, Some(&[0.0; 3])).is_err());
    }

    /// Times the cifar U-Net's 4 × 4 convolution, tract's plan and this op alternated
    /// in one process (for the docs: `cargo test --release --lib small_map_conv::tests::
    /// timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn timing() {
        for cin in [256, 512] {
            let x_shape = [1, cin, 4, 4];
            let model = conv_model(x_shape, 256, [3, 3], (1, 1), 1, false).unwrap();
            let ins: TVec<TValue> = inputs(x_shape, 256, false)
                .into_iter()
                .map(|t| t.into_tvalue())
                .collect();
            let plans = [false, true].map(|small| {
                let mut m = model.clone();
                if small {
                    use_small_map_convs(&mut m).unwrap();
                }
                m.into_optimized().unwrap().into_runnable().unwrap()
            });
            // Between runs, 64 MB read through: the weights come from memory, as in a
            // U-Net's forward, where 143 MB of weights pass through the caches.
            let mut evict = vec![1f32; 16 << 20];
            let mut times = [vec![], vec![]];
            for _ in 0..30 {
                for (plan, times) in plans.iter().zip(&mut times) {
                    let mut spent = 0.0;
                    for _ in 0..10 {
                        evict.iter_mut().step_by(16).for_each(|v| *v += 1.0);
                        let start = std::time::Instant::now();
                        plan.run(ins.clone()).unwrap();
                        spent += start.elapsed().as_secs_f64();
                    }
                    times.push(spent / 10.0 * 1e3);
                }
            }
            std::hint::black_box(&evict);
            for (name, t) in ["tract", "small-map"].iter().zip(&mut times) {
                t.sort_by(f64::total_cmp);
                let gf = 2.0 * 256.0 * 16.0 * (cin * 9) as f64 / 1e6;
                println!(
                    "cin {cin}: {name} min {:.3} ms, median {:.3} ms ({:.1} GFLOP/s at the median)",
                    t[0],
                    t[15],
                    gf / t[15]
                );
            }
        }
    }
}
