//! CUDA attention against a naive f64 reference written here (f32 and bf16, every head-dim
//! launch configuration, causal/bidirectional, padding masks with fully masked rows, GQA and
//! MHA, prefix absent/present, q_len < kv_len, ragged lengths). The lead may swap the reference
//! for `<Cpu as AttentionKernel<f32>>` once both branches are merged.

use super::*;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Rng, Tol};
use crate::Cuda;
use cudarc::driver::CudaSlice;
use half::bf16;

/// One test shape.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    prefix: usize,
    head_dim: usize,
    causal: bool,
    mask: bool,
}

impl Case {
    fn params(&self) -> AttnParams {
        AttnParams {
            q_len: self.q_len as u32,
            kv_len: self.kv_len as u32,
            prefix_len: self.prefix as u32,
            has_mask: self.mask as u32,
            ..AttnParams::new(self.batch, self.heads, self.kv_heads, self.q_len, self.head_dim, self.causal)
        }
    }
}

/// Host inputs, output gradient, and the nonzero starting gradients (backward accumulates).
struct Data {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    pk: Vec<f32>,
    pv: Vec<f32>,
    mask: Vec<u8>,
    d_o: Vec<f32>,
    g0: Grads,
}

/// Gradients (or their reference increments) as f32/f64 host vectors.
#[derive(Clone)]
struct Grads<F = f32> {
    dq: Vec<F>,
    dk: Vec<F>,
    dv: Vec<F>,
    dpk: Vec<F>,
    dpv: Vec<F>,
}

/// Random data for `c`; with `bf16`, every E-typed buffer is rounded through bf16 so the
/// reference sees exactly what the kernel sees. The mask drops ~25% of keys, always key 0 of
/// sequence 0 (under causal with q_len == kv_len its row 0 sees no content key) and, when
/// batch > 1, every key of the last sequence (fully masked rows unless a prefix is present).
fn data(c: &Case, seed: u64, bf16: bool) -> Data {
    let p = c.params();
    let mut rng = Rng::new(seed);
    let r = |v: Vec<f32>| if bf16 { round_bf16(&v) } else { v };
    let (nq, nkv, np) = (p.q_elems(), p.kv_elems(), p.prefix_elems());
    let mut mask: Vec<u8> = (0..c.batch * c.kv_len).map(|_| (rng.unit() > 0.25) as u8).collect();
    if c.mask {
        mask[0] = 0;
        if c.batch > 1 {
            mask[(c.batch - 1) * c.kv_len..].fill(0);
        }
    }
    Data {
        q: r(rng.normal_vec(nq, 1.0)),
        k: r(rng.normal_vec(nkv, 1.0)),
        v: r(rng.normal_vec(nkv, 1.0)),
        pk: r(rng.normal_vec(np, 1.0)),
        pv: r(rng.normal_vec(np, 1.0)),
        mask: if c.mask { mask } else { Vec::new() },
        d_o: r(rng.normal_vec(nq, 1.0)),
        g0: Grads {
            dq: r(rng.vec(nq, -0.5, 0.5)),
            dk: r(rng.vec(nkv, -0.5, 0.5)),
            dv: r(rng.vec(nkv, -0.5, 0.5)),
            dpk: rng.vec(np, -0.5, 0.5),
            dpv: rng.vec(np, -0.5, 0.5),
        },
    }
}

/// For query (b, i, h): the visible keys as (is_prefix, index), per the rules in mod.rs.
fn visible(c: &Case, d: &Data, b: usize, i: usize) -> Vec<(bool, usize)> {
    let mut keys: Vec<(bool, usize)> = (0..c.prefix).map(|j| (true, j)).collect();
    let pos = c.kv_len - c.q_len + i;
    for j in 0..c.kv_len {
        let unmasked = !c.mask || d.mask[b * c.kv_len + j] != 0;
        if unmasked && (!c.causal || j <= pos) {
            keys.push((false, j));
        }
    }
    keys
}

/// Offset of key row (is_prefix, j) of kv head `g` in sequence `b`.
fn key_at(c: &Case, b: usize, g: usize, (pre, j): (bool, usize)) -> usize {
    let row = if pre { j } else { b * c.kv_len + j };
    (row * c.kv_heads + g) * c.head_dim
}

/// Naive f64 attention: per query row, the probabilities over its visible keys and the lse.
fn probs(c: &Case, d: &Data, b: usize, i: usize, h: usize) -> (Vec<(bool, usize)>, Vec<f64>, f64) {
    let (dh, g) = (c.head_dim, h / (c.heads / c.kv_heads));
    let qo = ((b * c.q_len + i) * c.heads + h) * dh;
    let keys = visible(c, d, b, i);
    let scale = c.params().scale as f64;
    let s: Vec<f64> = keys
        .iter()
        .map(|&key| {
            let (ko, kb) = (key_at(c, b, g, key), if key.0 { &d.pk } else { &d.k });
            scale * (0..dh).map(|x| d.q[qo + x] as f64 * kb[ko + x] as f64).sum::<f64>()
        })
        .collect();
    if s.is_empty() {
        return (keys, s, f64::NEG_INFINITY);
    }
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
    (keys, s.iter().map(|x| (x - lse).exp()).collect(), lse)
}

/// Reference forward: (o, lse).
fn ref_fwd(c: &Case, d: &Data) -> (Vec<f64>, Vec<f64>) {
    let dh = c.head_dim;
    let mut o = vec![0.0; c.batch * c.q_len * c.heads * dh];
    let mut lse = vec![0.0; c.batch * c.heads * c.q_len];
    for b in 0..c.batch {
        for i in 0..c.q_len {
            for h in 0..c.heads {
                let (keys, pr, l) = probs(c, d, b, i, h);
                lse[(b * c.heads + h) * c.q_len + i] = l;
                let oo = ((b * c.q_len + i) * c.heads + h) * dh;
                for (&key, &pj) in keys.iter().zip(&pr) {
                    let (ko, vb) = (key_at(c, b, h / (c.heads / c.kv_heads), key), if key.0 { &d.pv } else { &d.v });
                    for x in 0..dh {
                        o[oo + x] += pj * vb[ko + x] as f64;
                    }
                }
            }
        }
    }
    (o, lse)
}

/// Reference backward increments, with delta = sum(dO * o) from the given `o` (as the kernel).
fn ref_bwd(c: &Case, d: &Data, o: &[f32]) -> Grads<f64> {
    let (dh, scale) = (c.head_dim, c.params().scale as f64);
    let z = |n: usize| vec![0.0f64; n];
    let p = c.params();
    let mut g = Grads {
        dq: z(p.q_elems()),
        dk: z(p.kv_elems()),
        dv: z(p.kv_elems()),
        dpk: z(p.prefix_elems()),
        dpv: z(p.prefix_elems()),
    };
    for b in 0..c.batch {
        for i in 0..c.q_len {
            for h in 0..c.heads {
                let (keys, pr, _) = probs(c, d, b, i, h);
                let kvh = h / (c.heads / c.kv_heads);
                let qo = ((b * c.q_len + i) * c.heads + h) * dh;
                let delta: f64 = (0..dh).map(|x| d.d_o[qo + x] as f64 * o[qo + x] as f64).sum();
                for (&key, &pj) in keys.iter().zip(&pr) {
                    let ko = key_at(c, b, kvh, key);
                    let (kb, vb) = if key.0 { (&d.pk, &d.pv) } else { (&d.k, &d.v) };
                    let dp: f64 = (0..dh).map(|x| d.d_o[qo + x] as f64 * vb[ko + x] as f64).sum();
                    let ds = pj * (dp - delta);
                    let (dk, dv) = if key.0 { (&mut g.dpk, &mut g.dpv) } else { (&mut g.dk, &mut g.dv) };
                    for x in 0..dh {
                        g.dq[qo + x] += scale * ds * kb[ko + x] as f64;
                        dk[ko + x] += scale * ds * d.q[qo + x] as f64;
                        dv[ko + x] += pj * d.d_o[qo + x] as f64;
                    }
                }
            }
        }
    }
    g
}

/// What the CUDA kernels produced, widened to f32: o, lse, and the accumulated gradients.
struct CudaOut {
    o: Vec<f32>,
    lse: Vec<f32>,
    g: Grads,
}

fn run_cuda<E: CudaElem>(dev: &Cuda, c: &Case, d: &Data) -> CudaOut {
    let p = c.params();
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |v: &CudaSlice<E>| dev.download(v).unwrap().into_iter().map(E::to_f32).collect::<Vec<f32>>();
    let (q, k, v, d_o) = (up(&d.q), up(&d.k), up(&d.v), up(&d.d_o));
    let (pk, pv) = (up(&d.pk), up(&d.pv));
    let mask = if c.mask { Some(dev.upload(&d.mask).unwrap()) } else { None };
    let x = AttnInputs::<Cuda, E> {
        q: &q,
        k: &k,
        v: &v,
        prefix: (c.prefix > 0).then_some((&pk, &pv)),
        key_mask: mask.as_ref(),
    };
    let mut o = dev.zeros::<E>(p.q_elems()).unwrap();
    let mut lse = dev.zeros::<f32>(p.lse_elems()).unwrap();
    <Cuda as AttentionKernel<E>>::attn_fwd(dev, &p, x, &mut o, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (up(&d.g0.dq), up(&d.g0.dk), up(&d.g0.dv));
    let (mut dpk, mut dpv) = (dev.upload(&d.g0.dpk).unwrap(), dev.upload(&d.g0.dpv).unwrap());
    let g = AttnGrads::<Cuda, E> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: (c.prefix > 0).then_some((&mut dpk, &mut dpv)),
    };
    <Cuda as AttentionKernel<E>>::attn_bwd(dev, &p, x, &o, &d_o, &lse, g).unwrap();
    let g = Grads {
        dq: down(&dq),
        dk: down(&dk),
        dv: down(&dv),
        dpk: dev.download(&dpk).unwrap(),
        dpv: dev.download(&dpv).unwrap(),
    };
    CudaOut { o: down(&o), lse: dev.download(&lse).unwrap(), g }
}

/// lse: -inf exactly where the reference has a row with no visible key, else close.
fn assert_lse(what: &str, tol: Tol, got: &[f32], want: &[f64]) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g == f32::NEG_INFINITY, w == f64::NEG_INFINITY, "{what} lse[{i}]: got {g}, want {w}");
    }
    let fin = |x: f64| if x.is_finite() { x } else { 0.0 };
    let got: Vec<f64> = got.iter().map(|&g| fin(g as f64)).collect();
    let want: Vec<f64> = want.iter().map(|&w| fin(w)).collect();
    tol.assert_close(&format!("{what} lse"), &got, &want);
}

/// Start + increment, for the accumulate semantics.
fn plus(start: &[f32], inc: &[f64]) -> Vec<f64> {
    start.iter().zip(inc).map(|(&a, &b)| a as f64 + b).collect()
}

/// Run case `c` on CUDA in f32 (Tol::CUDA_F32) and bf16 (Tol::CUDA_BF16) against the reference.
fn check_case(dev: &Cuda, name: &str, c: Case) {
    for (dtype, tol) in [("f32", Tol::CUDA_F32), ("bf16", Tol::CUDA_BF16)] {
        let d = data(&c, 0xA77E ^ (c.head_dim as u64) << 8 ^ c.q_len as u64, dtype == "bf16");
        let out = if dtype == "f32" { run_cuda::<f32>(dev, &c, &d) } else { run_cuda::<bf16>(dev, &c, &d) };
        let what = format!("attention {name} {dtype} {c:?}");
        let (o_ref, lse_ref) = ref_fwd(&c, &d);
        if c.mask && c.batch > 1 && c.prefix == 0 {
            assert!(lse_ref.contains(&f64::NEG_INFINITY), "{what}: case should have fully masked rows");
        }
        tol.assert_close(&format!("{what} o"), &out.o, &o_ref);
        assert_lse(&what, tol, &out.lse, &lse_ref);
        // the backward reads the kernel's own o (as a caller passes it), so delta matches
        let inc = ref_bwd(&c, &d, &out.o);
        tol.assert_close(&format!("{what} dq"), &out.g.dq, &plus(&d.g0.dq, &inc.dq));
        tol.assert_close(&format!("{what} dk"), &out.g.dk, &plus(&d.g0.dk, &inc.dk));
        tol.assert_close(&format!("{what} dv"), &out.g.dv, &plus(&d.g0.dv, &inc.dv));
        tol.assert_close(&format!("{what} dpk"), &out.g.dpk, &plus(&d.g0.dpk, &inc.dpk));
        tol.assert_close(&format!("{what} dpv"), &out.g.dpv, &plus(&d.g0.dpv, &inc.dpv));
    }
}

const fn case(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    prefix: usize,
    head_dim: usize,
    causal: bool,
    mask: bool,
) -> Case {
    Case { batch, heads, kv_heads, q_len, kv_len, prefix, head_dim, causal, mask }
}

#[test]
fn cuda_d32_matches_reference() {
    let Some(dev) = cuda_or_skip("attention::cuda_d32_matches_reference") else { return };
    check_case(&dev, "gqa6/2 bidir mask", case(2, 6, 2, 129, 129, 0, 32, false, true));
    check_case(&dev, "gqa4/1 causal", case(3, 4, 1, 129, 129, 0, 32, true, false));
    check_case(&dev, "mha causal kv-cache prefix70", case(2, 2, 2, 37, 129, 70, 32, true, true));
}

#[test]
fn cuda_d64_matches_reference() {
    let Some(dev) = cuda_or_skip("attention::cuda_d64_matches_reference") else { return };
    check_case(&dev, "mha causal mask", case(2, 4, 4, 37, 37, 0, 64, true, true));
    check_case(&dev, "gqa6/2 causal kv-cache prefix70 mask", case(2, 6, 2, 37, 129, 70, 64, true, true));
    check_case(&dev, "gqa4/1 bidir prefix5", case(1, 4, 1, 129, 129, 5, 64, false, false));
}

#[test]
fn cuda_d128_matches_reference() {
    let Some(dev) = cuda_or_skip("attention::cuda_d128_matches_reference") else { return };
    check_case(&dev, "gqa4/1 causal kv-cache prefix5 mask", case(2, 4, 1, 37, 129, 5, 128, true, true));
    check_case(&dev, "mha bidir prefix70", case(1, 2, 2, 129, 129, 70, 128, false, false));
    check_case(&dev, "gqa6/2 causal mask", case(2, 6, 2, 129, 129, 0, 128, true, true));
}

#[test]
fn cuda_head_dim_24_is_unsupported() {
    let Some(dev) = cuda_or_skip("attention::cuda_head_dim_24_is_unsupported") else { return };
    let p = AttnParams::new(1, 2, 2, 5, 24, true);
    let z = |n: usize| dev.zeros::<f32>(n).unwrap();
    let (q, k, v, mut o, mut lse) =
        (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()), z(p.q_elems()), z(p.lse_elems()));
    let x = AttnInputs::<Cuda, f32> { q: &q, k: &k, v: &v, prefix: None, key_mask: None };
    let e = AttentionKernel::<f32>::attn_fwd(&*dev, &p, x, &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("head_dim 24"), "{e}");
    let (mut dq, mut dk, mut dv) = (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()));
    let g = AttnGrads::<Cuda, f32> { dq: &mut dq, dk: &mut dk, dv: &mut dv, dprefix: None };
    let e = AttentionKernel::<f32>::attn_bwd(&*dev, &p, x, &o, &o, &lse, g).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("head_dim 24"), "{e}");
}

/// Input tensor `t` of q, k, v, pk, pv.
fn input_mut(d: &mut Data, t: usize) -> &mut Vec<f32> {
    match t {
        0 => &mut d.q,
        1 => &mut d.k,
        2 => &mut d.v,
        3 => &mut d.pk,
        _ => &mut d.pv,
    }
}

/// The reference itself: its backward against central differences of its forward (loss
/// `sum(o * d_o)`), on a small case with GQA, causal kv-cache offset, prefix, and a mask with
/// fully masked rows. Runs everywhere (no GPU needed).
#[test]
fn reference_backward_matches_central_differences() {
    let c = case(2, 4, 2, 5, 7, 3, 4, true, true);
    let mut d = data(&c, 11, false);
    let loss = |d: &Data| -> f64 { ref_fwd(&c, d).0.iter().zip(&d.d_o).map(|(o, g)| o * *g as f64).sum() };
    let o: Vec<f32> = ref_fwd(&c, &d).0.iter().map(|&x| x as f32).collect();
    let g = ref_bwd(&c, &d, &o);
    let want = [&g.dq, &g.dk, &g.dv, &g.dpk, &g.dpv];
    let tol = Tol::new("central differences, h=1e-3, f64 forward over f32-stored inputs", 1e-5, 1e-4);
    for (t, name) in ["q", "k", "v", "pk", "pv"].into_iter().enumerate() {
        let n = want[t].len();
        let mut fd = vec![0.0; n];
        for (i, fd_i) in fd.iter_mut().enumerate() {
            let x0 = input_mut(&mut d, t)[i];
            let (xp, xm) = (x0 + 1e-3, x0 - 1e-3);
            input_mut(&mut d, t)[i] = xp;
            let lp = loss(&d);
            input_mut(&mut d, t)[i] = xm;
            let lm = loss(&d);
            input_mut(&mut d, t)[i] = x0;
            *fd_i = (lp - lm) / (xp as f64 - xm as f64);
        }
        tol.assert_close(&format!("reference d{name}"), want[t], &fd);
    }
}
