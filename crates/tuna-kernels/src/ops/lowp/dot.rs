//! The int8 dot-product path of an int8 (or q4) frozen base: both products in integers, on the CPU's
//! integer dot-product instructions (AMX `tdpbsud`, AVX-512 VNNI or AVX-VNNI `vpdpbusd`), or on a
//! portable Rust twin of them ([`DotIsa::Emulated`]) that computes the same integers.
//!
//! **Forward**, `y = x W^T`: `x` is quantized on the fly, symmetric, one f32 scale per row and
//! group of [`INT8_GROUP`] inputs (`sx = max|x_group| / 127`, `qx = round(x / sx)` in [-127, 127]:
//! an outlier coarsens only its own 64 values, as in the weight); the weight is the int8 base as
//! packed (one scale per [`INT8_GROUP`] inputs of an output channel). For each group `g` the
//! integer sum `I = sum_{k in g} qx_k q_k` is exact in i32, and
//! `y = sum_g f32(I_g) * sw_g * sx_g` (f32, groups in order).
//!
//! **Input gradient**, `dx += dy W`: the same product with the roles turned. Its reduction runs
//! over the output channels, whose int8 scales differ from one input group to the next, so the
//! stored weight `w~ = q * sw` is requantized per call for it: `W^T`, one scale per 64 output
//! channels of each input column (the forward's grouping, along this product's reduction). `dy` is
//! quantized per row and group of 64 output channels as `x` is, and
//! `dx += sum_g f32(I_g) * st_g * sdy_g`.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes (AMX's `tdpbsud` signed by unsigned): the
//! weights are laid out shifted by 128 (`u = q + 128`, in 1..=255) and the activations stay
//! signed, so that on AVX-512 each instruction takes a row's four activation bytes as its memory
//! broadcast (`{1to16}`, only the signed operand's place has one); `128 * sum qx` over each row's
//! group is taken off the integer sum (exact). Every integer is exact on every path, and the f32
//! work after it is the same Rust code for all of them, so all paths give the same bits: the
//! emulated path *is* the hardware paths' arithmetic, which is how they are tested on a CPU that
//! lacks the instructions (and, where the CPU has them, each is tested against the emulated path
//! bit for bit; `the_int8_products_keep_their_bits` pins the bits themselves).
//!
//! **Error bound** (tested against an f64 product with the original f32 weight): per output
//! element `|y - y_ref| <= sum_k (|x_k| e_w(k) + e_x |w~_k|) + f32 rounding`, where `e_w(k) =
//! max|w_group(k)| / 254` (the weight's rounding), `e_x = max|x_group(k)| / 254` (the activation's)
//! and `w~` the stored weight; for `dx` the same with `dy`'s groups, plus the requantization's
//! `|dy_o| max|w~_(group of o, column k)| / 254`.
//!
//! **q4** (a GGUF file's Q4_0 / Q4_1 blocks of 32) takes the same path: its two blocks in each
//! group of 64 inputs, dequantized, are requantized to int8 with one scale when the product packs
//! them (per call; memory keeps the blocks), and the input gradient requantizes them as it does the
//! int8 base. The bounds above hold with `w~` the dequantized blocks (the reference q4 is tested
//! against: the file's weights as the widen path multiplies by them) and `e_w(k) =
//! max|w~_group(k)| / 254`, the requantization's rounding, which the reference does not count
//! (typically 1/16 to 1/8 of a block's own half step; up to about 1.5 times it where a group's two
//! block scales differ widely or a Q4_1 minimum sits far from zero). A block whose scale is not finite makes its group's
//! products NaN, as the widen path's are.
//!
//! The packed layouts are made per call from the int8 base or q4's blocks (one parallel pass) into
//! a buffer the calling thread keeps from call to call: the largest layer's layout (about 1.1 bytes
//! a weight) stays allocated, rather than every layer's (a byte a weight per product, held).

use super::{q4, BasePrecision, PackedWeight, Q4Format, Store, INT8_GROUP, Q4_BLOCK};
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
    /// AMX tiles, `tdpbsud`.
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
                    f.amx_tile && f.amx_int8 && amx_permitted()
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

/// `c[t] = sum_{j in t*per..(t+1)*per} A_j B_j` for `t in 0..sums` (each `c[t]` a 16 x 16 i32
/// tile, row-major): `A_j` is 16 rows of 64 signed bytes at `a[r * a_stride + 64 j..]`, `B_j`
/// the 1024 unsigned bytes at `b[1024 j..]`, laid out four reduction values at a time
/// (`b[k4 * 64 + col * 4 + i]` = B[4 k4 + i, col]), as `vpdpbusd` (B its unsigned operand, A's
/// four bytes broadcast as its signed one) and AMX `tdpbsud` take them.
/// (The tests' entry; the products run in a [`TileSession`] through [`tiles_in`].)
#[cfg(test)]
pub(super) fn tiles(isa: DotIsa, a: &[i8], a_stride: usize, b: &[u8], per: usize, sums: usize, c: &mut [i32]) {
    tiles_on(isa, a, a_stride, b, per, sums, c, false)
}

/// AMX's tile configuration loaded on this thread while the session lives (nothing on the other
/// paths), so that a run of [`tiles_in`] calls loads it once, not around every tile.
struct TileSession {
    amx: bool,
    /// Not `Send`: the configuration belongs to the thread that loaded it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl TileSession {
    fn begin(isa: DotIsa) -> TileSession {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if isa == DotIsa::Amx {
            assert!(isa.available(), "this CPU cannot run amx");
            // SAFETY: the CPU has AMX and Linux granted the tile state (checked above); `drop`
            // releases it on this thread (the session is not `Send`).
            unsafe { amx::configure() };
            return TileSession { amx: true, _thread: std::marker::PhantomData };
        }
        let _ = isa;
        TileSession { amx: false, _thread: std::marker::PhantomData }
    }
}

impl Drop for TileSession {
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if self.amx {
            // SAFETY: `begin` loaded the configuration on this thread.
            unsafe { amx::release() };
        }
    }
}

/// [`tiles`] inside a [`TileSession`] of the same `isa`.
#[allow(clippy::too_many_arguments)]
fn tiles_in(
    session: &TileSession,
    isa: DotIsa,
    a: &[i8],
    a_stride: usize,
    b: &[u8],
    per: usize,
    sums: usize,
    c: &mut [i32],
) {
    tiles_on(isa, a, a_stride, b, per, sums, c, session.amx)
}

/// [`tiles`]; `configured`: AMX's configuration is already loaded on this thread.
#[allow(clippy::too_many_arguments)]
fn tiles_on(
    isa: DotIsa,
    a: &[i8],
    a_stride: usize,
    b: &[u8],
    per: usize,
    sums: usize,
    c: &mut [i32],
    configured: bool,
) {
    let _ = configured;
    assert!(a_stride >= CH * sums * per && a.len() >= (T - 1) * a_stride + CH * sums * per);
    assert!(b.len() >= BCH * sums * per && c.len() >= T * T * sums && per >= 1);
    match isa {
        DotIsa::Emulated => emulated(a, a_stride, b, per, sums, c),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the callers choose a hardware path only when `available()` said the CPU has
        // it; the slices' lengths are asserted above for every address the kernels touch.
        DotIsa::AvxVnni => unsafe { vnni256(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        DotIsa::Avx512Vnni => unsafe { vnni512(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr()) },
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        // SAFETY: as above (and `available()` asked the kernel for the tile state).
        DotIsa::Amx => unsafe { amx_tiles(a.as_ptr(), a_stride, b.as_ptr(), per, sums, c.as_mut_ptr(), configured) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("{} is not available on this target", isa.name()),
    }
}

/// The instructions' arithmetic in Rust: i8 x u8 products summed in i32, wrapping as they do
/// (compiled for AVX2 where the CPU has it: the same integers, twice the lanes).
fn emulated(a: &[i8], a_stride: usize, b: &[u8], per: usize, sums: usize, c: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { emulated_avx2(a, a_stride, b, per, sums, c) };
    }
    emulated_body(a, a_stride, b, per, sums, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn emulated_avx2(a: &[i8], a_stride: usize, b: &[u8], per: usize, sums: usize, c: &mut [i32]) {
    emulated_body(a, a_stride, b, per, sums, c)
}

#[inline(always)]
fn emulated_body(a: &[i8], a_stride: usize, b: &[u8], per: usize, sums: usize, c: &mut [i32]) {
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
unsafe fn vnni512(a: *const i8, a_stride: usize, b: *const u8, per: usize, sums: usize, c: *mut i32) {
    use std::arch::x86_64::*;
    for t in 0..sums {
        let mut acc = [_mm512_setzero_si512(); T];
        for j in t * per..(t + 1) * per {
            let (aj, bj) = (a.add(CH * j), b.add(BCH * j));
            for k4 in 0..CH / 4 {
                let bv = _mm512_loadu_si512(bj.add(k4 * 4 * T).cast());
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_epi32(aj.add(r * a_stride + 4 * k4).cast::<i32>().read_unaligned());
                    // B unsigned, A's broadcast signed: it folds into the instruction's memory
                    // operand (`{1to16}`), one load fewer than a separate broadcast.
                    *acc = _mm512_dpbusd_epi32(*acc, bv, av);
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
unsafe fn vnni256(a: *const i8, a_stride: usize, b: *const u8, per: usize, sums: usize, c: *mut i32) {
    use std::arch::x86_64::*;
    // Four rows at a time: 4 rows x 2 registers of 8 columns = 8 accumulators, with the two B
    // registers and the broadcast inside the 16 ymm registers (eight rows at a time would spill).
    for t in 0..sums {
        for quarter in 0..4 {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for j in t * per..(t + 1) * per {
                let (aj, bj) = (a.add(CH * j + 4 * quarter * a_stride), b.add(BCH * j));
                for k4 in 0..CH / 4 {
                    let b0 = _mm256_loadu_si256(bj.add(k4 * 4 * T).cast());
                    let b1 = _mm256_loadu_si256(bj.add(k4 * 4 * T + 32).cast());
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let av = _mm256_set1_epi32(aj.add(r * a_stride + 4 * k4).cast::<i32>().read_unaligned());
                        acc[0] = _mm256_dpbusd_avx_epi32(acc[0], b0, av);
                        acc[1] = _mm256_dpbusd_avx_epi32(acc[1], b1, av);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let dst = c.add(t * T * T + (4 * quarter + r) * T);
                _mm256_storeu_si256(dst.cast(), acc[0]);
                _mm256_storeu_si256(dst.add(8).cast(), acc[1]);
            }
        }
    }
}

/// Whether Linux granted this process the AMX tile state (asked once); false off Linux x86-64.
pub(crate) fn amx_permitted() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        amx::permitted()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) mod amx {
    use std::sync::OnceLock;

    /// Linux hands a process the AMX tile state only when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`, process-wide: every thread, created before or after); asked once,
    /// the answer kept. `false` where the kernel refuses (too old, or the state disabled), and the
    /// tiles are then not used.
    pub(crate) fn permitted() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
            const XFEATURE_XTILEDATA: libc::c_long = 18;
            // SAFETY: a plain system call with integer arguments; it changes only which register
            // state the kernel saves for this process.
            unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
        })
    }

    /// The tile configuration, palette 1: tmm0 the accumulator (16 rows of 16 four-byte values),
    /// tmm1 the A chunk (16 rows of 64 bytes), tmm2 the B chunk (16 rows of 64 bytes: four int8
    /// or two bf16 reduction values x 16 columns).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new() -> Config {
            let mut c = [0u8; 64];
            c[0] = 1;
            for tmm in 0..3 {
                c[16 + 2 * tmm..18 + 2 * tmm].copy_from_slice(&64u16.to_le_bytes());
                c[48 + tmm] = 16;
            }
            Config(c)
        }
    }

    /// Loads the tile configuration on this thread (it also zeroes the tiles).
    ///
    /// # Safety
    /// The CPU has AMX-TILE and [`permitted`] returned true; [`release`] follows on this thread.
    pub(crate) unsafe fn configure() {
        let cfg = Config::new();
        std::arch::asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    }

    /// Returns the tiles to their initial state (no tile data to save on a context switch).
    ///
    /// # Safety
    /// After [`configure`] on this thread.
    pub(crate) unsafe fn release() {
        std::arch::asm!("tilerelease", out("tmm0") _, out("tmm1") _, out("tmm2") _, options(nostack, nomem));
    }

    macro_rules! tile_sum {
        ($(#[$doc:meta])* $name:ident, $ins:literal) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// After [`configure`] on this thread; the CPU has the instruction; `chunks >= 1`; `a`
            /// covers 16 rows of `64 chunks` bytes `a_stride` apart, `b` `1024 chunks` bytes, `c`
            /// 1024 bytes.
            pub(crate) unsafe fn $name(a: *const u8, a_stride: usize, b: *const u8, chunks: usize, c: *mut u8) {
                // One block per tile (the tile registers, unknown to the compiler, are declared
                // clobbered; none is live between blocks): the chunks are summed in tmm0.
                std::arch::asm!(
                    "tilezero tmm0",
                    "2:",
                    "tileloadd tmm1, [{a} + {sa}*1]",
                    "tileloadd tmm2, [{b} + {sb}*1]",
                    concat!($ins, " tmm0, tmm1, tmm2"),
                    "add {a}, 64",
                    "add {b}, 1024",
                    "dec {n}",
                    "jnz 2b",
                    "tilestored [{c} + {sb}*1], tmm0",
                    a = inout(reg) a => _,
                    b = inout(reg) b => _,
                    n = inout(reg) chunks => _,
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    c = in(reg) c,
                    out("tmm0") _,
                    out("tmm1") _,
                    out("tmm2") _,
                    options(nostack),
                );
            }
        };
    }

    tile_sum!(
        /// `c (16 x 16 i32) = sum over the chunks of A (i8, passed as bytes) B (u8)`: `tdpbsud`.
        dpbsud,
        "tdpbsud"
    );
    tile_sum!(
        /// `c (16 x 16 f32) = sum over the chunks of A (bf16) B (bf16)`: `tdpbf16ps`.
        dpbf16ps,
        "tdpbf16ps"
    );
}

/// # Safety
/// The CPU has AMX-TILE and AMX-INT8, [`amx_permitted`] returned true, the pointers cover what
/// [`tiles`] asserts, and where `configured` the tile configuration is loaded on this thread.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
unsafe fn amx_tiles(
    a: *const i8,
    a_stride: usize,
    b: *const u8,
    per: usize,
    sums: usize,
    c: *mut i32,
    configured: bool,
) {
    if !configured {
        amx::configure();
    }
    for t in 0..sums {
        amx::dpbsud(a.add(CH * t * per).cast(), a_stride, b.add(BCH * t * per), per, c.add(t * T * T).cast());
    }
    if !configured {
        amx::release();
    }
}

thread_local! {
    /// Per-thread buffers kept from call to call: quantized rows, an integer tile and the rows'
    /// group sums, f32 row scales.
    static ROWS: RefCell<(Vec<i8>, Vec<i32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    /// The calling thread's packed weight layout and scales, kept from call to call.
    static PACK: Bufs<u8, (), f32> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `$vis fn $name(args)`: calls `$body(args)` (an `#[inline(always)]` function) compiled for the
/// widest vector instructions this CPU has (AVX-512, else AVX2 + FMA, else the build's baseline).
/// The quantization, epilogue and weight layout of the products are plain Rust, which the crate's
/// baseline target (SSE2) runs four lanes at a time. The operations and their order are the same
/// at every width (Rust never contracts `a * b + c` into an FMA, and the maxima and integer sums
/// are exact), so the bits are too.
macro_rules! vectorized {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $body:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v4($($arg: $ty),*) {
                $body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v3($($arg: $ty),*) {
                $body($($arg),*)
            }
            match $crate::ops::lowp::dot::wide_level() {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: wide_level() said the CPU has v4's features.
                2 => unsafe { v4($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: wide_level() said the CPU has v3's features.
                1 => unsafe { v3($($arg),*) },
                _ => $body($($arg),*),
            }
        }
    };
}
pub(super) use vectorized;

/// 2 where the CPU has AVX-512 (F, BW, DQ, VL), 1 where it has AVX2 and FMA, else 0 (see
/// [`vectorized`]).
pub(crate) fn wide_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl") && has!("avx2") && has!("fma") {
            return 2;
        }
        if has!("avx2") && has!("fma") {
            return 1;
        }
    }
    0
}

/// Up to three kept buffers of a thread (`()` for one not needed).
pub(super) type Bufs<A, B, C> = RefCell<(Vec<A>, Vec<B>, Vec<C>)>;

/// Runs `f` on `cell`'s buffers (fresh ones if they are in use further up this thread's stack),
/// grown to the lengths asked; what they hold is whatever the last call left (callers write
/// before they read).
pub(super) fn with_bufs<A: Copy + Default, B: Copy + Default, C: Copy + Default, R>(
    cell: &'static std::thread::LocalKey<Bufs<A, B, C>>,
    (na, nb, nc): (usize, usize, usize),
    f: impl FnOnce(&mut [A], &mut [B], &mut [C]) -> R,
) -> R {
    cell.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            let (a, b, c) = &mut *v;
            a.resize(a.len().max(na), A::default());
            b.resize(b.len().max(nb), B::default());
            c.resize(c.len().max(nc), C::default());
            f(&mut a[..na], &mut b[..nb], &mut c[..nc])
        }
        Err(_) => f(&mut vec![A::default(); na], &mut vec![B::default(); nb], &mut vec![C::default(); nc]),
    })
}

/// `v` rounded to the nearest integer, ties to even, for `|v| <= 2^22` (adding and taking off
/// 1.5 * 2^23 leaves no fraction bits; plain arithmetic, so it vectorizes where `round` is a call).
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const M: f32 = 12_582_912.0;
    (v + M) - M
}

/// Quantizes `src` to `dst` (`dst.len() >= src.len()`; the rest is set to 0) and returns the
/// row's scale, NaN when the row holds a non-finite value (so that its outputs are NaN, as an f32
/// product's would be) and 0 for a row of zeros, and the sum of the quantized values.
#[inline(always)]
fn quantize_row(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    // A NaN scale (a non-finite value) or a zero one stores zeros: the scale carries the NaN.
    let s = requant_scale(src);
    dst[src.len()..].fill(0);
    let mut sum = 0i32;
    if s > 0.0 {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = requant(v, s);
            sum += *d as i32;
        }
    } else {
        dst[..src.len()].fill(0);
    }
    (s, sum)
}

/// A weight laid out for [`tiles`]: `n` output columns in blocks of 16, each block `groups` chunks
/// of 64 reduction values (`b`, 1024 bytes a chunk, each weight shifted by 128), with each (block,
/// group, column)'s scale `s`, `[block][group][16]`.
struct Packed<'a> {
    b: &'a [u8],
    s: &'a [f32],
    n: usize,
    groups: usize,
}

/// `y[m, n] = x[m, k] B` (or `+=` when `accumulate`), `x` quantized per row and group of 64, over
/// the packed `B` (`k` reduction values in `groups` chunks of 64, the last one padded).
fn product(isa: DotIsa, x: &[f32], m: usize, k: usize, p: &Packed, y: &mut [f32], accumulate: bool) {
    let (n, groups) = (p.n, p.groups);
    let (kp, nb) = (groups * CH, n.div_ceil(T));
    assert!(k <= kp && x.len() >= m * k && y.len() >= m * n);
    assert!(p.b.len() >= nb * groups * BCH && p.s.len() >= nb * groups * T);
    y[..m * n].par_chunks_mut(T * n).enumerate().for_each(|(rb, yb)| {
        with_bufs(&ROWS, (T * kp, T * T + T * groups, T * groups), |a, c, f| {
            product_rows_wide(isa, x, k, p, rb, yb, accumulate, a, c, f)
        })
    });
}

vectorized! {
    /// [`product_rows`], vectorized.
    #[allow(clippy::too_many_arguments)]
    fn product_rows_wide => product_rows(
        isa: DotIsa, x: &[f32], k: usize, p: &Packed, rb: usize, yb: &mut [f32], accumulate: bool,
        a: &mut [i8], c: &mut [i32], f: &mut [f32],
    )
}

/// Rows `16 rb..` of [`product`] into `yb` (at most 16 rows of `y`), on a thread's buffers: `a`
/// the quantized rows, `c` one group's tile and the rows' sums per group, `f` their scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn product_rows(
    isa: DotIsa,
    x: &[f32],
    k: usize,
    p: &Packed,
    rb: usize,
    yb: &mut [f32],
    accumulate: bool,
    a: &mut [i8],
    c: &mut [i32],
    f: &mut [f32],
) {
    let (n, groups) = (p.n, p.groups);
    let (kp, nb) = (groups * CH, n.div_ceil(T));
    let rows = yb.len() / n;
    // One scale per row and 64-value group of `x` (`sx[r * groups + g]`): an outlier
    // coarsens only its own group, as the weight's group scales do.
    let sx = &mut f[..T * groups];
    // The rows' sums of quantized values per group (`128 rsum` comes off each integer sum).
    let (c, rsum) = c.split_at_mut(T * T);
    for r in 0..T {
        let dst = &mut a[r * kp..(r + 1) * kp];
        if r < rows {
            let row = &x[(rb * T + r) * k..(rb * T + r + 1) * k];
            for (g, (d, src)) in dst.chunks_exact_mut(CH).zip(row.chunks(CH)).enumerate() {
                (sx[r * groups + g], rsum[r * groups + g]) = quantize_row(src, d);
            }
        } else {
            dst.fill(0);
            sx[r * groups..(r + 1) * groups].fill(0.0);
            rsum[r * groups..(r + 1) * groups].fill(0);
        }
    }
    let session = TileSession::begin(isa);
    for cb in 0..nb {
        // Group by group, each tile's epilogue while the tile is in the L1 cache; each output's
        // sum over the groups added in group order.
        let mut acc = [[0f32; T]; T];
        for g in 0..groups {
            let at = (cb * groups + g) * T;
            tiles_in(&session, isa, &a[g * CH..], kp, &p.b[at * CH..(at + T) * CH], 1, 1, c);
            let s = &p.s[at..at + T];
            for (r, (accr, cr)) in acc[..rows].iter_mut().zip(c.chunks_exact(T)).enumerate() {
                let (sxg, shift) = (sx[r * groups + g], 128 * rsum[r * groups + g]);
                for col in 0..T {
                    accr[col] += (cr[col] - shift) as f32 * s[col] * sxg;
                }
            }
        }
        let cols = T.min(n - cb * T);
        for (r, accr) in acc[..rows].iter().enumerate() {
            store(&mut yb[r * n + cb * T..r * n + cb * T + cols], accr, accumulate);
        }
    }
}

/// `dst = src[..dst.len()]`, or `+=` when `accumulate`: a tile row into the product's output.
#[inline(always)]
pub(super) fn store(dst: &mut [f32], src: &[f32], accumulate: bool) {
    if accumulate {
        for (d, &v) in dst.iter_mut().zip(src) {
            *d += v;
        }
    } else {
        // a loop, not copy_from_slice: at 16 values a memcpy call costs more than the copy
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v;
        }
    }
}

/// The stored weight as the dot path reads it.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The int8 base as packed: `q` `[out, in]`, one scale per [`INT8_GROUP`] inputs of a row.
    Int8 { q: &'a [i8], scale: &'a [f32] },
    /// A GGUF file's 4-bit blocks, requantized to int8 per call where the product needs them.
    Q4 { fmt: Q4Format, blocks: &'a [u8] },
}

impl Source<'_> {
    fn of(w: &PackedWeight) -> Source<'_> {
        match &w.store {
            Store::Int8 { q, scale } => Source::Int8 { q, scale },
            Store::Q4 { fmt, blocks } => Source::Q4 { fmt: *fmt, blocks },
            Store::Bf16(_) => panic!("the int8 dot path takes int8 and q4 weights, not bf16"),
        }
    }

    /// The stored weights `(o, k0..k0 + dst.len())` as f32: the numbers the widen path multiplies
    /// by (`q * scale` for int8, the blocks dequantized for q4).
    #[inline(always)]
    fn values(self, inp: usize, o: usize, k0: usize, dst: &mut [f32]) {
        match self {
            Source::Int8 { q, scale } => {
                // A group's stretch at a time, its scale hoisted (so that the loop vectorizes).
                let (groups, end) = (inp.div_ceil(CH), k0 + dst.len());
                let mut k = k0;
                while k < end {
                    let (g, stop) = (k / CH, ((k / CH + 1) * CH).min(end));
                    let sc = scale[o * groups + g];
                    for (d, &v) in dst[k - k0..stop - k0].iter_mut().zip(&q[o * inp + k..o * inp + stop]) {
                        *d = v as f32 * sc;
                    }
                    k = stop;
                }
            }
            Source::Q4 { fmt, blocks } => {
                let bb = fmt.block_bytes();
                let row = &blocks[o * (inp / Q4_BLOCK) * bb..(o + 1) * (inp / Q4_BLOCK) * bb];
                let (mut tmp, end) = ([0f32; Q4_BLOCK], k0 + dst.len());
                let mut k = k0;
                while k < end {
                    let b = k / Q4_BLOCK;
                    q4::dequant_block(fmt, &row[b * bb..(b + 1) * bb], &mut tmp);
                    let stop = ((b + 1) * Q4_BLOCK).min(end);
                    dst[k - k0..stop - k0].copy_from_slice(&tmp[k - b * Q4_BLOCK..stop - b * Q4_BLOCK]);
                    k = stop;
                }
            }
        }
    }
}

/// `max|v|` and whether any `v` was not finite, kept in 16 lanes: a maximum is exact in any
/// order, so the lanes let the loops vectorize without changing a result.
struct AbsMax {
    amax: [f32; T],
    bad: [bool; T],
}

impl AbsMax {
    #[inline(always)]
    fn new() -> AbsMax {
        AbsMax { amax: [0.0; T], bad: [false; T] }
    }

    /// Takes in `v` (at most 16 values), `v[i]` into lane `i`.
    #[inline(always)]
    fn add(&mut self, v: &[f32]) {
        for ((m, b), &v) in self.amax.iter_mut().zip(&mut self.bad).zip(v) {
            *m = m.max(v.abs());
            *b |= !v.is_finite();
        }
    }

    /// Lane `i`'s int8 scale ([`scale_of`]).
    #[inline(always)]
    fn lane_scale(&self, i: usize) -> f32 {
        scale_of(self.amax[i], !self.bad[i])
    }

    /// The int8 scale of everything taken in ([`scale_of`]).
    #[inline(always)]
    fn scale(&self) -> f32 {
        scale_of(self.amax.iter().fold(0f32, |m, &v| m.max(v)), !self.bad.contains(&true))
    }
}

/// The int8 scale of `vals` (symmetric: `max|v| / 127`), or NaN where one of them is not finite
/// (every product the group enters is then NaN, as an f32 product with the weight would be).
#[inline(always)]
fn requant_scale(vals: &[f32]) -> f32 {
    let mut m = AbsMax::new();
    let mut chunks = vals.chunks_exact(T);
    for c in &mut chunks {
        m.add(c);
    }
    m.add(chunks.remainder());
    m.scale()
}

/// `amax / 127`, or NaN where the values were not all finite.
#[inline(always)]
fn scale_of(amax: f32, finite: bool) -> f32 {
    if finite {
        amax / 127.0
    } else {
        f32::NAN
    }
}

/// `v` in int8 at scale `s` (0 where `s` is 0 or NaN: a group of zeros, or a non-finite one whose
/// NaN scale carries it).
#[inline(always)]
fn requant(v: f32, s: f32) -> i8 {
    // Divided, not multiplied by 1/s (1/s overflows for a group of subnormals); |v / s| <= 127.
    if s > 0.0 {
        // through i32: a clamped value converts exactly, and a saturating conversion to i8 would
        // not vectorize
        round_even(v / s).clamp(-127.0, 127.0) as i32 as i8
    } else {
        0
    }
}

/// A weight byte as the tiles take it: `q + 128`, in 1..=255 for the int8 range (128 is zero).
#[inline(always)]
fn shifted(q: i8) -> u8 {
    (q as i32 + 128) as u8
}

vectorized! {
    /// [`pack_fwd`], vectorized.
    #[allow(clippy::too_many_arguments)]
    fn pack_fwd_wide => pack_fwd(
        src: Source, inp: usize, out: usize, groups: usize, cb: usize, b: &mut [u8], s: &mut [f32],
    )
}

/// Block `cb` of 16 output channels of `W^T` for [`product`]: per input group, the int8 values
/// (shifted by 128) and the scale (the int8 base's own; q4's two blocks of the group requantized
/// with one scale).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_fwd(src: Source, inp: usize, out: usize, groups: usize, cb: usize, b: &mut [u8], s: &mut [f32]) {
    // Set here, in parallel. A padding input meets a zero activation and a padding channel's
    // output is not read, so their bytes need only be set.
    b.fill(128);
    s.fill(0.0);
    let mut vals = [0f32; CH];
    for col in 0..T.min(out - cb * T) {
        let o = cb * T + col;
        for g in 0..groups {
            let (k0, len) = (g * CH, CH.min(inp - g * CH));
            // The group's 64 bytes first (past `len`, the zero weight's 128), then four at a time
            // into their places.
            let mut qb = [128u8; CH];
            match src {
                Source::Int8 { q, scale } => {
                    for (d, &v) in qb.iter_mut().zip(&q[o * inp + k0..o * inp + k0 + len]) {
                        *d = shifted(v);
                    }
                    s[g * T + col] = scale[o * groups + g];
                }
                Source::Q4 { .. } => {
                    src.values(inp, o, k0, &mut vals[..len]);
                    let sg = requant_scale(&vals[..len]);
                    for (d, &v) in qb.iter_mut().zip(&vals[..len]) {
                        *d = shifted(requant(v, sg));
                    }
                    s[g * T + col] = sg;
                }
            }
            let bg = &mut b[g * BCH..(g + 1) * BCH];
            for (k4, four) in qb.chunks_exact(4).enumerate() {
                bg[k4 * 4 * T + col * 4..k4 * 4 * T + col * 4 + 4].copy_from_slice(four);
            }
        }
    }
}

vectorized! {
    /// [`pack_bwd`], vectorized.
    #[allow(clippy::too_many_arguments)]
    fn pack_bwd_wide => pack_bwd(
        src: Source, inp: usize, out: usize, groups: usize, kb: usize, b: &mut [u8], s: &mut [f32],
    )
}

/// Block `kb` of 16 input columns of `W` for [`product`]: per group of 64 output channels, the
/// stored weight requantized with one scale per (group, column) (shifted by 128) and the scales.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_bwd(src: Source, inp: usize, out: usize, groups: usize, kb: usize, b: &mut [u8], s: &mut [f32]) {
    b.fill(128);
    s.fill(0.0);
    let (k0, cols) = (kb * T, T.min(inp - kb * T));
    let mut vals = [[0f32; T]; CH];
    for g in 0..groups {
        let os = g * CH..(g * CH + CH).min(out);
        for o in os.clone() {
            src.values(inp, o, k0, &mut vals[o - g * CH][..cols]);
        }
        let n = os.len();
        // Each column's scale, the columns as lanes.
        let mut m = AbsMax::new();
        for row in &vals[..n] {
            m.add(row);
        }
        let st: [f32; T] = std::array::from_fn(|col| if col < cols { m.lane_scale(col) } else { 0.0 });
        // Four channels at a time: each column's four bytes lie together. Every column is written
        // (past `cols` the values and scales are 0, so the bytes are the zero weight's 128), which
        // keeps the loops' bounds fixed so that they vectorize.
        let bg = &mut b[g * BCH..(g + 1) * BCH];
        for (c4, out4) in bg.chunks_exact_mut(4 * T).enumerate().take(n.div_ceil(4)) {
            let mut q = [[0i8; T]; 4];
            for (i, qi) in q.iter_mut().enumerate() {
                if 4 * c4 + i < n {
                    let row = &vals[4 * c4 + i];
                    for col in 0..T {
                        qi[col] = requant(row[col], st[col]);
                    }
                }
            }
            for col in 0..T {
                for i in 0..4 {
                    out4[col * 4 + i] = shifted(q[i][col]);
                }
            }
        }
        s[g * T..g * T + T].copy_from_slice(&st);
    }
}

fn check_weight(isa: DotIsa, w: &PackedWeight) {
    assert!(isa.available(), "this CPU cannot run the {} dot-product path", isa.name());
    assert!(
        matches!(w.precision(), BasePrecision::Int8 | BasePrecision::Q4),
        "the int8 dot path takes int8 and q4 weights, not {}",
        w.precision()
    );
}

/// `y[m, out] = x[m, in] W^T` (overwrites `y`) on `isa`, for an int8 or q4 weight.
///
/// # Panics
/// Where this CPU cannot run `isa` ([`DotIsa::available`]), or the weight is bf16.
pub fn linear_fwd(isa: DotIsa, w: &PackedWeight, m: usize, x: &[f32], y: &mut [f32]) {
    check_weight(isa, w);
    let (out, inp) = (w.out_features(), w.in_features());
    let src = Source::of(w);
    let (groups, nb) = (inp.div_ceil(CH), out.div_ceil(T));
    // B = W^T: per block of 16 output channels, per input group, the int8 values and scale (the
    // int8 base's own; q4's two blocks of the group requantized with one scale).
    with_bufs(&PACK, (nb * groups * BCH, 0, nb * groups * T), |b, _, s| {
        b.par_chunks_mut(groups * BCH)
            .zip(s.par_chunks_mut(groups * T))
            .enumerate()
            .for_each(|(cb, (b, s))| pack_fwd_wide(src, inp, out, groups, cb, b, s));
        product(isa, x, m, inp, &Packed { b, s, n: out, groups }, y, false)
    })
}

/// `dx[m, in] += dy[m, out] W` on `isa`, for an int8 or q4 weight.
///
/// # Panics
/// Where this CPU cannot run `isa` ([`DotIsa::available`]), or the weight is bf16.
pub fn linear_bwd(isa: DotIsa, w: &PackedWeight, m: usize, dy: &[f32], dx: &mut [f32]) {
    check_weight(isa, w);
    let (out, inp) = (w.out_features(), w.in_features());
    let src = Source::of(w);
    let (groups, nb) = (out.div_ceil(CH), inp.div_ceil(T));
    // B = W: per block of 16 input columns, per group of 64 output channels, the stored weight
    // (`q * sw`, or q4's blocks dequantized) requantized with one scale per (group, column).
    with_bufs(&PACK, (nb * groups * BCH, 0, nb * groups * T), |b, _, s| {
        b.par_chunks_mut(groups * BCH)
            .zip(s.par_chunks_mut(groups * T))
            .enumerate()
            .for_each(|(kb, (b, s))| pack_bwd_wide(src, inp, out, groups, kb, b, s));
        product(isa, dy, m, out, &Packed { b, s, n: inp, groups }, dx, true)
    })
}
