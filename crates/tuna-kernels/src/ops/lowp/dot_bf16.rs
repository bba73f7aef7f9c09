//! The bf16 dot-product path of a bf16 frozen base: both products with bf16 inputs and f32 sums,
//! on AMX tiles (`tdpbf16ps`) or AVX512_BF16 (`vdpbf16ps`), or on a portable Rust twin
//! ([`Bf16Isa::Emulated`]) that follows `vdpbf16ps`'s definition (AMX's `tdpbf16ps` sums in
//! another order: the paths differ in the f32 rounding).
//!
//! **Forward**, `y = x W^T`: each row of `x` is rounded to bf16 (to nearest even, as PyTorch's bf16
//! autocast does before a product), the weight is the bf16 base as packed, and the products are
//! summed in f32, two at a time as the instructions take them. **Input gradient**, `dx += dy W`:
//! the same with `dy`'s rows rounded and the weight laid out transposed (exactly: bf16 values need
//! no scale, so nothing is requantized).
//!
//! **Error bound** (tested against an f64 product with the original f32 weight): per output
//! element `|y - y_ref| <= sum_k |x_k w_k| (2^-8 + 2^-8 + 2^-16) + f32 rounding of the sum`: the
//! weight's and the activation's roundings, each at most 2^-8 relative.
//!
//! **Not bit for bit across paths**, unlike the int8 path: the sums are f32 and round at every
//! step, and the instructions flush subnormal inputs and outputs to zero (DAZ/FTZ) where the
//! portable twin keeps them; the hardware paths are tested against the portable one within the
//! f32 rounding of the sum, and each against the bound.

use super::dot::{store, vectorized, with_bufs, Bufs};
use super::{PackedWeight, Store};
use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

/// Which instructions compute the bf16 tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Isa {
    /// Portable Rust: each pair of products added to the f32 sum in `vdpbf16ps`'s order.
    Emulated,
    /// AVX512_BF16 `vdpbf16ps` on 512-bit registers.
    Avx512Bf16,
    /// AMX tiles, `tdpbf16ps`.
    Amx,
}

impl Bf16Isa {
    /// Best first (the default takes the first this CPU runs, the portable twin never).
    pub const ALL: [Bf16Isa; 3] = [Bf16Isa::Amx, Bf16Isa::Avx512Bf16, Bf16Isa::Emulated];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Isa::Emulated => "emulated",
            Bf16Isa::Avx512Bf16 => "avx512-bf16",
            Bf16Isa::Amx => "amx",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Bf16Isa::Emulated => true,
                Bf16Isa::Avx512Bf16 => has!("avx512f") && has!("avx512bf16"),
                Bf16Isa::Amx => {
                    let f = super::CpuMatrixFeatures::detect();
                    f.amx_tile && f.amx_bf16 && super::dot::amx_permitted()
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Bf16Isa::Emulated
        }
    }
}

/// Rows and columns of one f32 output tile.
const T: usize = 16;
/// bf16 values of the reduction per chunk (64 bytes: one AMX tile row).
const CH: usize = 32;
/// bf16 values of one B chunk: 16 pairs of reduction values x 16 columns.
const BCH: usize = CH * T;

/// `c = sum_{j < chunks} A_j B_j` (a 16 x 16 f32 tile, row-major, overwritten): `A_j` is 16 rows
/// of 32 bf16 at `a[r * a_stride + 32 j..]`, `B_j` the 512 bf16 at `b[512 j..]`, two reduction
/// values at a time (`b[k2 * 32 + col * 2 + i]` = B[2 k2 + i, col]), as `vdpbf16ps` and AMX take them.
pub(super) fn tiles(isa: Bf16Isa, a: &[u16], a_stride: usize, b: &[u16], chunks: usize, c: &mut [f32]) {
    assert!(a_stride >= CH * chunks && a.len() >= (T - 1) * a_stride + CH * chunks);
    assert!(b.len() >= BCH * chunks && c.len() >= T * T && chunks >= 1);
    match isa {
        Bf16Isa::Emulated => emulated(a, a_stride, b, chunks, c),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the callers choose a hardware path only when `available()` said the CPU has
        // it; the slices' lengths are asserted above for every address the kernels touch.
        Bf16Isa::Avx512Bf16 => unsafe { avx512(a.as_ptr(), a_stride, b.as_ptr(), chunks, c.as_mut_ptr()) },
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: as above (and `available()` asked the kernel for the tile state).
        Bf16Isa::Amx => unsafe { amx(a.as_ptr(), a_stride, b.as_ptr(), chunks, c.as_mut_ptr()) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("{} is not available on this target", isa.name()),
    }
}

/// The instructions' definition in Rust: for each pair, the odd product then the even one added
/// to the f32 sum, each product exact (8 x 8 significant bits) and each addition rounded.
fn emulated(a: &[u16], a_stride: usize, b: &[u16], chunks: usize, c: &mut [f32]) {
    let f = |v: u16| f32::from_bits((v as u32) << 16);
    c[..T * T].fill(0.0);
    for j in 0..chunks {
        let bj = &b[j * BCH..(j + 1) * BCH];
        for r in 0..T {
            let ar = &a[r * a_stride + CH * j..r * a_stride + CH * (j + 1)];
            let cr = &mut c[r * T..(r + 1) * T];
            for k2 in 0..CH / 2 {
                let (a0, a1) = (f(ar[2 * k2]), f(ar[2 * k2 + 1]));
                let row = &bj[k2 * 2 * T..(k2 + 1) * 2 * T];
                for (col, cv) in cr.iter_mut().enumerate() {
                    *cv += a1 * f(row[2 * col + 1]);
                    *cv += a0 * f(row[2 * col]);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn avx512(a: *const u16, a_stride: usize, b: *const u16, chunks: usize, c: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); T];
    for j in 0..chunks {
        let (aj, bj) = (a.add(CH * j), b.add(BCH * j));
        for k2 in 0..CH / 2 {
            let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(bj.add(k2 * 2 * T).cast()));
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = aj.add(r * a_stride + 2 * k2).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                // Broadcast operand last: it folds into the instruction as a memory broadcast
                // (`{1to16}`), one load fewer. The products are exact and their pairs the same
                // either way round, so the sums are the same bits.
                *acc = _mm512_dpbf16_ps(*acc, bv, av);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(c.add(r * T), *acc);
    }
}

/// # Safety
/// The CPU has AMX-TILE and AMX-BF16, [`super::dot::amx_permitted`] returned true, and the pointers cover what
/// [`tiles`] asserts.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn amx(a: *const u16, a_stride: usize, b: *const u16, chunks: usize, c: *mut f32) {
    use super::dot::amx;
    amx::configure();
    amx::dpbf16ps(a.cast(), 2 * a_stride, b.cast(), chunks, c.cast());
    amx::release();
}

thread_local! {
    /// Per-thread rounded rows and the tile, kept from call to call.
    static ROWS: Bufs<u16, f32, ()> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// The calling thread's packed weight layout, kept from call to call (the callers zero it, in
    /// parallel, chunk by chunk).
    static PACK: Bufs<u16, (), ()> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `y[m, n] = x[m, k] B` (or `+=` when `accumulate`), `x`'s rows rounded to bf16, over `b`: `n`
/// columns in blocks of 16, each `chunks` chunks of 32 reduction values (`k <= 32 chunks`).
#[allow(clippy::too_many_arguments)]
fn product(isa: Bf16Isa, x: &[f32], m: usize, k: usize, b: &[u16], n: usize, y: &mut [f32], accumulate: bool) {
    let chunks = k.div_ceil(CH);
    let (kp, nb) = (chunks * CH, n.div_ceil(T));
    assert!(x.len() >= m * k && y.len() >= m * n && b.len() >= nb * chunks * BCH);
    y[..m * n].par_chunks_mut(T * n).enumerate().for_each(|(rb, yb)| {
        with_bufs(&ROWS, (T * kp, T * T, 0), |a, c, _| rows_wide(isa, x, k, b, n, rb, yb, accumulate, a, c))
    });
}

vectorized! {
    /// [`rows`], vectorized.
    #[allow(clippy::too_many_arguments)]
    fn rows_wide => rows(
        isa: Bf16Isa, x: &[f32], k: usize, b: &[u16], n: usize, rb: usize, yb: &mut [f32], accumulate: bool,
        a: &mut [u16], c: &mut [f32],
    )
}

/// Rows `16 rb..` of [`product`] into `yb` (at most 16 rows of `y`), on a thread's buffers: `a`
/// the rounded rows, `c` the tile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows(
    isa: Bf16Isa,
    x: &[f32],
    k: usize,
    b: &[u16],
    n: usize,
    rb: usize,
    yb: &mut [f32],
    accumulate: bool,
    a: &mut [u16],
    c: &mut [f32],
) {
    let (chunks, rows) = (k.div_ceil(CH), yb.len() / n);
    let (kp, nb) = (chunks * CH, n.div_ceil(T));
    for r in 0..T {
        let dst = &mut a[r * kp..(r + 1) * kp];
        if r < rows {
            let src = &x[(rb * T + r) * k..(rb * T + r + 1) * k];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = bf16::from_f32(v).to_bits();
            }
            dst[k..].fill(0);
        } else {
            dst.fill(0);
        }
    }
    for cb in 0..nb {
        tiles(isa, a, kp, &b[cb * chunks * BCH..(cb + 1) * chunks * BCH], chunks, c);
        let cols = T.min(n - cb * T);
        for r in 0..rows {
            store(&mut yb[r * n + cb * T..r * n + cb * T + cols], &c[r * T..(r + 1) * T], accumulate);
        }
    }
}

fn bf16_weight(w: &PackedWeight) -> &[bf16] {
    match &w.store {
        Store::Bf16(v) => v,
        _ => unreachable!("the bf16 dot path takes bf16 weights only"),
    }
}

/// `y[m, out] = x[m, in] W^T` (overwrites `y`) on `isa`.
///
/// # Panics
/// Where this CPU cannot run `isa` ([`Bf16Isa::available`]).
pub fn linear_fwd(isa: Bf16Isa, w: &PackedWeight, m: usize, x: &[f32], y: &mut [f32]) {
    assert!(isa.available(), "this CPU cannot run the {} bf16 dot-product path", isa.name());
    let (out, inp, wv) = (w.out_features(), w.in_features(), bf16_weight(w));
    let (chunks, nb) = (inp.div_ceil(CH), out.div_ceil(T));
    with_bufs(&PACK, (nb * chunks * BCH, 0, 0), |b, _, _| {
        b.par_chunks_mut(chunks * BCH).enumerate().for_each(|(cb, b)| {
            b.fill(0);
            for col in 0..T.min(out - cb * T) {
                let o = cb * T + col;
                for (k, v) in wv[o * inp..(o + 1) * inp].iter().enumerate() {
                    b[(k / CH) * BCH + ((k % CH) / 2) * 2 * T + col * 2 + k % 2] = v.to_bits();
                }
            }
        });
        product(isa, x, m, inp, b, out, y, false)
    })
}

/// `dx[m, in] += dy[m, out] W` on `isa`.
///
/// # Panics
/// Where this CPU cannot run `isa` ([`Bf16Isa::available`]).
pub fn linear_bwd(isa: Bf16Isa, w: &PackedWeight, m: usize, dy: &[f32], dx: &mut [f32]) {
    assert!(isa.available(), "this CPU cannot run the {} bf16 dot-product path", isa.name());
    let (out, inp, wv) = (w.out_features(), w.in_features(), bf16_weight(w));
    let (chunks, nb) = (out.div_ceil(CH), inp.div_ceil(T));
    with_bufs(&PACK, (nb * chunks * BCH, 0, 0), |b, _, _| {
        b.par_chunks_mut(chunks * BCH).enumerate().for_each(|(kb, b)| {
            b.fill(0);
            let cols = T.min(inp - kb * T);
            for o in 0..out {
                let at = (o / CH) * BCH + ((o % CH) / 2) * 2 * T + o % 2;
                for (col, v) in wv[o * inp + kb * T..o * inp + kb * T + cols].iter().enumerate() {
                    b[at + col * 2] = v.to_bits();
                }
            }
        });
        product(isa, dy, m, out, b, inp, dx, true)
    })
}
