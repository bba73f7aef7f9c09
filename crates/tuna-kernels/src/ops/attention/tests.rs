//! Attention tests: an f64 reference (full score matrix), proven by central differences, and
//! the CPU kernel against it over a grid of masking, GQA, prefix, KV-cache and ragged shapes,
//! in f32 and (a subset) in f64. Score-bias and longer-query (q_len > kv_len) cases are in
//! `tests_bias.rs`.
//! `Pad`, `Data` and `grad_starts` are shared with `cuda_tests.rs`, which checks CUDA against
//! the CPU kernel proven here.

use super::cpu::{attn_bwd_mode, BwdMode};
use super::*;
use crate::backend::CpuFloat;
use crate::testing::{to_f64, Rng, Tol};
use crate::Cpu;

/// Which key padding mask a case uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Pad {
    None,
    /// Each sequence keeps a random number of leading keys (at least one).
    Right,
    /// Each sequence drops a random number of leading keys; batch 0 drops all of them.
    Left,
    /// Each key dropped with probability 1/4 (holes inside tiles), key 0 of sequence 0 always,
    /// and, when batch > 1, every key of the last sequence (fully masked rows unless a prefix
    /// is present).
    Scattered,
}

/// Inputs of one case, in f32.
#[derive(Clone)]
pub(super) struct Data {
    pub(super) p: AttnParams,
    pub(super) q: Vec<f32>,
    pub(super) k: Vec<f32>,
    pub(super) v: Vec<f32>,
    pub(super) pk: Vec<f32>,
    pub(super) pv: Vec<f32>,
    pub(super) mask: Vec<u8>,
    pub(super) d_o: Vec<f32>,
    /// Per-sequence prefix ranges `[batch, 2]`, used when `p.has_prefix_rows == 1`.
    pub(super) prefix_rows: Vec<u32>,
    /// Score bias `[heads, q_len, prefix_len + kv_len]`, used when `p.has_bias == 1`.
    pub(super) bias: Vec<f32>,
}

impl Data {
    /// Seeded random inputs: `b` sequences, `h` query and `kvh` KV heads, `t` queries after
    /// `s` keys, `pre` prefix positions, head dim `d`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        seed: u64,
        b: usize,
        h: usize,
        kvh: usize,
        t: usize,
        s: usize,
        pre: usize,
        d: usize,
        causal: bool,
        pad: Pad,
    ) -> Self {
        let mut p = AttnParams::new(b, h, kvh, t, d, causal);
        p.kv_len = s as u32;
        p.prefix_len = pre as u32;
        p.has_mask = (pad != Pad::None) as u32;
        let mut rng = Rng::new(seed);
        let mut mask = vec![1u8; if pad == Pad::None { 0 } else { b * s }];
        for (bi, row) in mask.chunks_mut(s.max(1)).enumerate() {
            match pad {
                Pad::Right => row[1 + rng.below(s)..].fill(0),
                Pad::Left => row[..if bi == 0 { s } else { rng.below(s) }].fill(0),
                Pad::Scattered => {
                    row.iter_mut().for_each(|m| *m = (rng.unit() >= 0.25) as u8);
                    if bi == 0 {
                        row[0] = 0;
                    }
                    if b > 1 && bi == b - 1 {
                        row.fill(0);
                    }
                }
                Pad::None => {}
            }
        }
        Data {
            q: rng.normal_vec(p.q_elems(), 1.0),
            k: rng.normal_vec(p.kv_elems(), 1.0),
            v: rng.normal_vec(p.kv_elems(), 1.0),
            pk: rng.normal_vec(p.prefix_elems(), 1.0),
            pv: rng.normal_vec(p.prefix_elems(), 1.0),
            d_o: rng.normal_vec(p.q_elems(), 1.0),
            mask,
            prefix_rows: Vec::new(),
            bias: Vec::new(),
            p,
        }
    }
    /// The same case with a seeded random score bias (standard normal, times `amp`).
    pub(super) fn with_bias(mut self, seed: u64, amp: f32) -> Self {
        self.p.has_bias = 1;
        self.bias = Rng::new(seed).normal_vec(self.p.bias_elems(), amp);
        self
    }
    /// The same case with per-sequence prefix ranges `rows[b] = (start, len)`.
    pub(super) fn with_prefix_rows(mut self, rows: &[(u32, u32)]) -> Self {
        assert_eq!(rows.len(), self.p.batch as usize);
        self.p.has_prefix_rows = 1;
        self.prefix_rows = rows.iter().flat_map(|&(a, n)| [a, n]).collect();
        self
    }
    /// The same case with `k`, `v` in buffers of `cap` rows per sequence (a KV cache's
    /// preallocated buffer): the keys first, then `cap - kv_len` rows of noise the kernels must
    /// not read.
    pub(super) fn strided(&self, cap: usize, seed: u64) -> Self {
        let mut d = self.clone();
        let (s, row) = (self.p.kv_len as usize, (self.p.kv_heads * self.p.head_dim) as usize);
        let mut rng = Rng::new(seed);
        let widen = |x: &[f32], rng: &mut Rng| -> Vec<f32> {
            x.chunks(s * row).flat_map(|b| b.iter().copied().chain(rng.normal_vec((cap - s) * row, 1e3))).collect()
        };
        (d.k, d.v) = (widen(&self.k, &mut rng), widen(&self.v, &mut rng));
        d.p.kv_cap = cap as u32;
        d
    }
    pub(super) fn inputs(&self) -> AttnInputs<'_, Cpu, f32> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix: (self.p.prefix_len > 0).then_some((&self.pk[..], &self.pv[..])),
            key_mask: (self.p.has_mask == 1).then_some(&self.mask[..]),
            prefix_rows: (self.p.has_prefix_rows == 1).then_some(&self.prefix_rows[..]),
            bias: (self.p.has_bias != 0).then_some(&self.bias[..]),
        }
    }
    pub(super) fn reference(&self) -> Ref<'_> {
        Ref {
            p: self.p,
            mask: &self.mask,
            rows: &self.prefix_rows,
            bias: to_f64(&self.bias),
            q: to_f64(&self.q),
            k: to_f64(&self.k),
            v: to_f64(&self.v),
            pk: to_f64(&self.pk),
            pv: to_f64(&self.pv),
        }
    }
}

/// The float inputs of a [`Data`] in the kernel's type `F` (exact: every f32 is an f64).
pub(super) struct Cast<F> {
    q: Vec<F>,
    k: Vec<F>,
    v: Vec<F>,
    pk: Vec<F>,
    pv: Vec<F>,
    d_o: Vec<F>,
    bias: Vec<F>,
}

impl<F: CpuFloat> Cast<F> {
    pub(super) fn new(d: &Data) -> Self {
        let c = |x: &[f32]| x.iter().map(|&v| F::c(v.into())).collect();
        Cast { q: c(&d.q), k: c(&d.k), v: c(&d.v), pk: c(&d.pk), pv: c(&d.pv), d_o: c(&d.d_o), bias: c(&d.bias) }
    }
    pub(super) fn inputs<'a>(&'a self, d: &'a Data) -> AttnInputs<'a, Cpu, F> {
        AttnInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            prefix: (d.p.prefix_len > 0).then_some((&self.pk[..], &self.pv[..])),
            key_mask: (d.p.has_mask == 1).then_some(&d.mask[..]),
            prefix_rows: (d.p.has_prefix_rows == 1).then_some(&d.prefix_rows[..]),
            bias: (d.p.has_bias != 0).then_some(&self.bias[..]),
        }
    }
}

/// The f64 reference, over one full score row at a time.
pub(super) struct Ref<'a> {
    p: AttnParams,
    mask: &'a [u8],
    /// Per-sequence prefix ranges (read when `p.has_prefix_rows == 1`).
    rows: &'a [u32],
    /// `[heads, q_len, prefix_len + kv_len]` (read when `p.has_bias == 1`).
    bias: Vec<f64>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pk: Vec<f64>,
    pv: Vec<f64>,
}

/// Gradients from the reference.
pub(super) struct RefGrads {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dpk: Vec<f64>,
    dpv: Vec<f64>,
    dbias: Vec<f64>,
}

/// One key a query row sees: prefix or content, the offset of its row in `pk`/`pv` or `k`/`v`,
/// and its bias column.
#[derive(Clone, Copy)]
struct Key {
    pre: bool,
    off: usize,
    col: usize,
}

impl Ref<'_> {
    fn dims(&self) -> [usize; 7] {
        let p = &self.p;
        [p.batch, p.heads, p.kv_heads, p.q_len, p.kv_len, p.prefix_len, p.head_dim].map(|x| x as usize)
    }
    /// Visible keys of query (b, i) for KV head `kvh`.
    fn keys(&self, b: usize, i: usize, kvh: usize) -> Vec<Key> {
        let [_, _, kvhs, t, s, pre, d] = self.dims();
        let (start, end) = if self.p.has_prefix_rows == 1 {
            let (a, n) = (self.rows[2 * b] as usize, self.rows[2 * b + 1] as usize);
            (a, a + n)
        } else {
            (0, pre)
        };
        let mut out: Vec<Key> = (start..end).map(|j| Key { pre: true, off: (j * kvhs + kvh) * d, col: j }).collect();
        for j in 0..s {
            let causal_ok = self.p.causal == 0 || j + t <= s + i;
            let mask_ok = self.p.has_mask == 0 || self.mask[b * s + j] == 1;
            if causal_ok && mask_ok {
                out.push(Key { pre: false, off: ((b * s + j) * kvhs + kvh) * d, col: pre + j });
            }
        }
        out
    }
    /// Softmax probabilities and lse of query (b, i, h) over `keys`.
    fn probs(&self, qoff: usize, h: usize, i: usize, keys: &[Key]) -> (Vec<f64>, f64) {
        let [_, _, _, t, s, pre, d] = self.dims();
        let sc: Vec<f64> = keys
            .iter()
            .map(|key| {
                let kk = if key.pre { &self.pk } else { &self.k };
                let dot = (0..d).map(|c| self.q[qoff + c] * kk[key.off + c]).sum::<f64>() * self.p.scale as f64;
                dot + if self.p.has_bias != 0 { self.bias[(h * t + i) * (pre + s) + key.col] } else { 0.0 }
            })
            .collect();
        let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        (sc.iter().map(|x| (x - m).exp() / z).collect(), m + z.ln())
    }
    fn val(&self, pre: bool, off: usize, c: usize) -> f64 {
        if pre {
            self.pv[off + c]
        } else {
            self.v[off + c]
        }
    }
    pub(super) fn fwd(&self) -> (Vec<f64>, Vec<f64>) {
        let [bs, hs, kvhs, t, _, _, d] = self.dims();
        let (mut o, mut lse) = (vec![0.0; self.p.q_elems()], vec![f64::NEG_INFINITY; self.p.lse_elems()]);
        for b in 0..bs {
            for h in 0..hs {
                for i in 0..t {
                    let keys = self.keys(b, i, h / (hs / kvhs));
                    if keys.is_empty() {
                        continue;
                    }
                    let qoff = ((b * t + i) * hs + h) * d;
                    let (pr, l) = self.probs(qoff, h, i, &keys);
                    lse[(b * hs + h) * t + i] = l;
                    for (&pj, key) in pr.iter().zip(&keys) {
                        (0..d).for_each(|c| o[qoff + c] += pj * self.val(key.pre, key.off, c));
                    }
                }
            }
        }
        (o, lse)
    }
    /// Gradients of `sum(o * d_o)`.
    pub(super) fn bwd(&self, d_o: &[f64]) -> RefGrads {
        let [bs, hs, kvhs, t, s, pre, d] = self.dims();
        let mut g = RefGrads {
            dq: vec![0.0; self.q.len()],
            dk: vec![0.0; self.k.len()],
            dv: vec![0.0; self.v.len()],
            dpk: vec![0.0; self.pk.len()],
            dpv: vec![0.0; self.pv.len()],
            dbias: vec![0.0; self.bias.len()],
        };
        for b in 0..bs {
            for h in 0..hs {
                for i in 0..t {
                    let keys = self.keys(b, i, h / (hs / kvhs));
                    let qoff = ((b * t + i) * hs + h) * d;
                    let (pr, _) = self.probs(qoff, h, i, &keys);
                    let dp: Vec<f64> = keys
                        .iter()
                        .map(|key| (0..d).map(|c| d_o[qoff + c] * self.val(key.pre, key.off, c)).sum())
                        .collect();
                    let delta: f64 = pr.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    let sc = self.p.scale as f64;
                    for ((&pj, &dpj), key) in pr.iter().zip(&dp).zip(&keys) {
                        if self.p.has_bias == 1 {
                            g.dbias[(h * t + i) * (pre + s) + key.col] += pj * (dpj - delta);
                        }
                        let (ds, off) = (pj * (dpj - delta) * sc, key.off);
                        let (kk, dk, dv) =
                            if key.pre { (&self.pk, &mut g.dpk, &mut g.dpv) } else { (&self.k, &mut g.dk, &mut g.dv) };
                        for c in 0..d {
                            g.dq[qoff + c] += ds * kk[off + c];
                            dk[off + c] += ds * self.q[qoff + c];
                            dv[off + c] += pj * d_o[qoff + c];
                        }
                    }
                }
            }
        }
        g
    }
}

#[test]
fn reference_gradients_match_central_differences() {
    let causal = Data::new(11, 2, 4, 2, 3, 5, 2, 3, true, Pad::Left).with_bias(12, 1.0);
    // Bidirectional, more queries than keys, per-sequence prefix ranges.
    let longer = Data::new(13, 2, 4, 2, 6, 4, 3, 3, false, Pad::Scattered).with_bias(14, 1.0);
    for data in [causal, longer.with_prefix_rows(&[(1, 2), (0, 3)])] {
        check_reference_gradients(&data);
    }
}

/// The reference's analytic gradients (every input, the bias included) against central differences.
fn check_reference_gradients(data: &Data) {
    let r = data.reference();
    let d_o = to_f64(&data.d_o);
    let g = r.bwd(&d_o);
    let loss = |r: &Ref| r.fwd().0.iter().zip(&d_o).map(|(a, b)| a * b).sum::<f64>();
    let eps = 1e-6;
    type Pick = for<'a, 'b> fn(&'a mut Ref<'b>) -> &'a mut Vec<f64>;
    let cases: [(&str, Pick, &Vec<f64>); 6] = [
        ("dq", |r| &mut r.q, &g.dq),
        ("dk", |r| &mut r.k, &g.dk),
        ("dv", |r| &mut r.v, &g.dv),
        ("dpk", |r| &mut r.pk, &g.dpk),
        ("dpv", |r| &mut r.pv, &g.dpv),
        ("dbias", |r| &mut r.bias, &g.dbias),
    ];
    assert!(g.dbias.iter().any(|&x| x.abs() > 1e-3), "the bias gradient is not exercised");
    for (name, pick, analytic) in cases {
        let mut r = data.reference();
        let numeric: Vec<f64> = (0..analytic.len())
            .map(|i| {
                let x = pick(&mut r)[i];
                pick(&mut r)[i] = x + eps;
                let up = loss(&r);
                pick(&mut r)[i] = x - eps;
                let down = loss(&r);
                pick(&mut r)[i] = x;
                (up - down) / (2.0 * eps)
            })
            .collect();
        Tol::GRAD_CHECK.assert_close(&format!("reference {name} vs central differences"), analytic, &numeric);
    }
}

/// Nonzero starting gradients `[dq, dk, dv, dpk, dpv, dbias]` for `p` (`dbias` empty without a
/// bias), since the backward accumulates.
pub(super) fn grad_starts(p: &AttnParams, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let nb = if p.has_bias == 1 { p.bias_elems() } else { 0 };
    [p.q_elems(), p.kv_elems(), p.kv_elems(), p.prefix_elems(), p.prefix_elems(), nb]
        .iter()
        .map(|&n| rng.vec(n, -1.0, 1.0))
        .collect()
}

/// Runs the f32 CPU forward and every backward split on `data` and compares with the reference.
pub(super) fn check_case(what: &str, data: &Data) {
    check_case_in::<f32>(what, data, Tol::F32_LONG);
}

/// [`check_case`] with the kernel computing in `F`, compared with tolerance `tol`.
pub(super) fn check_case_in<F: CpuFloat>(what: &str, data: &Data, tol: Tol) {
    let what = format!("{what} [{}]", F::NAME);
    let p = data.p;
    let (x, r) = (Cast::<F>::new(data), data.reference());
    let (o_ref, lse_ref) = r.fwd();
    let (mut o, mut lse) = (vec![F::zero(); p.q_elems()], vec![F::zero(); p.lse_elems()]);
    Cpu.attn_fwd(&p, x.inputs(data), &mut o, &mut lse).unwrap();
    tol.assert_close(&format!("{what}: o"), &o, &o_ref);
    for (i, (&got, &want)) in lse.iter().zip(&lse_ref).enumerate() {
        if want == f64::NEG_INFINITY {
            assert!(got == F::neg_infinity(), "{what}: lse[{i}] = {got:?} of a row that sees nothing");
        } else {
            tol.assert_close(&format!("{what}: lse[{i}]"), &[got], &[want]);
        }
    }
    let g = r.bwd(&to_f64(&data.d_o));
    let starts = grad_starts(&p, 99);
    let want: Vec<Vec<f64>> = [&g.dq, &g.dk, &g.dv, &g.dpk, &g.dpv, &g.dbias]
        .iter()
        .zip(&starts)
        .map(|(grad, s0)| grad.iter().zip(s0).map(|(a, &b)| a + b as f64).collect())
        .collect();
    let names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dbias"];
    let starts: Vec<Vec<F>> = starts.iter().map(|s| s.iter().map(|&v| F::c(v.into())).collect()).collect();
    for mode in [BwdMode::Split, BwdMode::Fused, BwdMode::Auto] {
        let mut got = starts.clone();
        let [dq, dk, dv, dpk, dpv, db] = &mut got[..] else { unreachable!() };
        let dprefix = (p.prefix_len > 0).then_some((&mut dpk[..], &mut dpv[..]));
        let grads = AttnGrads::<Cpu, F> { dq, dk, dv, dprefix, dbias: (p.has_bias == 1).then_some(&mut db[..]) };
        attn_bwd_mode(&p, x.inputs(data), &o, &x.d_o, &lse, grads, mode).unwrap();
        for ((name, gv), wv) in names.iter().zip(&got).zip(&want) {
            tol.assert_close(&format!("{what} ({mode:?}): {name}"), gv, wv);
        }
    }
}

#[test]
fn cpu_matches_reference_mha_causal_and_bidirectional() {
    check_case("mha causal d32 t37", &Data::new(1, 2, 4, 4, 37, 37, 0, 32, true, Pad::None));
    check_case("mha bidir d64 t70", &Data::new(2, 2, 3, 3, 70, 70, 0, 64, false, Pad::None));
    check_case("mha causal d128 t129", &Data::new(3, 1, 2, 2, 129, 129, 0, 128, true, Pad::None));
}

#[test]
fn cpu_matches_reference_padding_masks() {
    // Left padding under causal leaves early rows (and all of batch 0) seeing nothing.
    check_case("left pad causal", &Data::new(4, 3, 2, 2, 70, 70, 0, 32, true, Pad::Left));
    check_case("left pad bidir", &Data::new(5, 3, 2, 1, 37, 37, 0, 24, false, Pad::Left));
    check_case("right pad bidir gqa", &Data::new(6, 2, 4, 1, 129, 129, 0, 24, false, Pad::Right));
    check_case("right pad causal", &Data::new(7, 2, 6, 2, 130, 130, 0, 64, true, Pad::Right));
    // Holes inside tiles, and a last sequence with no key at all.
    check_case("scattered causal gqa", &Data::new(22, 3, 6, 2, 70, 70, 0, 32, true, Pad::Scattered));
    check_case("scattered bidir kv-cache", &Data::new(23, 2, 4, 4, 37, 129, 0, 64, false, Pad::Scattered));
}

#[test]
fn cpu_matches_reference_gqa_and_prefix() {
    check_case("gqa 6/2 prefix 5 left pad", &Data::new(8, 2, 6, 2, 70, 70, 5, 64, true, Pad::Left));
    check_case("mqa 4/1 prefix 70 bidir", &Data::new(9, 1, 4, 1, 129, 129, 70, 32, false, Pad::None));
    check_case("gqa prefix 5 right pad", &Data::new(10, 2, 6, 2, 37, 37, 5, 24, false, Pad::Right));
    check_case("mha prefix 70 causal d128", &Data::new(11, 2, 2, 2, 64, 64, 70, 128, true, Pad::None));
    check_case("gqa prefix 150 (two blocks) causal", &Data::new(21, 2, 4, 2, 37, 37, 150, 32, true, Pad::Right));
}

#[test]
fn cpu_matches_reference_kv_cache() {
    check_case("q_len 1 after 70", &Data::new(12, 2, 4, 2, 1, 70, 0, 64, true, Pad::None));
    check_case("q_len 1 prefix 70", &Data::new(13, 1, 4, 2, 1, 129, 70, 128, true, Pad::Left));
    check_case("q_len 37 after 129", &Data::new(14, 2, 6, 2, 37, 129, 5, 64, true, Pad::Left));
    check_case("q_len 70 after 200 bidir", &Data::new(15, 1, 4, 4, 70, 200, 0, 24, false, Pad::Right));
}

/// The f64 kernel against the f64 reference, to f64 rounding: a subset of the f32 grid covering
/// causal and bidirectional, several query/key tiles, GQA/MQA, prefix (one and two blocks),
/// every padding kind (fully masked rows included) and KV-cache query blocks. This is what makes
/// the f64 CPU kernel usable for central-difference gradient checks.
#[test]
fn cpu_f64_matches_reference() {
    let cases = [
        ("mha causal d32 t37", Data::new(1, 2, 4, 4, 37, 37, 0, 32, true, Pad::None)),
        ("right pad bidir gqa t129", Data::new(6, 2, 4, 1, 129, 129, 0, 24, false, Pad::Right)),
        ("scattered causal gqa", Data::new(22, 3, 6, 2, 70, 70, 0, 32, true, Pad::Scattered)),
        ("scattered bidir kv-cache", Data::new(23, 2, 4, 4, 37, 129, 0, 64, false, Pad::Scattered)),
        ("gqa 6/2 prefix 5 left pad", Data::new(8, 2, 6, 2, 70, 70, 5, 64, true, Pad::Left)),
        ("gqa prefix 150 (two blocks) causal", Data::new(21, 2, 4, 2, 37, 37, 150, 32, true, Pad::Right)),
        ("q_len 1 prefix 70", Data::new(13, 1, 4, 2, 1, 129, 70, 128, true, Pad::Left)),
        ("q_len 37 after 129 prefix 5", Data::new(14, 2, 6, 2, 37, 129, 5, 64, true, Pad::Left)),
    ];
    for (what, data) in &cases {
        check_case_in::<f64>(what, data, Tol::F64);
    }
}

#[test]
fn prefix_equals_concatenated_keys() {
    // Prefix keys behave exactly like content keys placed before the sequence (causal too,
    // since the query offset grows by the prefix length).
    let data = Data::new(16, 2, 4, 2, 37, 37, 5, 32, true, Pad::None);
    let p = data.p;
    let (kvr, pre, s) = ((p.kv_heads * p.head_dim) as usize, 5, 37);
    let cat = |pb: &[f32], cb: &[f32]| -> Vec<f32> {
        (0..2).flat_map(|b| pb.iter().chain(&cb[b * s * kvr..][..s * kvr]).copied().collect::<Vec<_>>()).collect()
    };
    let (k2, v2) = (cat(&data.pk, &data.k), cat(&data.pv, &data.v));
    let mut p2 = p;
    p2.prefix_len = 0;
    p2.kv_len = (pre + s) as u32;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    let (mut o2, mut lse2) = (o.clone(), lse.clone());
    Cpu.attn_fwd(&p, data.inputs(), &mut o, &mut lse).unwrap();
    let x2 = AttnInputs::<Cpu, f32> {
        q: &data.q,
        k: &k2,
        v: &v2,
        prefix: None,
        key_mask: None,
        prefix_rows: None,
        bias: None,
    };
    Cpu.attn_fwd(&p2, x2, &mut o2, &mut lse2).unwrap();
    Tol::F32.assert_close("prefix vs concatenated: o", &o, &o2);
    Tol::F32.assert_close("prefix vs concatenated: lse", &lse, &lse2);
}

#[test]
fn zero_length_prefix_is_no_prefix() {
    // prefix_len 0 means no prefix: buffers given anyway are an error, not silently read.
    let data = Data::new(17, 1, 2, 2, 5, 5, 0, 8, true, Pad::None);
    let (mut o, mut lse) = (vec![0.0; data.p.q_elems()], vec![0.0; data.p.lse_elems()]);
    let mut x = data.inputs();
    x.prefix = Some((&[], &[]));
    let e = Cpu.attn_fwd(&data.p, x, &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    check_case("prefix_len 0", &data);
}

#[test]
fn backward_is_deterministic() {
    let data = Data::new(18, 2, 4, 2, 70, 70, 5, 32, true, Pad::Right);
    let p = data.p;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    Cpu.attn_fwd(&p, data.inputs(), &mut o, &mut lse).unwrap();
    let run = || {
        let (mut dq, mut dk, mut dv) = (vec![0.0; p.q_elems()], vec![0.0; p.kv_elems()], vec![0.0; p.kv_elems()]);
        let (mut dpk, mut dpv) = (vec![0.0; p.prefix_elems()], vec![0.0; p.prefix_elems()]);
        let g = AttnGrads::<Cpu, f32> {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dprefix: Some((&mut dpk, &mut dpv)),
            dbias: None,
        };
        Cpu.attn_bwd(&p, data.inputs(), &o, &data.d_o, &lse, g).unwrap();
        [dq, dk, dv, dpk, dpv]
    };
    assert!(run() == run(), "two backward runs differ");
}

#[test]
fn shape_mismatch_names_the_tensor() {
    let data = Data::new(19, 1, 2, 1, 4, 6, 2, 8, false, Pad::None);
    let p = data.p;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    let mut x = data.inputs();
    x.v = &data.v[1..];
    let e = Cpu.attn_fwd(&p, x, &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }) && e.to_string().contains("`v`"), "{e}");
    let e = Cpu.attn_fwd(&p, data.inputs(), &mut o, &mut lse[1..]).unwrap_err();
    assert!(e.to_string().contains("`lse`"), "{e}");
    let (mut dq, mut dk, mut dv) = (vec![0.0; p.q_elems()], vec![0.0; p.kv_elems() + 1], vec![0.0; p.kv_elems()]);
    let (mut dpk, mut dpv) = (vec![0.0; p.prefix_elems()], vec![0.0; p.prefix_elems()]);
    let g = AttnGrads::<Cpu, f32> {
        dq: &mut dq,
        dk: &mut dk,
        dv: &mut dv,
        dprefix: Some((&mut dpk, &mut dpv)),
        dbias: None,
    };
    let e = Cpu.attn_bwd(&p, data.inputs(), &o, &data.d_o, &lse, g).unwrap_err();
    assert!(e.to_string().contains("`dk`"), "{e}");
}

#[test]
fn invalid_params_are_rejected() {
    let data = Data::new(20, 1, 6, 4, 4, 4, 0, 8, false, Pad::None);
    let (mut o, mut lse) = (vec![0.0; data.p.q_elems()], vec![0.0; data.p.lse_elems()]);
    let e = Cpu.attn_fwd(&data.p, data.inputs(), &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("divisible"), "{e}");
    let mut p = data.p;
    p.kv_heads = 2;
    p.q_len = 5; // q_len > kv_len: fine bidirectionally, refused under causal masking
    assert!(p.validate().is_ok());
    p.causal = 1;
    let e = Cpu.attn_fwd(&p, data.inputs(), &mut o, &mut lse).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }) && e.to_string().contains("causal"), "{e}");
    p.causal = 0;
    p.has_bias = 3;
    let e = p.validate().unwrap_err();
    assert!(e.to_string().contains("flags"), "{e}");
}

#[test]
fn strided_kv_forward_equals_contiguous() {
    // A KV cache's buffer holds `kv_cap` rows per sequence of which the first `kv_len` are keys:
    // the forward reads them in place and gives bitwise what the contiguous keys give (same
    // blocks, same order), under masks, GQA, prefixes with per-sequence ranges, and a query block.
    let mut rows = Data::new(41, 3, 4, 2, 3, 40, 6, 8, true, Pad::Left);
    rows.p.has_prefix_rows = 1;
    rows.prefix_rows = vec![0, 6, 2, 3, 0, 0];
    let cases = [
        ("decode 1 after 200, gqa, mask", Data::new(40, 2, 6, 2, 1, 200, 0, 16, true, Pad::Scattered)),
        ("prefill 37 of 37, prefix", Data::new(42, 1, 2, 2, 37, 37, 5, 32, true, Pad::None)),
        ("3 after 40, prefix rows, left pad", rows),
        ("bidirectional 9, mask", Data::new(43, 2, 2, 2, 9, 9, 0, 4, false, Pad::Right)),
    ];
    for (what, d) in &cases {
        let run = |d: &Data| {
            let (mut o, mut lse) = (vec![0.0; d.p.q_elems()], vec![0.0; d.p.lse_elems()]);
            Cpu.attn_fwd(&d.p, d.inputs(), &mut o, &mut lse).unwrap();
            (o, lse)
        };
        for cap in [d.p.kv_len as usize, d.p.kv_len as usize + 1, 2 * d.p.kv_len as usize + 130] {
            assert!(run(&d.strided(cap, 7)) == run(d), "{what}: kv_cap {cap} differs from contiguous");
        }
    }
    // Buffers of the contiguous size, a cap below the length, and the backward: errors.
    let d = &cases[0].1;
    let mut p = d.p;
    p.kv_cap = p.kv_len + 3;
    let (mut o, mut lse) = (vec![0.0; p.q_elems()], vec![0.0; p.lse_elems()]);
    let e = Cpu.attn_fwd(&p, d.inputs(), &mut o, &mut lse).unwrap_err();
    assert!(e.to_string().contains("`k`"), "{e}");
    p.kv_cap = p.kv_len - 1;
    let e = Cpu.attn_fwd(&p, d.inputs(), &mut o, &mut lse).unwrap_err();
    assert!(e.to_string().contains("kv_cap"), "{e}");
    let w = d.strided(d.p.kv_len as usize + 3, 7);
    Cpu.attn_fwd(&w.p, w.inputs(), &mut o, &mut lse).unwrap();
    let (mut dq, mut dk, mut dv) = (vec![0.0; w.p.q_elems()], vec![0.0; w.p.kv_elems()], vec![0.0; w.p.kv_elems()]);
    let g = AttnGrads::<Cpu, f32> { dq: &mut dq, dk: &mut dk, dv: &mut dv, dprefix: None, dbias: None };
    let e = Cpu.attn_bwd(&w.p, w.inputs(), &o, &w.d_o, &lse, g).unwrap_err();
    assert!(e.to_string().contains("inference-only"), "{e}");
}
