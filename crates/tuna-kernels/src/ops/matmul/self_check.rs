//! The products checked on the device that runs them, once per device, before the first product.
//!
//! On the emulated device the cuBLAS calls (`cublasGemmEx`; `cublasLtMatmul` with its bias / GELU
//! epilogues) are replaced by a host computation of what this crate takes their semantics to be:
//! column-major operands, the leading dimensions and transposes `gemm_ex` and `lt_epilogue` pass,
//! the bias along D's rows, the pre-activation in `aux`. A misreading of those semantics would be
//! reproduced by the emulator, pass every test, and give wrong products on hardware. So the first
//! product on a device first runs small fixed products there (37 x 24 x 40: no two sizes alike,
//! so a swapped dimension or leading dimension shows; 24 and 40 multiples of 8, as cuBLASLt's
//! epilogues want their leading dimensions) and compares them with a host reference in f64 on
//! the same values:
//! - `cublasGemmEx`: f32 and bf16 operands, every transpose combination, alpha 0.5 accumulating
//!   into an existing output, and bf16 operands into an f32 output (the weight gradients' form);
//! - the fused path, in f32 and bf16, with weights `[out, in]` (`nn.Linear`) and `[in, out]`
//!   (GPT-2's Conv1D, which `linear+gelu` takes): bias, bias + GELU, bias + GELU keeping the
//!   pre-activation.
//!
//! A disagreement of `cublasGemmEx` refuses every product on the device (nothing else computes
//! them there); one of the fused path sends fused products to the unfused one (`cublasGemmEx`,
//! then the bias and GELU kernels), with a warning naming the case, the value and both numbers;
//! so does a fused path that did not run every case (cuBLASLt refused or failed one): only what
//! the check ran takes the device's calls. Tolerances: f32 outputs 2e-4 + 2e-3 relative
//! (summation order; TF32 when it is on: 2e-2), GELU outputs in f32 2e-3 + 1e-2 relative
//! (cuBLASLt's GELU instructions are not documented: a `tanh.approx` is good to ~2^-11), bf16
//! outputs 2e-2 + 2e-2 relative (bf16's rounding of the result, 2^-9 relative): a misread layout
//! moves values by their own size.

use super::{Activation, MatmulParams, View};
use crate::cuda::{CudaBuf, CudaElem};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use crate::Cuda;
use half::bf16;
use std::cell::Cell;

/// What the check found on a device.
#[derive(Debug, Clone, PartialEq)]
pub enum ProductVerdict {
    /// Every product agrees with the reference (`cases` of them); `fused`: whether the fused path
    /// ran every fused case (cuBLASLt may refuse or fail a call; where it did, the device's fused
    /// products take the unfused path, whose `cublasGemmEx` the check covers).
    Agrees { cases: usize, fused: bool },
    /// `cublasGemmEx` agrees, the fused path does not (`why`): fused products take the unfused path.
    Unfused { why: String },
    /// `cublasGemmEx` disagrees (`why`): products are refused on this device.
    Refused { why: String },
}

impl ProductVerdict {
    /// One line for `tuna info` and the warning.
    pub fn describe(&self) -> String {
        match self {
            ProductVerdict::Agrees { cases, fused: true } => {
                format!("cublasGemmEx and the fused cuBLASLt epilogues checked against the host on this device ({cases} cases): agree")
            }
            ProductVerdict::Agrees { cases, fused: false } => format!(
                "cublasGemmEx checked against the host on this device ({cases} cases): agrees; cuBLASLt did not run \
                 every fused case, so fused products take cublasGemmEx and the bias/GELU kernels"
            ),
            ProductVerdict::Unfused { why } => format!(
                "the fused cuBLASLt products disagree with the host on this device ({why}); fused products take \
                 cublasGemmEx and the bias/GELU kernels instead"
            ),
            ProductVerdict::Refused { why } => format!(
                "cublasGemmEx disagrees with the host on this device ({why}); matrix products are refused here (the \
                 CPU device runs them)"
            ),
        }
    }
}

/// A deliberate error injected into the check's device results (tests only).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductFault {
    None,
    /// The fused path's results get one value moved by 1.
    Fused,
    /// `cublasGemmEx`'s too.
    Gemm,
}

thread_local! {
    static FAULT: Cell<ProductFault> = const { Cell::new(ProductFault::None) };
}

/// Inject `f` into the checks this thread runs from now on (tests only).
#[doc(hidden)]
pub fn inject_product_fault(f: ProductFault) {
    FAULT.with(|c| c.set(f));
}

impl Cuda {
    /// The products' check on this device ([`ProductVerdict`]), run now if it has not run (the
    /// first product on the device runs it). A device error while checking is returned, and the
    /// check runs again at the next product.
    pub fn product_check(&self) -> Result<&ProductVerdict> {
        self.product_check_state().get_or_run(|| {
            let verdict = run_check(self)?;
            if !matches!(verdict, ProductVerdict::Agrees { fused: true, .. }) {
                eprintln!("warning: CUDA device {} ({}): {}", self.ordinal(), self.name(), verdict.describe());
            }
            Ok(verdict)
        })
    }

    /// The verdict, the check run first if it has not run; an error where it refused products.
    pub(super) fn checked_products(&self) -> Result<&ProductVerdict> {
        match self.product_check()? {
            ProductVerdict::Refused { why } => Err(Error::Unsupported {
                op: "matmul",
                device: crate::backend::Backend::device_name(self),
                msg: format!(
                    "the device's product check failed: {why}; products cannot run here (the CPU device runs them)"
                ),
            }),
            v => Ok(v),
        }
    }
}

const M: usize = 37;
const N: usize = 24;
const K: usize = 40;

/// `n` values in [-1, 1], as `E` and as the f64 the reference reads (the same values).
fn values<E: CudaElem>(rng: &mut SplitMix64, n: usize) -> (Vec<E>, Vec<f64>) {
    let e: Vec<E> = (0..n).map(|_| E::from_f32((2.0 * rng.next_f64() - 1.0) as f32)).collect();
    let f = e.iter().map(|v| v.to_f32() as f64).collect();
    (e, f)
}

/// Element `(r, c)` of a logical view of `s`.
fn at(s: &[f64], v: View, r: usize, c: usize) -> f64 {
    if v.transposed {
        s[c * v.rows + r]
    } else {
        s[r * v.cols + c]
    }
}

/// `x y` in f64, row-major `[x.rows, y.cols]`.
fn reference(x: (&[f64], View), y: (&[f64], View)) -> Vec<f64> {
    let (m, n, k) = (x.1.rows, y.1.cols, x.1.cols);
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|l| at(x.0, x.1, i, l) * at(y.0, y.1, l, j)).sum();
        }
    }
    out
}

/// The tolerance `(atol, rtol)` of an output of type `D` from operands of type `X`.
fn tol<X: CudaElem, D: CudaElem>(dev: &Cuda) -> (f64, f64) {
    if D::NAME == "bf16" || (X::NAME == "f32" && dev.tf32()) {
        (2e-2, 2e-2)
    } else {
        (2e-4, 2e-3)
    }
}

/// The first value of `got` outside `tol` of `want`, described (a NaN counts as outside).
fn compare(case: &str, got: &[f64], want: &[f64], (atol, rtol): (f64, f64)) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{case}: {} values, the reference's {}", got.len(), want.len()));
    }
    let close = |g: f64, w: f64| (g - w).abs() <= atol + rtol * w.abs();
    let i = got.iter().zip(want).position(|(&g, &w)| !close(g, w))?;
    Some(format!("{case}: [{i}] = {}, the reference's {}, allowed {atol} + {rtol} * |{}|", got[i], want[i], want[i]))
}

/// A buffer's values as f64, with the injected fault applied when `fault`.
fn download<E: CudaElem>(dev: &Cuda, b: &CudaBuf<E>, fault: bool) -> Result<Vec<f64>> {
    let mut v: Vec<f64> = dev.download(b)?.into_iter().map(|x| x.to_f32() as f64).collect();
    if fault {
        v[5] += 1.0;
    }
    Ok(v)
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + (super::super::gelu::SQRT_2_OVER_PI * (x + super::super::gelu::GELU_C * x * x * x)).tanh())
}

/// `cublasGemmEx` with operands `X` into `D`: every transpose combination, then alpha 0.5
/// accumulating into an existing output. Returns the cases run and the first disagreement.
fn gemm_cases<X: CudaElem, D: CudaElem>(
    dev: &Cuda,
    rng: &mut SplitMix64,
    fault: bool,
) -> Result<(usize, Option<String>)> {
    let mut n_cases = 0;
    for (ta, tb, alpha, acc) in [
        (false, false, 1.0, false),
        (false, true, 1.0, false),
        (true, false, 1.0, false),
        (true, true, 1.0, false),
        (false, true, 0.5, true),
    ] {
        let p = MatmulParams { trans_a: ta, trans_b: tb, alpha, accumulate: acc, ..MatmulParams::new(M, N, K) };
        let ((a, af), (b, bf)) = (values::<X>(rng, M * K), values::<X>(rng, K * N));
        let (c0, c0f) = values::<D>(rng, M * N);
        let (da, db) = (dev.upload(&a)?, dev.upload(&b)?);
        let mut dc = dev.upload(&c0)?;
        dev.gemm_ex(&mut dc, (&da, p.view_a()), (&db, p.view_b()), alpha, acc)?;
        let got = download(dev, &dc, fault)?;
        let mut want = reference((&af, p.view_a()), (&bf, p.view_b()));
        for (w, c) in want.iter_mut().zip(&c0f) {
            *w = alpha as f64 * *w + if acc { *c } else { 0.0 };
        }
        n_cases += 1;
        let case = format!(
            "cublasGemmEx {}x{}x{} {} into {}, A{} B{}, alpha {alpha}{}",
            M,
            N,
            K,
            X::NAME,
            D::NAME,
            if ta { "^T" } else { "" },
            if tb { "^T" } else { "" },
            if acc { ", accumulating" } else { "" }
        );
        if let Some(why) = compare(&case, &got, &want, tol::<X, D>(dev)) {
            return Ok((n_cases, Some(why)));
        }
    }
    Ok((n_cases, None))
}

/// The fused path in `E` as `linear` calls it: bias, bias + GELU keeping the pre-activation, GELU
/// alone. Returns the cases run, whether the fused path ran them all, and the first disagreement.
fn fused_cases<E: CudaElem>(dev: &Cuda, rng: &mut SplitMix64, fault: bool) -> Result<(usize, bool, Option<String>)> {
    let (mut n_cases, mut all_ran) = (0, true);
    for (trans_b, act, with_bias, with_aux) in [true, false].into_iter().flat_map(|t| {
        [
            (t, Activation::None, true, false),
            (t, Activation::GeluTanh, true, false),
            (t, Activation::GeluTanh, true, true),
        ]
    }) {
        let p = MatmulParams { trans_b, ..MatmulParams::new(M, N, K) };
        let ((a, af), (b, bf), (bias, biasf)) = (values::<E>(rng, M * K), values::<E>(rng, N * K), values::<E>(rng, N));
        let (da, db, dbias) = (dev.upload(&a)?, dev.upload(&b)?, dev.upload(&bias)?);
        let mut y = dev.unfilled::<E>(M * N)?;
        let mut aux = if with_aux { Some(dev.unfilled::<E>(M * N)?) } else { None };
        let bias_arg = with_bias.then_some(&dbias);
        if !dev.fused_for_check(&p, act, &da, &db, bias_arg, &mut y, aux.as_mut())? {
            all_ran = false;
            continue;
        }
        let pre: Vec<f64> = reference((&af, p.view_a()), (&bf, p.view_b()))
            .iter()
            .enumerate()
            .map(|(i, v)| v + if with_bias { biasf[i % N] } else { 0.0 })
            .collect();
        let want: Vec<f64> = match act {
            Activation::None => pre.clone(),
            Activation::GeluTanh => pre.iter().map(|&x| gelu_tanh(x)).collect(),
        };
        n_cases += 1;
        let case = format!(
            "fused {}x{}x{} {} ({}){}{}",
            M,
            N,
            K,
            E::NAME,
            if trans_b { "x W^T, W [out, in]" } else { "x W, W [in, out]" },
            if with_bias { " + bias" } else { "" },
            match (act, with_aux) {
                (Activation::GeluTanh, true) => ", GELU, pre-activation kept",
                (Activation::GeluTanh, false) => ", GELU",
                _ => "",
            }
        );
        let t = tol::<E, E>(dev);
        // cuBLASLt's GELU may use an approximate tanh (good to ~2^-11 relative).
        let ty = if act == Activation::GeluTanh { (t.0.max(2e-3), t.1.max(1e-2)) } else { t };
        if let Some(why) = compare(&format!("{case}: y"), &download(dev, &y, fault)?, &want, ty) {
            return Ok((n_cases, all_ran, Some(why)));
        }
        if let Some(aux) = &aux {
            if let Some(why) = compare(&format!("{case}: aux"), &download(dev, aux, false)?, &pre, t) {
                return Ok((n_cases, all_ran, Some(why)));
            }
        }
    }
    Ok((n_cases, all_ran, None))
}

/// The check itself.
fn run_check(dev: &Cuda) -> Result<ProductVerdict> {
    let fault = FAULT.with(|c| c.get());
    let mut rng = SplitMix64::new(0x9E3D_C4EC);
    let mut cases = 0;
    for r in [
        gemm_cases::<f32, f32>(dev, &mut rng, fault == ProductFault::Gemm)?,
        gemm_cases::<bf16, bf16>(dev, &mut rng, fault == ProductFault::Gemm)?,
        gemm_cases::<bf16, f32>(dev, &mut rng, fault == ProductFault::Gemm)?,
    ] {
        cases += r.0;
        if let Some(why) = r.1 {
            return Ok(ProductVerdict::Refused { why });
        }
    }
    let mut fused = true;
    for r in [
        fused_cases::<f32>(dev, &mut rng, fault == ProductFault::Fused)?,
        fused_cases::<bf16>(dev, &mut rng, fault == ProductFault::Fused)?,
    ] {
        cases += r.0;
        fused &= r.1;
        if let Some(why) = r.2 {
            return Ok(ProductVerdict::Unfused { why });
        }
    }
    Ok(ProductVerdict::Agrees { cases, fused })
}
