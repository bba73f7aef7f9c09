//! Matrix multiply `C = alpha * op(A) op(B) (+ C)`, row-major, forward and backward. CPU through
//! the `gemm` crate, CUDA through cuBLAS (`cublasGemmEx`, bf16 or f32 in, fp32 accumulate).
//!
//! `op(A)` is `[m, k]`: A is stored `[m, k]`, or `[k, m]` when `trans_a`. `op(B)` is `[k, n]`: B is
//! stored `[k, n]`, or `[n, k]` when `trans_b` (a Hugging Face `nn.Linear` weight `[out, in]` is
//! `trans_b`; GPT-2's Conv1D `[in, out]` is not). The backward computes only the gradients asked
//! for, so a frozen weight costs no `dW` product.
//!
//! [`MatmulKernel::matmul_epilogue_fwd`] is the forward with a fused epilogue, `act(op(A) op(B) +
//! bias)` (act none or GELU-tanh, the pre-activation kept when asked): CPU the GEMM and one pass;
//! CUDA cuBLASLt's bias / GELU-aux-bias epilogues, falling back to `cublasGemmEx` and the bias and
//! GELU kernels ([`last_epilogue_path`]). Each CUDA device checks both against a host reference
//! before its first product ([`self_check`]).

mod cpu;
mod cuda;
pub mod self_check;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_check;
#[cfg(test)]
mod tests_epilogue;

pub use cuda::{force_epilogue_fallback, last_epilogue_path, EpiloguePath};

/// Benchmark hook: the CPU fused forward's epilogue alone, over a product already in `y`
/// (`[rows, n]`): bias, `aux` (the pre-activation) when given, activation.
#[doc(hidden)]
pub mod bench {
    pub fn cpu_epilogue_f32(
        n: usize,
        act: super::Activation,
        bias: Option<&[f32]>,
        y: &mut [f32],
        aux: Option<&mut [f32]>,
    ) {
        super::cpu::epilogue(n, act, bias, y, aux)
    }
}

use crate::backend::{Backend, Elem};
use crate::error::{check_len, Error, Result};

/// Shape and mode of one product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulParams {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    /// Forward adds into `C` instead of overwriting it.
    pub accumulate: bool,
}

impl MatmulParams {
    /// `C[m,n] = A[m,k] B[k,n]`.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        MatmulParams { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, accumulate: false }
    }
    /// `y[m,n] = x[m,k] W^T` for a weight stored `[n, k]` (an `nn.Linear`).
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        MatmulParams { trans_b: true, ..Self::new(m, n, k) }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// A logical `[rows, cols]` operand: stored row-major `[rows, cols]`, or `[cols, rows]` when
/// `transposed`. Both backends express every product of forward and backward with these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct View {
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl View {
    pub fn t(self) -> View {
        View { rows: self.cols, cols: self.rows, transposed: !self.transposed }
    }
    /// (row stride, column stride) in elements.
    pub fn strides(self) -> (isize, isize) {
        if self.transposed {
            (1, self.rows as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// Which operands feed a product `dst[M,N] (+)= alpha * x[M,K] y[K,N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operand {
    A,
    B,
    DC,
}

/// One product of the backward, `dst (+)= alpha * x y`, in terms of views of A, B and dC;
/// `dst` is the gradient's own (contiguous) storage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product {
    pub x: (Operand, View),
    pub y: (Operand, View),
}

impl MatmulParams {
    pub(crate) fn view_a(&self) -> View {
        View { rows: self.m, cols: self.k, transposed: self.trans_a }
    }
    pub(crate) fn view_b(&self) -> View {
        View { rows: self.k, cols: self.n, transposed: self.trans_b }
    }
    pub(crate) fn view_dc(&self) -> View {
        View { rows: self.m, cols: self.n, transposed: false }
    }
    /// dop(A) = dC op(B)^T, written into A's storage (transposed when `trans_a`).
    pub(crate) fn grad_a(&self) -> Product {
        if self.trans_a {
            // dA[k,m] = op(B) dC^T
            Product { x: (Operand::B, self.view_b()), y: (Operand::DC, self.view_dc().t()) }
        } else {
            Product { x: (Operand::DC, self.view_dc()), y: (Operand::B, self.view_b().t()) }
        }
    }
    /// dop(B) = op(A)^T dC, written into B's storage.
    pub(crate) fn grad_b(&self) -> Product {
        if self.trans_b {
            // dB[n,k] = dC^T op(A)
            Product { x: (Operand::DC, self.view_dc().t()), y: (Operand::A, self.view_a()) }
        } else {
            Product { x: (Operand::A, self.view_a().t()), y: (Operand::DC, self.view_dc()) }
        }
    }
}

/// Matmul on a device: forward and backward together.
pub trait MatmulKernel<E: Elem>: Backend {
    /// `c = alpha * op(a) op(b)`, or `c += ...` when `p.accumulate`.
    fn matmul_fwd(&self, p: &MatmulParams, a: &Self::Buf<E>, b: &Self::Buf<E>, c: &mut Self::Buf<E>) -> Result<()>;
    /// Accumulates `da += alpha * dop(A)` and `db += alpha * dop(B)` for the gradients given.
    /// `da` is an activation gradient (type E); `db` is a weight gradient (`E::Acc`: f32 for f32
    /// and bf16, f64 for f64). Either may be `None` (a frozen weight: no `dW` product is run);
    /// both `None` is a no-op after the length checks.
    ///
    /// Only the operands a requested gradient needs are required: `b` iff `da` is asked for, `a`
    /// iff `db` is (so a frozen weight's input need not be kept). A missing required operand is
    /// [`Error::Invalid`] naming it; an operand given but not needed is length-checked, then ignored.
    fn matmul_bwd(
        &self,
        p: &MatmulParams,
        a: Option<&Self::Buf<E>>,
        b: Option<&Self::Buf<E>>,
        dc: &Self::Buf<E>,
        da: Option<&mut Self::Buf<E>>,
        db: Option<&mut Self::Buf<E::Acc>>,
    ) -> Result<()>;

    /// `da = alpha * dop(A)` written over `da`, whatever it holds: [`MatmulKernel::matmul_bwd`]'s
    /// `da` product for a gradient that has no value yet, without zeroing it first or reading it
    /// (cuBLAS beta 0). On the CPU and the emulated device the same bits as `matmul_bwd` into
    /// zeros, but for the sign of an exact zero (`0 + x` is `+0` where `x` is `-0`); on a GPU
    /// cuBLAS may pick another algorithm for beta 0 than for beta 1, so there the same product
    /// within its rounding.
    fn matmul_bwd_a_overwrite(
        &self,
        p: &MatmulParams,
        b: &Self::Buf<E>,
        dc: &Self::Buf<E>,
        da: &mut Self::Buf<E>,
    ) -> Result<()>;

    /// The product with a fused epilogue: `y = act(alpha * op(a) op(b) + bias)`, the bias (`[n]`)
    /// added to every row, and `aux = alpha * op(a) op(b) + bias` (the pre-activation, which the
    /// backward reads) when `aux` is given. `p.accumulate` must be false; `aux` needs an activation.
    ///
    /// CPU: the GEMM, then one parallel pass over the output in blocks adding the bias and applying
    /// the activation (the same bits as `matmul_fwd`, `add_bias_inplace` and `gelu_fwd` in turn).
    /// CUDA: `cublasLtMatmul` with a bias / GELU-aux-bias epilogue where cuBLASLt takes the call,
    /// else (for the rest of the process after any cuBLASLt error, and on a device whose check
    /// found the fused path wrong or could not run it) `cublasGemmEx` and the bias and GELU
    /// kernels; [`last_epilogue_path`] says which ran. The emulated device computes
    /// the epilogue on the f32 accumulator and rounds once to `E`, as cuBLASLt does.
    #[allow(clippy::too_many_arguments)]
    fn matmul_epilogue_fwd(
        &self,
        p: &MatmulParams,
        act: Activation,
        a: &Self::Buf<E>,
        b: &Self::Buf<E>,
        bias: Option<&Self::Buf<E>>,
        y: &mut Self::Buf<E>,
        aux: Option<&mut Self::Buf<E>>,
    ) -> Result<()>;
}

/// The fused forward's checks, shared by both devices: the product's buffers, `bias` (`[n]`) and
/// `aux` (`[m, n]`) by name, no accumulation, and `aux` only with an activation.
pub(crate) fn check_epilogue(
    p: &MatmulParams,
    act: Activation,
    a: usize,
    b: usize,
    bias: Option<usize>,
    y: usize,
    aux: Option<usize>,
) -> Result<()> {
    let (mn, n) = (p.m * p.n, p.n);
    check_lens(
        p,
        [("a", Some(a), p.m * p.k), ("b", Some(b), p.k * p.n), ("y", Some(y), mn), ("bias", bias, n), ("aux", aux, mn)],
    )?;
    if p.accumulate {
        return Err(Error::Invalid {
            op: "matmul",
            msg: "the fused epilogue overwrites y: accumulate must be false".into(),
        });
    }
    if aux.is_some() && act == Activation::None {
        return Err(Error::Invalid { op: "matmul", msg: "aux is the pre-activation: it needs an activation".into() });
    }
    Ok(())
}

/// The activation a fused product applies after its bias ([`MatmulKernel::matmul_epilogue_fwd`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None: `y = op(a) op(b) + bias`.
    None,
    /// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2's
    /// `gelu_new`; what cuBLASLt's GELU epilogue computes). BERT's erf GELU has no epilogue.
    GeluTanh,
}

pub(crate) fn check(p: &MatmulParams, a: usize, b: usize, c: usize) -> Result<()> {
    check_lens(p, [("a", Some(a), p.m * p.k), ("b", Some(b), p.k * p.n), ("c", Some(c), p.m * p.n)])
}

/// The backward's checks, shared by both devices, all before any product runs: parameters, the
/// length of every buffer given, and that each requested gradient has the operand it needs (`b`
/// for `da`, `a` for `db`).
pub(crate) fn check_bwd(
    p: &MatmulParams,
    a: Option<usize>,
    b: Option<usize>,
    dc: usize,
    da: Option<usize>,
    db: Option<usize>,
) -> Result<()> {
    let (mk, kn) = (p.m * p.k, p.k * p.n);
    check_lens(p, [("a", a, mk), ("b", b, kn), ("dc", Some(dc), p.m * p.n), ("da", da, mk), ("db", db, kn)])?;
    if da.is_some() && b.is_none() {
        return Err(missing("b", "da"));
    }
    if db.is_some() && a.is_none() {
        return Err(missing("a", "db"));
    }
    Ok(())
}

/// Non-empty product, and `(name, length if given, expected)` for each buffer.
fn check_lens<const N: usize>(p: &MatmulParams, bufs: [(&'static str, Option<usize>, usize); N]) -> Result<()> {
    if p.m == 0 || p.n == 0 || p.k == 0 {
        return Err(Error::Invalid { op: "matmul", msg: format!("empty product m={} n={} k={}", p.m, p.n, p.k) });
    }
    let d = || format!("m={} n={} k={} trans_a={} trans_b={}", p.m, p.n, p.k, p.trans_a, p.trans_b);
    for (name, len, want) in bufs {
        if let Some(len) = len {
            check_len("matmul", name, len, want, d)?;
        }
    }
    Ok(())
}

fn missing(operand: &str, grad: &str) -> Error {
    Error::Invalid {
        op: "matmul",
        msg: format!("operand `{operand}` is required to compute `{grad}` but was not given"),
    }
}

/// The buffer behind `o` in a backward product; a missing operand is the error [`check_bwd`]
/// reports (it has already been checked, so this is only the non-panicking fallback).
pub(crate) fn pick<'a, T: ?Sized>(o: Operand, a: Option<&'a T>, b: Option<&'a T>, dc: &'a T) -> Result<&'a T> {
    match o {
        Operand::A => a.ok_or_else(|| missing("a", "db")),
        Operand::B => b.ok_or_else(|| missing("b", "da")),
        Operand::DC => Ok(dc),
    }
}
