//! Matmul tests: CPU against an f64 reference for every transpose combination, backward against
//! the reference formulas (proven by finite differences), and CUDA against the CPU.

use super::*;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// Element (r, c) of a logical view of `buf`.
fn at(buf: &[f64], v: View, r: usize, c: usize) -> f64 {
    if v.transposed {
        buf[c * v.rows + r]
    } else {
        buf[r * v.cols + c]
    }
}

fn ref_fwd(p: &MatmulParams, a: &[f64], b: &[f64]) -> Vec<f64> {
    let (va, vb) = (p.view_a(), p.view_b());
    let mut c = vec![0.0; p.m * p.n];
    for i in 0..p.m {
        for j in 0..p.n {
            c[i * p.n + j] = p.alpha as f64 * (0..p.k).map(|l| at(a, va, i, l) * at(b, vb, l, j)).sum::<f64>();
        }
    }
    c
}

/// Gradients of `sum(C * dC)` with respect to A's and B's storage.
fn ref_bwd(p: &MatmulParams, a: &[f64], b: &[f64], dc: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (va, vb) = (p.view_a(), p.view_b());
    let (mut da, mut db) = (vec![0.0; a.len()], vec![0.0; b.len()]);
    let al = p.alpha as f64;
    for i in 0..p.m {
        for j in 0..p.n {
            for l in 0..p.k {
                let g = al * dc[i * p.n + j];
                let ia = if va.transposed { l * p.m + i } else { i * p.k + l };
                let ib = if vb.transposed { j * p.k + l } else { l * p.n + j };
                da[ia] += g * at(b, vb, l, j);
                db[ib] += g * at(a, va, i, l);
            }
        }
    }
    (da, db)
}

fn params(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> MatmulParams {
    MatmulParams { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.75, accumulate: false }
}

const TRANS: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

#[test]
fn reference_backward_matches_central_differences() {
    let mut rng = Rng::new(10);
    for (ta, tb) in TRANS {
        let p = params(3, 4, 5, ta, tb);
        let a: Vec<f64> = rng.vec(15, -1.0, 1.0).into_iter().map(f64::from).collect();
        let b: Vec<f64> = rng.vec(20, -1.0, 1.0).into_iter().map(f64::from).collect();
        let dc: Vec<f64> = rng.vec(12, -1.0, 1.0).into_iter().map(f64::from).collect();
        let loss = |a: &[f64], b: &[f64]| ref_fwd(&p, a, b).iter().zip(&dc).map(|(c, d)| c * d).sum::<f64>();
        let (da, db) = ref_bwd(&p, &a, &b, &dc);
        let h = 1e-6;
        let fd = |x: &[f64], i: usize, is_a: bool| {
            let (mut xp, mut xm) = (x.to_vec(), x.to_vec());
            xp[i] += h;
            xm[i] -= h;
            if is_a {
                (loss(&xp, &b) - loss(&xm, &b)) / (2.0 * h)
            } else {
                (loss(&a, &xp) - loss(&a, &xm)) / (2.0 * h)
            }
        };
        let fda: Vec<f64> = (0..a.len()).map(|i| fd(&a, i, true)).collect();
        let fdb: Vec<f64> = (0..b.len()).map(|i| fd(&b, i, false)).collect();
        Tol::GRAD_CHECK.assert_close(&format!("ref dA ta={ta} tb={tb}"), &da, &fda);
        Tol::GRAD_CHECK.assert_close(&format!("ref dB ta={ta} tb={tb}"), &db, &fdb);
    }
}

#[test]
fn cpu_matches_f64_reference() {
    let mut rng = Rng::new(11);
    // ragged sizes: none a multiple of the microkernel tiles; one large enough to go parallel
    for (m, n, k) in [(37, 53, 29), (1, 17, 3), (130, 97, 71)] {
        for (ta, tb) in TRANS {
            let p = params(m, n, k, ta, tb);
            let (a, b, dc) = (rng.vec(m * k, -1.0, 1.0), rng.vec(k * n, -1.0, 1.0), rng.vec(m * n, -1.0, 1.0));
            let (a64, b64, dc64) =
                (crate::testing::to_f64(&a), crate::testing::to_f64(&b), crate::testing::to_f64(&dc));
            let what = format!("matmul {m}x{n}x{k} ta={ta} tb={tb}");
            // forward, overwrite then accumulate
            let mut c = vec![9.0; m * n];
            Cpu.matmul_fwd(&p, &a, &b, &mut c).unwrap();
            let want = ref_fwd(&p, &a64, &b64);
            Tol::F32_LONG.assert_close(&format!("{what} fwd"), &c, &want);
            Cpu.matmul_fwd(&MatmulParams { accumulate: true, ..p }, &a, &b, &mut c).unwrap();
            let want2: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
            Tol::F32_LONG.assert_close(&format!("{what} fwd accumulate"), &c, &want2);
            // backward accumulates into nonzero grads
            let (mut da, mut db) = (vec![1.0; a.len()], vec![-1.0; b.len()]);
            Cpu.matmul_bwd(&p, Some(&a[..]), Some(&b[..]), &dc, Some(&mut da), Some(&mut db)).unwrap();
            let (rda, rdb) = ref_bwd(&p, &a64, &b64, &dc64);
            let rda: Vec<f64> = rda.iter().map(|g| g + 1.0).collect();
            let rdb: Vec<f64> = rdb.iter().map(|g| g - 1.0).collect();
            Tol::F32_LONG.assert_close(&format!("{what} dA"), &da, &rda);
            Tol::F32_LONG.assert_close(&format!("{what} dB"), &db, &rdb);
        }
    }
}

/// The f64 kernels against the f64 reference: `gemm`'s f64 microkernels sum the k terms in another
/// order (and with FMA), a few ulps of sums of magnitude ~10, far inside Tol::F64.
#[test]
fn cpu_f64_matches_f64_reference() {
    let mut rng = Rng::new(13);
    let f = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    for (m, n, k) in [(37, 53, 29), (1, 17, 3), (130, 97, 71)] {
        for (ta, tb) in TRANS {
            let p = params(m, n, k, ta, tb);
            let (a, b, dc) = (f(rng.vec(m * k, -1.0, 1.0)), f(rng.vec(k * n, -1.0, 1.0)), f(rng.vec(m * n, -1.0, 1.0)));
            let what = format!("matmul f64 {m}x{n}x{k} ta={ta} tb={tb}");
            let mut c = vec![9.0f64; m * n];
            Cpu.matmul_fwd(&p, &a, &b, &mut c).unwrap();
            let want = ref_fwd(&p, &a, &b);
            Tol::F64.assert_close(&format!("{what} fwd"), &c, &want);
            Cpu.matmul_fwd(&MatmulParams { accumulate: true, ..p }, &a, &b, &mut c).unwrap();
            let want2: Vec<f64> = want.iter().map(|w| 2.0 * w).collect();
            Tol::F64.assert_close(&format!("{what} fwd accumulate"), &c, &want2);
            // backward accumulates into nonzero grads; dB is the f64 weight gradient (E::Acc)
            let (mut da, mut db) = (vec![1.0f64; a.len()], vec![-1.0f64; b.len()]);
            Cpu.matmul_bwd(&p, Some(&a[..]), Some(&b[..]), &dc, Some(&mut da), Some(&mut db)).unwrap();
            let (rda, rdb) = ref_bwd(&p, &a, &b, &dc);
            let rda: Vec<f64> = rda.iter().map(|g| g + 1.0).collect();
            let rdb: Vec<f64> = rdb.iter().map(|g| g - 1.0).collect();
            Tol::F64.assert_close(&format!("{what} dA"), &da, &rda);
            Tol::F64.assert_close(&format!("{what} dB"), &db, &rdb);
        }
    }
}

/// Operands `(a, b, dc)` and their f64 reference gradients `(dA, dB)`.
type Case = ((Vec<f32>, Vec<f32>, Vec<f32>), (Vec<f64>, Vec<f64>));

/// Random `(a, b, dc)` for `p`, and their f64 reference gradients `(dA, dB)`.
fn case(rng: &mut Rng, p: &MatmulParams) -> Case {
    let (a, b, dc) = (rng.vec(p.m * p.k, -1.0, 1.0), rng.vec(p.k * p.n, -1.0, 1.0), rng.vec(p.m * p.n, -1.0, 1.0));
    let f = crate::testing::to_f64;
    let grads = ref_bwd(p, &f(&a), &f(&b), &f(&dc));
    ((a, b, dc), grads)
}

/// A frozen weight: `dX` only, without `a` (the input a frozen layer need not keep).
#[test]
fn dx_only_needs_no_a() {
    let mut rng = Rng::new(14);
    for (ta, tb) in TRANS {
        let p = params(37, 23, 19, ta, tb);
        let ((_, b, dc), (rda, _)) = case(&mut rng, &p);
        let mut da = vec![1.0f32; p.m * p.k];
        Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, Some(&mut da), None).unwrap();
        let rda: Vec<f64> = rda.iter().map(|g| g + 1.0).collect();
        Tol::F32_LONG.assert_close(&format!("dA only ta={ta} tb={tb}"), &da, &rda);
    }
}

/// A weight whose input needs no gradient (the first layer): `dW` only, without `b`.
#[test]
fn dw_only_needs_no_b() {
    let mut rng = Rng::new(15);
    for (ta, tb) in TRANS {
        let p = params(37, 23, 19, ta, tb);
        let ((a, _, dc), (_, rdb)) = case(&mut rng, &p);
        let mut db = vec![-1.0f32; p.k * p.n];
        Cpu.matmul_bwd(&p, Some(&a[..]), None, &dc, None, Some(&mut db)).unwrap();
        let rdb: Vec<f64> = rdb.iter().map(|g| g - 1.0).collect();
        Tol::F32_LONG.assert_close(&format!("dB only ta={ta} tb={tb}"), &db, &rdb);
    }
}

/// No gradient asked for: nothing runs, even without operands (lengths still checked if given).
#[test]
fn no_gradients_is_a_no_op() {
    let p = MatmulParams::linear(4, 3, 5);
    MatmulKernel::<f32>::matmul_bwd(&Cpu, &p, None, None, &[1.0; 12], None, None).unwrap();
    MatmulKernel::<f64>::matmul_bwd(&Cpu, &p, Some(&[1.0; 20][..]), Some(&[1.0; 15][..]), &[1.0; 12], None, None)
        .unwrap();
    let e = MatmulKernel::<f32>::matmul_bwd(&Cpu, &p, Some(&[1.0; 19][..]), None, &[1.0; 12], None, None).unwrap_err();
    assert!(e.to_string().contains("`a`"), "{e}");
}

/// A requested gradient without the operand it needs is `Invalid`, naming the operand, and
/// nothing is written (all checks run before any product).
#[test]
fn missing_required_operand_is_an_error() {
    let p = MatmulParams::linear(4, 3, 5);
    let (a, b, dc) = (vec![1.0f32; 20], vec![1.0f32; 15], vec![1.0f32; 12]);
    let (mut da, mut db) = (vec![0.0f32; 20], vec![0.0f32; 15]);
    let e = Cpu.matmul_bwd(&p, Some(&a[..]), None, &dc, Some(&mut da), None).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("`b`"), "{e}");
    let e = Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, None, Some(&mut db)).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("`a`"), "{e}");
    // dA is computable but dB is not: the error comes before dA is touched
    let e = Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, Some(&mut da), Some(&mut db)).unwrap_err();
    assert!(e.to_string().contains("`a`"), "{e}");
    assert!(da.iter().chain(&db).all(|&g| g == 0.0));
}

#[test]
fn shape_errors_name_the_tensor() {
    let p = MatmulParams::new(2, 3, 4);
    let e = Cpu.matmul_fwd(&p, &[0.0; 8], &[0.0; 11], &mut [0.0; 6]).unwrap_err().to_string();
    assert!(e.contains("`b`") && e.contains("12") && e.contains("11"), "{e}");
    let e = Cpu
        .matmul_bwd(&p, Some(&[0.0; 8][..]), Some(&[0.0; 12][..]), &[0.0; 6], None, Some(&mut [0.0; 3]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`db`"), "{e}");
    assert!(Cpu.matmul_fwd(&MatmulParams::new(0, 3, 4), &[], &[0.0; 12], &mut []).is_err());
}

#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("matmul::cuda_matches_cpu") else { return };
    let mut rng = Rng::new(12);
    for (m, n, k) in [(37, 53, 29), (130, 97, 71)] {
        for (ta, tb) in TRANS {
            let p = params(m, n, k, ta, tb);
            let a = round_bf16(&rng.vec(m * k, -1.0, 1.0));
            let b = round_bf16(&rng.vec(k * n, -1.0, 1.0));
            let dc = round_bf16(&rng.vec(m * n, -1.0, 1.0));
            let mut c = vec![0.0; m * n];
            Cpu.matmul_fwd(&p, &a, &b, &mut c).unwrap();
            // backward accumulates (cuBLAS beta = 1): start both gradients nonzero
            let (da0, db0) = (vec![0.5; a.len()], vec![-0.5; b.len()]);
            let (mut da, mut db) = (da0.clone(), db0.clone());
            Cpu.matmul_bwd(&p, Some(&a[..]), Some(&b[..]), &dc, Some(&mut da), Some(&mut db)).unwrap();
            // forward with accumulate (beta = 1) on top of `c`: 2c
            let pacc = MatmulParams { accumulate: true, ..p };
            let c2: Vec<f32> = c.iter().map(|v| 2.0 * v).collect();
            let what = format!("cuda matmul {m}x{n}x{k} ta={ta} tb={tb}");
            // f32
            let (ad, bd, dcd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&dc).unwrap());
            let mut cd = dev.zeros::<f32>(m * n).unwrap();
            let (mut dad, mut dbd) = (dev.upload(&da0).unwrap(), dev.upload(&db0).unwrap());
            MatmulKernel::<f32>::matmul_fwd(&*dev, &p, &ad, &bd, &mut cd).unwrap();
            Tol::CUDA_F32.assert_close(&format!("{what} f32 fwd"), &dev.download(&cd).unwrap(), &c);
            MatmulKernel::<f32>::matmul_fwd(&*dev, &pacc, &ad, &bd, &mut cd).unwrap();
            Tol::CUDA_F32.assert_close(&format!("{what} f32 fwd accumulate"), &dev.download(&cd).unwrap(), &c2);
            MatmulKernel::<f32>::matmul_bwd(&*dev, &p, Some(&ad), Some(&bd), &dcd, Some(&mut dad), Some(&mut dbd))
                .unwrap();
            Tol::CUDA_F32.assert_close(&format!("{what} f32 dA"), &dev.download(&dad).unwrap(), &da);
            Tol::CUDA_F32.assert_close(&format!("{what} f32 dB"), &dev.download(&dbd).unwrap(), &db);
            // bf16 operands, fp32 accumulate; dB in f32
            let tb16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (ab, bb, dcb) =
                (dev.upload(&tb16(&a)).unwrap(), dev.upload(&tb16(&b)).unwrap(), dev.upload(&tb16(&dc)).unwrap());
            let mut cb = dev.zeros::<bf16>(m * n).unwrap();
            let (mut dab, mut dbb) = (dev.upload(&tb16(&da0)).unwrap(), dev.upload(&db0).unwrap());
            let f = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
            <Cuda as MatmulKernel<bf16>>::matmul_fwd(&dev, &p, &ab, &bb, &mut cb).unwrap();
            Tol::CUDA_BF16.assert_close(&format!("{what} bf16 fwd"), &f(dev.download(&cb).unwrap()), &c);
            <Cuda as MatmulKernel<bf16>>::matmul_fwd(&dev, &pacc, &ab, &bb, &mut cb).unwrap();
            Tol::CUDA_BF16.assert_close(&format!("{what} bf16 fwd accumulate"), &f(dev.download(&cb).unwrap()), &c2);
            <Cuda as MatmulKernel<bf16>>::matmul_bwd(
                &dev,
                &p,
                Some(&ab),
                Some(&bb),
                &dcb,
                Some(&mut dab),
                Some(&mut dbb),
            )
            .unwrap();
            Tol::CUDA_BF16.assert_close(&format!("{what} bf16 dA"), &f(dev.download(&dab).unwrap()), &da);
            // dB is an f32 output of bf16 inputs: only the inputs were rounded, so f32 tolerance holds
            Tol::CUDA_F32.assert_close(&format!("{what} bf16 dB (f32 out)"), &dev.download(&dbb).unwrap(), &db);
        }
    }
}

/// CUDA with one gradient and only the operand it needs (f32 and bf16), against the CPU.
#[test]
fn cuda_single_gradients_match_cpu() {
    let Some(dev) = cuda_or_skip("matmul::cuda_single_gradients_match_cpu") else { return };
    let mut rng = Rng::new(16);
    let tb16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let f = |v: Vec<bf16>| v.into_iter().map(f32::from).collect::<Vec<_>>();
    for (ta, tb) in TRANS {
        let p = params(37, 53, 29, ta, tb);
        let a = round_bf16(&rng.vec(p.m * p.k, -1.0, 1.0));
        let b = round_bf16(&rng.vec(p.k * p.n, -1.0, 1.0));
        let dc = round_bf16(&rng.vec(p.m * p.n, -1.0, 1.0));
        let (da0, db0) = (vec![0.5f32; a.len()], vec![-0.5f32; b.len()]);
        let (mut da, mut db) = (da0.clone(), db0.clone());
        Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, Some(&mut da), None).unwrap();
        Cpu.matmul_bwd(&p, Some(&a[..]), None, &dc, None, Some(&mut db)).unwrap();
        let what = format!("cuda matmul single grads ta={ta} tb={tb}");
        // f32
        let (ad, bd, dcd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&dc).unwrap());
        let (mut dad, mut dbd) = (dev.upload(&da0).unwrap(), dev.upload(&db0).unwrap());
        MatmulKernel::<f32>::matmul_bwd(&*dev, &p, None, Some(&bd), &dcd, Some(&mut dad), None).unwrap();
        MatmulKernel::<f32>::matmul_bwd(&*dev, &p, Some(&ad), None, &dcd, None, Some(&mut dbd)).unwrap();
        MatmulKernel::<f32>::matmul_bwd(&*dev, &p, None, None, &dcd, None, None).unwrap();
        Tol::CUDA_F32.assert_close(&format!("{what} f32 dA"), &dev.download(&dad).unwrap(), &da);
        Tol::CUDA_F32.assert_close(&format!("{what} f32 dB"), &dev.download(&dbd).unwrap(), &db);
        let e = MatmulKernel::<f32>::matmul_bwd(&*dev, &p, Some(&ad), None, &dcd, Some(&mut dad), None).unwrap_err();
        assert!(e.to_string().contains("`b`"), "{e}");
        // bf16
        let (ab, bb, dcb) =
            (dev.upload(&tb16(&a)).unwrap(), dev.upload(&tb16(&b)).unwrap(), dev.upload(&tb16(&dc)).unwrap());
        let (mut dab, mut dbb) = (dev.upload(&tb16(&da0)).unwrap(), dev.upload(&db0).unwrap());
        <Cuda as MatmulKernel<bf16>>::matmul_bwd(&dev, &p, None, Some(&bb), &dcb, Some(&mut dab), None).unwrap();
        <Cuda as MatmulKernel<bf16>>::matmul_bwd(&dev, &p, Some(&ab), None, &dcb, None, Some(&mut dbb)).unwrap();
        Tol::CUDA_BF16.assert_close(&format!("{what} bf16 dA"), &f(dev.download(&dab).unwrap()), &da);
        Tol::CUDA_F32.assert_close(&format!("{what} bf16 dB (f32 out)"), &dev.download(&dbb).unwrap(), &db);
    }
}

/// cuBLAS has no integer GEMM here: an integer element type is an error, not a read of 4-byte
/// floats past the end of 1-byte buffers.
#[test]
fn cuda_rejects_integer_elements() {
    let Some(dev) = cuda_or_skip("matmul::cuda_rejects_integer_elements") else { return };
    let p = MatmulParams::new(2, 3, 4);
    let (a, b, mut c) = (dev.zeros::<u8>(8).unwrap(), dev.zeros::<u8>(12).unwrap(), dev.zeros::<u8>(6).unwrap());
    let e = MatmulKernel::<u8>::matmul_fwd(&*dev, &p, &a, &b, &mut c).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

#[test]
fn tf32_rounding_keeps_10_mantissa_bits_to_nearest_even() {
    use super::cuda::round_tf32;
    let one = 1.0f32;
    let ulp = f32::from_bits(one.to_bits() + (1 << 13)) - one; // TF32's step at 1: 2^-10
    assert_eq!(ulp, 2f32.powi(-10));
    for (x, want) in [
        (one, one),
        (one + ulp / 4.0, one),             // below half a step: down
        (one + 0.75 * ulp, one + ulp),      // above half: up
        (one + ulp / 2.0, one),             // a tie to the even (1.0's last kept bit is 0)
        (one + 1.5 * ulp, one + 2.0 * ulp), // a tie to the even, upwards
        (-(one + 0.75 * ulp), -(one + ulp)),
        (f32::INFINITY, f32::INFINITY),
        (0.0, 0.0),
    ] {
        assert_eq!(round_tf32(x), want, "{x}");
    }
    assert!(round_tf32(f32::NAN).is_nan());
    // Every result has its low 13 mantissa bits clear, and lies within half a step of x.
    let mut rng = Rng::new(3);
    for x in rng.vec(1000, -100.0, 100.0) {
        let r = round_tf32(x);
        assert_eq!(r.to_bits() & 0x1fff, 0, "{x}");
        assert!((r - x).abs() <= x.abs() * 2f32.powi(-11), "{x} -> {r}");
    }
}

/// TF32 products ([`Cuda::set_tf32`]): f32 operands rounded to 10 mantissa bits, the products
/// summed in f32. The forward and both gradients lie within TF32's bound of the f64 reference
/// (each operand off by less than 2^-10 relative where the hardware truncates, 2^-11 where it
/// rounds, which cuBLAS does not document: each product by at most 2^-9, plus f32 summation:
/// `(2^-9 + k 2^-23) sum |x||y|` per element); on the emulated device they also differ from the
/// f32 results (the mode took effect) and equal the f64 product of the rounded operands to f32's
/// tolerance (both operands were rounded). (A GPU's cuBLAS may run these small odd shapes on an
/// f32 kernel: TF32 is allowed there, not forced.) bf16 operands are untouched by the flag, and turning
/// it off gives f32's results again.
#[test]
fn cuda_tf32_products_round_f32_operands_to_10_bits() {
    let Some(shared) = cuda_or_skip("matmul::cuda_tf32_products_round_f32_operands_to_10_bits") else { return };
    // A device of its own: the flag is per device, and the shared one serves other tests.
    let dev = Cuda::new(0).unwrap();
    assert!(!dev.tf32() && !shared.tf32(), "TF32 must be off by default");
    let f = crate::testing::to_f64;
    let abs = |v: &[f32]| v.iter().map(|x| x.abs() as f64).collect::<Vec<f64>>();
    let tf = |v: &[f32]| v.iter().map(|&x| super::cuda::round_tf32(x)).collect::<Vec<f32>>();
    let within = |what: &str, got: &[f32], want: &[f64], mag: &[f64], k: usize| {
        let slack = 2f64.powi(-9) + k as f64 * 2f64.powi(-23);
        for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
            assert!((*g as f64 - w).abs() <= slack * m + 1e-30, "{what}[{i}]: {g} vs {w} (bound {})", slack * m);
        }
    };
    let mut rng = Rng::new(21);
    for (m, n, k) in [(37, 53, 29), (130, 97, 71)] {
        for (ta, tb) in TRANS {
            let p = params(m, n, k, ta, tb);
            let ((a, b, dc), _) = case(&mut rng, &p);
            let what = format!("tf32 matmul {m}x{n}x{k} ta={ta} tb={tb}");
            let (ad, bd, dcd) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap(), dev.upload(&dc).unwrap());
            let run = |tf32: bool| {
                dev.set_tf32(tf32);
                let mut cd = dev.zeros::<f32>(m * n).unwrap();
                let (mut dad, mut dbd) = (dev.zeros::<f32>(a.len()).unwrap(), dev.zeros::<f32>(b.len()).unwrap());
                MatmulKernel::<f32>::matmul_fwd(&dev, &p, &ad, &bd, &mut cd).unwrap();
                MatmulKernel::<f32>::matmul_bwd(&dev, &p, Some(&ad), Some(&bd), &dcd, Some(&mut dad), Some(&mut dbd))
                    .unwrap();
                [cd, dad, dbd].map(|x| dev.download(&x).unwrap())
            };
            let [c, da, db] = run(true);
            let [c32, da32, db32] = run(false);
            let (want_c, (want_da, want_db)) = (ref_fwd(&p, &f(&a), &f(&b)), ref_bwd(&p, &f(&a), &f(&b), &f(&dc)));
            let (mag_c, (mag_da, mag_db)) =
                (ref_fwd(&p, &abs(&a), &abs(&b)), ref_bwd(&p, &abs(&a), &abs(&b), &abs(&dc)));
            within(&format!("{what} fwd"), &c, &want_c, &mag_c, k);
            within(&format!("{what} dA"), &da, &want_da, &mag_da, n);
            within(&format!("{what} dB"), &db, &want_db, &mag_db, m);
            // cuBLAS may keep a small or odd shape on an f32 kernel (TF32 is allowed, not forced):
            // that the flag took effect is checked where the rounding is known.
            for (name, t, f32_) in [("fwd", &c, &c32), ("dA", &da, &da32), ("dB", &db, &db32)] {
                let differs = t.iter().zip(f32_).any(|(x, y)| x != y);
                assert!(differs || !dev.is_emulated(), "{what} {name}: TF32 gave f32's exact results");
            }
            let f32_ref = ref_fwd(&p, &f(&a), &f(&b));
            let f32_ref: Vec<f32> = f32_ref.iter().map(|&v| v as f32).collect();
            Tol::CUDA_F32.assert_close(&format!("{what} off again"), &c32, &f32_ref);
            if dev.is_emulated() {
                let want: Vec<f32> = ref_fwd(&p, &f(&tf(&a)), &f(&tf(&b))).iter().map(|&v| v as f32).collect();
                Tol::CUDA_F32.assert_close(&format!("{what} = the rounded operands' product"), &c, &want);
            }
            // bf16 operands: the flag changes nothing.
            let tb16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
            let (ab, bb) = (dev.upload(&tb16(&a)).unwrap(), dev.upload(&tb16(&b)).unwrap());
            let bf = |tf32: bool| {
                dev.set_tf32(tf32);
                let mut cb = dev.zeros::<bf16>(m * n).unwrap();
                <Cuda as MatmulKernel<bf16>>::matmul_fwd(&dev, &p, &ab, &bb, &mut cb).unwrap();
                dev.download(&cb).unwrap()
            };
            assert_eq!(bf(true), bf(false), "{what}: bf16 operands changed by the TF32 flag");
        }
    }
}

/// Bits with the sign of zero dropped (`0 + x` turns a `-0` product into `+0`).
fn bits_no_neg_zero(v: &[f32]) -> Vec<u32> {
    v.iter().map(|&x| if x == 0.0 { 0 } else { x.to_bits() }).collect()
}

/// `matmul_bwd_a_overwrite` writes `dA` over whatever its buffer holds (NaN here) with the bits
/// of `matmul_bwd` accumulating into zeros, for every transpose combination and a scaled product,
/// on the CPU and on the emulated device (into an unfilled buffer: NaN there), f32; on a GPU
/// within the product's rounding (cuBLAS may pick another algorithm for beta 0). Inner dims of 2
/// (gemm's vector path) and 1100 (past one k-block, where later blocks add to the first's).
#[test]
fn the_overwriting_da_is_the_accumulating_one_into_zeros() {
    let mut rng = Rng::new(77);
    let dev = cuda_or_skip("matmul::the_overwriting_da_is_the_accumulating_one_into_zeros");
    for (m, n, k) in [(37, 23, 19), (1, 5, 3), (70, 96, 130), (8, 2, 9), (5, 1100, 7)] {
        for (ta, tb) in TRANS {
            let p = MatmulParams { alpha: 0.75, ..params(m, n, k, ta, tb) };
            let ((_, b, dc), _) = case(&mut rng, &p);
            let what = format!("[{m}, {n}, {k}] ta={ta} tb={tb}");
            let mut acc = vec![0.0f32; m * k];
            Cpu.matmul_bwd(&p, None, Some(&b[..]), &dc, Some(&mut acc), None).unwrap();
            let mut over = vec![f32::NAN; m * k];
            Cpu.matmul_bwd_a_overwrite(&p, &b, &dc, &mut over).unwrap();
            assert_eq!(bits_no_neg_zero(&over), bits_no_neg_zero(&acc), "cpu {what}");
            if let Some(dev) = &dev {
                let (bd, dcd) = (dev.upload(&b).unwrap(), dev.upload(&dc).unwrap());
                let mut acc_d = dev.zeros::<f32>(m * k).unwrap();
                dev.matmul_bwd(&p, None, Some(&bd), &dcd, Some(&mut acc_d), None).unwrap();
                let mut over_d = dev.unfilled::<f32>(m * k).unwrap();
                dev.matmul_bwd_a_overwrite(&p, &bd, &dcd, &mut over_d).unwrap();
                let (a, o) = (dev.download(&acc_d).unwrap(), dev.download(&over_d).unwrap());
                if dev.is_emulated() {
                    assert_eq!(bits_no_neg_zero(&o), bits_no_neg_zero(&a), "cuda {what}");
                } else {
                    Tol::CUDA_F32.assert_close(&format!("cuda {what}"), &o, &a);
                }
            }
        }
    }
    // the length checks are matmul_bwd's
    let p = params(4, 3, 2, false, false);
    let e = Cpu.matmul_bwd_a_overwrite(&p, &[0.0; 6], &[0.0; 12], &mut [0.0; 7]).unwrap_err();
    assert!(e.to_string().contains("matmul") && e.to_string().contains("`da`"), "{e}");
}
