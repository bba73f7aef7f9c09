//! Gradient checks: central differences in f64 on the CPU against the tape's gradients.

use crate::error::{Error, Result};
use crate::graph::no_grad;
use crate::tensor::Tensor;
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;

/// The tolerance gradient checks use by default: central differences with `h = 1e-5` in f64 have
/// truncation error ~h^2 * f''' and rounding error ~eps * |L| / h, both near 1e-9 for O(1) losses.
pub const GRAD_TOL: Tol = Tol::new("grad-check f64 central differences", 1e-6, 1e-5);

/// What a check compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Elements compared, over all parameters.
    pub checked: usize,
    /// The largest `|analytic - numeric|` seen.
    pub max_abs_err: f64,
}

/// Compare the gradient of `loss()` with respect to each of `params` with central differences.
///
/// At most `max_per_param` elements of each parameter are perturbed (spread evenly over the
/// tensor), so large tensors stay cheap. `loss` must rebuild the graph each call. Errors name the
/// parameter and element that disagree.
pub fn check<F>(params: &[&Tensor<Cpu, f64>], loss: F, h: f64, tol: Tol, max_per_param: usize) -> Result<Report>
where
    F: Fn() -> Result<Tensor<Cpu, f64>>,
{
    for p in params {
        p.zero_grad();
    }
    loss()?.backward()?;
    let mut report = Report { checked: 0, max_abs_err: 0.0 };
    for (pi, p) in params.iter().enumerate() {
        let name = p.name().map(str::to_owned).unwrap_or_else(|| format!("param #{pi}"));
        let analytic = p.grad()?.unwrap_or_else(|| vec![0.0; p.numel()]);
        let n = p.numel();
        let step = n.div_ceil(max_per_param.max(1)).max(1);
        for i in (0..n).step_by(step) {
            let orig = p.data()[i];
            p.data_mut()[i] = orig + h;
            let lp = no_grad(&loss)?.to_vec()?[0];
            p.data_mut()[i] = orig - h;
            let lm = no_grad(&loss)?.to_vec()?[0];
            p.data_mut()[i] = orig;
            let numeric = (lp - lm) / (2.0 * h);
            let err = (analytic[i] - numeric).abs();
            report.checked += 1;
            report.max_abs_err = report.max_abs_err.max(err);
            if err.is_nan() || err > tol.atol + tol.rtol * numeric.abs() {
                return Err(Error::Backward(format!(
                    "gradient check failed for `{name}`[{i}]: analytic {:.9e}, central difference {numeric:.9e} \
                     (err {err:.2e}, tolerance {} atol {:e} rtol {:e})",
                    analytic[i], tol.name, tol.atol, tol.rtol
                )));
            }
        }
    }
    Ok(report)
}
