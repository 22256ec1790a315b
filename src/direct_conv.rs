//! A direct convolution for the small convolutions of small U-Nets, which tract lowers
//! poorly (issue 6, lever 6 in `docs/PERFORMANCE.md`).
//!
//! tract turns a convolution into a matrix product `W[Cout, Cin·kh·kw] · im2col(x)`
//! with the im2col operand packed on the fly. With few output channels (`Cout` ≤ 32)
//! that packing costs as much as the product: each input value is gathered `kh·kw`
//! times for only `Cout` multiply-adds, and the shipped U-Net's 16- and 32-channel
//! convolutions ran at 40-55 GFLOP/s where its 64-channel ones reach 65-85.
//!
//! [`DirectConv`] computes the same sum without the gather:
//!
//! ```text
//! y[n, o, i, j] = b[o] + Σ_c Σ_dy Σ_dx W[o, c, dy, dx] · xp[n, c, i + dy, j + dx]
//! ```
//!
//! where `xp` is the input zero-padded once into a scratch buffer the op keeps between
//! runs. A register tile holds `L` neighbouring outputs of a row for `B` output channels;
//! each tap loads `L` inputs once and broadcasts `B` weights (laid out per tile at load
//! time). Every output is fused multiply-adds in the order `(c, dy, dx)` from zero,
//! then `+ b[o]`, whichever tile runs, so the result is the same bit for bit with
//! every tile (it differs from tract's in the last bits: another summation order).
//!
//! [`use_direct_convs`] swaps it in at load time where it was measured to win: f32,
//! NCHW, one group, stride and dilation 1, a kernel of 2 taps or more, constant weights,
//! a constant bias or one computed at run time (tract folds a ResNet block's timestep
//! embedding into its first convolution's bias at batch 1), on x86-64, within the
//! limits of the CPU's default [`Policy`]: with AVX-512F ([`Policy::avx512`]) up to 64
//! output channels on rows of 16 columns or more in a multiple of 16 (tiles of 32 × 4
//! and 16 × 8), or on an even number of rows of exactly 8 columns as wide as the input
//! (two rows per vector, [`Tile::Rows2x8`]); with only AVX2 and FMA ([`Policy::avx2`])
//! up to 64 output channels on rows of 8 columns or more (tiles of 16 × 6 on rows a
//! multiple of 16, else 8 × 8). A last partial tile of channels is computed on zero
//! weights and not stored.
//! Everything else, and every other CPU, stays with tract. It runs after
//! [`crate::winograd::use_winograd`], which takes the 3 × 3 convolutions it runs
//! faster (with AVX2, on maps of 8 × 8 or more). 1 × 1 convolutions, which
//! tract's declutter has made matrix products by then, reach it through
//! [`crate::pointwise_conv`].
//!
//! The 16 × 8, two-row, 8 × 8 and 16 × 6 tiles are written in `std::arch` intrinsics:
//! the compiler did not vectorise the generic loop for them (the 32 × 4 one it does).

use crate::fusion::{same_bits, same_optional_bits};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// The values of `x` (f32) in C order: borrowed when its strides are natural, else
/// copied.
pub(crate) fn c_order_f32(x: &Tensor) -> TractResult<std::borrow::Cow<'_, [f32]>> {
    if x.strides() == &*Tensor::natural_strides(x.shape()) {
        Ok(x.try_as_plain_ram()?.as_slice::<f32>()?.into())
    } else {
        Ok(x.to_plain_array_view::<f32>()?.iter().copied().collect())
    }
}

/// The values of a convolution's input `x` in C order (see [`c_order_f32`]), checked to
/// be f32 and `[n, cin, input[0], input[1]]`.
pub(crate) fn image_values(
    x: &Tensor,
    cin: usize,
    input: [usize; 2],
) -> TractResult<std::borrow::Cow<'_, [f32]>> {
    ensure!(
        x.datum_type() == f32::datum_type(),
        "input is {:?}",
        x.datum_type()
    );
    let shape = x.shape();
    ensure!(
        shape.len() == 4 && shape[1] == cin && shape[2..] == input,
        "input shape {shape:?} for a convolution of {cin} channels at {input:?}"
    );
    c_order_f32(x)
}

/// A convolution's bias per output channel into `into`: `own` where it is constant,
/// else the op's second input (one value for every channel, or one per channel).
pub(crate) fn bias_values(
    own: Option<&[f32]>,
    inputs: &[TValue],
    cout: usize,
    into: &mut Vec<f32>,
) -> TractResult<()> {
    into.clear();
    match (own, inputs) {
        (Some(bias), [_]) => into.extend_from_slice(bias),
        (None, [_, bias]) => {
            ensure!(
                bias.datum_type() == f32::datum_type(),
                "bias is {:?}",
                bias.datum_type()
            );
            let values = bias.try_as_plain_ram()?.as_slice::<f32>()?;
            match values.len() {
                1 => into.resize(cout, values[0]),
                n if n == cout => into.extend_from_slice(values),
                n => bail!("{n} biases for {cout} output channels"),
            }
        }
        _ => bail!("{} inputs to a convolution", inputs.len()),
    }
    Ok(())
}

/// Zeros before and after the scratch of a [`Tile::Rows2x8`] convolution, so that its
/// shifted loads stay in the buffer.
const ROWS_GUARD: usize = 16;

/// The fewest multiply-adds per image for which a convolution is split across
/// threads (when [`op_threads`] has more than one): below it a hand-off to the pool
/// costs more than it saves.
pub const MIN_MACS_TO_SPLIT: usize = 1 << 18;

/// The register tile a convolution runs with: `width` outputs of a row for `channels`
/// output channels. Chosen once, at load time, from the CPU and the shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tile {
    /// 32 outputs (two 512-bit vectors) × 4 channels: AVX-512F (with AVX2 and FMA),
    /// rows a multiple of 32 wide.
    Wide32x4,
    /// 16 outputs (one 512-bit vector) × 8 channels: AVX-512F (with AVX2 and FMA),
    /// rows a multiple of 16 wide.
    Wide16x8,
    /// 16 outputs (one 512-bit vector: two output rows of 8 columns) × 8 channels:
    /// AVX-512F (with AVX2 and FMA), for output rows of exactly 8 columns, an even
    /// number of them, as wide as the input rows (the horizontal padding is the
    /// kernel's width − 1 in all, at most 15). Its scratch holds the input without
    /// horizontal padding; masked loads give the zeros instead.
    Rows2x8,
    /// 8 outputs (one 256-bit vector) × 8 channels: AVX2 and FMA, rows a multiple of 8.
    Narrow8x8,
    /// 16 outputs (two 256-bit vectors) × 6 channels: AVX2 and FMA, rows a multiple of
    /// 16. Twelve accumulators of AVX2's sixteen registers, where the 8 × 8 tile has
    /// eight: enough independent multiply-adds in flight to cover their latency.
    Wide16x6,
}

impl Tile {
    /// Outputs per row the tile covers.
    pub fn width(self) -> usize {
        match self {
            Tile::Wide32x4 => 32,
            Tile::Wide16x8 => 16,
            Tile::Rows2x8 => 8,
            Tile::Narrow8x8 => 8,
            Tile::Wide16x6 => 16,
        }
    }

    /// Output channels the tile covers.
    pub fn channels(self) -> usize {
        match self {
            Tile::Wide32x4 => 4,
            Tile::Wide16x8 => 8,
            Tile::Rows2x8 => 8,
            Tile::Narrow8x8 => 8,
            Tile::Wide16x6 => 6,
        }
    }

    /// Whether the tile can compute a convolution of geometry `g`.
    pub fn fits(self, g: &Geometry) -> bool {
        match self {
            Tile::Rows2x8 => {
                g.output[1] == 8
                    && g.output[0].is_multiple_of(2)
                    && g.input[1] == 8
                    && g.kernel[1] <= ROWS_GUARD
            }
            _ => g.output[1].is_multiple_of(self.width()),
        }
    }

    /// The tiles this CPU runs, fastest first (none off x86-64, or without AVX2+FMA).
    pub fn available() -> Vec<Tile> {
        #[cfg(target_arch = "x86_64")]
        {
            let mut tiles = Vec::new();
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    tiles.push(Tile::Wide32x4);
                    tiles.push(Tile::Wide16x8);
                    tiles.push(Tile::Rows2x8);
                }
                tiles.push(Tile::Wide16x6);
                tiles.push(Tile::Narrow8x8);
            }
            tiles
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Vec::new()
        }
    }
}

/// Which convolutions [`use_direct_convs_with`] takes, and with which tiles. The
/// default is what was measured to win on the CPU ([`Policy::avx512`],
/// [`Policy::avx2`]); the benchmark moves the limits to re-measure them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The most output channels a convolution may have.
    pub max_output_channels: usize,
    /// The narrowest output row a convolution may have.
    pub min_output_width: usize,
    /// The tiles to use, fastest first; only those [`Tile::available`] lists are used.
    pub tiles: Vec<Tile>,
}

/// What was measured to win on this CPU: [`Policy::avx512`] where it has AVX-512F,
/// else [`Policy::avx2`] (no tile at all without AVX2 and FMA, or off x86-64).
impl Default for Policy {
    fn default() -> Self {
        if Tile::available().contains(&Tile::Wide32x4) {
            Policy::avx512()
        } else {
            Policy::avx2()
        }
    }
}

impl Policy {
    /// With AVX-512: the 32-wide tile, then the 16-wide one, then the two-row one, for
    /// rows of 8 columns or more and up to 64 output channels. Measured on the shipped
    /// U-Net (`cargo bench --bench unet_forward -- profile ... --direct-*`, 2-core AMD
    /// EPYC; `docs/PERFORMANCE.md`, lever 8): tract's im2col path ran its 16- and
    /// 32-channel convolutions at 40-55 GFLOP/s, its 64-channel one at 16 columns at
    /// ~80 and its 8-column ones (64 channels) at 62-80, where these tiles run 75-98
    /// (the 8-wide tile ran the 8-column ones at only 48-57).
    pub fn avx512() -> Self {
        Policy {
            max_output_channels: 64,
            min_output_width: 8,
            tiles: vec![Tile::Wide32x4, Tile::Wide16x8, Tile::Rows2x8],
        }
    }

    /// With AVX2 and FMA only: the 16 × 6 tile, then the 8 × 8 one, for rows of 8
    /// columns or more and up to 64 output channels. Measured on an AVX2-only 2-core
    /// AMD EPYC (`cargo bench --bench unet_forward -- profile models/fashion/unet.onnx 1
    /// 32 32 1 400 --direct-tiles wide16x6,narrow|narrow|none --direct-max-channels 256
    /// --direct-min-width 8`; `docs/PERFORMANCE.md`, the thirteenth lever): on the shipped U-Net the
    /// 16 × 6 tile ran 58-75 GFLOP/s, the 8 × 8 one 51-58 and tract's im2col path 31-60
    /// on the same convolutions (the 8 × 8 tile alone takes the 8-column ones, at 58-60
    /// against tract's 52-54). On the cifar-size U-Net's 128- and 256-channel
    /// convolutions tile and tract were even (64-81 against 47-77 GFLOP/s, the whole
    /// forward no faster), so those stay with tract.
    pub fn avx2() -> Self {
        Policy {
            max_output_channels: 64,
            min_output_width: 8,
            tiles: vec![Tile::Wide16x6, Tile::Narrow8x8],
        }
    }

    /// The first of the policy's available tiles that fits a convolution of
    /// geometry `g` ([`Tile::fits`]); `None` when `g` is beyond the policy's limits
    /// (more output channels, or narrower output rows) or no tile fits.
    pub fn tile_for(&self, g: &Geometry) -> Option<Tile> {
        if g.cout > self.max_output_channels || g.output[1] < self.min_output_width {
            return None;
        }
        let available = Tile::available();
        self.tiles
            .iter()
            .copied()
            .filter(|t| available.contains(t))
            .find(|t| t.fits(g))
    }
}

/// The sizes of one convolution of stride 1 and dilation 1 (a direct one, and a
/// [`crate::small_map_conv::SmallMapConv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Geometry {
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Input height and width.
    pub input: [usize; 2],
    /// Zero rows above and columns left of the input.
    pub pad_before: [usize; 2],
    /// Output height and width: `input + pad_before + pad_after - kernel + 1`.
    pub output: [usize; 2],
}

impl Geometry {
    /// Height and width of the padded input: `output + kernel - 1`.
    pub fn padded(&self) -> [usize; 2] {
        [
            self.output[0] + self.kernel[0] - 1,
            self.output[1] + self.kernel[1] - 1,
        ]
    }

    /// Multiply-adds per image: `cout · oh · ow · cin · kh · kw`.
    pub fn macs_per_image(&self) -> usize {
        self.cout * self.output[0] * self.output[1] * self.cin * self.kernel[0] * self.kernel[1]
    }
}

/// A 2-D convolution computed directly (module docs), with its weights laid out for
/// `tile`: `[⌈cout / B⌉][cin][kh][kw][B]`, `B = tile.channels()`, zero past `cout`.
///
/// Its inputs are the image batch and, when the bias is not constant, the bias (one
/// value, or one per output channel).
#[derive(Debug, Clone)]
pub struct DirectConv {
    /// Sizes.
    pub geometry: Geometry,
    /// The register tile, checked against the CPU and the shape when made.
    pub tile: Tile,
    weights: Arc<Vec<f32>>,
    /// `None`: the bias is the op's second input.
    bias: Option<Arc<Vec<f32>>>,
}

/// Two ops are equal when they compute the same thing: same sizes, tile and values
/// (compared bit for bit, so that the relation is an equivalence, as tract needs).
impl PartialEq for DirectConv {
    fn eq(&self, other: &Self) -> bool {
        self.geometry == other.geometry
            && self.tile == other.tile
            && same_bits(&self.weights, &other.weights)
            && same_optional_bits(
                self.bias.as_deref().map(|b| &b[..]),
                other.bias.as_deref().map(|b| &b[..]),
            )
    }
}

impl Eq for DirectConv {}

impl DirectConv {
    /// Makes the op from OIHW `weights` (`cout · cin · kh · kw` values) and a constant
    /// `bias` (one value per output channel), or `None` for a bias given at run time as
    /// a second input. Fails when `tile` is not available on this CPU or its width does
    /// not divide the output row, or when the sizes disagree.
    pub fn new(
        geometry: Geometry,
        tile: Tile,
        weights: &[f32],
        bias: Option<&[f32]>,
    ) -> TractResult<Self> {
        let g = geometry;
        ensure!(
            Tile::available().contains(&tile),
            "{tile:?} is not available on this CPU"
        );
        ensure!(
            tile.fits(&g),
            "{tile:?} does not fit output rows of {} columns ({} rows, input rows of {})",
            g.output[1],
            g.output[0],
            g.input[1]
        );
        ensure!(g.kernel.iter().all(|&k| k >= 1) && g.cin >= 1 && g.cout >= 1);
        ensure!(g.output[0] >= 1);
        let taps = g.cin * g.kernel[0] * g.kernel[1];
        ensure!(
            weights.len() == g.cout * taps,
            "expected {} weights",
            g.cout * taps
        );
        if let Some(bias) = bias {
            ensure!(bias.len() == g.cout, "expected {} biases", g.cout);
        }
        for axis in 0..2 {
            ensure!(
                g.pad_before[axis] + g.input[axis] <= g.padded()[axis],
                "the input does not fit the padded input on axis {axis}"
            );
        }
        let b = tile.channels();
        let mut laid = vec![0f32; g.cout.div_ceil(b) * b * taps];
        for o in 0..g.cout {
            for t in 0..taps {
                laid[((o / b) * taps + t) * b + o % b] = weights[o * taps + t];
            }
        }
        Ok(DirectConv {
            geometry,
            tile,
            weights: Arc::new(laid),
            bias: bias.map(|b| Arc::new(b.to_vec())),
        })
    }

    /// Runs the convolution on the op's inputs: a batch `x` (`[n, cin, ih, iw]`, f32),
    /// then the bias when it is not constant. Pads each image into `scratch` (grown
    /// once, then reused).
    pub fn run(&self, scratch: &mut Scratch, inputs: &[TValue]) -> TractResult<Tensor> {
        let g = &self.geometry;
        let b = self.tile.channels();
        bias_values(
            self.bias.as_deref().map(|b| &b[..]),
            inputs,
            g.cout,
            &mut scratch.bias,
        )?;
        scratch.bias.resize(g.cout.div_ceil(b) * b, 0.0);
        let x = &*inputs[0];
        let input = image_values(x, g.cin, g.input)?;
        let n = x.shape()[0];
        let [hp, wp] = g.padded();
        let [ih, iw] = g.input;
        let [oh, ow] = g.output;
        let mut y = Tensor::zero::<f32>(&[n, g.cout, oh, ow])?;
        let mut view = y.try_as_plain_ram_mut()?;
        let out = view.as_slice_mut::<f32>()?;
        // Without padding (a 1 × 1 kernel, as `pointwise_conv` makes, or a "valid"
        // convolution) the tiles read each image where it is, uncopied.
        if g.padded() == g.input && self.tile != Tile::Rows2x8 {
            for (image, out) in input
                .chunks_exact(g.cin * ih * iw)
                .zip(out.chunks_exact_mut(g.cout * oh * ow))
            {
                self.run_image(image, &scratch.bias, out);
            }
            return Ok(y);
        }
        // Rows of the padded width, or for `Rows2x8` of the input's width (no columns
        // of zeros) between guards of zeros.
        let (row_len, left, guard) = match self.tile {
            Tile::Rows2x8 => (iw, 0, ROWS_GUARD),
            _ => (wp, g.pad_before[1], 0),
        };
        // Zeroed when (re)sized only: the borders stay zero, each image rewrites the
        // interior.
        let padded = &mut scratch.padded;
        if padded.len() != g.cin * hp * row_len + 2 * guard {
            padded.clear();
            padded.resize(g.cin * hp * row_len + 2 * guard, 0.0);
        }
        for (image, out) in input
            .chunks_exact(g.cin * ih * iw)
            .zip(out.chunks_exact_mut(g.cout * oh * ow))
        {
            for (c, plane) in image.chunks_exact(ih * iw).enumerate() {
                for (r, row) in plane.chunks_exact(iw).enumerate() {
                    let at = guard + (c * hp + g.pad_before[0] + r) * row_len + left;
                    padded[at..at + iw].copy_from_slice(row);
                }
            }
            self.run_image(padded, &scratch.bias, out);
        }
        Ok(y)
    }

    /// One padded image into `out` (`[cout, oh, ow]`) with the op's tile; `b` holds a
    /// bias per output channel, zero-padded to whole tiles. A convolution of at least
    /// [`MIN_MACS_TO_SPLIT`] multiply-adds is split by blocks of channels across the
    /// threads [`op_threads`] has here (the blocks are independent: the same bits).
    fn run_image(&self, padded: &[f32], b: &[f32], out: &mut [f32]) {
        let g = &self.geometry;
        let channels = self.tile.channels();
        let blocks = g.cout.div_ceil(channels);
        let parts = if g.macs_per_image() >= MIN_MACS_TO_SPLIT {
            op_threads::threads().min(blocks)
        } else {
            1
        };
        if parts <= 1 {
            return self.run_blocks(padded, &self.weights, b, out);
        }
        let per_part = blocks.div_ceil(parts) * channels;
        let taps = g.cin * g.kernel[0] * g.kernel[1];
        let parts = out
            .chunks_mut(per_part * g.output[0] * g.output[1])
            .zip(self.weights.chunks(per_part * taps))
            .zip(b.chunks(per_part));
        op_threads::for_each(parts, |((out, w), b)| self.run_blocks(padded, w, b, out));
    }

    /// Whole blocks of channels: `w` and `b` hold theirs, `out` their outputs.
    fn run_blocks(&self, padded: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let g = &self.geometry;
            // SAFETY: `new` made the op only with a tile `Tile::available` lists, that
            // is, after detecting the target features these functions enable.
            match self.tile {
                Tile::Wide32x4 => unsafe { x86::wide32x4(g, padded, w, b, out) },
                Tile::Wide16x8 => unsafe { x86::wide16x8(g, padded, w, b, out) },
                Tile::Rows2x8 => unsafe { x86::rows2x8(g, padded, w, b, out) },
                Tile::Narrow8x8 => unsafe { x86::narrow8x8(g, padded, w, b, out) },
                Tile::Wide16x6 => unsafe { x86::wide16x6(g, padded, w, b, out) },
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (padded, w, b, out);
            unreachable!("no tile is available off x86-64")
        }
    }
}

/// One image, every tile of `L` columns × `B` channels (inlined into each
/// target-feature function so that it is compiled for those features).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn conv_image<const L: usize, const B: usize>(
    g: &Geometry,
    padded: &[f32],
    weights: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    let [oh, ow] = g.output;
    let taps = g.cin * g.kernel[0] * g.kernel[1];
    let blocks = weights.chunks_exact(taps * B).zip(bias.chunks_exact(B));
    // The last block may have fewer than B channels: its other outputs are not stored.
    for (block, out) in blocks.zip(out.chunks_mut(B * oh * ow)) {
        let ((w, b), channels) = (block, out.len() / (oh * ow));
        let b: &[f32; B] = b.try_into().expect("B biases");
        for row in 0..oh {
            for col in (0..ow).step_by(L) {
                let acc = conv_tile::<L, B>(g, padded, w, b, row, col);
                for (j, acc) in acc.iter().enumerate().take(channels) {
                    out[(j * oh + row) * ow + col..][..L].copy_from_slice(acc);
                }
            }
        }
    }
}

/// `L` outputs from column `col` of output row `row`, for `B` channels:
/// `acc[j][l] = (Σ_(c, dy, dx) w[c, dy, dx, j] · xp[c, row + dy, col + l + dx]) + b[j]`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn conv_tile<const L: usize, const B: usize>(
    g: &Geometry,
    padded: &[f32],
    w: &[f32],
    b: &[f32; B],
    row: usize,
    col: usize,
) -> [[f32; L]; B] {
    // Sizes as locals and the weights cut to length, so that nothing is reloaded or
    // bounds-checked per tap (the compiler kept both in the loop otherwise).
    let [hp, wp] = g.padded();
    let [kh, kw] = g.kernel;
    let cin = g.cin;
    let w = &w[..cin * kh * kw * B];
    let mut acc = [[0f32; L]; B];
    for c in 0..cin {
        for dy in 0..kh {
            let line = &padded[(c * hp + row + dy) * wp + col..];
            for dx in 0..kw {
                let x: &[f32; L] = line[dx..dx + L].try_into().expect("L inputs");
                let tap = (c * kh + dy) * kw + dx;
                let wt: &[f32; B] = w[tap * B..][..B].try_into().expect("B weights");
                for j in 0..B {
                    for l in 0..L {
                        acc[j][l] = x[l].mul_add(wt[j], acc[j][l]);
                    }
                }
            }
        }
    }
    for (acc, b) in acc.iter_mut().zip(b) {
        for a in acc {
            *a += b;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{conv_image, Geometry};

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn wide32x4(g: &Geometry, xp: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
        conv_image::<32, 4>(g, xp, w, b, out)
    }

    /// A tile function in `std::arch` intrinsics: `$v` vectors of `$lanes` outputs of a
    /// row × `$b` channels, the same operations in the same order as `conv_tile`, so the
    /// same bits.
    macro_rules! intrinsic_tile {
        ($(#[$doc:meta])* $name:ident, $features:literal,
         $v:literal vectors of $lanes:literal x $b:literal,
         $zero:ident, $load:ident, $fmadd:ident, $set1:ident, $add:ident, $store:ident) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub(super) fn $name(
                g: &Geometry,
                xp: &[f32],
                w: &[f32],
                b: &[f32],
                out: &mut [f32],
            ) {
                use std::arch::x86_64::*;
                const V: usize = $v;
                const LANES: usize = $lanes;
                const L: usize = V * LANES;
                const B: usize = $b;
                let [oh, ow] = g.output;
                let [hp, wp] = g.padded();
                let [kh, kw] = g.kernel;
                let cin = g.cin;
                let taps = cin * kh * kw;
                assert!(ow.is_multiple_of(L) && b.len() == w.len() / taps);
                assert!(xp.len() >= cin * hp * wp && hp >= oh + kh - 1 && wp >= ow + kw - 1);
                let blocks = w.chunks_exact(taps * B).zip(b.chunks_exact(B));
                for ((w, b), out) in blocks.zip(out.chunks_mut(B * oh * ow)) {
                    let channels = out.len() / (oh * ow);
                    for row in 0..oh {
                        for col in (0..ow).step_by(L) {
                            let mut acc = [[$zero(); V]; B];
                            for c in 0..cin {
                                for dy in 0..kh {
                                    let line = (c * hp + row + dy) * wp + col;
                                    for dx in 0..kw {
                                        let mut x = [$zero(); V];
                                        for (k, x) in x.iter_mut().enumerate() {
                                            // SAFETY: the asserts above keep
                                            // `line + dx + L` within the padded image
                                            // (`col + L <= ow`, `dx < kw`).
                                            *x = unsafe {
                                                $load(xp.as_ptr().add(line + dx + k * LANES))
                                            };
                                        }
                                        let wt = &w[((c * kh + dy) * kw + dx) * B..][..B];
                                        for j in 0..B {
                                            let wj = $set1(wt[j]);
                                            for k in 0..V {
                                                acc[j][k] = $fmadd(x[k], wj, acc[j][k]);
                                            }
                                        }
                                    }
                                }
                            }
                            for (j, acc) in acc.iter().enumerate().take(channels) {
                                let bj = $set1(b[j]);
                                let at = &mut out[(j * oh + row) * ow + col..][..L];
                                for (k, acc) in acc.iter().enumerate() {
                                    // SAFETY: `at` holds L = V × LANES values.
                                    unsafe {
                                        $store(at.as_mut_ptr().add(k * LANES), $add(*acc, bj))
                                    };
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    intrinsic_tile!(
        /// The 16 × 8 tile (AVX-512): the compiler did not vectorise the generic
        /// `conv_image::<16, 8>` (scalar fused multiply-adds, 20x slower).
        wide16x8, "avx512f,avx2,fma", 1 vectors of 16 x 8,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_set1_ps, _mm512_add_ps,
        _mm512_storeu_ps
    );

    /// The two-row tile (AVX-512): 16 outputs, rows `row` and `row + 1` of 8 columns,
    /// × 8 channels. `xp` holds the input with its rows of 8 (no columns of zeros) and
    /// its rows of zeros above and below, between `ROWS_GUARD` zeros; each tap loads 16
    /// values shifted by `dx − pad_left`, the lanes whose column falls outside the row
    /// masked to zero. The same operations in the same order as `conv_tile`, so the
    /// same bits.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) fn rows2x8(g: &Geometry, xp: &[f32], w: &[f32], b: &[f32], out: &mut [f32]) {
        use super::ROWS_GUARD;
        use std::arch::x86_64::*;
        const B: usize = 8;
        const W: usize = 8;
        let [oh, ow] = g.output;
        let [hp, _] = g.padded();
        let [kh, kw] = g.kernel;
        let left = g.pad_before[1];
        let cin = g.cin;
        let taps = cin * kh * kw;
        assert!(ow == W && oh.is_multiple_of(2) && g.input[1] == W && b.len() == w.len() / taps);
        assert!(kw <= ROWS_GUARD && left < kw && hp >= oh + kh - 1);
        assert!(xp.len() >= cin * hp * W + 2 * ROWS_GUARD);
        // Lane l reads column (l % 8) + dx − left of its row: kept where that is in 0..8.
        let mut masks = [0u16; ROWS_GUARD];
        for (dx, mask) in masks.iter_mut().enumerate().take(kw) {
            for l in 0..2 * W {
                let col = (l % W + dx) as isize - left as isize;
                if (0..W as isize).contains(&col) {
                    *mask |= 1 << l;
                }
            }
        }
        let blocks = w.chunks_exact(taps * B).zip(b.chunks_exact(B));
        for ((w, b), out) in blocks.zip(out.chunks_mut(B * oh * ow)) {
            let channels = out.len() / (oh * ow);
            for row in (0..oh).step_by(2) {
                let mut acc = [_mm512_setzero_ps(); B];
                for c in 0..cin {
                    for dy in 0..kh {
                        let line = ROWS_GUARD + (c * hp + row + dy) * W;
                        for (dx, &mask) in masks.iter().enumerate().take(kw) {
                            // SAFETY: `line + dx − left` ≥ ROWS_GUARD − left > 0, and its
                            // 16 values end at most kw − 1 − left ≤ ROWS_GUARD past the
                            // last input row (`row + 1 + dy < hp`): within `xp`, as the
                            // asserts above check.
                            let x = unsafe {
                                _mm512_maskz_loadu_ps(mask, xp.as_ptr().add(line + dx - left))
                            };
                            let wt = &w[((c * kh + dy) * kw + dx) * B..][..B];
                            for j in 0..B {
                                acc[j] = _mm512_fmadd_ps(x, _mm512_set1_ps(wt[j]), acc[j]);
                            }
                        }
                    }
                }
                for (j, acc) in acc.iter().enumerate().take(channels) {
                    let y = _mm512_add_ps(*acc, _mm512_set1_ps(b[j]));
                    let at = &mut out[(j * oh + row) * W..][..2 * W];
                    // SAFETY: `at` holds 16 values.
                    unsafe { _mm512_storeu_ps(at.as_mut_ptr(), y) };
                }
            }
        }
    }

    intrinsic_tile!(
        /// The 8 × 8 tile (AVX2): the generic `conv_image::<8, 8>` was not vectorised
        /// well either.
        narrow8x8, "avx2,fma", 1 vectors of 8 x 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_add_ps,
        _mm256_storeu_ps
    );

    intrinsic_tile!(
        /// The 16 × 6 tile (AVX2): two vectors of 8 outputs per channel, 12
        /// accumulators.
        wide16x6, "avx2,fma", 2 vectors of 8 x 6,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_set1_ps, _mm256_add_ps,
        _mm256_storeu_ps
    );
}

/// A [`DirectConv`]'s scratch, kept between runs of a plan's state: the padded input
/// image and the bias padded to whole tiles.
#[derive(Debug, Clone, Default)]
pub struct Scratch {
    padded: Vec<f32>,
    bias: Vec<f32>,
}

impl OpState for Scratch {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<DirectConv>()
            .context("direct convolution state on another op")?;
        Ok(tvec!(op.run(self, &inputs)?.into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        // Nothing carries from one run to the next.
        Ok(())
    }
}

impl Op for DirectConv {
    fn name(&self) -> StaticName {
        "EsddpmDirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("{:?} {:?}", self.geometry, self.tile)])
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConv {
    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        let mut scratch = Scratch::default();
        Ok(Some(tvec!(self.run(&mut scratch, &inputs)?.into_tvalue())))
    }

    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::<Scratch>::default()))
    }
}

impl TypedOp for DirectConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &self.geometry;
        ensure!(inputs.len() == 1 + usize::from(self.bias.is_none()) && inputs[0].rank() == 4);
        let n = inputs[0].shape[0].clone();
        Ok(tvec!(f32::fact([
            n,
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

/// A tract `Conv` node as esddpm's convolutions take it: one group, OIHW weights that
/// are constant, an NCHW f32 input of a concrete 4-D shape, stride and dilation 1, an
/// f32 bias (constant or given at run time).
pub(crate) struct PlainConv<'a> {
    /// The convolution's kernel, padding and channels.
    pub spec: &'a PoolSpec,
    /// The input's shape, `[n, cin, h, w]`.
    pub shape: &'a [usize],
    /// The weights, `[cout, cin, kh, kw]`.
    pub kernel: &'a Tensor,
    /// The bias as one value per output channel, where it is constant.
    pub bias: Option<Vec<f32>>,
}

impl PlainConv<'_> {
    /// Its sizes (stride and dilation 1, as [`Self::of`] takes).
    pub(crate) fn geometry(&self) -> Geometry {
        let (spec, shape) = (self.spec, self.shape);
        let padding = spec.computed_padding(&shape[2..]);
        Geometry {
            cin: spec.input_channels,
            cout: spec.output_channels,
            kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
            input: [shape[2], shape[3]],
            pad_before: [padding[0].pad_before, padding[1].pad_before],
            output: [padding[0].convoluted, padding[1].convoluted],
        }
    }

    /// `node` as a plain convolution, or `None` where it is not one.
    pub(crate) fn of<'a>(
        model: &'a TypedModel,
        node: &'a TypedNode,
    ) -> TractResult<Option<PlainConv<'a>>> {
        let Some(conv) = node.op_as::<Conv>() else {
            return Ok(None);
        };
        let spec = &conv.pool_spec;
        let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&d| d == 1));
        if conv.q_params.is_some()
            || conv.group != 1
            || conv.kernel_fmt != KernelFormat::OIHW
            || spec.data_format != DataFormat::NCHW
            || spec.rank() != 2
            || !ones(&spec.strides)
            || !ones(&spec.dilations)
        {
            return Ok(None);
        }
        let facts = model.node_input_facts(node.id)?;
        let (x, kernel, bias) = (facts[0], facts[1], facts[2]);
        let Some(shape) = x.shape.as_concrete() else {
            return Ok(None);
        };
        let Some(kernel) = &kernel.konst else {
            return Ok(None);
        };
        if x.datum_type != f32::datum_type()
            || kernel.datum_type() != f32::datum_type()
            || bias.datum_type != f32::datum_type()
            || shape.len() != 4
        {
            return Ok(None);
        }
        let bias = match &bias.konst {
            Some(b) if b.len() == 1 => Some(vec![c_order_f32(b)?[0]; spec.output_channels]),
            Some(b) => Some(c_order_f32(b)?.into_owned()),
            None => None,
        };
        Ok(Some(PlainConv {
            spec,
            shape,
            kernel,
            bias,
        }))
    }
}

/// Replaces each node of `model` for which `make` (given the model and the node's id)
/// gives an op, the op taking the node's image and, where `make` says the bias is not
/// constant, its bias; returns how many.
pub(crate) fn replace_convs<O: TypedOp>(
    model: &mut TypedModel,
    mut make: impl FnMut(&mut TypedModel, usize) -> TractResult<Option<(O, bool)>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some((op, constant_bias)) = make(model, id)? else {
            continue;
        };
        let node = model.node(id);
        let inputs = if constant_bias {
            &node.inputs[0..1]
        } else {
            &[node.inputs[0], node.inputs[2]][..]
        };
        TypedModelPatch::replace_single_op(model, node, inputs, op)?.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// The direct convolution for `node` (a tract `Conv` of `model`), or `None` where it
/// does not apply (module docs).
fn direct_for(
    model: &TypedModel,
    node: &TypedNode,
    policy: &Policy,
) -> TractResult<Option<DirectConv>> {
    let Some(conv) = PlainConv::of(model, node)? else {
        return Ok(None);
    };
    if conv.spec.kernel_shape.iter().product::<usize>() < 2 {
        return Ok(None);
    }
    let geometry = conv.geometry();
    let Some(tile) = policy.tile_for(&geometry) else {
        return Ok(None);
    };
    let weights = c_order_f32(conv.kernel)?;
    DirectConv::new(geometry, tile, &weights, conv.bias.as_deref()).map(Some)
}

/// Replaces every convolution of `model` (decluttered, before `optimize`) that the
/// direct kernels run faster with a [`DirectConv`] (module docs). Returns how many were
/// replaced; none on a CPU without the kernels. The default [`Policy`].
pub fn use_direct_convs(model: &mut TypedModel) -> TractResult<usize> {
    use_direct_convs_with(model, &Policy::default())
}

/// [`use_direct_convs`] with another [`Policy`] (for measuring its limits).
pub fn use_direct_convs_with(model: &mut TypedModel, policy: &Policy) -> TractResult<usize> {
    replace_convs(model, |model, id| {
        Ok(direct_for(model, model.node(id), policy)?.map(|op| {
            let constant_bias = op.bias.is_some();
            (op, constant_bias)
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{bits, conv_model, values};

    /// Runs `model` optimised, with or without the direct convolutions; returns the
    /// output and how many were used.
    fn run(
        model: &TypedModel,
        policy: Option<&Policy>,
        inputs: &[Tensor],
    ) -> TractResult<(Vec<f32>, usize)> {
        let mut m = model.clone();
        let replaced = match policy {
            Some(p) => use_direct_convs_with(&mut m, p)?,
            None => 0,
        };
        let plan = m.into_optimized()?.into_runnable()?;
        let y = plan
            .run(inputs.iter().map(|t| t.clone().into_tvalue()).collect())?
            .remove(0);
        Ok((y.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(), replaced))
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_tract_on_the_shapes_it_takes() -> TractResult<()> {
        // Every tile this CPU has, each alone (the default uses only the wide one).
        let policies: Vec<Policy> = Tile::available()
            .into_iter()
            .map(|t| Policy {
                tiles: vec![t],
                max_output_channels: 64,
                min_output_width: 8,
            })
            .collect();
        for (x_shape, cout, kernel, pad, bias_input) in [
            ([1, 16, 32, 32], 16, [3, 3], (1, 1), false),
            ([2, 48, 32, 32], 16, [3, 3], (1, 1), false),
            ([1, 48, 32, 32], 16, [3, 3], (1, 1), true),
            ([1, 32, 16, 64], 32, [3, 3], (1, 1), true),
            ([1, 16, 32, 32], 1, [3, 3], (1, 1), false),
            ([3, 5, 8, 64], 12, [3, 3], (1, 1), false),
            ([1, 4, 12, 34], 8, [5, 3], (0, 0), false),
            ([1, 3, 9, 33], 24, [2, 2], (0, 0), true),
            ([1, 2, 6, 31], 8, [3, 3], (2, 1), false),
            // 16 columns (the 16- and 8-wide tiles), 64 and 40 channels.
            ([1, 32, 16, 16], 64, [3, 3], (1, 1), false),
            ([2, 24, 8, 16], 40, [3, 3], (1, 1), true),
            // 8 columns (the two-row and 8-wide tiles): padding on both sides, only
            // on the right, only on the left; a partial block of channels.
            ([1, 64, 8, 8], 64, [3, 3], (1, 1), false),
            ([2, 5, 6, 8], 12, [3, 3], (1, 1), true),
            ([1, 4, 4, 8], 8, [3, 3], (0, 2), false),
            ([1, 3, 4, 8], 20, [2, 2], (1, 0), false),
        ] {
            let out_width = x_shape[3] + pad.0 + pad.1 + 1 - kernel[1];
            let model = conv_model(x_shape, cout, kernel, pad, 1, bias_input)?;
            let mut inputs = vec![Tensor::from_shape(
                &x_shape,
                &values(x_shape.iter().product(), 3),
            )?];
            if bias_input {
                inputs.push(tensor1(&values(cout, 7)));
            }
            let (want, _) = run(&model, None, &inputs)?;
            for policy in &policies {
                let (got, replaced) = run(&model, Some(policy), &inputs)?;
                let g = Geometry {
                    cin: x_shape[1],
                    cout,
                    kernel,
                    input: [x_shape[2], x_shape[3]],
                    pad_before: [pad.0, pad.0],
                    output: [x_shape[2] + pad.0 + pad.1 + 1 - kernel[0], out_width],
                };
                let fits = policy.tile_for(&g).is_some();
                assert_eq!(
                    replaced,
                    usize::from(fits),
                    "{x_shape:?} {kernel:?} {:?}",
                    policy.tiles
                );
                // Another summation order: equal to f32 rounding of the largest output.
                let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                let d = max_diff(&want, &got);
                assert!(
                    d <= 2e-6 * scale,
                    "{x_shape:?} -> {cout} {kernel:?} {:?}: max abs diff {d}",
                    policy.tiles
                );
            }
        }
        Ok(())
    }

    #[test]
    fn leaves_other_convolutions_to_tract() -> TractResult<()> {
        for (x_shape, cout, kernel, pad, stride) in [
            ([1, 16, 32, 32], 128, [3, 3], (1, 1), 1), // too many output channels
            ([1, 16, 32, 32], 16, [1, 1], (0, 0), 1),  // 1x1: a plain product
            ([1, 16, 32, 32], 16, [3, 3], (1, 1), 2),  // strided
            ([1, 16, 30, 36], 16, [3, 3], (1, 1), 1),  // 36 columns: no tile divides
            ([1, 64, 7, 8], 64, [3, 3], (1, 1), 1),    // 7 rows of 8: not two by two
            ([1, 16, 8, 10], 16, [3, 3], (0, 0), 1),   // rows of 8 from rows of 10
        ] {
            // Rows of 8 are the two-row tile's (AVX-512) alone, with its limits; with
            // AVX2 only, the 8 × 8 tile takes them.
            if x_shape[3] <= 10 && Policy::default() != Policy::avx512() {
                continue;
            }
            let mut model = conv_model(x_shape, cout, kernel, pad, stride, false)?;
            assert_eq!(
                use_direct_convs(&mut model)?,
                0,
                "{x_shape:?} {cout} {kernel:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_policy_moves_the_limits() -> TractResult<()> {
        let Some(&narrow) = Tile::available().last() else {
            return Ok(());
        };
        // 128 channels: tract's by default.
        let model = conv_model([1, 32, 8, 8], 128, [3, 3], (1, 1), 1, false)?;
        let open = Policy {
            max_output_channels: 128,
            min_output_width: 8,
            tiles: vec![narrow],
        };
        let closed = Policy {
            tiles: vec![],
            ..open.clone()
        };
        assert_eq!(use_direct_convs_with(&mut model.clone(), &closed)?, 0);
        assert_eq!(use_direct_convs(&mut model.clone())?, 0);
        let mut m = model.clone();
        assert_eq!(use_direct_convs_with(&mut m, &open)?, 1);
        let x = Tensor::from_shape(&[1, 32, 8, 8], &values(32 * 8 * 8, 3))?;
        let plan = m.into_optimized()?.into_runnable()?;
        let got = plan.run(tvec![x.clone().into_tvalue()])?.remove(0);
        let got = got.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let (want, _) = run(&model, None, &[x])?;
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        assert!(max_diff(&want, &got) <= 2e-6 * scale);
        Ok(())
    }

    #[test]
    fn a_convolution_split_across_threads_gives_the_same_bits() -> TractResult<()> {
        // 32 channels of 32 x 32 from 16: 4.7 M multiply-adds, over MIN_MACS_TO_SPLIT;
        // the two-row tile: 64 channels of 8 x 8 from 64, 2.4 M.
        for (x_shape, cout) in [([1, 16, 32, 32], 32), ([1, 64, 8, 8], 64)] {
            split_gives_the_same_bits(x_shape, cout)?;
        }
        Ok(())
    }

    fn split_gives_the_same_bits(x_shape: [usize; 4], cout: usize) -> TractResult<()> {
        let model = conv_model(x_shape, cout, [3, 3], (1, 1), 1, true)?;
        let inputs = [
            Tensor::from_shape(&x_shape, &values(x_shape.iter().product(), 8))?,
            tensor1(&values(cout, 9)),
        ];
        let g = same_3x3(x_shape[1], cout, [x_shape[2], x_shape[3]]);
        for tile in Tile::available().into_iter().filter(|t| t.fits(&g)) {
            let policy = Policy {
                tiles: vec![tile],
                max_output_channels: 64,
                min_output_width: 8,
            };
            let (alone, replaced) = run(&model, Some(&policy), &inputs)?;
            assert_eq!(replaced, 1);
            let pool = tract_linalg::multithread::Executor::multithread(2);
            let (split, _) = op_threads::scope(&pool, || {
                assert_eq!(op_threads::threads(), 2);
                run(&model, Some(&policy), &inputs)
            })?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&alone), bits(&split), "{tile:?}");
        }
        Ok(())
    }

    /// A 3x3 convolution padded by 1 (output as large as the input).
    fn same_3x3(cin: usize, cout: usize, hw: [usize; 2]) -> Geometry {
        Geometry {
            cin,
            cout,
            kernel: [3, 3],
            input: hw,
            pad_before: [1, 1],
            output: hw,
        }
    }

    #[test]
    fn every_tile_gives_the_same_bits() -> TractResult<()> {
        // Rows of 32 (every tile but the two-row one) and of 8 (it and the 8-wide one).
        for (side, tiles_that_fit) in [(32, 4), (8, 2)] {
            let g = same_3x3(7, 16, [side, side]);
            let weights = values(16 * 7 * 9, 4);
            let bias = values(16, 5);
            let x = Tensor::from_shape(&[2, 7, side, side], &values(2 * 7 * side * side, 6))?;
            let tiles: Vec<Tile> = Tile::available()
                .into_iter()
                .filter(|t| t.fits(&g))
                .collect();
            if Tile::available().len() == 5 {
                assert_eq!(tiles.len(), tiles_that_fit, "{side} columns: {tiles:?}");
            }
            same_bits_on(g, &tiles, &weights, &bias, &x)?;
        }
        Ok(())
    }

    /// Asserts that every tile of `tiles` computes the same bits for `x`.
    fn same_bits_on(
        g: Geometry,
        tiles: &[Tile],
        weights: &[f32],
        bias: &[f32],
        x: &Tensor,
    ) -> TractResult<()> {
        let outputs: Vec<Vec<u32>> = tiles
            .iter()
            .map(|&tile| {
                let op = DirectConv::new(g, tile, weights, Some(bias))?;
                let y = op.run(&mut Scratch::default(), &[x.clone().into_tvalue()])?;
                Ok(bits(&y))
            })
            .collect::<TractResult<_>>()?;
        for other in outputs.iter().skip(1) {
            assert!(other == &outputs[0], "tiles disagree");
        }
        Ok(())
    }

    #[test]
    fn bad_sizes_are_errors() {
        let Some(&tile) = Tile::available().first() else {
            return;
        };
        let g = same_3x3(2, 8, [8, 32]);
        assert!(DirectConv::new(g, tile, &[0.0; 10], Some(&[0.0; 8])).is_err());
        assert!(DirectConv::new(g, tile, &[0.0; 144], Some(&[0.0; 7])).is_err());
        let narrow = Geometry {
            output: [8, 30],
            input: [8, 30],
            ..g
        };
        assert!(DirectConv::new(narrow, tile, &[0.0; 144], None).is_err());
        let op = DirectConv::new(g, tile, &[0.0; 144], Some(&[0.0; 8])).unwrap();
        let wrong = Tensor::zero::<f32>(&[1, 3, 8, 32]).unwrap().into_tvalue();
        assert!(op.run(&mut Scratch::default(), &[wrong]).is_err());
        let x = Tensor::zero::<f32>(&[1, 2, 8, 32]).unwrap().into_tvalue();
        let dynamic = DirectConv::new(g, tile, &[0.0; 144], None).unwrap();
        assert!(
            dynamic
                .run(&mut Scratch::default(), std::slice::from_ref(&x))
                .is_err(),
            "no bias"
        );
        let five = tensor1(&[0f32; 5]).into_tvalue();
        assert!(dynamic
            .run(&mut Scratch::default(), &[x.clone(), five])
            .is_err());
        let one = tensor1(&[2f32]).into_tvalue();
        let y = dynamic.run(&mut Scratch::default(), &[x, one]).unwrap();
        assert!(y
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 2.0));
    }
}
