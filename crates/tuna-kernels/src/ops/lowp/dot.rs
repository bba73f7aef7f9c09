//! The int8 dot-product path of an int8 frozen base: both products in integers, on the CPU's
//! integer dot-product instructions (AMX `tdpbusd`, AVX-512 VNNI or AVX-VNNI `vpdpbusd`), or on a
//! portable Rust twin of them ([`DotIsa::Emulated`]) that computes the same integers.
//!
//! **Forward**, `y = x W^T`: each row of `x` is quantized on the fly, symmetric, one f32 scale per
//! row (`sx = max|x_row| / 127`, `qx = round(x / sx)` in [-127, 127]); the weight is the int8 base
//! as packed (one scale per [`INT8_GROUP`] inputs of an output channel). For each group `g` the
//! integer sum `I = sum_{k in g} qx_k q_k` is exact in i32, and
//! `y = sx * sum_g f32(I_g) * sw_g` (f32, groups in order).
//!
//! **Input gradient**, `dx += dy W`: the reduction runs over the output channels, whose scales
//! differ from group to group of the inputs, so for each group `g` of `dx`'s columns the rows of
//! `z = dy * sw[:, g]` are quantized (one scale per row and group) and
//! `dx[:, g] += sz * f32(sum_o qz_o q_o)`.
//!
//! The instructions multiply unsigned by signed bytes, so the quantized activations are stored
//! shifted by 128 (`u = q + 128`, in 1..=255) and `128 * sum q_w` is taken off the integer sum
//! (exact). Every integer is exact on every path, and the f32 work after it is the same Rust code
//! for all of them, so all paths give the same bits: the emulated path *is* the hardware paths'
//! arithmetic, which is how they are tested on a CPU that lacks the instructions (and, where the
//! CPU has them, each is tested against the emulated path bit for bit).
//!
//! **Error bound** (tested against an f64 product with the original f32 weight): per output
//! element `|y - y_ref| <= sum_k (|x_k| e_w(k) + e_x |w~_k|) + f32 rounding`, where `e_w(k) =
//! max|w_group(k)| / 254` (the weight's rounding), `e_x = max|x_row| / 254` (the activation's)
//! and `w~` the stored weight; for `dx` the same with `dy`'s rows per group in place of `x`'s.
//!
//! **Limits**: the input gradient's integer sum runs over all output channels in i32, so the dot
//! path takes weights of at most [`MAX_OUT`] output channels (the widen path takes larger ones).
//! The packed layouts are made per call from the int8 base (one pass over its bytes, shared by
//! the threads), not held: holding them would add a byte per weight for each product.

use super::{PackedWeight, Store, INT8_GROUP};
use rayon::prelude::*;
use std::cell::RefCell;

/// Which instructions compute the integer tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DotIsa {
    /// Portable Rust, the instructions' integer semantics (any CPU).
    Emulated,
    /// AVX-VNNI `vpdpbusd` on 256-bit registers.
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` on 512-bit registers.
    Avx512Vnni,
    /// AMX tiles, `tdpbusd`.
    Amx,
}

impl DotIsa {
    pub const ALL: [DotIsa; 4] = [DotIsa::Emulated, DotIsa::AvxVnni, DotIsa::Avx512Vnni, DotIsa::Amx];

    pub fn name(self) -> &'static str {
        match self {
            DotIsa::Emulated => "emulated",
            DotIsa::AvxVnni => "avx-vnni",
            DotIsa::Avx512Vnni => "avx512-vnni",
            DotIsa::Amx => "amx",
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run it.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                DotIsa::Emulated => true,
                DotIsa::AvxVnni => has!("avx2") && has!("avxvnni"),
                DotIsa::Avx512Vnni => has!("avx512f") && has!("avx512vnni"),
                DotIsa::Amx => {
                    let f = super::CpuMatrixFeatures::detect();
                    f.amx_tile && f.amx_int8 && amx::permitted()
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == DotIsa::Emulated
        }
    }
}

/// Rows and columns of one i32 output tile.
const T: usize = 16;
/// Bytes of the reduction per chunk: one int8 group (and one AMX tile row of 64 bytes).
const CH: usize = 64;
const _: () = assert!(INT8_GROUP == CH, "the dot path takes one int8 group per 64-byte chunk");
/// Bytes of one B chunk: 64 reduction values x 16 columns.
const BCH: usize = CH * T;

/// Most output channels the dot path's input gradient takes: its i32 sum over them of products of
/// at most 255 x 127 stays below 2^31.
pub const MAX_OUT: usize = 65536;

/// `c[t] = sum_{j in t*per..(t+1)*per} A_j B_j` for `t in 0..sums` (each `c[t]` a 16 x 16 i32
/// tile, row-major): `A_j` is 16 rows of 64 unsigned bytes at `a[r * a_stride + 64 j..]`, `B_j`
/// the 1024 signed bytes at `b[1024 j..]`, laid out four reduction values at a time
/// (`b[k4 * 64 + col * 4 + i]` = B[4 k4 + i, col]), as `vpdpbusd` and AMX take them.
pub(super) fn tiles(isa: DotIsa, a: &[u8], a_stride: usize, b: &[i8], per: usize, sums: usize, c: &mut [i32]) {
    assert!(a_stride >= CH * sums * per && a.len() >= (T - 1) * a_stride + CH * sums * per);
    assert!(b.len() >= BCH * sums * per && c.len() >= T * T * sums);
    match isa {
        DotIsa::Emulated => emulated(a, a_stride, b, per, sums, c),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the callers choose a hardware path only when `available()` said the CPU has
        // it; the slices' lengths are asserted above for every address the kernels touch.
        DotIsa::AvxVnni => unsafe { vnni256(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        DotIsa::Avx512Vnni => unsafe { vnni512(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above (and `available()` asked the kernel for the tile state).
        DotIsa::Amx => unsafe { amx::tiles(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr()) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("only the emulated path exists off x86-64"),
    }
}

/// The instructions' arithmetic in Rust: u8 x i8 products summed in i32, wrapping as they do.
fn emulated(a: &[u8], a_stride: usize, b: &[i8], per: usize, sums: usize, c: &mut [i32]) {
    // B chunk unpacked to [col][k] so each dot product reads both operands contiguously.
    let mut bt = [[0i16; CH]; T];
    for t in 0..sums {
        let ct = &mut c[t * T * T..(t + 1) * T * T];
        ct.fill(0);
        for j in t * per..(t + 1) * per {
            let bj = &b[j * BCH..(j + 1) * BCH];
            for (k4, row) in bj.chunks_exact(4 * T).enumerate() {
                for (col, four) in row.chunks_exact(4).enumerate() {
                    for (i, &v) in four.iter().enumerate() {
                        bt[col][4 * k4 + i] = v as i16;
                    }
                }
            }
            for r in 0..T {
                let ar = &a[r * a_stride + CH * j..r * a_stride + CH * (j + 1)];
                for (col, bc) in bt.iter().enumerate() {
                    let s: i32 = ar.iter().zip(bc).map(|(&x, &w)| x as i32 * w as i32).sum();
                    ct[r * T + col] = ct[r * T + col].wrapping_add(s);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn vnni512(a: *const u8, a_stride: usize, b: *const i8, per: usize, sums: usize, c: *mut i32) {
    use std::arch::x86_64::*;
    for t in 0..sums {
        let mut acc = [_mm512_setzero_si512(); T];
        for j in t * per..(t + 1) * per {
            let (aj, bj) = (a.add(CH * j), b.add(BCH * j));
            for k4 in 0..CH / 4 {
                let bv = _mm512_loadu_si512(bj.add(k4 * 4 * T).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(aj.add(r * a_stride + 4 * k4).cast::<i32>().read_unaligned());
                    *acc = _mm512_dpbusd_epi32(*acc, av, bv);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_si512(c.add(t * T * T + r * T).cast(), *acc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn vnni256(a: *const u8, a_stride: usize, b: *const i8, per: usize, sums: usize, c: *mut i32) {
    use std::arch::x86_64::*;
    // Eight rows at a time: 8 rows x 2 registers of 8 columns = 16 accumulators.
    for t in 0..sums {
        for half in 0..2 {
            let mut acc = [[_mm256_setzero_si256(); 2]; 8];
            for j in t * per..(t + 1) * per {
                let (aj, bj) = (a.add(CH * j + 8 * half * a_stride), b.add(BCH * j));
                for k4 in 0..CH / 4 {
                    let b0 = _mm256_loadu_si256(bj.add(k4 * 4 * T).cast());
                    let b1 = _mm256_loadu_si256(bj.add(k4 * 4 * T + 32).cast());
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(aj.add(r * a_stride + 4 * k4).cast::<i32>().read_unaligned());
                        acc[0] = _mm256_dpbusd_avx_epi32(acc[0], av, b0);
                        acc[1] = _mm256_dpbusd_avx_epi32(acc[1], av, b1);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let dst = c.add(t * T * T + (8 * half + r) * T);
                _mm256_storeu_si256(dst.cast(), acc[0]);
                _mm256_storeu_si256(dst.add(8).cast(), acc[1]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{BCH, CH, T};
    use std::sync::OnceLock;

    /// Linux hands a process the AMX tile state only when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); asked once, the answer kept. `false` where the kernel refuses
    /// (too old, or the state disabled), and the tiles are then not used.
    pub(super) fn permitted() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it changes only which register
            // state the kernel saves for this process.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }

    /// The tile configuration: palette 1; tmm0 the i32 accumulator, tmm1 the A chunk (16 rows of
    /// 64 bytes), tmm2 the B chunk (16 rows of 64 bytes: four reduction values x 16 columns).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    fn config() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for tmm in 0..3 {
            c[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&(CH as u16).to_le_bytes());
            c[48 + tmm] = T as u8;
        }
        Config(c)
    }

    /// # Safety
    /// The CPU has AMX-TILE and AMX-INT8, [`permitted`] returned true, and the pointers cover
    /// what [`super::tiles`] asserts.
    pub(super) unsafe fn tiles(a: *const u8, a_stride: usize, b: *const i8, per: usize, sums: usize, c: *mut i32) {
        let cfg = config();
        std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        for t in 0..sums {
            std::arch::asm!("tilezero tmm0", options(nostack, nomem));
            for j in t * per..(t + 1) * per {
                std::arch::asm!(
                    "tileloadd tmm1, [{a} + {sa}*1]",
                    "tileloadd tmm2, [{b} + {sb}*1]",
                    "tdpbusd tmm0, tmm1, tmm2",
                    a = in(reg) a.add(CH * j),
                    sa = in(reg) a_stride,
                    b = in(reg) b.add(BCH * j),
                    sb = in(reg) 4 * T,
                    options(nostack, readonly),
                );
            }
            std::arch::asm!(
                "tilestored [{c} + {sc}*1], tmm0",
                c = in(reg) c.add(t * T * T),
                sc = in(reg) 4 * T,
                options(nostack),
            );
        }
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
}

thread_local! {
    /// Per-thread buffers kept from call to call: quantized rows, integer tiles.
    static ROWS: RefCell<(Vec<u8>, Vec<i32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

thread_local! {
    /// The calling thread's packed weight layout, kept from call to call.
    static PACK: RefCell<(Vec<i8>, Vec<i32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's kept packing buffers, zeroed, of the lengths asked (fresh ones if
/// they are in use further up this thread's stack).
fn with_pack<R>(nb: usize, ni: usize, nf: usize, f: impl FnOnce(&mut [i8], &mut [i32], &mut [f32]) -> R) -> R {
    PACK.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            let (b, i, s) = &mut *v;
            b.resize(b.len().max(nb), 0);
            i.resize(i.len().max(ni), 0);
            s.resize(s.len().max(nf), 0.0);
            let (b, i, s) = (&mut b[..nb], &mut i[..ni], &mut s[..nf]);
            b.fill(0);
            i.fill(0);
            s.fill(0.0);
            f(b, i, s)
        }
        Err(_) => f(&mut vec![0; nb], &mut vec![0; ni], &mut vec![0.0; nf]),
    })
}

/// Runs `f` with this thread's kept buffers grown to the lengths asked (fresh ones if they are
/// in use by a caller further up this thread's stack).
fn with_rows<R>(nu: usize, ni: usize, nf: usize, f: impl FnOnce(&mut [u8], &mut [i32], &mut [f32]) -> R) -> R {
    ROWS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            let (u, i, s) = &mut *v;
            u.resize(u.len().max(nu), 0);
            i.resize(i.len().max(ni), 0);
            s.resize(s.len().max(nf), 0.0);
            f(&mut u[..nu], &mut i[..ni], &mut s[..nf])
        }
        Err(_) => f(&mut vec![0; nu], &mut vec![0; ni], &mut vec![0.0; nf]),
    })
}

/// Quantizes `src` (one row, `len` values) to `dst` shifted by 128 (`dst.len() >= len`; the rest
/// is set to 128, a zero) and returns the row's scale: NaN when the row holds a non-finite value,
/// so that its outputs are NaN as an f32 product's would be; 0 for a row of zeros.
fn quantize_row(src: impl Iterator<Item = f32> + Clone, dst: &mut [u8]) -> f32 {
    let mut amax = 0f32;
    for v in src.clone() {
        if !v.is_finite() {
            dst.fill(128);
            return f32::NAN;
        }
        amax = amax.max(v.abs());
    }
    let s = amax / 127.0;
    let mut n = 0;
    for (d, v) in dst.iter_mut().zip(src) {
        // Divided, not multiplied by 1/s (1/s overflows for a row of subnormals).
        let q = if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) as i32 } else { 0 };
        *d = (q + 128) as u8;
        n += 1;
    }
    dst[n..].fill(128);
    s
}

fn int8_parts(w: &PackedWeight) -> (&[i8], &[f32]) {
    match &w.store {
        Store::Int8 { q, scale } => (q, scale),
        _ => unreachable!("the dot path takes int8 weights only"),
    }
}

/// `y[m, out] = x[m, in] W^T` (overwrites `y`) on `isa`.
pub fn linear_fwd(isa: DotIsa, w: &PackedWeight, m: usize, x: &[f32], y: &mut [f32]) {
    let (out, inp) = (w.out_features(), w.in_features());
    let (q, scale) = int8_parts(w);
    let groups = inp.div_ceil(CH);
    let ncb = out.div_ceil(T);
    assert!(x.len() >= m * inp && y.len() >= m * out);
    // B: per block of 16 output channels, per group, the chunk in vpdpbusd's layout; with each
    // (channel, group)'s sum of weights (for the 128 shift) and scale. Padding channels and
    // inputs are zero weights.
    with_pack(ncb * groups * BCH, ncb * T * groups, ncb * T * groups, |b, cs, sw| {
        b.par_chunks_mut(groups * BCH)
            .zip(cs.par_chunks_mut(T * groups))
            .zip(sw.par_chunks_mut(T * groups))
            .enumerate()
            .for_each(|(cb, ((b, cs), sw))| {
                for col in 0..T.min(out - cb * T) {
                    let o = cb * T + col;
                    let row = &q[o * inp..(o + 1) * inp];
                    for (g, grp) in row.chunks(CH).enumerate() {
                        let bg = &mut b[g * BCH..(g + 1) * BCH];
                        for (k, &v) in grp.iter().enumerate() {
                            bg[(k / 4) * 4 * T + col * 4 + k % 4] = v;
                        }
                        cs[col * groups + g] = grp.iter().map(|&v| v as i32).sum();
                        sw[col * groups + g] = scale[o * groups + g];
                    }
                }
            });
        fwd_rows(isa, (out, inp, groups), m, x, y, b, cs, sw)
    })
}

#[allow(clippy::too_many_arguments)]
fn fwd_rows(
    isa: DotIsa,
    (out, inp, groups): (usize, usize, usize),
    m: usize,
    x: &[f32],
    y: &mut [f32],
    b: &[i8],
    cs: &[i32],
    sw: &[f32],
) {
    let (kp, ncb) = (groups * CH, out.div_ceil(T));
    y[..m * out].par_chunks_mut(T * out).enumerate().for_each(|(rb, yb)| {
        let rows = yb.len() / out;
        with_rows(T * kp, groups * T * T, T, |a, c, sx| {
            for r in 0..T {
                let dst = &mut a[r * kp..(r + 1) * kp];
                sx[r] = if r < rows {
                    let row = rb * T + r;
                    quantize_row(x[row * inp..(row + 1) * inp].iter().copied(), dst)
                } else {
                    dst.fill(128);
                    0.0
                };
            }
            for cb in 0..ncb {
                tiles(isa, a, kp, &b[cb * groups * BCH..(cb + 1) * groups * BCH], 1, groups, c);
                let cols = T.min(out - cb * T);
                for r in 0..rows {
                    for col in 0..cols {
                        let (cs, sw) = (&cs[(cb * T + col) * groups..], &sw[(cb * T + col) * groups..]);
                        let mut acc = 0f32;
                        for g in 0..groups {
                            let i = c[g * T * T + r * T + col] - 128 * cs[g];
                            acc += i as f32 * sw[g];
                        }
                        yb[r * out + cb * T + col] = acc * sx[r];
                    }
                }
            }
        })
    });
}

/// `dx[m, in] += dy[m, out] W` on `isa`. `out` must be at most [`MAX_OUT`].
pub fn linear_bwd(isa: DotIsa, w: &PackedWeight, m: usize, dy: &[f32], dx: &mut [f32]) {
    let (out, inp) = (w.out_features(), w.in_features());
    assert!(out <= MAX_OUT, "the dot path's input gradient takes at most {MAX_OUT} output channels");
    assert!(dy.len() >= m * out && dx.len() >= m * inp);
    let (q, scale) = int8_parts(w);
    let groups = inp.div_ceil(CH);
    let chunks = out.div_ceil(CH);
    let nkb = groups * (CH / T);
    // B: per block of 16 input columns, the reduction over the output channels in chunks of 64,
    // vpdpbusd's layout; with each column's sum of weights (for the 128 shift).
    with_pack(nkb * chunks * BCH, nkb * T, 0, |b, cs, _| {
        b.par_chunks_mut(chunks * BCH).zip(cs.par_chunks_mut(T)).enumerate().for_each(|(kb, (b, cs))| {
            let cols = T.min(inp.saturating_sub(kb * T));
            if cols == 0 {
                return;
            }
            for o in 0..out {
                let (bo, src) = (&mut b[(o / CH) * BCH + ((o % CH) / 4) * 4 * T + o % 4..], &q[o * inp + kb * T..]);
                for (col, &v) in src[..cols].iter().enumerate() {
                    bo[col * 4] = v;
                    cs[col] += v as i32;
                }
            }
        });
        bwd_rows(isa, (out, inp, groups, chunks), m, dy, dx, b, cs, scale)
    })
}

#[allow(clippy::too_many_arguments)]
fn bwd_rows(
    isa: DotIsa,
    (out, inp, groups, chunks): (usize, usize, usize, usize),
    m: usize,
    dy: &[f32],
    dx: &mut [f32],
    b: &[i8],
    cs: &[i32],
    scale: &[f32],
) {
    let op = chunks * CH;
    dx[..m * inp].par_chunks_mut(T * inp).enumerate().for_each(|(rb, db)| {
        let rows = db.len() / inp;
        with_rows(T * op, T * T, T, |a, c, sz| {
            for g in 0..groups {
                for r in 0..T {
                    let dst = &mut a[r * op..(r + 1) * op];
                    sz[r] = if r < rows {
                        let row = &dy[(rb * T + r) * out..(rb * T + r + 1) * out];
                        quantize_row(row.iter().enumerate().map(|(o, &v)| v * scale[o * groups + g]), dst)
                    } else {
                        dst.fill(128);
                        0.0
                    };
                }
                for sub in 0..CH / T {
                    let kb = g * (CH / T) + sub;
                    if kb * T >= inp {
                        break;
                    }
                    tiles(isa, a, op, &b[kb * chunks * BCH..(kb + 1) * chunks * BCH], chunks, 1, c);
                    for r in 0..rows {
                        for col in 0..T.min(inp - kb * T) {
                            let i = c[r * T + col].wrapping_sub(128 * cs[kb * T + col]);
                            db[r * inp + kb * T + col] += i as f32 * sz[r];
                        }
                    }
                }
            }
        })
    });
}
