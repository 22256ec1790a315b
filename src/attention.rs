//! A fused attention (issue 6, lever 12 in `docs/PERFORMANCE.md`).
//!
//! A diffusers attention block exported to ONNX computes, per head `h`,
//!
//! ```text
//! S = Q Kᵀ            (Q: N × D queries, K: M × D keys, the scale already in Q and K)
//! P = softmax(S)      (over the M keys, per query)
//! O = P V             (V: M × E values; O: N × E)
//! ```
//!
//! tract runs that as two matrix products with a softmax between them: the `N × M`
//! scores are written, packed for the second product and read back, with three
//! dispatches per head group. [`Attention`] computes it in one op, a few queries at a
//! time: the scores of four queries against all keys (register tiles of 4 queries ×
//! 64 keys with AVX-512, × 32 with AVX2), each row's exponentials `exp(s − max s)` and
//! their sum (`src/attention/softmax.rs`, lever 17), then the four output rows (tiles
//! of 4 × 32 values with AVX-512, 4 × 16 with AVX2: the tiles fit each one's
//! registers, lever 13), divided by their row's sum; with AVX-512 and fewer than 16
//! values per row (many small heads), the output rows of 16 queries at a time (lever
//! 25). The scores never leave the cache.
//! Heads and blocks of queries are split across esddpm's operator threads ([`crate::op_threads`]), each thread part with buffers
//! kept in the plan's state ([`AttentionScratch`]).
//!
//! [`fuse_attention`] finds `EinSum(q, k) → Softmax → EinSum(·, v)` in a decluttered
//! model, in whatever axis order tract left the inputs (read from the einsums' axes:
//! one optional head axis, the query, key and feature axes), and swaps it for the op.
//! Anything else stays with tract.

mod softmax;

use crate::fusion::{fuse_all, only_reader, Fusion};
use crate::op_threads;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Queries per tile.
const ROWS: usize = 4;
/// Keys per score tile (AVX-512 and generic).
const KEYS: usize = 64;
/// Values per output tile (AVX-512 and generic).
const VALS: usize = 32;
/// Keys per score tile with AVX2 (16 vector registers, not AVX-512's 32: 4 × 24 keys
/// are 12 accumulators of 8 lanes, with room for the loads).
#[cfg(target_arch = "x86_64")]
const KEYS_AVX2: usize = 32;
/// Values per output tile with AVX2 (4 × 16 values: 8 accumulators).
#[cfg(target_arch = "x86_64")]
const VALS_AVX2: usize = 16;
/// Queries per unit of work handed to a thread.
const QUERY_BLOCK: usize = 64;
/// The most queries whose output rows one values tile holds ([`tiles::query_group`]).
const MAX_GROUP: usize = 16;

/// Where each role's axis is in a tensor: an optional head axis, the row axis (queries,
/// or keys for K and V) and the feature axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Axes {
    /// The head axis, when there are several heads.
    pub head: Option<usize>,
    /// The row axis (a query of Q and of the output, a key of K and V).
    pub row: usize,
    /// The feature axis (D for Q and K, E for V and the output).
    pub feat: usize,
}

impl Axes {
    fn rank(&self) -> usize {
        2 + usize::from(self.head.is_some())
    }

    /// Whether the axes are distinct positions of a tensor of [`Self::rank`].
    fn valid(&self) -> bool {
        let rank = self.rank();
        let distinct =
            self.row != self.feat && self.head.is_none_or(|h| h != self.row && h != self.feat);
        distinct && self.row < rank && self.feat < rank && self.head.is_none_or(|h| h < rank)
    }

    /// (heads, rows, features) of `shape`.
    fn dims(&self, shape: &[usize]) -> (usize, usize, usize) {
        (
            self.head.map_or(1, |h| shape[h]),
            shape[self.row],
            shape[self.feat],
        )
    }

    /// Element strides (head, row, feature) of a tensor with natural strides.
    fn strides(&self, shape: &[usize]) -> (usize, usize, usize) {
        let natural = Tensor::natural_strides(shape);
        let s = |a: usize| natural[a] as usize;
        (self.head.map_or(0, s), s(self.row), s(self.feat))
    }
}

/// `softmax(Q Kᵀ) V` per head, for f32 inputs laid out as [`Axes`] say (module docs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attention {
    /// The axes of Q.
    pub q: Axes,
    /// The axes of K.
    pub k: Axes,
    /// The axes of V.
    pub v: Axes,
    /// The axes of the output.
    pub out: Axes,
}

/// Sizes of one evaluation.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    n: usize,
    m: usize,
    d: usize,
    e: usize,
}

impl Attention {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> TractResult<Dims> {
        ensure!(
            [self.q, self.k, self.v, self.out].iter().all(Axes::valid)
                && self.out.head.is_some() == self.q.head.is_some(),
            "attention axes {self:?} are not distinct positions of their tensors"
        );
        ensure!(
            q.len() == self.q.rank() && k.len() == self.k.rank() && v.len() == self.v.rank(),
            "attention inputs of ranks {}, {}, {}",
            q.len(),
            k.len(),
            v.len()
        );
        let (hq, n, d) = self.q.dims(q);
        let (hk, m, dk) = self.k.dims(k);
        let (hv, mv, e) = self.v.dims(v);
        ensure!(
            hq == hk && hk == hv && d == dk && m == mv && m > 0,
            "attention shapes q {q:?}, k {k:?}, v {v:?} do not fit"
        );
        Ok(Dims {
            heads: hq,
            n,
            m,
            d,
            e,
        })
    }

    fn out_shape(&self, dims: Dims) -> TVec<usize> {
        let mut shape = tvec![0; self.out.rank()];
        if let Some(h) = self.out.head {
            shape[h] = dims.heads;
        }
        shape[self.out.row] = dims.n;
        shape[self.out.feat] = dims.e;
        shape
    }

    /// Evaluates the op with buffers of its own (out of a plan).
    pub fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> TractResult<Tensor> {
        self.run_in(&mut AttentionScratch::default(), q, k, v)
    }

    /// Evaluates the op with `scratch`'s buffers, grown on the first run and reused
    /// after (a plan's state keeps one per node: [`AttentionScratch`]).
    pub fn run_in(
        &self,
        scratch: &mut AttentionScratch,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> TractResult<Tensor> {
        for t in [q, k, v] {
            ensure!(
                t.datum_type() == f32::datum_type(),
                "attention on {:?}",
                t.datum_type()
            );
        }
        let dims = self.dims(q.shape(), k.shape(), v.shape())?;
        let shape = self.out_shape(dims);
        let mut y = Tensor::zero::<f32>(&shape)?;
        // tract's tensors are laid out C-contiguously (a unit axis's stride aside,
        // which indexes nothing): the kernels index them with natural strides.
        let (qr, kr, vr) = (
            q.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            v.try_as_plain_ram()?,
        );
        let (qv, kv, vv) = (
            qr.as_slice::<f32>()?,
            kr.as_slice::<f32>()?,
            vr.as_slice::<f32>()?,
        );
        let strides = Strides {
            q: self.q.strides(q.shape()),
            k: self.k.strides(k.shape()),
            v: self.v.strides(v.shape()),
            out: self.out.strides(&shape),
        };
        {
            let mut view = y.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            run_all(dims, strides, qv, kv, vv, out, scratch)?;
        }
        Ok(y)
    }
}

#[derive(Debug, Clone, Copy)]
struct Strides {
    q: (usize, usize, usize),
    k: (usize, usize, usize),
    v: (usize, usize, usize),
    out: (usize, usize, usize),
}

/// A raw output pointer that units of work write through, each to its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every unit writes disjoint elements (its head's rows), and the scope that
// shares the pointer outlives them all.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(&self) -> *mut f32 {
        self.0
    }
}

/// All heads and rows, split across esddpm's operator threads by blocks of queries,
/// each thread part with its own scratch from `scratch`.
fn run_all(
    dims: Dims,
    st: Strides,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    scratch: &mut AttentionScratch,
) -> TractResult<()> {
    let blocks = dims.n.div_ceil(QUERY_BLOCK);
    let units = dims.heads * blocks;
    let parts = op_threads::threads().min(units).max(1);
    let out_len = out.len();
    let ptr = OutPtr(out.as_mut_ptr());
    if scratch.parts.len() < parts {
        scratch.parts.resize_with(parts, Scratch::default);
    }
    let work = scratch.parts[..parts].iter_mut().enumerate();
    op_threads::try_for_each(work, |(p, sc)| {
        let (u0, u1) = (units * p / parts, units * (p + 1) / parts);
        sc.fit(dims);
        for unit in u0..u1 {
            let (h, b) = (unit / blocks, unit % blocks);
            let rows = b * QUERY_BLOCK..((b + 1) * QUERY_BLOCK).min(dims.n);
            run_unit(dims, st, h, rows, q, k, v, (ptr, out_len), sc)?;
        }
        Ok(())
    })
}

/// A thread part's buffers: K of one head transposed (D × M), V of one head (M × E), a
/// tile of queries (4 × D), their scores (4 × M) and outputs (4 × E); sized by
/// [`Scratch::fit`] on every run, allocated only when the sizes grow.
#[derive(Debug, Clone, Default)]
struct Scratch {
    q: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    /// The head whose K and V `kt` and `v` hold in this run.
    head: Option<usize>,
    isa: Option<tiles::Isa>,
}

impl Scratch {
    /// Sizes the buffers for `d` and forgets the head: K and V are a new run's.
    fn fit(&mut self, d: Dims) {
        self.q.resize(MAX_GROUP * d.d, 0.0);
        self.kt.resize(d.d * d.m, 0.0);
        self.v.resize(d.m * d.e, 0.0);
        self.s.resize(MAX_GROUP * d.m, 0.0);
        self.o.resize(MAX_GROUP * d.e, 0.0);
        self.head = None;
        self.isa.get_or_insert_with(tiles::Isa::detect);
    }
}

/// An [`Attention`]'s buffers, kept between runs of a plan's state (tract's
/// [`OpState`]): one scratch per thread part, grown on the first run and reused
/// after, so a forward allocates nothing here but the op's output.
#[derive(Debug, Clone, Default)]
pub struct AttentionScratch {
    parts: Vec<Scratch>,
}

impl OpState for AttentionScratch {
    fn eval(
        &mut self,
        _ctx: &EvalContext,
        op: &dyn Op,
        inputs: TVec<TValue>,
    ) -> TractResult<TVec<TValue>> {
        let op = op
            .downcast_ref::<Attention>()
            .context("attention state on another op")?;
        ensure!(inputs.len() == 3, "{} inputs to an attention", inputs.len());
        Ok(tvec!(op
            .run_in(self, &inputs[0], &inputs[1], &inputs[2])?
            .into_tvalue()))
    }

    fn reset_lanes(&mut self, _lanes: &[LaneId]) -> TractResult<()> {
        // Nothing carries from one run to the next.
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn run_unit(
    dims: Dims,
    st: Strides,
    h: usize,
    rows: std::ops::Range<usize>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (out, out_len): (OutPtr, usize),
    sc: &mut Scratch,
) -> TractResult<()> {
    let Dims { m, d, e, .. } = dims;
    let Some(isa) = sc.isa else {
        bail!("attention scratch used before Scratch::fit");
    };
    if sc.head != Some(h) {
        let (kh, kr, kf) = st.k;
        let (vh, vr, vf) = st.v;
        for j in 0..m {
            let (kj, vj) = (h * kh + j * kr, h * vh + j * vr);
            if kf == 1 {
                for (c, &x) in k[kj..kj + d].iter().enumerate() {
                    sc.kt[c * m + j] = x;
                }
            } else {
                for c in 0..d {
                    sc.kt[c * m + j] = k[kj + c * kf];
                }
            }
            let row = &mut sc.v[j * e..(j + 1) * e];
            if vf == 1 {
                row.copy_from_slice(&v[vj..vj + e]);
            } else {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = v[vj + c * vf];
                }
            }
        }
        sc.head = Some(h);
    }
    let (qh, qr, qf) = st.q;
    let (oh, or, of) = st.out;
    let group = tiles::query_group(isa, e);
    let mut r0 = rows.start;
    while r0 < rows.end {
        let n = group.min(rows.end - r0);
        for r in 0..n {
            let (qi, row) = (h * qh + (r0 + r) * qr, &mut sc.q[r * d..(r + 1) * d]);
            if qf == 1 {
                row.copy_from_slice(&q[qi..qi + d]);
            } else {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = q[qi + c * qf];
                }
            }
        }
        // The scores and exponentials four queries at a time, then the group's
        // output rows in one tile.
        let mut sums = [0f32; MAX_GROUP];
        for g0 in (0..n).step_by(ROWS) {
            let k = ROWS.min(n - g0);
            let scores = &mut sc.s[g0 * m..(g0 + ROWS) * m];
            tiles::scores(isa, &sc.q[g0 * d..], k, &sc.kt, d, m, scores, m);
            for (r, sum) in sums[g0..g0 + k].iter_mut().enumerate() {
                *sum = softmax::exp_row(isa, &mut scores[r * m..(r + 1) * m]);
            }
        }
        tiles::values(isa, &sc.s, m, n, &sc.v, m, e, &mut sc.o);
        for (r, sum) in sums.iter().enumerate().take(n) {
            let at = h * oh + (r0 + r) * or;
            assert!(e == 0 || at + (e - 1) * of < out_len);
            let row = &sc.o[r * e..(r + 1) * e];
            // SAFETY: in bounds (checked: the row's last value is); only this unit
            // writes head h's rows `rows`, and the output outlives `run_all`'s threads.
            unsafe {
                for (c, &x) in row.iter().enumerate() {
                    out.get().add(at + c * of).write(x / sum);
                }
            }
        }
        r0 += n;
    }
    Ok(())
}

/// The two products, in register tiles, compiled for AVX-512 and for AVX2 + FMA where
/// the CPU has them (the same operations in the same order on every path, so the same
/// bits), else generic.
mod tiles {
    use super::{KEYS, ROWS, VALS};
    #[cfg(target_arch = "x86_64")]
    use super::{KEYS_AVX2, VALS_AVX2};

    /// The kernels this CPU runs, detected once per evaluation ([`Isa::detect`]).
    #[derive(Debug, Clone, Copy)]
    pub enum Isa {
        /// AVX-512F and FMA.
        #[cfg(target_arch = "x86_64")]
        Avx512,
        /// AVX2 and FMA.
        #[cfg(target_arch = "x86_64")]
        Avx2,
        /// Anything else: plain multiply and add.
        Generic,
    }

    impl Isa {
        /// The best this CPU has.
        pub fn detect() -> Self {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                if has!("fma") && has!("avx512f") {
                    return Self::Avx512;
                }
                if has!("fma") && has!("avx2") {
                    return Self::Avx2;
                }
            }
            Self::Generic
        }
    }

    /// `s[r][j] = Σ_c q[r][c] · kt[c][j]` for `n` (≤ 4) rows of `q` (`n × d`), `kt`
    /// being `d × m`, rows of `s` `ss` apart.
    #[allow(clippy::too_many_arguments)]
    pub fn scores(
        isa: Isa,
        q: &[f32],
        n: usize,
        kt: &[f32],
        d: usize,
        m: usize,
        s: &mut [f32],
        ss: usize,
    ) {
        match isa {
            // SAFETY: `Isa::detect` found the features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { scores_avx512(q, n, kt, d, m, s, ss) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { scores_avx2(q, n, kt, d, m, s, ss) },
            Isa::Generic => scores_generic::<false, KEYS>(q, n, kt, d, m, s, ss),
        }
    }

    /// Queries per values tile for `e` values per row: 4, or with AVX-512 where a row
    /// fills less than one vector (`e < 16`, as the cifar-size U-Net's 32 heads of 8
    /// features), 16: 16 rows of 8 values in 16 of its 32 registers (`values8x16`),
    /// enough independent sums to keep the multiply-add units busy, where 4 rows of
    /// 8 each wait on the previous one's latency (lever 25: that U-Net's attention
    /// took 0.078 of its Winograd convolutions' time in the profile, 0.095 before).
    /// Each value is summed alike either way. AVX2, with 16
    /// registers, keeps 4 (not measured otherwise: no AVX2 machine this session).
    pub fn query_group(isa: Isa, e: usize) -> usize {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if e < 16 => super::MAX_GROUP,
            _ => ROWS,
        }
    }

    /// `o[r][c] = Σ_j p[r][j] · v[j][c]` for `n` (≤ [`query_group`]) rows of `p`
    /// (`n × m`, rows `ps` apart; as many rows as the tile has are read), `v` being
    /// `m × e`.
    #[allow(clippy::too_many_arguments)]
    pub fn values(
        isa: Isa,
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        o: &mut [f32],
    ) {
        match isa {
            // SAFETY: `Isa::detect` found the features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { values_avx512(p, ps, n, v, m, e, o) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { values_avx2(p, ps, n, v, m, e, o) },
            Isa::Generic => values_generic::<false, VALS, ROWS>(p, ps, n, v, m, e, o),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn scores_avx512(
        q: &[f32],
        n: usize,
        kt: &[f32],
        d: usize,
        m: usize,
        s: &mut [f32],
        ss: usize,
    ) {
        scores_generic::<true, KEYS>(q, n, kt, d, m, s, ss)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores_avx2(
        q: &[f32],
        n: usize,
        kt: &[f32],
        d: usize,
        m: usize,
        s: &mut [f32],
        ss: usize,
    ) {
        scores_generic::<true, KEYS_AVX2>(q, n, kt, d, m, s, ss)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn values_avx512(
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        o: &mut [f32],
    ) {
        const R: usize = super::MAX_GROUP;
        if n <= ROWS {
            return values_generic::<true, VALS, ROWS>(p, ps, n, v, m, e, o);
        }
        // A group ([`query_group`]: e < 16): 8 values of 16 rows in 16 registers,
        // then the values left one at a time.
        let mut c0 = 0;
        while e - c0 >= 8 {
            values8x16(p, ps, n, v, m, e, c0, o);
            c0 += 8;
        }
        for c0 in c0..e {
            values_tile::<true, 1, R>(p, ps, n, v, m, e, c0, o);
        }
    }

    /// Output values `c0..c0 + 8` of `n` (≤ 16) queries with AVX-512's 32 registers:
    /// 16 rows of 8 in 16 of them, each value summed over the keys in order from zero
    /// with FMA, as `values_tile` sums it (so the same bits).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn values8x16(
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        c0: usize,
        o: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        const R: usize = super::MAX_GROUP;
        assert!(n <= R && c0 + 8 <= e && p.len() >= (R - 1) * ps + m);
        assert!(v.len() >= (m - 1) * e + c0 + 8 && o.len() >= n * e);
        let (pp, vp) = (p.as_ptr(), v.as_ptr().add(c0));
        let mut acc = [_mm256_setzero_ps(); R];
        for j in 0..m {
            let x = _mm256_loadu_ps(vp.add(j * e));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*pp.add(r * ps + j)), x, *a);
            }
        }
        for (r, a) in acc.iter().enumerate().take(n) {
            _mm256_storeu_ps(o.as_mut_ptr().add(r * e + c0), *a);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn values_avx2(
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        o: &mut [f32],
    ) {
        values_generic::<true, VALS_AVX2, ROWS>(p, ps, n, v, m, e, o)
    }

    /// `a · b + c`, fused (one rounding) where `FMA`.
    #[inline(always)]
    pub(super) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
        if FMA {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }

    #[inline(always)]
    fn scores_generic<const FMA: bool, const KW: usize>(
        q: &[f32],
        n: usize,
        kt: &[f32],
        d: usize,
        m: usize,
        s: &mut [f32],
        ss: usize,
    ) {
        let mut j0 = 0;
        while j0 < m {
            // Every width sums over the features in the same order: the same bits.
            j0 += match m - j0 {
                w if w >= KW => scores_tile::<FMA, KW>(q, n, kt, d, m, j0, s, ss),
                w if w >= 16 => scores_tile::<FMA, 16>(q, n, kt, d, m, j0, s, ss),
                _ => scores_tile::<FMA, 1>(q, n, kt, d, m, j0, s, ss),
            };
        }
    }

    /// Scores of `n` (≤ 4) queries for keys `j0..j0 + W`; returns `W`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn scores_tile<const FMA: bool, const W: usize>(
        q: &[f32],
        n: usize,
        kt: &[f32],
        d: usize,
        m: usize,
        j0: usize,
        s: &mut [f32],
        ss: usize,
    ) -> usize {
        // All four rows, whatever `n`: a loop of fixed length keeps the tile in
        // registers. Rows past `n` hold an earlier tile's values and are not stored.
        let mut acc = [[0f32; W]; ROWS];
        for c in 0..d {
            // Loaded once for the four rows.
            let k: [f32; W] = kt[c * m + j0..c * m + j0 + W].try_into().unwrap();
            for r in 0..ROWS {
                let a = q[r * d + c];
                for j in 0..W {
                    acc[r][j] = fma::<FMA>(a, k[j], acc[r][j]);
                }
            }
        }
        for r in 0..n {
            s[r * ss + j0..r * ss + j0 + W].copy_from_slice(&acc[r]);
        }
        W
    }

    /// `O = P V` for `n` (≤ `R`) queries: `R` rows of `P` are read (rows past `n`
    /// hold earlier values and are not stored).
    #[inline(always)]
    fn values_generic<const FMA: bool, const VW: usize, const R: usize>(
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        o: &mut [f32],
    ) {
        let mut c0 = 0;
        while c0 < e {
            // Every width sums over the keys in the same order: the same bits.
            c0 += match e - c0 {
                w if w >= VW => values_tile::<FMA, VW, R>(p, ps, n, v, m, e, c0, o),
                w if w >= 16 => values_tile::<FMA, 16, R>(p, ps, n, v, m, e, c0, o),
                w if w >= 8 => values_tile::<FMA, 8, R>(p, ps, n, v, m, e, c0, o),
                _ => values_tile::<FMA, 1, R>(p, ps, n, v, m, e, c0, o),
            };
        }
    }

    /// Output values `c0..c0 + W` of `n` (≤ `R`) queries; returns `W`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn values_tile<const FMA: bool, const W: usize, const R: usize>(
        p: &[f32],
        ps: usize,
        n: usize,
        v: &[f32],
        m: usize,
        e: usize,
        c0: usize,
        o: &mut [f32],
    ) -> usize {
        // All `R` rows, whatever `n` (as in `scores_tile`).
        let mut acc = [[0f32; W]; R];
        for j in 0..m {
            let vv: [f32; W] = v[j * e + c0..j * e + c0 + W].try_into().unwrap();
            for r in 0..R {
                let a = p[r * ps + j];
                for c in 0..W {
                    acc[r][c] = fma::<FMA>(a, vv[c], acc[r][c]);
                }
            }
        }
        for r in 0..n {
            o[r * e + c0..r * e + c0 + W].copy_from_slice(&acc[r]);
        }
        W
    }
}

impl Op for Attention {
    fn name(&self) -> StaticName {
        "EsddpmAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "q {:?}, k {:?}, v {:?}, out {:?}",
            self.q, self.k, self.v, self.out
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Attention {
    fn state(&self, _ctx: &EvalContext) -> TractResult<Option<Box<dyn OpState>>> {
        Ok(Some(Box::<AttentionScratch>::default()))
    }

    fn eval_out_of_plan(&self, inputs: TVec<TValue>) -> TractResult<Option<TVec<TValue>>> {
        ensure!(inputs.len() == 3, "{} inputs to an attention", inputs.len());
        Ok(Some(tvec!(self
            .run(&inputs[0], &inputs[1], &inputs[2])?
            .into_tvalue())))
    }
}

impl TypedOp for Attention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3);
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        let concrete = |f: &TypedFact| -> TractResult<TVec<usize>> {
            f.shape
                .as_concrete()
                .map(|s| s.into())
                .context("attention needs concrete shapes")
        };
        let (q, k, v) = (
            concrete(inputs[0])?,
            concrete(inputs[1])?,
            concrete(inputs[2])?,
        );
        let dims = self.dims(&q, &k, &v)?;
        Ok(tvec!(f32::fact(self.out_shape(dims))))
    }

    /// The two products' multiply-adds, `H·N·M·(D + E)`, and tract's count for the
    /// softmax's exponentials (one per score).
    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let dims = |f: &TypedFact| -> TVec<usize> {
            f.shape.as_concrete().map(|s| s.into()).unwrap_or_default()
        };
        let Ok(d) = self.dims(&dims(inputs[0]), &dims(inputs[1]), &dims(inputs[2])) else {
            return Ok(tvec!());
        };
        let scores = d.heads * d.n * d.m;
        Ok(tvec!(
            (
                Cost::FMA(f32::datum_type()),
                (scores * (d.d + d.e)).to_dim()
            ),
            (Cost::Div(f32::datum_type()), scores.to_dim()),
        ))
    }
}

/// The position of `axis` in input `i` and in the output, when it appears at most once
/// in each (`Some(None)`: absent; `None`: repeated).
fn positions(axis: &Axis, i: usize) -> Option<Option<usize>> {
    match axis.inputs[i].as_slice() {
        [] => Some(None),
        [p] => Some(Some(*p)),
        _ => None,
    }
}

fn out_position(axis: &Axis) -> Option<Option<usize>> {
    match axis.outputs[0].as_slice() {
        [] => Some(None),
        [p] => Some(Some(*p)),
        _ => None,
    }
}

/// A plain f32 two-input einsum.
fn plain_einsum(node: &TypedNode) -> Option<&EinSum> {
    let op = node.op_as::<EinSum>()?;
    (op.q_params.is_none()
        && op.operating_dt == f32::datum_type()
        && node.inputs.len() == 2
        && op.axes.input_count() == 2)
        .then_some(op)
}

/// `EinSum(q, k) → Softmax → EinSum(p, v)` ending at node `qk`, if it is one.
fn attention_at(model: &TypedModel, qk: &TypedNode) -> TractResult<Option<Fusion<Attention>>> {
    let Some(qk_op) = plain_einsum(qk) else {
        return Ok(None);
    };
    let Some(sm) = only_reader(model, qk.id.into()) else {
        return Ok(None);
    };
    let Some(sm_op) = sm.op_as::<Softmax>() else {
        return Ok(None);
    };
    if sm_op.kind != SoftmaxKind::Softmax || sm_op.quant_output_dt.is_some() {
        return Ok(None);
    }
    let Some(av) = only_reader(model, sm.id.into()) else {
        return Ok(None);
    };
    let Some(av_op) = plain_einsum(av) else {
        return Ok(None);
    };
    let inputs_f32 = |n: &TypedNode| -> TractResult<bool> {
        Ok(model
            .node_input_facts(n.id)?
            .iter()
            .all(|f| f.datum_type == f32::datum_type() && f.shape.as_concrete().is_some()))
    };
    if !inputs_f32(qk)? || !inputs_f32(av)? {
        return Ok(None);
    }
    // Roles in Q·Kᵀ, by where each axis appears: head (q, k, s), query (q, s), key
    // (k, s), feature (q, k); each at most once.
    let mut roles: [Option<[Option<usize>; 3]>; 4] = [None; 4];
    for axis in qk_op.axes.iter_all_axes() {
        let (Some(pq), Some(pk), Some(ps)) =
            (positions(axis, 0), positions(axis, 1), out_position(axis))
        else {
            return Ok(None);
        };
        let role = match (pq.is_some(), pk.is_some(), ps.is_some()) {
            (true, true, true) => 0,
            (true, false, true) => 1,
            (false, true, true) => 2,
            (true, true, false) => 3,
            _ => return Ok(None),
        };
        if roles[role].replace([pq, pk, ps]).is_some() {
            return Ok(None);
        }
    }
    let [head, Some(query), Some(key), Some(feat)] = roles else {
        return Ok(None);
    };
    let at = |p: Option<usize>| p.expect("the role's axis is there");
    let q_axes = Axes {
        head: head.map(|h| at(h[0])),
        row: at(query[0]),
        feat: at(feat[0]),
    };
    let k_axes = Axes {
        head: head.map(|h| at(h[1])),
        row: at(key[1]),
        feat: at(feat[1]),
    };
    let (s_head, s_query, s_key) = (head.map(|h| at(h[2])), at(query[2]), at(key[2]));
    if sm_op.axes.as_slice() != [s_key] {
        return Ok(None);
    }
    // Roles in P·V (P has S's axes): head (p, v, o), query (p, o), key (p, v), value
    // feature (v, o).
    let p_outlet = OutletId::new(sm.id, 0);
    let pi = match (av.inputs[0] == p_outlet, av.inputs[1] == p_outlet) {
        (true, false) => 0,
        (false, true) => 1,
        _ => return Ok(None),
    };
    let vi = 1 - pi;
    let mut av_roles: [Option<[Option<usize>; 2]>; 4] = [None; 4];
    for axis in av_op.axes.iter_all_axes() {
        let (Some(pp), Some(pv), Some(po)) =
            (positions(axis, pi), positions(axis, vi), out_position(axis))
        else {
            return Ok(None);
        };
        let role = match (pp, pv.is_some(), po.is_some()) {
            (Some(p), true, true) if Some(p) == s_head => 0,
            (Some(p), false, true) if p == s_query => 1,
            (Some(p), true, false) if p == s_key => 2,
            (None, true, true) => 3,
            _ => return Ok(None),
        };
        if av_roles[role].replace([pv, po]).is_some() {
            return Ok(None);
        }
    }
    let [a_head, Some(a_query), Some(a_key), Some(a_feat)] = av_roles else {
        return Ok(None);
    };
    if a_head.is_some() != head.is_some() {
        return Ok(None);
    }
    let op = Attention {
        q: q_axes,
        k: k_axes,
        v: Axes {
            head: a_head.map(|h| at(h[0])),
            row: at(a_key[0]),
            feat: at(a_feat[0]),
        },
        out: Axes {
            head: a_head.map(|h| at(h[1])),
            row: at(a_query[1]),
            feat: at(a_feat[1]),
        },
    };
    let (q, k, v) = (qk.inputs[0], qk.inputs[1], av.inputs[vi]);
    let facts = [
        model.outlet_fact(q)?,
        model.outlet_fact(k)?,
        model.outlet_fact(v)?,
    ];
    let Ok(ours) = op.output_facts(&facts) else {
        return Ok(None);
    };
    if ours[0].shape != model.outlet_fact(av.id.into())?.shape {
        return Ok(None);
    }
    Ok(Some(Fusion {
        op,
        inputs: tvec![q, k, v],
        output: av.id.into(),
        nodes: vec![qk.id, sm.id, av.id],
    }))
}

/// Swaps every `EinSum(q, k) → Softmax → EinSum(p, v)` of `model` for an [`Attention`]
/// (module docs). Returns how many were replaced.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    fuse_all(model, attention_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values::{bits, values};

    /// `softmax(Q Kᵀ) V` in f64, straight from the definition, for tensors laid out
    /// as `op` says.
    fn reference(op: &Attention, q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<f64> {
        let d = op.dims(q.shape(), k.shape(), v.shape()).unwrap();
        let at = |t: &Tensor, axes: &Axes, h: usize, r: usize, c: usize| -> f64 {
            let mut idx = vec![0; axes.rank()];
            if let Some(a) = axes.head {
                idx[a] = h;
            }
            idx[axes.row] = r;
            idx[axes.feat] = c;
            let strides = Tensor::natural_strides(t.shape());
            let off: isize = idx
                .iter()
                .zip(&strides)
                .map(|(&i, &s)| i as isize * s)
                .sum();
            f64::from(t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap()[off as usize])
        };
        let shape = op.out_shape(d);
        let mut out = vec![0.0; shape.iter().product()];
        let ostr = Tensor::natural_strides(&shape);
        for h in 0..d.heads {
            for i in 0..d.n {
                let s: Vec<f64> = (0..d.m)
                    .map(|j| {
                        (0..d.d)
                            .map(|c| at(q, &op.q, h, i, c) * at(k, &op.k, h, j, c))
                            .sum()
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = p.iter().sum();
                for c in 0..d.e {
                    let o: f64 = (0..d.m).map(|j| p[j] / sum * at(v, &op.v, h, j, c)).sum();
                    let mut idx = vec![0; op.out.rank()];
                    if let Some(a) = op.out.head {
                        idx[a] = h;
                    }
                    idx[op.out.row] = i;
                    idx[op.out.feat] = c;
                    let off: isize = idx.iter().zip(&ostr).map(|(&i, &s)| i as isize * s).sum();
                    out[off as usize] = o;
                }
            }
        }
        out
    }

    fn tensor(axes: &Axes, heads: usize, rows: usize, feat: usize, seed: u64) -> Tensor {
        let mut shape = vec![0; axes.rank()];
        if let Some(h) = axes.head {
            shape[h] = heads;
        }
        shape[axes.row] = rows;
        shape[axes.feat] = feat;
        let n = shape.iter().product();
        Tensor::from_shape(&shape, &values(n, seed)).unwrap()
    }

    fn ax(head: Option<usize>, row: usize, feat: usize) -> Axes {
        Axes { head, row, feat }
    }

    /// The layouts tract leaves the shipped U-Net's attention in (one head), and the
    /// cifar U-Net's (32 heads of 8: q, k `[n, h, d]`, v `[m, h, e]`, out `[n, h, e]`),
    /// plus heads first; sizes off every tile (4 queries, 64 keys, 16 values).
    #[test]
    fn attention_matches_the_formula_in_every_layout() {
        let one = Attention {
            q: ax(None, 0, 1),
            k: ax(None, 0, 1),
            v: ax(None, 0, 1),
            out: ax(None, 0, 1),
        };
        let cifar = Attention {
            q: ax(Some(1), 0, 2),
            k: ax(Some(1), 0, 2),
            v: ax(Some(1), 0, 2),
            out: ax(Some(1), 0, 2),
        };
        let heads_first = Attention {
            q: ax(Some(0), 1, 2),
            k: ax(Some(2), 0, 1),
            v: ax(Some(0), 2, 1),
            out: ax(Some(2), 1, 0),
        };
        for (op, heads, n, m, d, e) in [
            (&one, 1, 256, 256, 32, 32),
            (&one, 1, 7, 70, 5, 19),
            (&one, 1, 64, 64, 64, 64),
            (&cifar, 32, 64, 64, 8, 8),
            (&cifar, 3, 9, 130, 8, 8),
            (&heads_first, 2, 5, 67, 3, 17),
        ] {
            let q = tensor(&op.q, heads, n, d, 1);
            let k = tensor(&op.k, heads, m, d, 2);
            let v = tensor(&op.v, heads, m, e, 3);
            let y = op.run(&q, &k, &v).unwrap();
            let want = reference(op, &q, &k, &v);
            let yr = y.try_as_plain_ram().unwrap();
            let got = yr.as_slice::<f32>().unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (f64::from(*g) - w).abs())
                .fold(0.0, f64::max);
            assert!(err < 2e-5, "{op:?} n {n} m {m} d {d} e {e}: error {err}");
        }
    }

    /// The values tiles of AVX2 and AVX-512 (where the CPU has them) give the same
    /// bits, AVX-512's groups of queries too ([`tiles::query_group`]), and as many
    /// rows as asked for.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_values_tiles_give_the_same_bits_on_every_isa() {
        use std::arch::is_x86_feature_detected as has;
        if !(has!("avx512f") && has!("avx2") && has!("fma")) {
            return;
        }
        let m = 37;
        let p = crate::test_values::values(MAX_GROUP * m, 4);
        for e in [8, 12, 5, 32, 40] {
            let v = crate::test_values::values(m * e, 5);
            for n in [1, 3, 4, 6, 8, 13, 16] {
                let mut got = vec![];
                for isa in [tiles::Isa::Avx2, tiles::Isa::Avx512] {
                    if n > tiles::query_group(isa, e) {
                        continue;
                    }
                    let mut o = vec![f32::NAN; MAX_GROUP * e];
                    tiles::values(isa, &p, m, n, &v, m, e, &mut o);
                    assert!(o[..n * e].iter().all(|x| x.is_finite()), "{e} {n}");
                    assert!(o[n * e..].iter().all(|x| x.is_nan()), "{e} {n}");
                    got.push(o.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
                // Row r's values: Σ_j p[r][j] v[j][c] in order, with FMA.
                let want: Vec<u32> = (0..n * e)
                    .map(|i| {
                        let (r, c) = (i / e, i % e);
                        (0..m)
                            .fold(0f32, |a, j| p[r * m + j].mul_add(v[j * e + c], a))
                            .to_bits()
                    })
                    .collect();
                for g in &got {
                    assert_eq!(g[..n * e], want[..], "{e} values, {n} queries");
                }
            }
        }
    }

    #[test]
    fn two_threads_give_the_bits_of_one() {
        let op = Attention {
            q: ax(Some(1), 0, 2),
            k: ax(Some(1), 0, 2),
            v: ax(Some(1), 0, 2),
            out: ax(Some(1), 0, 2),
        };
        let (q, k, v) = (
            tensor(&op.q, 4, 130, 8, 4),
            tensor(&op.k, 4, 130, 8, 5),
            tensor(&op.v, 4, 130, 8, 6),
        );
        let one = op.run(&q, &k, &v).unwrap();
        let pool = tract_linalg::multithread::Executor::multithread(2);
        let two = op_threads::scope(&pool, || {
            assert_eq!(op_threads::threads(), 2);
            op.run(&q, &k, &v).unwrap()
        });
        assert_eq!(bits(&one), bits(&two));
    }

    /// A scratch kept between runs (as a plan's state keeps it) gives what fresh
    /// buffers give: on other inputs of the same sizes (K and V of a new run, not the
    /// last head's), on other sizes, on one thread after two.
    #[test]
    fn a_kept_scratch_gives_the_bits_of_a_fresh_one() {
        let op = Attention {
            q: ax(Some(1), 0, 2),
            k: ax(Some(1), 0, 2),
            v: ax(Some(1), 0, 2),
            out: ax(Some(1), 0, 2),
        };
        let mut kept = AttentionScratch::default();
        let pool = tract_linalg::multithread::Executor::multithread(2);
        // One head twice: the second run starts on the head the first ended on.
        let runs = [
            (1, 70, 70, 8),
            (1, 70, 70, 8),
            (2, 70, 70, 8),
            (1, 9, 33, 5),
            (1, 70, 70, 8),
        ];
        for (i, (heads, n, m, d)) in runs.into_iter().enumerate() {
            let seed = 10 * i as u64;
            let (q, k, v) = (
                tensor(&op.q, heads, n, d, seed),
                tensor(&op.k, heads, m, d, seed + 1),
                tensor(&op.v, heads, m, d, seed + 2),
            );
            let fresh = op.run(&q, &k, &v).unwrap();
            let reused = if i == 2 {
                op_threads::scope(&pool, || op.run_in(&mut kept, &q, &k, &v).unwrap())
            } else {
                op.run_in(&mut kept, &q, &k, &v).unwrap()
            };
            assert_eq!(bits(&fresh), bits(&reused), "run {i}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let op = Attention {
            q: ax(None, 0, 1),
            k: ax(None, 0, 1),
            v: ax(None, 0, 1),
            out: ax(None, 0, 1),
        };
        let t = |r: usize, c: usize| Tensor::from_shape(&[r, c], &values(r * c, 7)).unwrap();
        // Features of q and k differ; keys of k and v differ; a rank-3 input.
        assert!(op.run(&t(4, 8), &t(5, 7), &t(5, 3)).is_err());
        assert!(op.run(&t(4, 8), &t(5, 8), &t(6, 3)).is_err());
        let r3 = Tensor::from_shape(&[1, 4, 8], &values(32, 8)).unwrap();
        assert!(op.run(&r3, &t(5, 8), &t(5, 3)).is_err());
        // Axes that are not distinct positions of rank-2 tensors.
        let bad = Attention {
            q: ax(None, 0, 2),
            ..op.clone()
        };
        assert!(bad.run(&t(4, 8), &t(5, 8), &t(5, 3)).is_err());
        let bad = Attention {
            k: ax(None, 1, 1),
            ..op.clone()
        };
        assert!(bad.run(&t(4, 8), &t(5, 8), &t(5, 3)).is_err());
        let ints = Tensor::from_shape(&[4, 8], &[1i32; 32]).unwrap();
        assert!(op.run(&ints, &t(5, 8), &t(5, 3)).is_err());
    }
}

#[cfg(test)]
mod on_the_shipped_unet {
    use super::*;
    use crate::test_values::decluttered;

    fn run(model: TypedModel) -> Vec<f32> {
        let x = crate::test_values::values(1024, 9);
        let out = model
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(tvec![
                Tensor::from_shape(&[1, 1, 32, 32], &x).unwrap().into(),
                Tensor::from_shape(&[1], &[417i64]).unwrap().into(),
            ])
            .unwrap();
        let y = out[0].try_as_plain_ram().unwrap();
        y.as_slice::<f32>().unwrap().to_vec()
    }

    #[test]
    fn every_attention_is_fused_within_rounding_of_tracts() {
        let plain = decluttered("models/fashion/unet.onnx", [1, 1, 32, 32]);
        let attentions = plain
            .nodes()
            .iter()
            .filter(|n| n.op_is::<Softmax>())
            .count();
        assert!(attentions >= 3, "{attentions} softmaxes");
        let mut fused = plain.clone();
        assert_eq!(fuse_attention(&mut fused).unwrap(), attentions);
        assert!(!fused.nodes().iter().any(|n| n.op_is::<Softmax>()));
        let (a, b) = (run(fused), run(plain));
        let err = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "max difference from tract's {err}");
    }
}
