//! Mixed-adapter batches on the CPU (f64) on the tiny fixtures (GPT-2, Llama with GQA, BERT):
//! every row of a batch mixing the base, prompts of two lengths, prefix, prefix MLP, P-tuning v2,
//! two LoRAs (different ranks and targets) and Houlsby equals that row alone (outputs, greedy
//! tokens, BERT class scores), and a mixed training batch's gradients of each adapter are the sum
//! over its rows of the rows' own gradients.

mod adapt_common;
mod golden_common;
mod mixed_common;

use golden_common::fixture;
use mixed_common::{bank_model, check_mixed, make_adapters, methods, pad, routes, row_ids, temp_dir};
use std::collections::BTreeMap;
use std::sync::Arc;
use tuna_autograd::ops::loss::cross_entropy;
use tuna_autograd::Ints;
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;
use tuna_models::model::AnyModel;
use tuna_models::IGNORE_INDEX;

/// Mixed vs alone in f64: the same arithmetic up to summation order (blocked attention over more
/// masked keys, matmuls of other row counts).
const SAME: Tol = Tol::new("mixed batch vs each row alone (f64)", 1e-10, 1e-8);

#[test]
fn mixed_batch_equals_each_row_alone() {
    let dev = Arc::new(Cpu);
    for arch in adapt_common::ARCHS {
        check_mixed::<Cpu, f64>(&dev, &fixture(arch), arch, SAME, 4, "cpu");
    }
}

/// Labels of a row: its tokens, the first ignored (so the padded batch and the row alone predict
/// the same targets), padding ignored.
fn labels(ids: &[u32], mask: &[u8], seq: usize) -> Vec<i32> {
    let mut l: Vec<i32> = ids.iter().zip(mask).map(|(&t, &m)| if m == 1 { t as i32 } else { IGNORE_INDEX }).collect();
    for row in l.chunks_mut(seq) {
        if let Some(first) = row.iter_mut().find(|x| **x != IGNORE_INDEX) {
            *first = IGNORE_INDEX;
        }
    }
    l
}

/// Multi-task training: the mixed batch's loss (the mean over all rows' targets) has, for each
/// adapter's tensors, the gradient `sum over its rows r of (targets_r / targets) * grad_r`, with
/// `grad_r` the gradient of row `r`'s own loss alone (decoders: the causal LM loss; BERT:
/// cross-entropy of each row's own head).
#[test]
fn mixed_batch_gradients_are_the_rows_gradients() {
    let dev = Arc::new(Cpu);
    for arch in adapt_common::ARCHS {
        let path = fixture(arch);
        let methods = methods(arch);
        let dirs = make_adapters::<Cpu, f64>(&dev, &path, &methods, 0.3, &temp_dir(&format!("grad-{arch}")));
        let mixed = bank_model::<Cpu, f64>(&dev, &path, &dirs);
        let routes = routes(methods.len());
        let vocab = mixed.shape().vocab;
        let rows: Vec<Vec<u32>> = (0..routes.len()).map(|r| row_ids(r, vocab)).collect();
        let batch = rows.len();
        let decoder = mixed.is_decoder();
        let (ids, mask, seq) = pad(&rows, decoder);
        let classes: Vec<i32> = (0..batch).map(|r| (r % 3) as i32).collect();
        let loss =
            |m: &AnyModel<Cpu, f64>, ids: &[u32], mask: &[u8], b: usize, seq: usize, cls: &[i32], mixed: bool| {
                if m.is_decoder() {
                    let l = labels(ids, mask, seq);
                    let r = routes.clone();
                    if mixed { m.lm_loss_mixed(ids, mask, &l, b, &r) } else { m.lm_loss(ids, mask, &l, b) }.unwrap()
                } else {
                    let s = if mixed {
                        m.class_scores_mixed(ids, mask, b, &[], &routes)
                    } else {
                        m.class_scores(ids, mask, b, &[])
                    };
                    cross_entropy(s.unwrap(), &Ints::new(&m.dev, &[b], cls).unwrap(), IGNORE_INDEX).unwrap()
                }
            };
        loss(&mixed, &ids, &mask, batch, seq, &classes, true).backward().unwrap();
        // Each row alone, on a model with only its adapter, weighted by its share of the targets.
        let targets = |r: usize| if decoder { rows[r].len() - 1 } else { 1 };
        let total: usize = (0..batch).map(targets).sum();
        let mut want: BTreeMap<(usize, String), Vec<f64>> = BTreeMap::new();
        for (r, row) in rows.iter().enumerate() {
            let Some(a) = routes[r] else { continue };
            let m = mixed_common::alone_model::<Cpu, f64>(&dev, &path, Some(&dirs[a]));
            let n = row.len();
            loss(&m, row, &vec![1; n], 1, n, &classes[r..r + 1], false).backward().unwrap();
            let w = targets(r) as f64 / total as f64;
            for (name, t) in m.adapt().params() {
                let g = t.grad().unwrap().unwrap_or_else(|| vec![0.0; t.numel()]);
                let acc = want.entry((a, name)).or_insert_with(|| vec![0.0; g.len()]);
                acc.iter_mut().zip(&g).for_each(|(x, y)| *x += w * y);
            }
        }
        let mut checked = 0;
        for ((a, name), w) in &want {
            let bank = &mixed.adapt().bank[*a].1;
            let t = bank.params().into_iter().find(|(n, _)| n == name).unwrap().1;
            let g = t.grad().unwrap().unwrap_or_else(|| vec![0.0; t.numel()]);
            SAME.assert_close(&format!("{arch} adapter {a} {name}: mixed-batch gradient vs rows alone"), &g, w);
            checked += w.iter().any(|x| x.abs() > 1e-9) as usize;
        }
        assert!(checked >= methods.len(), "{arch}: only {checked} adapter tensors got a nonzero gradient");
    }
}

#[test]
fn bad_routes_are_refused() {
    let dev = Arc::new(Cpu);
    let path = fixture("gpt2");
    let dirs = make_adapters::<Cpu, f32>(&dev, &path, &methods("gpt2")[..1], 0.1, &temp_dir("bad-gpt2"));
    let m = bank_model::<Cpu, f32>(&dev, &path, &dirs);
    let e = m.forward_mixed(&[5, 6, 7, 8], &[1; 4], 2, &[Some(0), Some(3)]).unwrap_err().to_string();
    assert!(e.contains("adapter index 3 but the bank holds 1"), "{e}");
    let e = m.forward_mixed(&[5, 6, 7, 8], &[1; 4], 2, &[Some(0)]).unwrap_err().to_string();
    assert!(e.contains("mixed batch") && e.contains("routing rows vs batch"), "{e}");
    // The routing is cleared after a failed forward: the model's own path works again.
    assert!(m.adapt().routing().is_none());
    let mut own = bank_model::<Cpu, f32>(&dev, &path, &dirs);
    own.load_adapter(&dirs[0]).unwrap();
    let e = own.adapt().set_routing(Some(vec![None])).unwrap_err().to_string();
    assert!(e.contains("own adapter installed"), "{e}");
}
