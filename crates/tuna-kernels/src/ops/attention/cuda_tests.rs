//! CUDA attention against the CPU kernel (`<Cpu as AttentionKernel<f32>>`, itself proven against
//! an f64 reference in `tests.rs`), in f32 and bf16, for every head-dim launch configuration,
//! causal/bidirectional, scattered padding masks with fully masked rows, GQA and MHA, prefix
//! absent/present, q_len < kv_len, and ragged lengths (not multiples of the 32-row tile).
//! Inputs come from the shared `tests::Data` builder.

use super::tests::{grad_starts, Data, Pad};
use super::*;
use crate::cuda::CudaBuf;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, Tol};
use crate::{Cpu, Cuda};
use half::bf16;

/// Gradient names, in the order of `grad_starts`: dq, dk, dv, dpk, dpv, dbias.
pub(super) const GRAD_NAMES: [&str; 6] = ["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias"];

/// One device's forward outputs and accumulated gradients, as f32 host vectors.
pub(super) struct Out {
    pub(super) o: Vec<f32>,
    pub(super) lse: Vec<f32>,
    pub(super) grads: Vec<Vec<f32>>,
}

/// `d`'s inputs on the device in precision `E` (prefix, mask and rows only when present: no
/// zero-length device allocations).
struct DevInputs<E: CudaElem> {
    q: CudaBuf<E>,
    k: CudaBuf<E>,
    v: CudaBuf<E>,
    prefix: Option<(CudaBuf<E>, CudaBuf<E>)>,
    mask: Option<CudaBuf<u8>>,
    rows: Option<CudaBuf<u32>>,
    bias: Option<CudaBuf<E>>,
}

impl<E: CudaElem> DevInputs<E> {
    fn upload(dev: &Cuda, d: &Data) -> Self {
        let p = d.p;
        let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
        DevInputs {
            q: up(&d.q),
            k: up(&d.k),
            v: up(&d.v),
            prefix: (p.prefix_len > 0).then(|| (up(&d.pk), up(&d.pv))),
            mask: (p.has_mask == 1).then(|| dev.upload(&d.mask).unwrap()),
            rows: (p.has_prefix_rows == 1).then(|| dev.upload(&d.prefix_rows).unwrap()),
            bias: (p.has_bias != 0).then(|| up(&d.bias)),
        }
    }

    fn inputs(&self) -> AttnInputs<'_, Cuda, E> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix: self.prefix.as_ref().map(|(pk, pv)| (pk, pv)),
            key_mask: self.mask.as_ref(),
            prefix_rows: self.rows.as_ref(),
            bias: self.bias.as_ref(),
        }
    }

    /// The CUDA forward: `o` and `lse` on the device, into unfilled buffers (NaN on the emulated
    /// device), as the autograd op allocates them: a row the kernel skipped shows.
    fn forward(&self, dev: &Cuda, p: &AttnParams) -> (CudaBuf<E>, CudaBuf<f32>) {
        let mut o = dev.unfilled::<E>(p.q_elems()).unwrap();
        let mut lse = dev.unfilled::<f32>(p.lse_elems()).unwrap();
        <Cuda as AttentionKernel<E>>::attn_fwd(dev, p, self.inputs(), &mut o, &mut lse).unwrap();
        (o, lse)
    }
}

/// Forward on CUDA in precision `E`, then backward from its own `o` and `lse`, accumulating into
/// gradients that start at `starts`.
pub(super) fn run_cuda<E: CudaElem>(dev: &Cuda, d: &Data, starts: &[Vec<f32>]) -> Out {
    let p = d.p;
    let up = |v: &[f32]| dev.upload(&v.iter().map(|&a| E::from_f32(a)).collect::<Vec<E>>()).unwrap();
    let down = |v: &CudaBuf<E>| dev.download(v).unwrap().into_iter().map(E::to_f32).collect::<Vec<f32>>();
    let x = DevInputs::<E>::upload(dev, d);
    let d_o = up(&d.d_o);
    let (o, lse) = x.forward(dev, &p);
    let (mut dq, mut dk, mut dv) = (up(&starts[0]), up(&starts[1]), up(&starts[2]));
    let mut dprefix = (p.prefix_len > 0).then(|| (dev.upload(&starts[3]).unwrap(), dev.upload(&starts[4]).unwrap()));
    let mut dbias = (p.has_bias == 1).then(|| dev.upload(&starts[5]).unwrap());
    let g = AttnGrads::<Cuda, E> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: dprefix.as_mut().map(|(a, b)| (a, b)),
        dbias: dbias.as_mut(),
    };
    <Cuda as AttentionKernel<E>>::attn_bwd(dev, &p, x.inputs(), &o, &d_o, &lse, g).unwrap();
    let (dpk, dpv) = match &dprefix {
        Some((a, b)) => (dev.download(a).unwrap(), dev.download(b).unwrap()),
        None => (Vec::new(), Vec::new()),
    };
    let db = dbias.as_ref().map_or(Vec::new(), |b| dev.download(b).unwrap());
    Out { o: down(&o), lse: dev.download(&lse).unwrap(), grads: vec![down(&dq), down(&dk), down(&dv), dpk, dpv, db] }
}

/// The CPU forward on `d`.
pub(super) fn cpu_fwd(d: &Data) -> (Vec<f32>, Vec<f32>) {
    let (mut o, mut lse) = (vec![0.0; d.p.q_elems()], vec![0.0; d.p.lse_elems()]);
    <Cpu as AttentionKernel<f32>>::attn_fwd(&Cpu, &d.p, d.inputs(), &mut o, &mut lse).unwrap();
    (o, lse)
}

/// The CPU backward on `d` from the given forward outputs, accumulating into copies of `starts`.
pub(super) fn cpu_bwd(d: &Data, o: &[f32], lse: &[f32], starts: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let mut got = starts.to_vec();
    let [dq, dk, dv, dpk, dpv, db] = &mut got[..] else { unreachable!("grad_starts gives six buffers") };
    let dprefix = (d.p.prefix_len > 0).then_some((&mut dpk[..], &mut dpv[..]));
    let g = AttnGrads::<Cpu, f32> { dq, dk, dv, dprefix, dbias: (d.p.has_bias == 1).then_some(&mut db[..]) };
    <Cpu as AttentionKernel<f32>>::attn_bwd(&Cpu, &d.p, d.inputs(), o, &d.d_o, lse, g).unwrap();
    got
}

/// lse: -inf exactly where the CPU's is (rows that see no key), else within `tol`.
pub(super) fn assert_lse(what: &str, tol: Tol, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what} lse length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g == f32::NEG_INFINITY, w == f32::NEG_INFINITY, "{what} lse[{i}]: got {g}, want {w}");
    }
    let fin = |x: &f32| if x.is_finite() { *x } else { 0.0 };
    let (got, want): (Vec<f32>, Vec<f32>) = (got.iter().map(fin).collect(), want.iter().map(fin).collect());
    tol.assert_close(&format!("{what} lse"), &got, &want);
}

/// Run `data` on CUDA in f32 (Tol::CUDA_F32) and bf16 (inputs and E-typed starting gradients
/// rounded through bf16, Tol::CUDA_BF16) and compare with the CPU on the same inputs. The CPU
/// backward reads the CUDA forward's `o` and `lse` (as a caller passes them to the backward),
/// so both backwards see identical inputs; the forward outputs are checked separately.
pub(super) fn check_case(dev: &Cuda, name: &str, data: Data) {
    for (dtype, tol) in [("f32", Tol::CUDA_F32), ("bf16", Tol::CUDA_BF16)] {
        let mut d = data.clone();
        let mut starts = grad_starts(&d.p, 0xA77E);
        if dtype == "bf16" {
            for v in [&mut d.q, &mut d.k, &mut d.v, &mut d.pk, &mut d.pv, &mut d.d_o, &mut d.bias] {
                *v = round_bf16(v);
            }
            // dq, dk, dv are bf16 on the device; dpk, dpv, dbias are always f32.
            for s in &mut starts[..3] {
                *s = round_bf16(s);
            }
        }
        let out = if dtype == "f32" { run_cuda::<f32>(dev, &d, &starts) } else { run_cuda::<bf16>(dev, &d, &starts) };
        let what = format!("attention {name} {dtype} {:?}", d.p);
        let (o_cpu, lse_cpu) = cpu_fwd(&d);
        if d.p.has_mask == 1 && d.p.batch > 1 && d.p.prefix_len == 0 {
            assert!(lse_cpu.contains(&f32::NEG_INFINITY), "{what}: case should have fully masked rows");
        }
        tol.assert_close(&format!("{what} o"), &out.o, &o_cpu);
        assert_lse(&what, tol, &out.lse, &lse_cpu);
        let want = cpu_bwd(&d, &out.o, &out.lse, &starts);
        for ((gname, got), want) in GRAD_NAMES.iter().zip(&out.grads).zip(&want) {
            tol.assert_close(&format!("{what} {gname}"), got, want);
        }
    }
}

// Data::new(seed, batch, heads, kv_heads, q_len, kv_len, prefix_len, head_dim, causal, pad)

#[test]
fn cuda_d32_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_d32_matches_cpu") else { return };
    check_case(&dev, "gqa6/2 bidir mask", Data::new(31, 2, 6, 2, 129, 129, 0, 32, false, Pad::Scattered));
    check_case(&dev, "gqa4/1 causal", Data::new(32, 3, 4, 1, 129, 129, 0, 32, true, Pad::None));
    check_case(
        &dev,
        "mha causal kv-cache prefix70 mask",
        Data::new(33, 2, 2, 2, 37, 129, 70, 32, true, Pad::Scattered),
    );
}

#[test]
fn cuda_d64_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_d64_matches_cpu") else { return };
    check_case(&dev, "mha causal mask", Data::new(64, 2, 4, 4, 37, 37, 0, 64, true, Pad::Scattered));
    let gqa_cache = Data::new(65, 2, 6, 2, 37, 129, 70, 64, true, Pad::Scattered);
    check_case(&dev, "gqa6/2 causal kv-cache prefix70 mask", gqa_cache);
    check_case(&dev, "gqa4/1 bidir prefix5", Data::new(66, 1, 4, 1, 129, 129, 5, 64, false, Pad::None));
}

#[test]
fn cuda_d128_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_d128_matches_cpu") else { return };
    let gqa_cache = Data::new(128, 2, 4, 1, 37, 129, 5, 128, true, Pad::Scattered);
    check_case(&dev, "gqa4/1 causal kv-cache prefix5 mask", gqa_cache);
    check_case(&dev, "mha bidir prefix70", Data::new(129, 1, 2, 2, 129, 129, 70, 128, false, Pad::None));
    check_case(&dev, "gqa6/2 causal mask", Data::new(130, 2, 6, 2, 129, 129, 0, 128, true, Pad::Scattered));
}

/// Head dims between the tile widths run zero-padded on the next width: the tiny fixtures' 4 and 8,
/// and the real models' 80 and 96.
#[test]
fn cuda_padded_head_dims_match_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_padded_head_dims_match_cpu") else { return };
    check_case(&dev, "d4 mha causal mask", Data::new(4, 2, 2, 2, 9, 9, 0, 4, true, Pad::Scattered));
    check_case(&dev, "d8 gqa4/2 causal prefix3", Data::new(8, 2, 4, 2, 7, 7, 3, 8, true, Pad::None));
    check_case(&dev, "d24 gqa2/1 bidir kv-cache prefix5", Data::new(24, 1, 2, 1, 5, 40, 5, 24, false, Pad::Scattered));
    check_case(&dev, "d80 mha causal", Data::new(80, 1, 2, 2, 33, 33, 0, 80, true, Pad::None));
    check_case(&dev, "d96 gqa2/1 bidir prefix4 mask", Data::new(96, 2, 2, 1, 20, 20, 4, 96, false, Pad::Scattered));
}

#[test]
fn cuda_widest_head_dims_match_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_widest_head_dims_match_cpu") else { return };
    check_case(&dev, "d160 mha causal prefix3", Data::new(160, 1, 2, 2, 33, 33, 3, 160, true, Pad::None));
    check_case(&dev, "d256 gqa2/1 causal mask", Data::new(256, 2, 2, 1, 35, 35, 0, 256, true, Pad::Scattered));
}

#[test]
fn cuda_head_dim_257_is_unsupported() {
    let Some(dev) = cuda_or_skip("attention::cuda_head_dim_257_is_unsupported") else { return };
    let p = AttnParams::new(1, 2, 2, 5, 257, true);
    assert_eq!(super::cuda::tile_width(256), Some(256));
    assert_eq!(super::cuda::tile_width(257), None);
    let z = |n: usize| dev.zeros::<f32>(n).unwrap();
    let (q, k, v, mut o, mut lse) =
        (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()), z(p.q_elems()), z(p.lse_elems()));
    let x =
        AttnInputs::<Cuda, f32> { q: &q, k: &k, v: &v, prefix: None, key_mask: None, prefix_rows: None, bias: None };
    let e = AttentionKernel::<f32>::attn_fwd(&*dev, &p, x, &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("head_dim 257"), "{e}");
    let (mut dq, mut dk, mut dv) = (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()));
    let g = AttnGrads::<Cuda, f32> { dq: &mut dq, dk: &mut dk, dv: &mut dv, dprefix: None, dbias: None };
    let e = AttentionKernel::<f32>::attn_bwd(&*dev, &p, x, &o, &o, &lse, g).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }) && e.to_string().contains("head_dim 257"), "{e}");
}

/// The forward reading keys/values in place from buffers of `kv_cap > kv_len` rows per sequence
/// (a KV cache's preallocated buffer, noise past the keys) equals the CPU's on the contiguous keys,
/// in f32 and bf16.
#[test]
fn cuda_strided_kv_forward_matches_cpu() {
    let Some(dev) = cuda_or_skip("attention::cuda_strided_kv_forward_matches_cpu") else { return };
    let mut rows = Data::new(45, 3, 4, 2, 3, 40, 6, 8, true, Pad::Left);
    rows.p.has_prefix_rows = 1;
    rows.prefix_rows = vec![0, 6, 2, 3, 0, 0];
    let cases = [
        ("decode 1 after 70, gqa6/2, mask", Data::new(44, 2, 6, 2, 1, 70, 0, 64, true, Pad::Scattered), 128),
        ("3 after 40, prefix rows, left pad", rows, 97),
        ("prefill 33, mha, prefix", Data::new(46, 1, 2, 2, 33, 33, 3, 32, true, Pad::None), 34),
    ];
    for (name, d, cap) in cases {
        let w = d.strided(cap, 9);
        assert_eq!(w.k.len(), w.p.kv_elems());
        let (o_cpu, lse_cpu) = cpu_fwd(&d);
        for (dtype, tol) in [("f32", Tol::CUDA_F32), ("bf16", Tol::CUDA_BF16)] {
            let mut w = w.clone();
            let mut want = (o_cpu.clone(), lse_cpu.clone());
            if dtype == "bf16" {
                let mut r = d.clone();
                for (a, b) in [(&mut w.q, &mut r.q), (&mut w.k, &mut r.k), (&mut w.v, &mut r.v)] {
                    *a = round_bf16(a);
                    *b = round_bf16(b);
                }
                for (a, b) in [(&mut w.pk, &mut r.pk), (&mut w.pv, &mut r.pv)] {
                    *a = round_bf16(a);
                    *b = round_bf16(b);
                }
                want = cpu_fwd(&r);
            }
            let (o, lse) = if dtype == "f32" { cuda_fwd::<f32>(&dev, &w) } else { cuda_fwd::<bf16>(&dev, &w) };
            let what = format!("attention strided {name} {dtype} kv_cap {cap}");
            tol.assert_close(&format!("{what} o"), &o, &want.0);
            assert_lse(&what, tol, &lse, &want.1);
        }
    }
}

/// The CUDA forward alone in precision `E` (`o`, `lse` as f32).
pub(super) fn cuda_fwd<E: CudaElem>(dev: &Cuda, d: &Data) -> (Vec<f32>, Vec<f32>) {
    let (o, lse) = DevInputs::<E>::upload(dev, d).forward(dev, &d.p);
    (dev.download(&o).unwrap().into_iter().map(E::to_f32).collect(), dev.download(&lse).unwrap())
}
