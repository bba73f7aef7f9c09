//! Embedding tests: CPU against an f64 reference, the reference's gradient against finite
//! differences, errors, and CUDA against the CPU.

use super::*;
use crate::cuda::CudaElem;
use crate::testing::{cuda_or_skip, round_bf16, to_f64, Rng, Tol};
use crate::{Cpu, CpuFloat, Cuda};
use half::bf16;

/// A random case: table, ids (with repeats), prompt, insertion points.
struct Case {
    p: EmbedParams,
    table: Vec<f32>,
    ids: Vec<u32>,
    prompt: Vec<f32>,
    at: Vec<u32>,
}

fn case(seed: u64, batch: usize, seq: usize, vocab: usize, hidden: usize, n: usize) -> Case {
    let mut rng = Rng::new(seed);
    let p = EmbedParams::new(batch, seq, vocab, hidden).with_prompt(n);
    let table = rng.normal_vec(p.table_elems(), 1.0);
    let ids = (0..p.ids_elems()).map(|_| rng.below(vocab) as u32).collect();
    let prompt = rng.normal_vec(p.prompt_elems(), 1.0);
    // First row PEFT layout, last row after the whole sequence, others anywhere.
    let at = (0..batch)
        .map(|b| {
            if b == 0 {
                0
            } else if b == batch - 1 {
                seq as u32
            } else {
                rng.below(seq + 1) as u32
            }
        })
        .collect();
    Case { p, table, ids, prompt, at }
}

/// The f64 reference forward, written from the layout's definition.
fn ref_fwd(p: &EmbedParams, table: &[f64], ids: &[u32], prompt: &[f64], at: &[u32]) -> Vec<f64> {
    let (h, seq, n) = (p.hidden as usize, p.seq as usize, p.n_prompt as usize);
    let mut out = Vec::new();
    for b in 0..p.batch as usize {
        let a = if n > 0 { at[b] as usize } else { 0 };
        let token = |j: usize| &table[ids[b * seq + j] as usize * h..][..h];
        for j in 0..a {
            out.extend_from_slice(token(j));
        }
        out.extend_from_slice(&prompt[..n * h]);
        for j in a..seq {
            out.extend_from_slice(token(j));
        }
    }
    out
}

/// The f64 reference backward: gradients of `sum(out * d_out)` w.r.t. table and prompt.
fn ref_bwd(p: &EmbedParams, ids: &[u32], at: &[u32], d_out: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (h, seq, n, len) = (p.hidden as usize, p.seq as usize, p.n_prompt as usize, p.out_len());
    let (mut dt, mut dp) = (vec![0.0; p.table_elems()], vec![0.0; p.prompt_elems()]);
    for b in 0..p.batch as usize {
        let a = if n > 0 { at[b] as usize } else { 0 };
        for t in 0..len {
            let g = &d_out[(b * len + t) * h..][..h];
            let dst = if t >= a && t < a + n {
                &mut dp[(t - a) * h..][..h]
            } else {
                let j = if t < a { t } else { t - n };
                &mut dt[ids[b * seq + j] as usize * h..][..h]
            };
            dst.iter_mut().zip(g).for_each(|(d, g)| *d += g);
        }
    }
    (dt, dp)
}

fn sp<'a>(c: &'a Case) -> Option<SoftPrompt<'a, Cpu, f32>> {
    (c.p.n_prompt > 0).then_some(SoftPrompt { vectors: &c.prompt, at: &c.at })
}

/// `v` converted to the float under test.
fn conv<F: CpuFloat>(v: &[f32]) -> Vec<F> {
    v.iter().map(|&x| F::c(x as f64)).collect()
}

/// The CPU forward on F (f32, or f64 for gradient checks) against the f64 reference.
fn cpu_fwd_case<F: CpuFloat>(tol: Tol) {
    for (seed, n) in [(1, 5), (2, 0)] {
        let c = case(seed, 4, 7, 13, 37, n);
        let (table, prompt) = (conv::<F>(&c.table), conv::<F>(&c.prompt));
        let sp = (n > 0).then_some(SoftPrompt::<Cpu, F> { vectors: &prompt, at: &c.at });
        let mut out = vec![F::nan(); c.p.out_elems()];
        Cpu.embed_fwd(&c.p, &table, &c.ids, sp, &mut out).unwrap();
        let want = ref_fwd(&c.p, &to_f64(&c.table), &c.ids, &to_f64(&c.prompt), &c.at);
        tol.assert_close(&format!("embedding fwd {} n_prompt {n}", F::NAME), &out, &want);
    }
}

#[test]
fn cpu_fwd_matches_reference() {
    cpu_fwd_case::<f32>(Tol::F32);
}

#[test]
fn cpu_f64_fwd_matches_reference() {
    cpu_fwd_case::<f64>(Tol::F64);
}

/// The CPU backward on F against the f64 reference, accumulating onto nonzero gradients.
fn cpu_bwd_case<F: CpuFloat>(tol: Tol) {
    let c = case(3, 5, 9, 6, 41, 3); // vocab 6 < 45 tokens: ids repeat
    let d_out32 = Rng::new(4).normal_vec(c.p.out_elems(), 1.0);
    let d_out = conv::<F>(&d_out32);
    let (dt_ref, dp_ref) = ref_bwd(&c.p, &c.ids, &c.at, &to_f64(&d_out32));
    let (mut dt, mut dp) = (vec![F::c(0.25); c.p.table_elems()], vec![F::c(-0.5); c.p.prompt_elems()]);
    Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, Some(&mut dt), Some(&mut dp)).unwrap();
    let shift = |v: &[f64], s: f64| v.iter().map(|x| x + s).collect::<Vec<_>>();
    let what = |t: &str| format!("embedding {} {t}", F::NAME);
    tol.assert_close(&what("d_table"), &dt, &shift(&dt_ref, 0.25));
    tol.assert_close(&what("d_prompt"), &dp, &shift(&dp_ref, -0.5));
    // Only one gradient asked for: the other buffer is not touched (it is not even passed).
    let mut dp_only = vec![F::zero(); c.p.prompt_elems()];
    Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, None, Some(&mut dp_only)).unwrap();
    tol.assert_close(&what("d_prompt alone"), &dp_only, &dp_ref);
    let mut dt_only = vec![F::zero(); c.p.table_elems()];
    Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, Some(&mut dt_only), None).unwrap();
    tol.assert_close(&what("d_table alone"), &dt_only, &dt_ref);
    Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, None, None).unwrap();
}

#[test]
fn cpu_bwd_accumulates_and_matches_reference() {
    cpu_bwd_case::<f32>(Tol::F32);
}

#[test]
fn cpu_f64_bwd_accumulates_and_matches_reference() {
    cpu_bwd_case::<f64>(Tol::F64);
}

#[test]
fn reference_gradient_matches_central_differences() {
    let c = case(5, 3, 4, 5, 3, 2);
    let w = to_f64(&Rng::new(6).normal_vec(c.p.out_elems(), 1.0));
    let loss = |table: &[f64], prompt: &[f64]| -> f64 {
        ref_fwd(&c.p, table, &c.ids, prompt, &c.at).iter().zip(&w).map(|(o, w)| o * w).sum()
    };
    let (table, prompt) = (to_f64(&c.table), to_f64(&c.prompt));
    let (dt, dp) = ref_bwd(&c.p, &c.ids, &c.at, &w);
    let h = 1e-6;
    let fd = |x: &[f64], i: usize, f: &dyn Fn(&[f64]) -> f64| {
        let (mut up, mut dn) = (x.to_vec(), x.to_vec());
        up[i] += h;
        dn[i] -= h;
        (f(&up) - f(&dn)) / (2.0 * h)
    };
    let fd_t: Vec<f64> = (0..table.len()).map(|i| fd(&table, i, &|t| loss(t, &prompt))).collect();
    let fd_p: Vec<f64> = (0..prompt.len()).map(|i| fd(&prompt, i, &|q| loss(&table, q))).collect();
    Tol::GRAD_CHECK.assert_close("embedding ref d_table vs fd", &dt, &fd_t);
    Tol::GRAD_CHECK.assert_close("embedding ref d_prompt vs fd", &dp, &fd_p);
}

#[test]
fn bad_ids_and_positions_are_errors_before_writing() {
    let mut c = case(7, 2, 3, 4, 5, 1);
    c.ids[4] = 4; // == vocab
    let mut out = vec![7.0; c.p.out_elems()];
    let e = Cpu.embed_fwd(&c.p, &c.table, &c.ids, sp(&c), &mut out).unwrap_err().to_string();
    assert!(e.contains("ids[4]") && e.contains("vocab 4"), "{e}");
    assert!(out.iter().all(|&v| v == 7.0), "out written before the id check");
    let d_out = vec![1.0f32; c.p.out_elems()];
    let e = Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, None, None).unwrap_err().to_string();
    assert!(e.contains("ids[4]"), "{e}");
    c.ids[4] = 0;
    c.at[1] = 4; // > seq 3
    let e = Cpu.embed_fwd(&c.p, &c.table, &c.ids, sp(&c), &mut out).unwrap_err().to_string();
    assert!(e.contains("at[1]") && e.contains("seq 3"), "{e}");
    assert!(validate_ids(&[0, 3], 4).is_ok() && validate_at(&[0, 3], 3).is_ok());
}

#[test]
fn shape_mismatch_is_an_error() {
    let c = case(8, 2, 3, 4, 5, 2);
    let mut out = vec![0.0; c.p.out_elems() - 1];
    let e = Cpu.embed_fwd(&c.p, &c.table, &c.ids, sp(&c), &mut out).unwrap_err().to_string();
    assert!(e.contains("embedding") && e.contains("`out`"), "{e}");
    let d_out = vec![0.0f32; c.p.out_elems()];
    let mut dp = vec![0.0f32; 3];
    let e = Cpu.embed_bwd(&c.p, &c.ids, Some(&c.at), &d_out, None, Some(&mut dp)).unwrap_err().to_string();
    assert!(e.contains("`d_prompt`"), "{e}");
    let e = Cpu.embed_fwd(&c.p, &c.table, &c.ids, None, &mut out).unwrap_err().to_string();
    assert!(e.contains("n_prompt 2"), "{e}");
}

/// CUDA (E = f32 or bf16, inputs rounded through bf16) against the CPU on the same case.
fn cuda_case<E: CudaElem>(dev: &Cuda, c: &Case, tol: Tol, what: &str)
where
    Cuda: EmbeddingKernel<E>,
{
    let to_e = |v: &[f32]| v.iter().map(|&a| E::from_f32(a)).collect::<Vec<_>>();
    let to_f = |v: Vec<E>| v.into_iter().map(|a| a.to_f32()).collect::<Vec<_>>();
    let d_out = round_bf16(&Rng::new(9).normal_vec(c.p.out_elems(), 1.0));
    let mut out = vec![0.0; c.p.out_elems()];
    Cpu.embed_fwd(&c.p, &c.table, &c.ids, sp(c), &mut out).unwrap();
    let has_prompt = c.p.n_prompt > 0;
    let (mut dt, mut dp) = (vec![0.5; c.p.table_elems()], vec![0.5; c.p.prompt_elems()]);
    Cpu.embed_bwd(
        &c.p,
        &c.ids,
        has_prompt.then_some(&c.at[..]),
        &d_out,
        Some(&mut dt),
        has_prompt.then_some(&mut dp[..]),
    )
    .unwrap();

    let (table, ids, at) =
        (dev.upload(&to_e(&c.table)).unwrap(), dev.upload(&c.ids).unwrap(), dev.upload(&c.at).unwrap());
    let prompt = dev.upload(&to_e(if has_prompt { &c.prompt } else { &[0.0] })).unwrap();
    let mut out_d = dev.zeros::<E>(c.p.out_elems()).unwrap();
    let spd = has_prompt.then_some(SoftPrompt { vectors: &prompt, at: &at });
    EmbeddingKernel::<E>::embed_fwd(dev, &c.p, &table, &ids, spd, &mut out_d).unwrap();
    tol.assert_close(&format!("{what} fwd"), &to_f(dev.download(&out_d).unwrap()), &out);

    let d_out_d = dev.upload(&to_e(&d_out)).unwrap();
    let (mut dt_d, mut dp_d) = (
        dev.upload(&vec![0.5f32; c.p.table_elems()]).unwrap(),
        dev.upload(&vec![0.5f32; c.p.prompt_elems().max(1)]).unwrap(),
    );
    let dp_arg = has_prompt.then_some(&mut dp_d);
    EmbeddingKernel::<E>::embed_bwd(dev, &c.p, &ids, has_prompt.then_some(&at), &d_out_d, Some(&mut dt_d), dp_arg)
        .unwrap();
    tol.assert_close(&format!("{what} d_table"), &dev.download(&dt_d).unwrap(), &dt);
    if has_prompt {
        tol.assert_close(&format!("{what} d_prompt"), &dev.download(&dp_d).unwrap(), &dp);
    }
}

#[test]
fn cuda_matches_cpu() {
    let Some(dev) = cuda_or_skip("embedding::cuda_matches_cpu") else { return };
    // Ragged: hidden not a multiple of the 256/128-thread blocks; ids repeat (atomics collide).
    for (seed, batch, seq, vocab, hidden, n) in [(10, 3, 11, 7, 300, 4), (11, 2, 5, 50, 77, 0), (12, 5, 1, 3, 129, 9)] {
        let mut c = case(seed, batch, seq, vocab, hidden, n);
        c.table = round_bf16(&c.table);
        c.prompt = round_bf16(&c.prompt);
        cuda_case::<f32>(&dev, &c, Tol::CUDA_F32, &format!("embedding cuda f32 case {seed}"));
        cuda_case::<bf16>(&dev, &c, Tol::CUDA_BF16, &format!("embedding cuda bf16 case {seed}"));
    }
}
