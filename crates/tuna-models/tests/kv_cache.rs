//! The preallocated KV cache on the tiny fixtures (GPT-2, Llama with GQA, BERT): tokens fed in
//! chunks through a cache give the full forward's outputs, whether its buffers regrow in the
//! middle (no reservation: capacities 2, 4, 8, 16) or were reserved up front (attention then reads
//! a buffer wider than its keys); appends within capacity keep the same buffers (written in
//! place, no concatenation per token).

mod adapt_common;
mod golden_common;

use adapt_common::{frozen, ids, Fixture, Model, Net, ARCHS};
use std::sync::Arc;
use tuna_autograd::{no_grad, Ints, Tensor};
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;
use tuna_models::generate::KvCache;

/// Cached against uncached in f64: the same keys reach the same attention in another order of
/// blocks at most.
const SAME: Tol = Tol::new("cached vs full forward (f64)", 1e-10, 1e-8);

/// Tokens per step: a prefill of 2, then 1, 1, 3, 1, 1 (9 in all).
const CHUNKS: [usize; 6] = [2, 1, 1, 3, 1, 1];

/// Outputs `[1, chunk, width]` of each chunk of `seq` fed through one cache, reserved for
/// `reserve` tokens; checks after each step that the buffers were kept exactly when the
/// capacity did not change. Returns the outputs and the capacities after each step.
fn chunked(m: &Model<f64>, seq: &[u32], reserve: usize) -> (Vec<f64>, Vec<usize>) {
    let dev = Arc::new(Cpu);
    let n_layers = m.shape().layers;
    let mut cache = KvCache::<Cpu, f64>::new(n_layers);
    cache.reserve(reserve);
    let (mut out, mut caps, mut start) = (Vec::new(), Vec::new(), 0);
    for n in CHUNKS {
        let before = cache.buffers(n_layers - 1).map(|(k, v)| (k.id(), v.id()));
        let (cap0, len0) = (cache.capacity(n_layers - 1), cache.len());
        let t = Ints::new(&dev, &[1, n], &seq[start..start + n]).unwrap();
        let pos: Vec<u32> = (start as u32..(start + n) as u32).collect();
        let pos = Ints::new(&dev, &[1, n], &pos).unwrap();
        let y: Tensor<Cpu, f64> = no_grad(|| match &m.net {
            Net::Llama(l) => l.forward(&t, &pos, None, Some(&mut cache)).unwrap(),
            Net::Gpt2(g) => g.forward_cached(&t, &pos, None, Some(&mut cache)).unwrap(),
            Net::Bert(b) => {
                let ones = Ints::new(&dev, &[1, n], &vec![1u8; n]).unwrap();
                b.encode_cached(&t, &ones, Some(&mut cache)).unwrap().0
            }
            Net::T5(_) => unreachable!("T5 has its own tests (golden_t5, peft_t5)"),
        });
        start += n;
        assert_eq!((cache.len(), cache.layer_len(n_layers - 1)), (start, start));
        let cap = cache.capacity(n_layers - 1);
        let after = cache.buffers(n_layers - 1).map(|(k, v)| (k.id(), v.id()));
        if len0 + n <= cap0 {
            assert_eq!((cap, after), (cap0, before), "an append within capacity replaced the buffers");
        } else {
            assert_ne!(after, before, "a full cache must have grown");
        }
        out.extend(y.to_vec().unwrap());
        caps.push(cap);
    }
    (out, caps)
}

#[test]
fn chunked_decoding_through_a_preallocated_cache_equals_the_full_forward() {
    for arch in ARCHS {
        let m: Model<f64> = frozen(arch);
        let seq = ids(9, m.shape().vocab, 5);
        let (grown, caps) = chunked(&m, &seq, 0);
        // Regrown twice in the middle, geometrically, and appended to in place in between.
        assert_eq!(caps, [2, 4, 4, 8, 8, 16], "{arch}");
        let (reserved, caps) = chunked(&m, &seq, 32);
        assert_eq!(caps, [32; 6], "{arch}");
        if arch == "bert" {
            // Bidirectional: a chunk's tokens see the cached ones but not the later ones, so the
            // full forward is no reference past the prefill; both buffer histories must agree
            // (tests/prefix_init.rs checks BERT's cached path against a prefix of the tokens).
            SAME.assert_close("bert: reserved vs regrown cache", &reserved, &grown);
            let prefill = m.outputs(&seq[..2], 1, None).to_vec().unwrap();
            SAME.assert_close("bert: prefill vs plain forward", &grown[..prefill.len()], &prefill);
            continue;
        }
        let full = m.outputs(&seq, 1, None).to_vec().unwrap();
        SAME.assert_close(&format!("{arch}: regrown cache vs full forward"), &grown, &full);
        SAME.assert_close(&format!("{arch}: reserved cache vs full forward"), &reserved, &full);
    }
}
