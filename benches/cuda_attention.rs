//! CUDA fused attention benchmark (bf16): forward and forward+backward TFLOP/s at FlashAttention's
//! benchmark shapes (16k tokens per batch, model width 2048: head dim 64 x 32 heads or 128 x 16),
//! causal and not, sequence 512 to 8192, and with 20 to 200 prefix positions. One JSON line per
//! case (for `scripts/gpu/attn_table.py`, which sets them beside PyTorch SDPA's from
//! `scripts/gpu/attn_sdpa.py`). The inputs are drawn and uploaded once (every case has the same
//! 16k x 2048 elements per tensor) and reused by every case. Without a GPU it says so and exits 0.
//!
//! Run: `cargo bench -p tuna-kernels --bench cuda_attention [-- --quick]`

use half::bf16;
use std::time::Instant;
use tuna_kernels::cuda::CudaBuf;
use tuna_kernels::ops::attention::{AttentionKernel, AttnGrads, AttnInputs, AttnParams};
use tuna_kernels::testing::Rng;
use tuna_kernels::Cuda;

/// FLOPs of one forward as FlashAttention counts them: 4 * B * H * T * S * D over the visible
/// (query, key) rectangle, halved for the causal part; backward = 2.5 x forward.
fn fwd_flops(p: &AttnParams, prefix: usize) -> f64 {
    let (b, h, t, d) = (p.batch as f64, p.heads as f64, p.q_len as f64, p.head_dim as f64);
    let content = if p.causal == 1 { t / 2.0 } else { t };
    4.0 * b * h * t * (content + prefix as f64) * d
}

/// Median seconds of `reps` synchronized runs after two warm-ups.
fn time(dev: &Cuda, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    dev.synchronize().expect("synchronize");
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            dev.synchronize().expect("synchronize");
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[reps / 2]
}

/// Tokens per batch and model width of every case.
const TOKENS: usize = 16 * 1024;
const WIDTH: usize = 2048;
/// Prefix lengths measured.
const PREFIXES: [usize; 2] = [20, 200];

/// The benchmark's inputs on the device, drawn once: q, k, v and dO of TOKENS x WIDTH elements
/// each, and for each prefix length its keys and values (length x WIDTH).
struct Inputs {
    q: CudaBuf<bf16>,
    k: CudaBuf<bf16>,
    v: CudaBuf<bf16>,
    d_o: CudaBuf<bf16>,
    prefixes: Vec<(usize, CudaBuf<bf16>, CudaBuf<bf16>)>,
}

impl Inputs {
    fn new(dev: &Cuda) -> Inputs {
        let mut rng = Rng::new(11);
        let mut up = |n: usize| {
            let v: Vec<bf16> = rng.normal_vec(n, 1.0).into_iter().map(bf16::from_f32).collect();
            dev.upload(&v).expect("upload")
        };
        let n = TOKENS * WIDTH;
        let (q, k, v, d_o) = (up(n), up(n), up(n), up(n));
        let prefixes = PREFIXES.iter().map(|&l| (l, up(l * WIDTH), up(l * WIDTH))).collect();
        Inputs { q, k, v, d_o, prefixes }
    }
}

fn case(dev: &Cuda, inp: &Inputs, t: usize, d: usize, causal: bool, prefix: usize, reps: usize) {
    assert!(TOKENS.is_multiple_of(t) && WIDTH.is_multiple_of(d), "case shape");
    let (b, h) = (TOKENS / t, WIDTH / d);
    let mut p = AttnParams::new(b, h, h, t, d, causal);
    p.prefix_len = prefix as u32;
    let (q, k, v, d_o) = (&inp.q, &inp.k, &inp.v, &inp.d_o);
    let pk = (prefix > 0).then(|| {
        let (_, pk, pv) = inp.prefixes.iter().find(|(l, ..)| *l == prefix).expect("a prefix drawn for this length");
        (pk, pv)
    });
    let x = AttnInputs::<Cuda, bf16> { q, k, v, prefix: pk, key_mask: None, prefix_rows: None, bias: None };
    let mut o = dev.zeros::<bf16>(p.q_elems()).expect("alloc");
    let mut lse = dev.zeros::<f32>(p.lse_elems()).expect("alloc");
    let (mut dq, mut dk, mut dv) = (
        dev.zeros::<bf16>(p.q_elems()).expect("alloc"),
        dev.zeros::<bf16>(p.kv_elems()).expect("alloc"),
        dev.zeros::<bf16>(p.kv_elems()).expect("alloc"),
    );
    let mut dp = (prefix > 0)
        .then(|| (dev.zeros::<f32>(prefix * h * d).expect("alloc"), dev.zeros::<f32>(prefix * h * d).expect("alloc")));
    let tf = time(dev, reps, || {
        <Cuda as AttentionKernel<bf16>>::attn_fwd(dev, &p, x, &mut o, &mut lse).expect("attention forward")
    });
    let tfb = time(dev, reps, || {
        <Cuda as AttentionKernel<bf16>>::attn_fwd(dev, &p, x, &mut o, &mut lse).expect("attention forward");
        let g = AttnGrads::<Cuda, bf16> {
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
            dprefix: dp.as_mut().map(|(a, b)| (a, b)),
            dbias: None,
        };
        <Cuda as AttentionKernel<bf16>>::attn_bwd(dev, &p, x, &o, d_o, &lse, g).expect("attention backward")
    });
    let f = fwd_flops(&p, prefix);
    println!(
        "{{\"impl\":\"tuna\",\"batch\":{b},\"heads\":{h},\"seq\":{t},\"head_dim\":{d},\"causal\":{causal},\"prefix\":{prefix},\"fwd_ms\":{:.4},\"fwd_bwd_ms\":{:.4},\"fwd_tflops\":{:.2},\"fwd_bwd_tflops\":{:.2}}}",
        tf * 1e3,
        tfb * 1e3,
        f / tf / 1e12,
        3.5 * f / tfb / 1e12
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let dev = match Cuda::new(0) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda_attention: no GPU ({e}); nothing measured");
            return;
        }
    };
    let seqs: &[usize] = if quick { &[512, 2048] } else { &[512, 1024, 2048, 4096, 8192] };
    let reps = if quick { 3 } else { 10 };
    let inputs = Inputs::new(&dev);
    for &d in &[64, 128] {
        for &causal in &[false, true] {
            for &t in seqs {
                case(&dev, &inputs, t, d, causal, 0, reps);
            }
        }
    }
    for prefix in PREFIXES {
        case(&dev, &inputs, 2048, 128, true, prefix, reps);
    }
}
