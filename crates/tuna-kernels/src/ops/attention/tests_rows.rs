//! Per-sequence prefix ranges (`prefix_rows`): a batch whose sequences see different slices of
//! one stacked prefix table equals each sequence run alone with its slice as the whole prefix
//! (CPU in f64, every backward split; prefix gradients of shared rows summed), CUDA matches the
//! CPU at ragged shapes (ranges crossing the 32-row tile, empty, shared, GQA, masks, a KV
//! cache), and a range outside the table is refused.

use super::cpu::{attn_bwd_mode, BwdMode};
use super::tests::{Data, Pad};
use super::*;
use crate::backend::CpuFloat;
use crate::testing::Tol;
use crate::Cpu;

/// `data` with a prefix table of `table` rows and sequence `b` seeing `rows[b] = (start, len)`.
#[allow(clippy::too_many_arguments)]
fn ranged(
    seed: u64,
    (h, kvh): (usize, usize),
    (t, s): (usize, usize),
    d: usize,
    causal: bool,
    pad: Pad,
    table: usize,
    rows: &[(u32, u32)],
) -> Data {
    let mut data = Data::new(seed, rows.len(), h, kvh, t, s, table, d, causal, pad);
    data.p.has_prefix_rows = 1;
    data.prefix_rows = rows.iter().flat_map(|&(a, n)| [a, n]).collect();
    data
}

/// Sequence `b` of `data` alone, its prefix range as the whole prefix.
fn alone(data: &Data, b: usize) -> Data {
    let p = data.p;
    let (t, s, h, kvh, dd) =
        (p.q_len as usize, p.kv_len as usize, p.heads as usize, p.kv_heads as usize, p.head_dim as usize);
    let (start, len) = (data.prefix_rows[2 * b] as usize, data.prefix_rows[2 * b + 1] as usize);
    let (qn, kn, pn) = (t * h * dd, s * kvh * dd, kvh * dd);
    let mut one = data.clone();
    one.p.batch = 1;
    one.p.prefix_len = len as u32;
    one.p.has_prefix_rows = 0;
    one.prefix_rows = Vec::new();
    one.q = data.q[b * qn..][..qn].to_vec();
    one.d_o = data.d_o[b * qn..][..qn].to_vec();
    one.k = data.k[b * kn..][..kn].to_vec();
    one.v = data.v[b * kn..][..kn].to_vec();
    one.pk = data.pk[start * pn..(start + len) * pn].to_vec();
    one.pv = data.pv[start * pn..(start + len) * pn].to_vec();
    if p.has_mask == 1 {
        one.mask = data.mask[b * s..][..s].to_vec();
    }
    one
}

/// Forward and backward (zero starting gradients) of `data` on the CPU in `F`:
/// `[o, lse, dq, dk, dv, dpk, dpv]` as f64.
fn run<F: CpuFloat>(data: &Data, mode: BwdMode) -> Vec<Vec<f64>> {
    let p = data.p;
    let c = |x: &[f32]| x.iter().map(|&v| F::c(v.into())).collect::<Vec<F>>();
    let (q, k, v, pk, pv, d_o) = (c(&data.q), c(&data.k), c(&data.v), c(&data.pk), c(&data.pv), c(&data.d_o));
    let x = AttnInputs::<Cpu, F> {
        q: &q,
        k: &k,
        v: &v,
        prefix: (p.prefix_len > 0).then_some((&pk[..], &pv[..])),
        key_mask: (p.has_mask == 1).then_some(&data.mask[..]),
        prefix_rows: (p.has_prefix_rows == 1).then_some(&data.prefix_rows[..]),
        bias: None,
    };
    let (mut o, mut lse) = (vec![F::zero(); p.q_elems()], vec![F::zero(); p.lse_elems()]);
    Cpu.attn_fwd(&p, x, &mut o, &mut lse).unwrap();
    let z = |n: usize| vec![F::zero(); n];
    let (mut dq, mut dk, mut dv, mut dpk, mut dpv) =
        (z(p.q_elems()), z(p.kv_elems()), z(p.kv_elems()), z(p.prefix_elems()), z(p.prefix_elems()));
    let dprefix = (p.prefix_len > 0).then_some((&mut dpk[..], &mut dpv[..]));
    let g = AttnGrads::<Cpu, F> { dq: &mut dq, dk: &mut dk, dv: &mut dv, dprefix, dbias: None };
    attn_bwd_mode(&p, x, &o, &d_o, &lse, g, mode).unwrap();
    let w = |x: &[F]| x.iter().map(|&v| v.into()).collect::<Vec<f64>>();
    vec![w(&o), w(&lse), w(&dq), w(&dk), w(&dv), w(&dpk), w(&dpv)]
}

/// The batch with ranges equals each sequence alone; prefix gradients are the sum of the
/// sequences' gradients at their ranges.
fn check_equals_alone(what: &str, data: &Data) {
    let p = data.p;
    let names = ["o", "lse", "dq", "dk", "dv"];
    let pn = (p.kv_heads * p.head_dim) as usize;
    for mode in [BwdMode::Split, BwdMode::Fused] {
        let got = run::<f64>(data, mode);
        let mut want: Vec<Vec<f64>> = vec![Vec::new(); 5];
        let (mut dpk, mut dpv) = (vec![0.0; p.prefix_elems()], vec![0.0; p.prefix_elems()]);
        for b in 0..p.batch as usize {
            let one = run::<f64>(&alone(data, b), mode);
            for (w, x) in want.iter_mut().zip(&one) {
                w.extend_from_slice(x);
            }
            let start = data.prefix_rows[2 * b] as usize * pn;
            for (i, (a, c)) in one[5].iter().zip(&one[6]).enumerate() {
                dpk[start + i] += a;
                dpv[start + i] += c;
            }
        }
        want.extend([dpk, dpv]);
        for (i, name) in names.iter().chain(&["dprefix_k", "dprefix_v"]).enumerate() {
            let fin = |v: &[f64]| v.iter().map(|&x| if x.is_finite() { x } else { -1e300 }).collect::<Vec<f64>>();
            Tol::F64.assert_close(&format!("{what} ({mode:?}) {name}"), &fin(&got[i]), &fin(&want[i]));
        }
    }
}

#[test]
fn prefix_rows_equal_each_sequence_alone() {
    // Ranges: crossing BK-sized blocks, empty, shared by two sequences, the table's tail.
    let rows = [(0, 130), (130, 0), (130, 5), (0, 130), (135, 3)];
    let big = ranged(7, (4, 2), (9, 9), 8, true, Pad::Left, 138, &rows);
    check_equals_alone("gqa4/2 causal left-pad", &big);
    let cache = ranged(8, (2, 2), (3, 11), 4, true, Pad::Scattered, 6, &[(0, 2), (2, 4), (0, 0)]);
    check_equals_alone("mha kv-cache scattered", &cache);
    let bidir = ranged(9, (2, 1), (6, 6), 4, false, Pad::None, 7, &[(3, 4), (0, 3)]);
    check_equals_alone("gqa2/1 bidirectional", &bidir);
}

#[test]
fn prefix_rows_outside_the_table_are_refused() {
    let data = ranged(10, (2, 2), (3, 3), 4, true, Pad::None, 4, &[(0, 4), (2, 3)]);
    let e = std::panic::catch_unwind(|| run::<f32>(&data, BwdMode::Auto)).unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("sequence 1 takes rows 2..+3 of a prefix table of 4"), "{msg}");
    let mut short = ranged(11, (2, 2), (3, 3), 4, true, Pad::None, 4, &[(0, 4), (0, 1)]);
    short.prefix_rows.pop();
    let e = std::panic::catch_unwind(|| run::<f32>(&short, BwdMode::Auto)).unwrap_err();
    let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("prefix_rows"), "{msg}");
}

#[test]
fn cuda_prefix_rows_match_cpu() {
    use super::cuda_tests::check_case;
    let Some(dev) = crate::testing::cuda_or_skip("attention::cuda_prefix_rows_match_cpu") else { return };
    // Ragged: ranges of 0, 3, 40 and 70 rows (crossing 32-row tiles), two sequences sharing one.
    let rows = [(0, 70), (70, 0), (70, 40), (0, 70), (110, 3)];
    check_case(&dev, "rows d8 gqa4/2 causal mask", ranged(40, (4, 2), (37, 37), 8, true, Pad::Scattered, 113, &rows));
    let cache = ranged(41, (2, 2), (5, 40), 24, true, Pad::Left, 9, &[(4, 5), (0, 4), (0, 9)]);
    check_case(&dev, "rows d24 mha kv-cache left-pad", cache);
    check_case(&dev, "rows d64 bidir", ranged(42, (2, 1), (33, 33), 64, false, Pad::None, 35, &[(2, 33), (0, 2)]));
}

/// Sequence 0 of `data` (no mask) with `pad` keys and queries of left padding before it (junk
/// values, masked out).
fn left_padded(data: &Data, pad: usize) -> Data {
    let p = data.p;
    let (t, h, kvh, dd) = (p.q_len as usize, p.heads as usize, p.kv_heads as usize, p.head_dim as usize);
    let junk = |n: usize| (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 3.0).collect::<Vec<f32>>();
    let mut out = data.clone();
    out.p.q_len = (t + pad) as u32;
    out.p.kv_len = (t + pad) as u32;
    out.p.has_mask = 1;
    out.mask = [vec![0u8; pad], vec![1u8; t]].concat();
    out.q = [junk(pad * h * dd), data.q.clone()].concat();
    out.d_o = [junk(pad * h * dd), data.d_o.clone()].concat();
    out.k = [junk(pad * kvh * dd), data.k.clone()].concat();
    out.v = [junk(pad * kvh * dd), data.v.clone()].concat();
    out
}

#[test]
fn a_left_padded_row_attends_to_the_bits_of_the_unpadded_row() {
    // The low-precision bases round activations, so a last-bit difference between a row padded in
    // a batch and the same row alone grows into whole quantization steps over the layers: the
    // padded row's output and log-sum-exp must be the unpadded row's, bit for bit (f32, the CPU's
    // training type), whatever the padding (within a key block, across one, several), with and
    // without a prefix, GQA.
    for (seed, (h, kvh), t, pre, d) in [(1, (2, 2), 70, 0, 16), (2, (4, 2), 200, 5, 32), (3, (2, 1), 129, 0, 64)] {
        let data = Data::new(seed, 1, h, kvh, t, t, pre, d, true, Pad::None);
        let plain = run::<f32>(&data, BwdMode::Split);
        for pad in [1, 5, 127, 128, 131] {
            let padded = run::<f32>(&left_padded(&data, pad), BwdMode::Split);
            let qn = h * d;
            let bits = |v: &[f64]| v.iter().map(|x| (*x as f32).to_bits()).collect::<Vec<u32>>();
            let what = format!("t={t} h={h}/{kvh} prefix {pre} d={d} pad {pad}");
            let (got, want) = (bits(&padded[0][pad * qn..]), bits(&plain[0]));
            let first = got.iter().zip(&want).position(|(a, b)| a != b);
            assert!(
                first.is_none(),
                "{what}: o differs first at row {:?} ({} rows differ)",
                first.map(|i| i / qn),
                (0..t).filter(|r| got[r * qn..(r + 1) * qn] != want[r * qn..(r + 1) * qn]).count()
            );
            // lse is [batch, heads, q_len]: the real rows of each head.
            let lse_rows = |v: &[f64], rows: usize, skip: usize| -> Vec<u32> {
                (0..h)
                    .flat_map(|hh| v[hh * rows + skip..(hh + 1) * rows].iter().map(|x| (*x as f32).to_bits()))
                    .collect()
            };
            assert_eq!(lse_rows(&padded[1], t + pad, pad), lse_rows(&plain[1], t, 0), "{what}: lse");
        }
    }
}
