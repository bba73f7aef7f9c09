//! The emulated CUDA device's speed: milliseconds per launch of a few kernels through their
//! launchers (the test device's cost, not a GPU's), with the CPU op beside each as the peer.
//!
//! Run: `cargo bench -p tuna-kernels --features emulator --bench emu_launch`

use std::time::Instant;
use tuna_kernels::ops::attention::{AttentionKernel, AttnInputs, AttnParams};
use tuna_kernels::ops::elementwise::ElementwiseKernel;
use tuna_kernels::ops::layernorm::{LayerNormKernel, LayerNormParams};
use tuna_kernels::testing::Rng;
use tuna_kernels::{Cpu, Cuda};

/// Milliseconds per call of `f` (one warm-up, then `reps`).
fn ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let t = Instant::now();
    for _ in 0..reps {
        f();
    }
    t.elapsed().as_secs_f64() * 1e3 / reps as f64
}

fn main() {
    let emu = Cuda::emulated().expect("the emulated device (build with --features emulator)");
    // The machine, beside the table (speeds are only comparable within one run).
    let cpu = tuna_kernels::testing::cpu_model();
    println!("cpu: {cpu}, {} rayon threads", rayon::current_num_threads());
    let mut rng = Rng::new(1);
    println!("{:<52} {:>10} {:>10}", "launch", "emulated", "cpu op");

    // LayerNorm: dim 1024 runs warp per row, dim 2048 block per row (256 threads).
    for dim in [1024usize, 2048] {
        let rows = 1024 * 1024 / dim;
        let p = LayerNormParams::new(rows, dim, 1e-5);
        let (x, g, b) = (rng.normal_vec(rows * dim, 1.0), rng.normal_vec(dim, 1.0), rng.normal_vec(dim, 1.0));
        let (xd, gd, bd) = (emu.upload(&x).unwrap(), emu.upload(&g).unwrap(), emu.upload(&b).unwrap());
        let (mut y, mut m, mut r) =
            (emu.zeros(rows * dim).unwrap(), emu.zeros(rows).unwrap(), emu.zeros(rows).unwrap());
        let te = ms(3, || emu.layernorm_fwd(&p, &xd, &gd, &bd, &mut y, &mut m, &mut r).unwrap());
        let (mut yc, mut mc, mut rc) = (vec![0f32; rows * dim], vec![0f32; rows], vec![0f32; rows]);
        let tc = ms(3, || Cpu.layernorm_fwd(&p, &x, &g, &b, &mut yc, &mut mc, &mut rc).unwrap());
        let variant = if dim <= 1024 { "warp" } else { "block" };
        println!("{:<52} {te:>8.2}ms {tc:>8.2}ms", format!("layernorm fwd {rows} x {dim} ({variant} per row)"));
    }

    // A flat elementwise op: 2^20 elements, 4096 blocks of 256 threads, no barrier.
    let n = 1 << 20;
    let (a, b) = (rng.normal_vec(n, 1.0), rng.normal_vec(n, 1.0));
    let (ad, bd) = (emu.upload(&a).unwrap(), emu.upload(&b).unwrap());
    let mut yd = emu.zeros(n).unwrap();
    let te = ms(3, || emu.add_fwd(&ad, &bd, &mut yd).unwrap());
    let mut yc = vec![0f32; n];
    let tc = ms(3, || Cpu.add_fwd(&a, &b, &mut yc).unwrap());
    println!("{:<52} {te:>8.2}ms {tc:>8.2}ms", "add fwd 2^20 elements");

    // Attention forward: shuffle- and barrier-heavy.
    let p = AttnParams::new(1, 8, 8, 256, 64, true);
    let (q, k, v) =
        (rng.normal_vec(p.q_elems(), 1.0), rng.normal_vec(p.kv_elems(), 1.0), rng.normal_vec(p.kv_elems(), 1.0));
    let (qd, kd, vd) = (emu.upload(&q).unwrap(), emu.upload(&k).unwrap(), emu.upload(&v).unwrap());
    let (mut o, mut lse) = (emu.zeros(p.q_elems()).unwrap(), emu.zeros(p.lse_elems()).unwrap());
    let x =
        AttnInputs::<Cuda, f32> { q: &qd, k: &kd, v: &vd, prefix: None, key_mask: None, prefix_rows: None, bias: None };
    let te = ms(2, || AttentionKernel::<f32>::attn_fwd(&emu, &p, x, &mut o, &mut lse).unwrap());
    let (mut oc, mut lc) = (vec![0f32; p.q_elems()], vec![0f32; p.lse_elems()]);
    let xc =
        AttnInputs::<Cpu, f32> { q: &q, k: &k, v: &v, prefix: None, key_mask: None, prefix_rows: None, bias: None };
    let tc = ms(2, || AttentionKernel::<f32>::attn_fwd(&Cpu, &p, xc, &mut oc, &mut lc).unwrap());
    println!("{:<52} {te:>8.2}ms {tc:>8.2}ms", "attention fwd B1 H8 T256 D64 causal");
}
