//! RoPE tests: f64 reference (proven by central differences), CPU against it (with Hugging Face's
//! frequencies as an anchor), shape errors, and CUDA against CPU in f32 and bf16.

use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// f64 reference rotation of every head (`backward`: the transpose, accumulated into `out`).
/// The angle is computed exactly as the f32 kernels do (f32 exponent, power rounded to f32,
/// f32 reciprocal, f32 product with the position), then cos/sin and the rotation in f64.
fn ref_rope(p: &RopeParams, pos: &[u32], inp: &[f64], out: &mut [f64], backward: bool) {
    let (d, half) = (p.head_dim as usize, p.head_dim as usize / 2);
    for (t, &ps) in pos.iter().enumerate() {
        for h in 0..p.heads as usize {
            let o = (t * p.heads as usize + h) * d;
            for i in 0..half {
                let e = (2 * i) as f32 / d as f32;
                let inv = 1.0f32 / (p.theta as f64).powf(e as f64) as f32;
                let angle = (ps as f32 * inv) as f64;
                let (c, s) = (angle.cos(), angle.sin());
                let (a, b) = (inp[o + i], inp[o + i + half]);
                if backward {
                    out[o + i] += a * c + b * s;
                    out[o + i + half] += b * c - a * s;
                } else {
                    out[o + i] = a * c - b * s;
                    out[o + i + half] = b * c + a * s;
                }
            }
        }
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

/// Positions: sequence 0 left-padded (starts at 0 after 2 pad tokens, which get position 0 too),
/// sequence 1 continues after a 1000-token cache, the rest random up to 40000.
fn positions(rng: &mut Rng, batch: usize, seq: usize) -> Vec<u32> {
    let mut pos = Vec::with_capacity(batch * seq);
    for b in 0..batch {
        for s in 0..seq {
            pos.push(match b {
                0 => s.saturating_sub(2) as u32,
                1 => (1000 + s) as u32,
                _ => rng.below(40_000) as u32,
            });
        }
    }
    pos
}

#[test]
fn reference_gradient_matches_central_differences() {
    let p = RopeParams::new(2, 3, 2, 6, 1e4);
    let mut rng = Rng::new(41);
    let pos = positions(&mut rng, 2, 3);
    let (x, dy) = (f64s(&rng.normal_vec(p.elems(), 1.0)), f64s(&rng.normal_vec(p.elems(), 1.0)));
    let loss = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        ref_rope(&p, &pos, x, &mut y, false);
        y.iter().zip(&dy).map(|(a, b)| a * b).sum::<f64>()
    };
    let mut dx = vec![0.0; x.len()];
    ref_rope(&p, &pos, &dy, &mut dx, true);
    let h = 1e-5;
    let fd: Vec<f64> = (0..x.len())
        .map(|i| {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[i] += h;
            b[i] -= h;
            (loss(&a) - loss(&b)) / (2.0 * h)
        })
        .collect();
    Tol::GRAD_CHECK.assert_close("rope ref dx", &dx, &fd);
}

#[test]
fn inv_freq_matches_hugging_face() {
    // Hugging Face Llama, head_dim 64, theta 1e4: inv_freq[i] = 10000^(-i/32).
    let f = inv_freq(1e4, 64);
    let want: Vec<f64> = (0..32).map(|i| 10000f64.powf(-(i as f64) / 32.0)).collect();
    Tol::new("f32 rounding of a power", 0.0, 3e-7).assert_close("inv_freq theta 1e4", &f, &want);
    assert_eq!(f[0], 1.0);
}

#[test]
fn cpu_matches_f64_reference() {
    let mut rng = Rng::new(42);
    // (batch, seq, heads, head_dim, theta): SmolLM2-135M q and k heads, Llama-style, tiny, odd half.
    for (b, s, h, d, theta) in
        [(3, 7, 9, 64, 1e5), (3, 5, 3, 64, 1e5), (2, 4, 4, 128, 1e4), (3, 3, 1, 2, 1e4), (3, 2, 5, 6, 1e4)]
    {
        let p = RopeParams::new(b, s, h, d, theta);
        let pos = positions(&mut rng, b, s);
        let (x, dy) = (rng.normal_vec(p.elems(), 1.0), rng.normal_vec(p.elems(), 1.0));
        let what = format!("rope [{b}, {s}, {h}, {d}] theta {theta:e}");
        let mut y = vec![0.0; p.elems()];
        Cpu.rope_fwd(&p, &pos, &x, &mut y).unwrap();
        let mut want = vec![0.0; p.elems()];
        ref_rope(&p, &pos, &f64s(&x), &mut want, false);
        Tol::F32.assert_close(&format!("{what} fwd"), &y, &want);
        // backward accumulates: start dx nonzero
        let start = rng.normal_vec(p.elems(), 1.0);
        let mut dx = start.clone();
        Cpu.rope_bwd(&p, &pos, &dy, &mut dx).unwrap();
        let mut want = f64s(&start);
        ref_rope(&p, &pos, &f64s(&dy), &mut want, true);
        Tol::F32.assert_close(&format!("{what} bwd"), &dx, &want);
    }
}

/// The f64 kernel against the f64 reference, which takes the same f32 angles: only cos/sin of the
/// same angle and the rotation in f64, so it agrees to ~1e-15.
#[test]
fn cpu_f64_matches_f64_reference() {
    let mut rng = Rng::new(44);
    for (b, s, h, d, theta) in
        [(3, 7, 9, 64, 1e5), (3, 5, 3, 64, 1e5), (2, 4, 4, 128, 1e4), (3, 3, 1, 2, 1e4), (3, 2, 5, 6, 1e4)]
    {
        let p = RopeParams::new(b, s, h, d, theta);
        let pos = positions(&mut rng, b, s);
        let (x, dy) = (f64s(&rng.normal_vec(p.elems(), 1.0)), f64s(&rng.normal_vec(p.elems(), 1.0)));
        let what = format!("rope f64 [{b}, {s}, {h}, {d}] theta {theta:e}");
        let mut y = vec![0.0f64; p.elems()];
        Cpu.rope_fwd(&p, &pos, &x, &mut y).unwrap();
        let mut want = vec![0.0; p.elems()];
        ref_rope(&p, &pos, &x, &mut want, false);
        Tol::F64.assert_close(&format!("{what} fwd"), &y, &want);
        // backward accumulates: start dx nonzero
        let start = f64s(&rng.normal_vec(p.elems(), 1.0));
        let mut dx = start.clone();
        Cpu.rope_bwd(&p, &pos, &dy, &mut dx).unwrap();
        let mut want = start;
        ref_rope(&p, &pos, &dy, &mut want, true);
        Tol::F64.assert_close(&format!("{what} bwd"), &dx, &want);
    }
}

#[test]
fn shape_mismatch_is_an_error() {
    let p = RopeParams::new(2, 3, 2, 4, 1e4);
    let (x, mut y) = (vec![0.0; 48], vec![0.0; 48]);
    let e = Cpu.rope_fwd(&p, &[0; 5], &x, &mut y).unwrap_err();
    assert!(e.to_string().contains("rope") && e.to_string().contains("`pos`"), "{e}");
    let e = Cpu.rope_fwd(&p, &[0; 6], &x[..40], &mut y).unwrap_err();
    assert!(e.to_string().contains("`x`"), "{e}");
    let e = Cpu.rope_bwd(&p, &[0; 6], &x, &mut y[..47]).unwrap_err();
    assert!(e.to_string().contains("`dx`"), "{e}");
    let odd = RopeParams::new(2, 3, 2, 5, 1e4);
    let e = Cpu.rope_fwd(&odd, &[0; 6], &[0.0; 60], &mut [0.0; 60]).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
}

/// `(y, dx)` on CUDA in element type `E`, `dx` starting at `start`, widened to f32.
fn run_cuda<E: crate::cuda::CudaElem>(
    dev: &Cuda,
    p: &RopeParams,
    pos: &[u32],
    x: &[f32],
    dy: &[f32],
    start: &[f32],
) -> (Vec<f32>, Vec<f32>)
where
    Cuda: RopeKernel<E>,
{
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |d: &crate::cuda::CudaBuf<E>| dev.download(d).unwrap().iter().map(|v| v.to_f32()).collect();
    let (posd, xd, dyd) = (dev.upload(pos).unwrap(), up(x), up(dy));
    let (mut yd, mut dxd) = (dev.zeros::<E>(p.elems()).unwrap(), up(start));
    dev.rope_fwd(p, &posd, &xd, &mut yd).unwrap();
    dev.rope_bwd(p, &posd, &dyd, &mut dxd).unwrap();
    (down(&yd), down(&dxd))
}

/// One launch configuration (a block per token); shapes where heads * head_dim/2 is below, equal
/// to and above the block size, and head_dim/2 above it (the cos/sin loop strides).
#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("rope::cuda_matches_cpu") else { return };
    let mut rng = Rng::new(43);
    for (b, s, h, d, theta) in
        [(3, 7, 9, 64, 1e5), (3, 5, 4, 64, 1e4), (3, 3, 1, 2, 1e4), (3, 4, 3, 258, 1e4), (4, 33, 5, 6, 1e5)]
    {
        let p = RopeParams::new(b, s, h, d, theta);
        let pos = positions(&mut rng, b, s);
        let x = round_bf16(&rng.normal_vec(p.elems(), 1.0));
        let dy = round_bf16(&rng.normal_vec(p.elems(), 1.0));
        let start = round_bf16(&rng.normal_vec(p.elems(), 1.0));
        let (mut y, mut dx) = (vec![0.0; p.elems()], start.clone());
        Cpu.rope_fwd(&p, &pos, &x, &mut y).unwrap();
        Cpu.rope_bwd(&p, &pos, &dy, &mut dx).unwrap();
        let what = format!("rope cuda [{b}, {s}, {h}, {d}]");
        let (gy, gdx) = run_cuda::<f32>(&dev, &p, &pos, &x, &dy, &start);
        Tol::CUDA_F32.assert_close(&format!("{what} f32 fwd"), &gy, &y);
        Tol::CUDA_F32.assert_close(&format!("{what} f32 bwd"), &gdx, &dx);
        let (gy, gdx) = run_cuda::<bf16>(&dev, &p, &pos, &x, &dy, &start);
        Tol::CUDA_BF16.assert_close(&format!("{what} bf16 fwd"), &gy, &y);
        Tol::CUDA_BF16.assert_close(&format!("{what} bf16 bwd"), &gdx, &dx);
    }
}
