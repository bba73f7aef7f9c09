//! The two backends (CPU and CUDA) and the element types they compute on.
//!
//! Every op trait is `trait XKernel<E: Elem>: Backend` and is implemented once for [`Cpu`]
//! (E = f32) and once for [`crate::Cuda`] (E = f32 and bf16). Buffers are `[E]` slices on the
//! CPU and `CudaBuf<E>` (device memory, or host memory on the emulated device) on CUDA, both
//! named `B::Buf<E>` in the traits.

use half::bf16;

/// Element types an op can take as activations/weights.
pub trait Elem: Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// Name used in kernel symbols: `<op>_<fwd|bwd>_<NAME>`.
    const NAME: &'static str;
    /// The type saved statistics and parameter gradients are kept in for ops on this element
    /// type: f32 for f32 and bf16 (fp32 accumulation), f64 for f64.
    type Acc: Elem;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The value as an f64 (exact for the float types).
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
    /// `x` rounded to this type (through f32 except for f64 itself, which is exact; f64 -> f32
    /// -> bf16 rounds as f64 -> bf16 would only where no tie is involved).
    fn from_f64(x: f64) -> Self {
        Self::from_f32(x as f32)
    }
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    type Acc = f32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for f64 {
    const NAME: &'static str = "f64";
    type Acc = f64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    type Acc = f32;
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for u8 {
    const NAME: &'static str = "u8";
    type Acc = f32;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x as u8
    }
}

impl Elem for i32 {
    const NAME: &'static str = "i32";
    type Acc = f32;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x as i32
    }
}

impl Elem for u32 {
    const NAME: &'static str = "u32";
    type Acc = f32;
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn from_f32(x: f32) -> Self {
        x as u32
    }
}

/// The float types the CPU backend computes in: f32 for training, f64 for gradient checks
/// (central differences need the precision). Every CPU kernel is generic over it.
pub trait CpuFloat:
    Elem<Acc = Self> + num_traits::Float + num_traits::FloatConst + num_traits::NumAssign + std::iter::Sum + Into<f64>
{
    /// A constant, rounded to this type.
    fn c(x: f64) -> Self;
    /// `erf`: libm for f64; for f32 a branch-free rational approximation (max abs error 4.5e-7
    /// against libm's f64 erf over the whole line) that vectorizes, unlike a libm call.
    fn erf(self) -> Self;
    /// `exp`: libm for f64; for f32 Cephes' polynomial with a branch-free range reduction (relative
    /// error about 2e-7), vectorizable.
    fn exp_fast(self) -> Self;
    /// `tanh`: libm for f64; for f32 `1 - 2 / (exp(2x) + 1)` through [`CpuFloat::exp_fast`]
    /// (absolute error below 3e-7), vectorizable.
    fn tanh_fast(self) -> Self;
}

/// Eigen's rational approximation of erf in f32 (numerator odd, denominator even), clamped to
/// [-4, 4] where erf is +-1 in f32.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    for c in [2.770_681_4e-8, -2.101_024e-6, -5.692_506_4e-5, -7.349_906_3e-4, -2.954_6e-3, -1.609_603_3e-2] {
        p = p * x2 + c;
    }
    let mut q = -1.456_607_2e-5_f32;
    for c in [-2.133_740_6e-4, -1.682_827e-3, -7.373_329e-3, -1.426_473_9e-2] {
        q = q * x2 + c;
    }
    x * p / q
}

/// Cephes' expf: `2^n * e^r` with `n = round(x / ln 2)` (by the 1.5 * 2^23 trick, no libm call)
/// and a degree-6 polynomial for `e^r` on [-ln2/2, ln2/2].
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut y = 1.987_569_1e-4_f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        y = y * r + c;
    }
    let e = y * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

// f32's accumulator is f32 and f64's is f64, so a CPU kernel generic over `F: CpuFloat` keeps
// statistics and parameter gradients in `F`.
impl CpuFloat for f32 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        let x = self.clamp(-9.0, 9.0);
        1.0 - 2.0 / (exp_f32(2.0 * x) + 1.0)
    }
}

impl CpuFloat for f64 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_fast(self) -> Self {
        self.tanh()
    }
}

/// A device that ops run on. `Buf<E>` is how it holds a buffer of `E`.
pub trait Backend {
    type Buf<E: Elem>: ?Sized;
    /// Number of elements in a buffer (for shape checks shared by both devices).
    fn len<E: Elem>(buf: &Self::Buf<E>) -> usize;
    /// Human-readable device name for errors.
    fn device_name(&self) -> String;
    /// How many elements of an intermediate a chunked op (the fused language-model head and loss)
    /// makes at once by default: 2^22 (16 MiB of f32) here, where a chunk should stay near the
    /// caches and the memory plan counts it; a GPU takes more (fewer, larger products and fewer
    /// passes over what the chunks accumulate into).
    fn chunk_elems(&self) -> usize {
        CPU_CHUNK_ELEMS
    }
}

/// [`Backend::chunk_elems`] on the CPU (and any device that does not say otherwise): 2^22.
pub const CPU_CHUNK_ELEMS: usize = 1 << 22;

/// The CPU backend: rayon across rows/tiles, `gemm` for matrix products. Computes in f32, or in
/// f64 for gradient checks ([`CpuFloat`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type Buf<E: Elem> = [E];
    fn len<E: Elem>(buf: &[E]) -> usize {
        buf.len()
    }
    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
}

/// Owned buffers of `E` on a backend: allocation and host transfers (what the autograd crate's
/// tensors hold). The CPU owns a `Vec<E>`; CUDA a `CudaBuf<E>`.
pub trait Alloc<E: Elem>: Backend {
    type Owned: 'static;
    fn buf(o: &Self::Owned) -> &Self::Buf<E>;
    fn buf_mut(o: &mut Self::Owned) -> &mut Self::Buf<E>;
    /// `n` zeros.
    fn zeros(&self, n: usize) -> crate::Result<Self::Owned>;
    /// `n` elements with no promised contents: a buffer one kernel writes in full before anything
    /// reads it (never one a kernel accumulates into with `+=`). A backend may skip
    /// the zeroing pass: CUDA does (no memset; the emulated device fills every byte with 0xFF, so
    /// an unwritten element shows as NaN); the CPU zeroes, since Rust reads only initialized memory.
    fn unfilled(&self, n: usize) -> crate::Result<Self::Owned> {
        self.zeros(n)
    }
    /// A copy of a host slice (a method: the device does the allocating).
    #[allow(clippy::wrong_self_convention)]
    fn from_host(&self, host: &[E]) -> crate::Result<Self::Owned>;
    /// A host copy (synchronizes a device).
    fn to_host(&self, o: &Self::Owned) -> crate::Result<Vec<E>>;
    /// Replaces the contents of `o` with a host slice: in place where the lengths agree and the
    /// backend can (the CPU: no second buffer while it is done), else by a fresh copy.
    fn copy_from_host(&self, o: &mut Self::Owned, host: &[E]) -> crate::Result<()> {
        *o = self.from_host(host)?;
        Ok(())
    }
}

impl<E: Elem> Alloc<E> for Cpu {
    type Owned = Vec<E>;
    fn buf(o: &Vec<E>) -> &[E] {
        o
    }
    fn buf_mut(o: &mut Vec<E>) -> &mut [E] {
        o
    }
    /// Large buffers are zeroed by all rayon threads: an op's output or gradient buffer is
    /// written over megabytes, and one core's stores alone take a tenth of the product that
    /// fills it. (`vec![0; n]`'s calloc is free only for pages fresh from the kernel, which a
    /// heap tuned by [`crate::heap::keep_freed_memory`] no longer hands out step after step;
    /// above its mmap threshold they still are, and calloc is left to do it.)
    fn zeros(&self, n: usize) -> crate::Result<Vec<E>> {
        use rayon::prelude::*;
        const PAR_MIN: usize = 1 << 18;
        const CHUNK: usize = 1 << 16;
        let bytes = n.saturating_mul(std::mem::size_of::<E>());
        if n < PAR_MIN || bytes > crate::heap::MMAP_THRESHOLD || rayon::current_num_threads() < 2 {
            return Ok(vec![E::default(); n]);
        }
        let mut v = Vec::with_capacity(n);
        v.spare_capacity_mut()[..n].par_chunks_mut(CHUNK).for_each(|c| {
            for x in c {
                x.write(E::default());
            }
        });
        // SAFETY: the first n elements of the capacity were written just above.
        unsafe { v.set_len(n) };
        Ok(v)
    }
    fn from_host(&self, host: &[E]) -> crate::Result<Vec<E>> {
        Ok(host.to_vec())
    }
    fn to_host(&self, o: &Vec<E>) -> crate::Result<Vec<E>> {
        Ok(o.clone())
    }
    fn copy_from_host(&self, o: &mut Vec<E>, host: &[E]) -> crate::Result<()> {
        if o.len() == host.len() {
            o.copy_from_slice(host);
        } else {
            *o = host.to_vec();
        }
        Ok(())
    }
}
