//! A frozen linear weight held in low precision (`--base-precision bf16|int8|q4`): the two products
//! a frozen weight takes part in, `y = x W^T` (forward) and `dx += dy W` (input gradient). A
//! frozen weight has no `dW`, so nothing else ever reads it.
//!
//! Storage: bf16 (round to nearest even, NaN kept: half the bytes of f32), or int8 symmetric per
//! group of [`INT8_GROUP`] weights along the input of each output channel (`w = q * scale[row,
//! group]`, `scale = max|w_group| / 127`: a quarter of the bytes, plus one f32 per 64 weights,
//! 1.0625 bytes a weight; as GGUF's Q8_0 groups by 32, so that one large weight scales only its
//! own group, not its whole row). The weight is packed once, at load, as `[out, in]` whatever the file's layout
//! (GPT-2's Conv1D is transposed then). q4 is not packed from f32: it keeps a GGUF file's own
//! Q4_0 / Q4_1 blocks ([`q4`]; 18 or 20 bytes per 32 weights, 5/32 of f32's bytes for Q4_1),
//! taken as they are by [`PackedWeight::from_q4`], rows `[out]` of blocks along `in`.
//!
//! Compute, CPU, int8 and q4: the instruction path [`matrix_path`] picks at run time. Where the CPU
//! has integer dot-product instructions (AMX `tdpbsud`, AVX-512 VNNI or AVX-VNNI `vpdpbusd`) the
//! products run in integers ([`dot`]: activations and output gradients quantized per row and group
//! on the fly, i32 sums per weight group, f32 after; q4's blocks requantized to int8 per group of 64
//! as the product packs them); bf16 likewise on bf16 dot products where the CPU has them
//! ([`dot_bf16`]); otherwise the
//! widen path ([`MatrixPath::WidenF32`]): a block of rows is widened (bf16) or dequantized (int8,
//! q4) into a per-thread f32 scratch (reused from call to call: a step allocates nothing after the
//! first), and the `gemm` crate's runtime-dispatched f32 microkernels run on it, so the only error
//! is the weight's rounding. f64 products always take the widen path.
//!
//! Error bounds (tested against an f64 product with the original f32 weight, `tests.rs`): per
//! output element `|y - y_ref| <= e_w * sum_k |x_k| |w_k| + f32 rounding`, with `e_w = 2^-8`
//! relative for bf16 (round to nearest even with 8 significant bits: `|w - bf16(w)| <= 2^-8 |w|`,
//! the bound itself), and for int8 the absolute weight error `max|w_group| / 254` (the group
//! holding `w_k`) in place of `e_w |w_k|`; the dot path adds the activation's rounding ([`dot`]). q4 has no rounding of its own on the widen path (the weight
//! *is* the file's blocks): its products equal f32 products with the blocks dequantized (the same
//! f32 numbers the GGUF reader's dequant-at-load gives) up to f32 summation order; the dot path
//! adds int8's bounds with the dequantized blocks as the weight. CUDA has no low-precision base here:
//! its frozen weights go bf16 through the mixed-precision design instead.

mod cpu;
mod cuda;
pub mod dot;
pub mod dot_bf16;
pub mod q4;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_dot;
#[cfg(test)]
mod tests_dot_bf16;

use crate::backend::Backend;
use crate::error::{Error, Result};
pub use dot::DotIsa;
pub use dot_bf16::Bf16Isa;
use half::bf16;
pub use q4::{Q4Format, Q4_BLOCK};

/// How a frozen base's linear weights are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BasePrecision {
    /// f32, as loaded: the ordinary matmul.
    #[default]
    F32,
    /// bf16 storage.
    Bf16,
    /// int8, symmetric, one f32 scale per group of [`INT8_GROUP`] inputs of an output channel.
    Int8,
    /// ggml's Q4_0 / Q4_1 blocks as a GGUF file holds them (read, never made from f32).
    Q4,
}

impl BasePrecision {
    pub const ALL: [BasePrecision; 4] =
        [BasePrecision::F32, BasePrecision::Bf16, BasePrecision::Int8, BasePrecision::Q4];

    pub fn name(self) -> &'static str {
        match self {
            BasePrecision::F32 => "f32",
            BasePrecision::Bf16 => "bf16",
            BasePrecision::Int8 => "int8",
            BasePrecision::Q4 => "q4",
        }
    }
}

impl std::fmt::Display for BasePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BasePrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(BasePrecision::F32),
            "bf16" => Ok(BasePrecision::Bf16),
            "int8" => Ok(BasePrecision::Int8),
            "q4" => Ok(BasePrecision::Q4),
            other => Err(format!("unknown base precision `{other}` (expected f32, bf16, int8 or q4)")),
        }
    }
}

/// The instructions an int8 base's products use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixPath {
    /// AMX tiles (`tdpbsud`), Sapphire Rapids and later.
    Amx,
    /// AVX-512 VNNI (`vpdpbusd` on 512-bit registers).
    Avx512Vnni,
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers: Alder Lake, Zen 5).
    AvxVnni,
    /// The int8 dot-product path with its instructions computed in portable Rust: the same
    /// numbers as the three above (see [`dot`]), far slower; chosen only by `TUNA_CPU_MATRIX`.
    Emulated,
    /// No integer dot-product instruction: widen a block of weights to f32, f32 FMA.
    WidenF32,
}

impl MatrixPath {
    /// Best first, the widen path (every CPU) last: the default takes the first this CPU runs,
    /// the portable twin never.
    pub const ALL: [MatrixPath; 5] =
        [MatrixPath::Amx, MatrixPath::Avx512Vnni, MatrixPath::AvxVnni, MatrixPath::Emulated, MatrixPath::WidenF32];

    /// The name `TUNA_CPU_MATRIX` takes.
    pub fn name(self) -> &'static str {
        match self {
            MatrixPath::Amx => "amx",
            MatrixPath::Avx512Vnni => "avx512-vnni",
            MatrixPath::AvxVnni => "avx-vnni",
            MatrixPath::Emulated => "emulated",
            MatrixPath::WidenF32 => "widen",
        }
    }

    /// The dot-product instructions of this path (`None` for the widen path).
    pub fn dot_isa(self) -> Option<DotIsa> {
        match self {
            MatrixPath::Amx => Some(DotIsa::Amx),
            MatrixPath::Avx512Vnni => Some(DotIsa::Avx512Vnni),
            MatrixPath::AvxVnni => Some(DotIsa::AvxVnni),
            MatrixPath::Emulated => Some(DotIsa::Emulated),
            MatrixPath::WidenF32 => None,
        }
    }

    /// Whether this CPU (and, for AMX, the operating system) can run it.
    pub fn available(self) -> bool {
        self.dot_isa().is_none_or(DotIsa::available)
    }
}

/// What this CPU offers for matrix products, detected once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuMatrixFeatures {
    pub avx2_fma: bool,
    pub avx512f: bool,
    pub avx512_vnni: bool,
    pub avx512_bf16: bool,
    pub avx_vnni: bool,
    pub amx_tile: bool,
    pub amx_bf16: bool,
    pub amx_int8: bool,
}

impl CpuMatrixFeatures {
    /// Run-time detection (cpuid through `is_x86_feature_detected!`); all false off x86-64.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // AMX's detection macro is unstable: cpuid leaf 7 directly (EDX bits 22, 24, 25:
            // AMX-BF16, AMX-TILE, AMX-INT8), what the CPU offers; using the tiles would also need
            // the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM).
            // cpuid is on every x86-64 CPU; leaf 7 exists when leaf 0 says so.
            let amx = {
                let max_leaf = std::arch::x86_64::__cpuid(0).eax;
                if max_leaf >= 7 {
                    let d = std::arch::x86_64::__cpuid_count(7, 0).edx;
                    (d & (1 << 22) != 0, d & (1 << 24) != 0, d & (1 << 25) != 0)
                } else {
                    (false, false, false)
                }
            };
            CpuMatrixFeatures {
                avx2_fma: has!("avx2") && has!("fma"),
                avx512f: has!("avx512f"),
                avx512_vnni: has!("avx512vnni"),
                avx512_bf16: has!("avx512bf16"),
                avx_vnni: has!("avxvnni"),
                amx_tile: amx.1,
                amx_bf16: amx.0,
                amx_int8: amx.2,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuMatrixFeatures::default()
        }
    }

    /// The matrix instructions found, by their usual names (`tuna info`).
    pub fn names(&self) -> Vec<&'static str> {
        let all = [
            (self.avx2_fma, "avx2+fma"),
            (self.avx512f, "avx512f"),
            (self.avx512_vnni, "avx512-vnni"),
            (self.avx512_bf16, "avx512-bf16"),
            (self.avx_vnni, "avx-vnni"),
            (self.amx_tile, "amx-tile"),
            (self.amx_bf16, "amx-bf16"),
            (self.amx_int8, "amx-int8"),
        ];
        all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect()
    }

    /// The best int8 path the instructions allow (AMX also needs the operating system's leave:
    /// [`MatrixPath::available`]).
    pub fn best(&self) -> MatrixPath {
        if self.amx_tile && self.amx_int8 {
            MatrixPath::Amx
        } else if self.avx512_vnni {
            MatrixPath::Avx512Vnni
        } else if self.avx_vnni {
            MatrixPath::AvxVnni
        } else {
            MatrixPath::WidenF32
        }
    }
}

/// The environment variable that picks the int8 base's path by [`MatrixPath::name`] (tests and
/// benchmarks; unset: the best this CPU has).
pub const MATRIX_ENV: &str = "TUNA_CPU_MATRIX";

/// The path an int8 or q4 base's products take in this process: `TUNA_CPU_MATRIX` if set,
/// otherwise the best this CPU runs (AMX, then AVX-512 VNNI, then AVX-VNNI, then the widen path).
/// An unknown or unavailable name is an error naming the variable and the paths this CPU has. A
/// bf16 base's path is [`bf16_path`]'s.
pub fn matrix_path_checked() -> std::result::Result<MatrixPath, String> {
    static PATH: std::sync::OnceLock<std::result::Result<MatrixPath, String>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let paths = MatrixPath::ALL.map(|p| (p.name(), p, p.available()));
        choose_path(MATRIX_ENV, &paths)
    })
    .clone()
}

/// The path the environment variable `var` names among `paths` (name, path, whether this CPU
/// runs it; best first, a fallback every CPU runs last); unset or empty, the first this CPU runs
/// other than `emulated`. A name unknown, not UTF-8, or of a path this CPU cannot run is an error
/// naming the variable, its value and the paths this CPU runs.
fn choose_path<P: Copy>(var: &str, paths: &[(&'static str, P, bool)]) -> std::result::Result<P, String> {
    let names = paths.iter().map(|(n, ..)| *n).collect::<Vec<_>>().join(", ");
    let here = paths.iter().filter(|(.., ok)| *ok).map(|(n, ..)| *n).collect::<Vec<_>>().join(", ");
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => match paths.iter().find(|(n, ..)| *n == v) {
            Some(&(_, p, true)) => Ok(p),
            Some((n, ..)) => Err(format!("{var}={v:?}: {} (it runs: {here})", cannot(n))),
            None => Err(format!("{var}={v:?}: unknown path (expected one of: {names}; this CPU runs: {here})")),
        },
        Err(std::env::VarError::NotUnicode(v)) => Err(format!("{var}={v:?}: unknown path (expected one of: {names})")),
        _ => Ok(paths
            .iter()
            .find(|(n, _, ok)| *ok && *n != "emulated")
            .map(|&(_, p, _)| p)
            .expect("the last path runs on every CPU")),
    }
}

/// Why a known path cannot run here: the CPU lacks it, or (AMX) Linux refused the tile state.
fn cannot(name: &str) -> String {
    let f = CpuMatrixFeatures::detect();
    if name == "amx" && f.amx_tile && !dot::amx_permitted() {
        "the CPU has AMX but the operating system refused this process the tile state (arch_prctl)".into()
    } else {
        "this CPU cannot run that path".into()
    }
}

/// [`matrix_path_checked`], with the widen path where `TUNA_CPU_MATRIX` names a path this CPU
/// cannot take (the command line refuses that before any product runs).
pub fn matrix_path() -> MatrixPath {
    matrix_path_checked().unwrap_or(MatrixPath::WidenF32)
}

/// The environment variable that picks the bf16 base's path: `amx`, `avx512-bf16`, `emulated` or
/// `widen` (unset: the best this CPU has).
pub const MATRIX_BF16_ENV: &str = "TUNA_CPU_MATRIX_BF16";

/// The path a bf16 base's products take in this process: `Some(isa)` for a bf16 dot-product path
/// (`TUNA_CPU_MATRIX_BF16` if set, otherwise AMX-BF16, then AVX512_BF16), `None` for the widen
/// path. An unknown or unavailable name is an error naming the variable.
pub fn bf16_path_checked() -> std::result::Result<Option<Bf16Isa>, String> {
    static PATH: std::sync::OnceLock<std::result::Result<Option<Bf16Isa>, String>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let mut paths: Vec<_> = Bf16Isa::ALL.iter().map(|&p| (p.name(), Some(p), p.available())).collect();
        paths.push(("widen", None, true));
        choose_path(MATRIX_BF16_ENV, &paths)
    })
    .clone()
}

/// The name (`TUNA_CPU_MATRIX`'s or `TUNA_CPU_MATRIX_BF16`'s) of the path a base of precision `p`
/// takes in this process: `None` for f32.
pub fn base_path_name(p: BasePrecision) -> Option<&'static str> {
    match p {
        BasePrecision::Int8 | BasePrecision::Q4 => Some(matrix_path().name()),
        BasePrecision::Bf16 => Some(bf16_path().map_or("widen", Bf16Isa::name)),
        BasePrecision::F32 => None,
    }
}

/// [`bf16_path_checked`], with the widen path where `TUNA_CPU_MATRIX_BF16` names a path this CPU
/// cannot take (the command line refuses that before any product runs).
pub fn bf16_path() -> Option<Bf16Isa> {
    bf16_path_checked().unwrap_or(None)
}

/// Weights per int8 scale: each output channel's inputs in groups of 64 (the last one shorter
/// where the input dimension is not a multiple), one f32 scale each.
pub const INT8_GROUP: usize = 64;

#[derive(Clone)]
enum Store {
    Bf16(Vec<bf16>),
    /// `q` `[out, in]`; `scale` `[out, in.div_ceil(INT8_GROUP)]`.
    Int8 {
        q: Vec<i8>,
        scale: Vec<f32>,
    },
    /// `out` rows of `in / 32` blocks each, the file's bytes unchanged.
    Q4 {
        fmt: Q4Format,
        blocks: Vec<u8>,
    },
}

/// A frozen weight `[out, in]` in bf16, int8 or q4, packed once.
#[derive(Clone)]
pub struct PackedWeight {
    out: usize,
    inp: usize,
    store: Store,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight {{ {} [{}, {}] }}", self.precision(), self.out, self.inp)
    }
}

impl PackedWeight {
    /// Packs an f32 weight of `out * inp` elements, stored `[out, in]` or, when `in_out`,
    /// `[in, out]` (GPT-2's Conv1D). `name` only labels errors. int8 refuses a row holding a
    /// non-finite value (its scale would be meaningless); bf16 keeps NaN and infinities. q4 is
    /// refused: it is only read from a GGUF file's blocks ([`PackedWeight::from_q4`]).
    pub fn pack(name: &str, w: &[f32], out: usize, inp: usize, in_out: bool, p: BasePrecision) -> Result<Self> {
        let invalid = |msg: String| Error::Invalid { op: "pack_weight", msg: format!("{name}: {msg}") };
        if out == 0 || inp == 0 {
            return Err(invalid(format!("empty weight [{out}, {inp}]")));
        }
        if w.len() != out * inp {
            return Err(invalid(format!("{} elements, expected {out} x {inp}", w.len())));
        }
        let at = |o: usize, i: usize| if in_out { w[i * out + o] } else { w[o * inp + i] };
        let store = match p {
            BasePrecision::F32 => return Err(invalid("f32 is not a packed precision (keep the f32 tensor)".into())),
            BasePrecision::Q4 => {
                return Err(invalid(
                    "q4 keeps a GGUF file's Q4_0 / Q4_1 blocks as they are; it is not made from f32 weights \
                     (bf16 and int8 pack any weight)"
                        .into(),
                ))
            }
            BasePrecision::Bf16 => {
                let mut v = Vec::with_capacity(out * inp);
                for o in 0..out {
                    v.extend((0..inp).map(|i| bf16::from_f32(at(o, i))));
                }
                Store::Bf16(v)
            }
            BasePrecision::Int8 => {
                let mut q = Vec::with_capacity(out * inp);
                let mut scale = Vec::with_capacity(out * inp.div_ceil(INT8_GROUP));
                for o in 0..out {
                    for g0 in (0..inp).step_by(INT8_GROUP) {
                        let cols = g0..(g0 + INT8_GROUP).min(inp);
                        let mut amax = 0f32;
                        for i in cols.clone() {
                            let v = at(o, i);
                            if !v.is_finite() {
                                return Err(invalid(format!(
                                    "row {o} holds {v} at column {i}: int8 needs finite weights"
                                )));
                            }
                            amax = amax.max(v.abs());
                        }
                        let s = amax / 127.0;
                        // Divided, not multiplied by 1/s: for a group of tiny (subnormal) weights
                        // 1/s overflows. A group so small that s underflows to 0 stores zeros.
                        let q_of = |v: f32| if s > 0.0 { (v / s).round().clamp(-127.0, 127.0) as i8 } else { 0 };
                        q.extend(cols.map(|i| q_of(at(o, i))));
                        scale.push(s);
                    }
                }
                Store::Int8 { q, scale }
            }
        };
        Ok(PackedWeight { out, inp, store })
    }

    /// A weight `[out, in]` held as ggml `fmt` blocks: `blocks` is `out` rows of `in / 32` blocks
    /// (a GGUF tensor of dims `[in, out]`, its bytes as stored), kept as they are. Refuses rows
    /// that are not whole blocks and a byte count that is not `out` such rows. `name` labels
    /// errors.
    pub fn from_q4(name: &str, fmt: Q4Format, blocks: Vec<u8>, out: usize, inp: usize) -> Result<Self> {
        let invalid = |msg: String| Error::Invalid { op: "pack_weight", msg: format!("{name}: {msg}") };
        if out == 0 || inp == 0 {
            return Err(invalid(format!("empty weight [{out}, {inp}]")));
        }
        if !inp.is_multiple_of(Q4_BLOCK) {
            return Err(invalid(format!(
                "rows of {inp} weights are not whole {fmt} blocks of {Q4_BLOCK}: q4 needs an input dimension that \
                 is a multiple of {Q4_BLOCK}"
            )));
        }
        let want = out * (inp / Q4_BLOCK) * fmt.block_bytes();
        if blocks.len() != want {
            return Err(invalid(format!("{} bytes of {fmt} blocks, expected {want} for [{out}, {inp}]", blocks.len())));
        }
        Ok(PackedWeight { out, inp, store: Store::Q4 { fmt, blocks } })
    }

    pub fn out_features(&self) -> usize {
        self.out
    }
    pub fn in_features(&self) -> usize {
        self.inp
    }
    pub fn precision(&self) -> BasePrecision {
        match self.store {
            Store::Bf16(_) => BasePrecision::Bf16,
            Store::Int8 { .. } => BasePrecision::Int8,
            Store::Q4 { .. } => BasePrecision::Q4,
        }
    }

    /// The ggml block format of a q4 weight (`None` for bf16 and int8).
    pub fn q4_format(&self) -> Option<Q4Format> {
        match self.store {
            Store::Q4 { fmt, .. } => Some(fmt),
            _ => None,
        }
    }
    /// Bytes held (weights and scales).
    pub fn bytes(&self) -> usize {
        match &self.store {
            Store::Bf16(v) => v.len() * 2,
            Store::Int8 { q, scale } => q.len() + scale.len() * 4,
            Store::Q4 { blocks, .. } => blocks.len(),
        }
    }

    /// Rows `r0..r0 + dst.len() / in` of the weight as `F`, row-major `[rows, in]`.
    pub fn widen_rows<F: crate::CpuFloat>(&self, r0: usize, dst: &mut [F]) {
        let inp = self.inp;
        debug_assert_eq!(dst.len() % inp, 0);
        let rows = dst.len() / inp;
        debug_assert!(r0 + rows <= self.out);
        match &self.store {
            Store::Bf16(v) => {
                for (d, s) in dst.iter_mut().zip(&v[r0 * inp..(r0 + rows) * inp]) {
                    *d = F::c(s.to_f32() as f64);
                }
            }
            Store::Int8 { q, scale } => {
                let groups = inp.div_ceil(INT8_GROUP);
                for (r, d) in dst.chunks_exact_mut(inp).enumerate() {
                    let (row, scales) = (r0 + r, &scale[(r0 + r) * groups..(r0 + r + 1) * groups]);
                    let src = &q[row * inp..(row + 1) * inp];
                    for ((d, src), &s) in d.chunks_mut(INT8_GROUP).zip(src.chunks(INT8_GROUP)).zip(scales) {
                        for (d, &qv) in d.iter_mut().zip(src) {
                            *d = F::c((qv as f32 * s) as f64);
                        }
                    }
                }
            }
            Store::Q4 { fmt, blocks } => {
                let row_bytes = inp / Q4_BLOCK * fmt.block_bytes();
                let src = &blocks[r0 * row_bytes..(r0 + rows) * row_bytes];
                let mut tmp = [0f32; Q4_BLOCK];
                for (b, d) in src.chunks_exact(fmt.block_bytes()).zip(dst.chunks_exact_mut(Q4_BLOCK)) {
                    q4::dequant_block(*fmt, b, &mut tmp);
                    for (d, &v) in d.iter_mut().zip(&tmp) {
                        *d = F::c(v as f64);
                    }
                }
            }
        }
    }

    /// The whole weight as f32 `[out, in]` (what the products compute with).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.out * self.inp];
        self.widen_rows(0, &mut v);
        v
    }
}

/// The two products of a frozen low-precision weight, on a device.
pub trait LowpKernel<E: crate::Elem>: Backend {
    /// `y[m, out] = x[m, in] W^T` (overwrites `y`).
    fn lowp_linear_fwd(&self, w: &PackedWeight, m: usize, x: &Self::Buf<E>, y: &mut Self::Buf<E>) -> Result<()>;
    /// `dx[m, in] += dy[m, out] W`.
    fn lowp_linear_bwd(&self, w: &PackedWeight, m: usize, dy: &Self::Buf<E>, dx: &mut Self::Buf<E>) -> Result<()>;
}

pub(crate) fn check(
    w: &PackedWeight,
    m: usize,
    xs: (&'static str, usize),
    ys: (&'static str, usize),
    fwd: bool,
) -> Result<()> {
    if m == 0 {
        return Err(Error::Invalid { op: "lowp_linear", msg: "no rows (m = 0)".into() });
    }
    let (a, b) = if fwd { (w.inp, w.out) } else { (w.out, w.inp) };
    let d = || format!("m={m} weight {} [{}, {}]", w.precision(), w.out, w.inp);
    crate::error::check_len("lowp_linear", xs.0, xs.1, m * a, d)?;
    crate::error::check_len("lowp_linear", ys.0, ys.1, m * b, d)
}
