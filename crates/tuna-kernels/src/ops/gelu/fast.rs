//! The f32 GELU on the CPU: an AVX2+FMA path (8 lanes, chosen at run time) and a portable scalar
//! path that computes the same formulas one element at a time (the fallback, and the tail of a
//! chunk that does not fill a vector). f64 does not come here: it keeps the generic libm code in
//! `cpu.rs` (it is the gradient-check type).
//!
//! The formulas (the same in both paths):
//!
//! - **Tanh**: `0.5 x (1 + tanh(u)) = x * sigmoid(2u)` with `2u = x (K0 + K1 x^2)`,
//!   `K0 = 2 sqrt(2/pi)`, `K1 = K0 * 0.044715`. Written with `e = exp(-2u)` and `s = 1 / (1 + e)`:
//!   `y = x s`, and `gelu'(x) = s + x s (1 - s) d(2u)/dx = s (1 + x (e s) d(2u)/dx)`. One exp and
//!   one division per element; no `1 + tanh` cancellation for negative `x` (the sigmoid form keeps
//!   relative accuracy there). The backward recomputes `e` and `s` from `x` (nothing but `x` is
//!   saved), as the forward does.
//! - **Erf**: `x Phi(x)`, `Phi(x) = 0.5 erfc(-x / sqrt 2)`. With `t = |x| / sqrt 2`,
//!   `erfc(t) = exp(-t^2) R(w)`, `R` a degree-10 polynomial in `w = 1 / (1 + 0.4 t)` fitting
//!   `erfcx(t) = exp(t^2) erfc(t)` on `[0, 9.5]`; then `Phi = 1 - 0.5 erfc(t)` for `x > 0` and
//!   `0.5 erfc(t)` otherwise (relative accuracy in the left tail, no `1 + erf` cancellation). The
//!   gradient `Phi(x) + x exp(-x^2/2) / sqrt(2 pi)` reuses the same `exp(-t^2)`. One exp and one
//!   division per element, as Tanh. The coefficients are a Chebyshev interpolant (near-minimax)
//!   computed in f64 by `scripts/fit_gelu_erf.py` (written for tuna), truncated and written in the
//!   mapped variable `v` in `[-1, 1]`; its own relative error in f64 is 3.3e-9, below f32 rounding.
//! - **exp**: Cephes' `expf` scheme (S. L. Moshier, Cephes Math Library): `2^n e^r` with
//!   `n = round(a / ln 2)`, `r = a - n ln 2` in two parts (`0.693359375`, `-2.12194440e-4`), and
//!   Cephes' degree-6 polynomial for `e^r` (the coefficients also in `backend.rs`'s `exp_f32`).
//!   The scalar path rounds `n` by adding and taking away `1.5 * 2^23` (no libm call, so the
//!   compiler vectorizes it for the baseline x86-64 SSE2 too); the AVX2 path with `vroundps`.
//! - **Relu**: `max(x, 0)`, gradient `x > 0`.
//!
//! Special values, both paths and both directions: NaN passes through (NaN in, NaN out; the
//! backward adds `dy * NaN`); `gelu(+inf) = +inf`, `gelu(-inf) = 0`, gradients 1 and 0. Past
//! `|2u| > 80` (Tanh) or `t^2 = x^2/2 > 87` (Erf) the result is the limit (`x` or 0; gradient 1 or 0),
//! which is what f32 rounds the exact value to there, up to an absolute 1e-30.
//!
//! Measured error (tests `scalar_path_within_stated_error` and
//! `avx2_path_within_stated_error_and_matches_scalar`: every 8th f32 of `[-12, 12]` above 1e-3 in
//! magnitude, and a grid below, against the f64 formulas), as `|got - exact| / max(1, |x|)`:
//!
//! | | Tanh fwd | Tanh grad | Erf fwd | Erf grad |
//! |---|---:|---:|---:|---:|
//! | AVX2 | 1.5e-7 | 2.4e-7 | 1.3e-7 | 2.8e-7 |
//! | scalar | 1.5e-7 | 2.4e-7 | 1.5e-7 | 3.4e-7 |
//!
//! The tests' bounds: 2e-7 forward, 3.5e-7 gradient. The Erf gradient's worst case is near
//! `x = 0`, where `R` is summed at the end of its interval (a few ulps of `0.5`); a separate
//! `erf(z)/z` polynomial there gave 1.5e-7 but cost about a tenth more time. Relu is exact. The
//! two paths differ from each other by a few ulps (FMA contractions).

use super::GeluKind;

/// `2 sqrt(2/pi)`.
const K0: f32 = (2.0 * super::SQRT_2_OVER_PI) as f32;
/// `2 sqrt(2/pi) * 0.044715`.
const K1: f32 = (2.0 * super::SQRT_2_OVER_PI * super::GELU_C) as f32;
/// `3 K1`: `d(2u)/dx = K0 + 3 K1 x^2`.
const K1X3: f32 = (6.0 * super::SQRT_2_OVER_PI * super::GELU_C) as f32;
/// Past `|2u| > TANH_BIG` the Tanh GELU is its limit.
const TANH_BIG: f32 = 80.0;
/// Past `x^2 / 2 > ERF_BIG` the Erf GELU is its limit (`exp(-87)` is near f32's smallest normal).
const ERF_BIG: f32 = 87.0;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const FRAC_1_SQRT_2PI: f32 = super::FRAC_1_SQRT_2PI as f32;
/// `w = 1 / (1 + W_X |x|)`: `0.4 t` with `t = |x| / sqrt 2`.
const W_X: f32 = 0.4 * FRAC_1_SQRT_2;
/// `erfcx(t) = R(v)`, `v = w * R_SCALE + R_SHIFT` (`w` in `[1/4.8, 1]` to `v` in `[-1, 1]`),
/// lowest degree first.
const R_SCALE: f32 = 2.526_315_8;
const R_SHIFT: f32 = -1.526_315_8;
const R: [f32; 11] = [
    3.003_837e-1,
    3.913_782e-1,
    2.134_257_1e-1,
    7.914_118_5e-2,
    1.654_488_6e-2,
    1.078_313_5e-5,
    -8.759_080_4e-4,
    -6.633_431e-5,
    5.786_861e-5,
    3.828_918e-6,
    -3.904_451_7e-6,
];

/// Cephes `expf`'s polynomial for `e^r` on `[-ln2/2, ln2/2]`, highest degree first: `e^r = 1 + r + r^2 p(r)`.
const EXP_P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

// ---------------------------------------------------------------------------------------------
// Scalar path

/// `exp(a)` for `a` in `[-87, 88]` (clamped), the scalar twin of [`avx2::exp`].
#[inline(always)]
fn exp(a: f32) -> f32 {
    let a = a.clamp(-87.0, 88.0);
    // round to nearest by adding and taking away 1.5 * 2^23 (no libm call: this vectorizes)
    let n = (a * std::f32::consts::LOG2_E + 12_582_912.0) - 12_582_912.0;
    let r = a - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    e * f32::from_bits((((n as i32) + 127) << 23) as u32)
}

#[inline(always)]
fn horner(cs: &[f32], v: f32) -> f32 {
    let mut p = cs[cs.len() - 1];
    for &c in cs[..cs.len() - 1].iter().rev() {
        p = p * v + c;
    }
    p
}

/// Tanh GELU: `(y, gelu'(x))`, the limits past `TANH_BIG`, NaN through.
#[inline(always)]
fn tanh_parts(x: f32) -> (f32, f32) {
    let x2 = x * x;
    let z = x * (K0 + K1 * x2);
    let dz = K0 + K1X3 * x2;
    let e = exp(-z.clamp(-TANH_BIG, TANH_BIG));
    let s = 1.0 / (1.0 + e);
    let (y, g) = (x * s, s * (1.0 + (x * dz) * (e * s)));
    // Past the cut-off GELU is ReLU, whose NaN also passes through.
    if z.abs() > TANH_BIG || x.is_nan() {
        relu_parts(x)
    } else {
        (y, g)
    }
}

/// Erf GELU: `(y, gelu'(x))`, the limits past `ERF_BIG`, NaN through.
#[inline(always)]
fn erf_parts(x: f32) -> (f32, f32) {
    let u = 0.5 * x * x; // t^2
    let e = exp(-u.min(ERF_BIG));
    let w = 1.0 / (1.0 + W_X * x.abs());
    let hr = 0.5 * horner(&R, w * R_SCALE + R_SHIFT);
    let half_erfc = e * hr;
    let pos = x > 0.0;
    let phi = if pos { 1.0 - half_erfc } else { half_erfc };
    // gelu' = phi + x e c = [x > 0] + e (x c -+ R/2): the sum of small terms first
    let g = e * (x * FRAC_1_SQRT_2PI + if pos { -hr } else { hr }) + if pos { 1.0 } else { 0.0 };
    let (y, g) = (x * phi, g);
    if u > ERF_BIG || x.is_nan() {
        relu_parts(x)
    } else {
        (y, g)
    }
}

#[inline(always)]
fn relu_parts(x: f32) -> (f32, f32) {
    if x > 0.0 {
        (x, 1.0)
    } else if x.is_nan() {
        (x, x)
    } else {
        (0.0, 0.0)
    }
}

#[inline(always)]
fn parts(kind: GeluKind, x: f32) -> (f32, f32) {
    match kind {
        GeluKind::Tanh => tanh_parts(x),
        GeluKind::Erf => erf_parts(x),
        GeluKind::Relu => relu_parts(x),
    }
}

/// `y = gelu(x)`, one element at a time.
pub(crate) fn fwd_scalar(kind: GeluKind, x: &[f32], y: &mut [f32]) {
    match kind {
        GeluKind::Tanh => y.iter_mut().zip(x).for_each(|(y, &x)| *y = tanh_parts(x).0),
        GeluKind::Erf => y.iter_mut().zip(x).for_each(|(y, &x)| *y = erf_parts(x).0),
        GeluKind::Relu => y.iter_mut().zip(x).for_each(|(y, &x)| *y = relu_parts(x).0),
    }
}

/// `dx += dy * gelu'(x)`, one element at a time.
pub(crate) fn bwd_scalar(kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        *dx += dy * parts(kind, x).1;
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

/// Whether this CPU has AVX2 and FMA, asked once.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::atomic::{AtomicU8, Ordering};
    static HAS: AtomicU8 = AtomicU8::new(0); // 0: not asked yet, 1: no, 2: yes
    match HAS.load(Ordering::Relaxed) {
        0 => {
            let yes = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            HAS.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
            yes
        }
        v => v == 2,
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2_fma() -> bool {
    false
}

/// `y = gelu(x)` on the fastest path this CPU has (one thread; the caller splits the work).
pub(crate) fn fwd(kind: GeluKind, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::fwd(kind, x, y) };
    }
    fwd_scalar(kind, x, y)
}

/// `dx += dy * gelu'(x)` on the fastest path this CPU has.
pub(crate) fn bwd(kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::bwd(kind, x, dy, dx) };
    }
    bwd_scalar(kind, x, dy, dx)
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA path

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }

    /// Horner's rule, lowest degree first in `cs`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn horner(cs: &[f32], v: __m256) -> __m256 {
        let mut p = splat(cs[cs.len() - 1]);
        for &c in cs[..cs.len() - 1].iter().rev() {
            p = _mm256_fmadd_ps(p, v, splat(c));
        }
        p
    }

    /// `exp(a)` for `a` in `[-87, 88]`: the callers clamp (a NaN lane gives garbage: the callers
    /// put NaN back).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp(a: __m256) -> __m256 {
        let n = _mm256_round_ps(
            _mm256_mul_ps(a, splat(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(n, splat(LN2_LO), _mm256_fnmadd_ps(n, splat(LN2_HI), a));
        let mut p = splat(EXP_P[0]);
        for &c in &EXP_P[1..] {
            p = _mm256_fmadd_ps(p, r, splat(c));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), splat(1.0));
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(e, _mm256_castsi256_ps(pow2))
    }

    /// Lanes where `big` holds take the limit: `x` (forward) or 1 (gradient) where `x > 0`, else
    /// 0; NaN lanes of `x` take `x`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn limits(x: __m256, big: __m256, y: __m256, g: __m256) -> (__m256, __m256) {
        let pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
        let y = _mm256_blendv_ps(y, _mm256_and_ps(pos, x), big);
        let g = _mm256_blendv_ps(g, _mm256_and_ps(pos, splat(1.0)), big);
        let nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
        (_mm256_blendv_ps(y, x, nan), _mm256_blendv_ps(g, x, nan))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn abs(x: __m256) -> __m256 {
        _mm256_andnot_ps(splat(-0.0), x)
    }

    /// Tanh GELU on 8 lanes: `(y, gelu'(x))`; `GRAD = false` skips the gradient's arithmetic.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tanh_parts<const GRAD: bool>(x: __m256) -> (__m256, __m256) {
        let x2 = _mm256_mul_ps(x, x);
        let z = _mm256_mul_ps(x, _mm256_fmadd_ps(splat(K1), x2, splat(K0)));
        let big = _mm256_cmp_ps(abs(z), splat(TANH_BIG), _CMP_GT_OQ);
        let zc = _mm256_min_ps(_mm256_max_ps(z, splat(-TANH_BIG)), splat(TANH_BIG));
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), zc));
        let s = _mm256_div_ps(splat(1.0), _mm256_add_ps(splat(1.0), e));
        let y = _mm256_mul_ps(x, s);
        let g = if GRAD {
            let dz = _mm256_fmadd_ps(splat(K1X3), x2, splat(K0));
            _mm256_mul_ps(s, _mm256_fmadd_ps(_mm256_mul_ps(x, dz), _mm256_mul_ps(e, s), splat(1.0)))
        } else {
            y
        };
        limits(x, big, y, g)
    }

    /// Erf GELU on 8 lanes, as [`tanh_parts`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn erf_parts<const GRAD: bool>(x: __m256) -> (__m256, __m256) {
        let u = _mm256_mul_ps(_mm256_mul_ps(x, x), splat(0.5));
        let big = _mm256_cmp_ps(u, splat(ERF_BIG), _CMP_GT_OQ);
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_min_ps(u, splat(ERF_BIG))));
        let w = _mm256_div_ps(splat(1.0), _mm256_fmadd_ps(abs(x), splat(W_X), splat(1.0)));
        let r = horner(&R, _mm256_fmadd_ps(w, splat(R_SCALE), splat(R_SHIFT)));
        let hr = _mm256_mul_ps(r, splat(0.5));
        let half_erfc = _mm256_mul_ps(e, hr);
        let pos = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_GT_OQ);
        let phi = _mm256_blendv_ps(half_erfc, _mm256_sub_ps(splat(1.0), half_erfc), pos);
        let y = _mm256_mul_ps(x, phi);
        let g = if GRAD {
            // gelu' = phi + x e c = [x > 0] + e (x c -+ R/2): the sum of small terms first
            let signed_hr = _mm256_xor_ps(hr, _mm256_and_ps(pos, splat(-0.0)));
            let d = _mm256_fmadd_ps(x, splat(FRAC_1_SQRT_2PI), signed_hr);
            _mm256_fmadd_ps(e, d, _mm256_and_ps(pos, splat(1.0)))
        } else {
            y
        };
        limits(x, big, y, g)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn relu_parts(x: __m256) -> (__m256, __m256) {
        let zero = _mm256_setzero_ps();
        let pos = _mm256_cmp_ps(x, zero, _CMP_GT_OQ);
        limits(x, zero, _mm256_and_ps(pos, x), _mm256_and_ps(pos, splat(1.0)))
    }

    const TANH: u8 = GeluKind::Tanh as u8;
    const ERF: u8 = GeluKind::Erf as u8;

    /// `(y, gelu'(x))` on 8 lanes for the kind `K` (a constant: one loop per kind).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn lanes<const K: u8, const GRAD: bool>(x: __m256) -> (__m256, __m256) {
        match K {
            TANH => tanh_parts::<GRAD>(x),
            ERF => erf_parts::<GRAD>(x),
            _ => relu_parts(x),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn fwd_k<const K: u8>(x: &[f32], y: &mut [f32]) {
        assert_eq!(x.len(), y.len());
        let body = x.len() - x.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY (of the pointer offsets): i + 8 <= body <= both lengths.
            let v = _mm256_loadu_ps(x.as_ptr().add(i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), lanes::<K, false>(v).0);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn bwd_k<const K: u8>(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        assert!(x.len() == dy.len() && x.len() == dx.len());
        let body = x.len() - x.len() % 8;
        for i in (0..body).step_by(8) {
            // SAFETY (of the pointer offsets): i + 8 <= body <= every length.
            let g = lanes::<K, true>(_mm256_loadu_ps(x.as_ptr().add(i))).1;
            let d = _mm256_loadu_ps(dy.as_ptr().add(i));
            let acc = _mm256_loadu_ps(dx.as_ptr().add(i));
            _mm256_storeu_ps(dx.as_mut_ptr().add(i), _mm256_fmadd_ps(d, g, acc));
        }
    }

    /// `y = gelu(x)`: 8 lanes at a time, the tail (`len % 8`) by the scalar path. Equal lengths.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn fwd(kind: GeluKind, x: &[f32], y: &mut [f32]) {
        match kind {
            GeluKind::Tanh => fwd_k::<TANH>(x, y),
            GeluKind::Erf => fwd_k::<ERF>(x, y),
            GeluKind::Relu => fwd_k::<{ GeluKind::Relu as u8 }>(x, y),
        }
        let body = x.len() - x.len() % 8;
        fwd_scalar(kind, &x[body..], &mut y[body..]);
    }

    /// `dx += dy * gelu'(x)`: 8 lanes at a time, the tail by the scalar path. Equal lengths.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn bwd(kind: GeluKind, x: &[f32], dy: &[f32], dx: &mut [f32]) {
        match kind {
            GeluKind::Tanh => bwd_k::<TANH>(x, dy, dx),
            GeluKind::Erf => bwd_k::<ERF>(x, dy, dx),
            GeluKind::Relu => bwd_k::<{ GeluKind::Relu as u8 }>(x, dy, dx),
        }
        let body = x.len() - x.len() % 8;
        bwd_scalar(kind, &x[body..], &dy[body..], &mut dx[body..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::note_skip;

    const KINDS: [GeluKind; 3] = [GeluKind::Tanh, GeluKind::Erf, GeluKind::Relu];

    /// The exact formulas in f64.
    fn exact(kind: GeluKind, x: f64) -> (f64, f64) {
        match kind {
            GeluKind::Tanh => {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let t = (c * (x + 0.044715 * x * x * x)).tanh();
                let y = 0.5 * x * (1.0 + t);
                (y, 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x))
            }
            GeluKind::Erf => {
                let cdf = 0.5 * libm::erfc(-x / std::f64::consts::SQRT_2);
                (x * cdf, cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt())
            }
            GeluKind::Relu => (x.max(0.0), (x > 0.0) as u8 as f64),
        }
    }

    /// Every 8th f32 in [-12, 12] above 1e-3 in magnitude and a uniform grid below (about 3.6M points).
    fn sweep() -> Vec<f32> {
        let mut xs = Vec::new();
        let mut b = 1e-3f32.to_bits();
        while f32::from_bits(b) <= 12.0 {
            let x = f32::from_bits(b);
            xs.extend([x, -x]);
            b += 8;
        }
        xs.extend((-1000..=1000).map(|i| i as f32 * 1e-6));
        xs
    }

    /// Runs `path`'s forward and backward (`dx` from 0, `dy = 1`) over `xs`.
    fn run(kind: GeluKind, xs: &[f32], simd: bool) -> (Vec<f32>, Vec<f32>) {
        let (mut y, mut g) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        let ones = vec![1.0; xs.len()];
        if simd {
            fwd(kind, xs, &mut y);
            bwd(kind, xs, &ones, &mut g);
        } else {
            fwd_scalar(kind, xs, &mut y);
            bwd_scalar(kind, xs, &ones, &mut g);
        }
        (y, g)
    }

    /// Max of `|got - exact| / max(1, |x|)`, forward and gradient.
    fn max_errors(kind: GeluKind, xs: &[f32], y: &[f32], g: &[f32]) -> (f64, f64) {
        let (mut ey, mut eg) = ((0.0f64, 0.0f32), (0.0f64, 0.0f32));
        for ((&x, &y), &g) in xs.iter().zip(y).zip(g) {
            let (wy, wg) = exact(kind, x as f64);
            let s = (x as f64).abs().max(1.0);
            if (y as f64 - wy).abs() / s > ey.0 {
                ey = ((y as f64 - wy).abs() / s, x);
            }
            if (g as f64 - wg).abs() / s > eg.0 {
                eg = ((g as f64 - wg).abs() / s, x);
            }
        }
        println!("gelu {kind:?}: worst forward at x = {}, gradient at x = {}", ey.1, eg.1);
        (ey.0, eg.0)
    }

    fn check_path(simd: bool) {
        let xs = sweep();
        for kind in KINDS {
            let (y, g) = run(kind, &xs, simd);
            let (ey, eg) = max_errors(kind, &xs, &y, &g);
            println!("gelu {kind:?} simd={simd}: max |err|/max(1,|x|) forward {ey:.2e}, gradient {eg:.2e}");
            assert!(ey <= 2e-7, "gelu {kind:?} simd={simd}: forward error {ey:e}");
            assert!(eg <= 3.5e-7, "gelu {kind:?} simd={simd}: gradient error {eg:e}");
        }
    }

    #[test]
    fn scalar_path_within_stated_error() {
        check_path(false);
    }

    /// The AVX2 path against the f64 formulas over the sweep, and against the scalar path.
    #[test]
    fn avx2_path_within_stated_error_and_matches_scalar() {
        if !has_avx2_fma() {
            note_skip("gelu::fast::avx2_path_within_stated_error_and_matches_scalar", "no avx2+fma on this CPU");
            return;
        }
        check_path(true);
        let xs = sweep();
        // Both paths are within the bounds of the exact values, so within twice them of each
        // other (they differ by FMA contractions: a few ulps).
        for kind in KINDS {
            let (ys, gs) = run(kind, &xs, false);
            let (yv, gv) = run(kind, &xs, true);
            let (mut dy, mut dg) = (0.0f32, 0.0f32);
            for i in 0..xs.len() {
                let s = xs[i].abs().max(1.0);
                dy = dy.max((ys[i] - yv[i]).abs() / s);
                dg = dg.max((gs[i] - gv[i]).abs() / s);
            }
            println!("gelu {kind:?}: max |scalar - avx2|/max(1,|x|) forward {dy:.2e}, gradient {dg:.2e}");
            assert!(dy <= 4e-7 && dg <= 6e-7, "gelu {kind:?}: scalar vs avx2 forward {dy:e}, gradient {dg:e}");
        }
    }

    /// NaN, infinities, the extremes, tiny and subnormal inputs, on both paths; the vector path is
    /// fed the values inside full vectors (not only the scalar tail).
    #[test]
    fn special_values() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            1e20,
            -1e20,
            30.0,
            -30.0,
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            f32::MIN_POSITIVE,
            1e-40, // subnormal
            -1e-40,
        ];
        // 16 copies: two full vectors of each value
        let xs: Vec<f32> = specials.iter().flat_map(|&v| [v; 16]).collect();
        let paths: &[bool] = if has_avx2_fma() { &[false, true] } else { &[false] };
        for &simd in paths {
            for kind in KINDS {
                let (y, g) = run(kind, &xs, simd);
                for (i, &x) in xs.iter().enumerate() {
                    let what = format!("gelu {kind:?} simd={simd} at {x:e}: y {}, grad {}", y[i], g[i]);
                    if x.is_nan() {
                        assert!(y[i].is_nan() && g[i].is_nan(), "{what}");
                    } else if x.abs() >= 30.0 {
                        // the limits: x or 0, gradient 1 or 0
                        let (wy, wg) = if x > 0.0 { (x, 1.0) } else { (0.0, 0.0) };
                        assert!(y[i] == wy && g[i] == wg, "{what}");
                    } else if kind == GeluKind::Relu {
                        assert!(y[i] == x.max(0.0) && g[i] == (x > 0.0) as u8 as f32, "{what}");
                    } else {
                        // |x| tiny: gelu(x) = x/2 (to first order), gradient 1/2
                        assert!((y[i] as f64 - 0.5 * x as f64).abs() <= 1e-7 * (x as f64).abs(), "{what}");
                        assert!((g[i] - 0.5).abs() <= 1e-7, "{what}");
                    }
                }
            }
        }
    }

    /// Lengths that are not multiples of 8 (the scalar tail) and `dx` accumulating onto what it
    /// held: every element equals the scalar path's.
    #[test]
    fn tails_and_accumulation() {
        let mut rng = crate::testing::Rng::new(7);
        for n in [0, 1, 7, 8, 9, 15, 16, 17, 100] {
            let x = rng.vec(n, -5.0, 5.0);
            let dy = rng.vec(n, -1.0, 1.0);
            for kind in KINDS {
                let (mut y0, mut y1) = (vec![9.0; n], vec![9.0; n]);
                fwd_scalar(kind, &x, &mut y0);
                fwd(kind, &x, &mut y1);
                let (mut d0, mut d1) = (vec![0.25; n], vec![0.25; n]);
                bwd_scalar(kind, &x, &dy, &mut d0);
                bwd(kind, &x, &dy, &mut d1);
                for i in 0..n {
                    assert!((y0[i] - y1[i]).abs() <= 1e-6 && (d0[i] - d1[i]).abs() <= 1e-6, "{kind:?} n={n} i={i}");
                    let (wy, wg) = exact(kind, x[i] as f64);
                    assert!((y1[i] as f64 - wy).abs() <= 1e-6, "{kind:?} n={n} i={i}: {} vs {wy}", y1[i]);
                    let want = 0.25 + dy[i] as f64 * wg;
                    assert!((d1[i] as f64 - want).abs() <= 1e-6, "{kind:?} n={n} i={i}: {} vs {want}", d1[i]);
                }
            }
        }
    }
}
