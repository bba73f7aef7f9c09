//! Reading the Hugging Face golden fixtures (`tests/fixtures/<arch>/golden.safetensors`, made by
//! `scripts/golden/make_golden.py`) and comparing with them.
#![allow(dead_code)]

use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;
use tuna_autograd::Tensor;
use tuna_kernels::testing::Tol;
use tuna_kernels::Cpu;

/// The fixture folder of `arch`: under `$TUNA_FIXTURES_DIR` where set (the GPU harness sets it:
/// test binaries built here run on a machine where the build-time `CARGO_MANIFEST_DIR` does not
/// exist), else this crate's `tests/fixtures`.
pub fn fixture(arch: &str) -> PathBuf {
    match std::env::var_os("TUNA_FIXTURES_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join(arch),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(arch),
    }
}

/// The golden tensors of one fixture.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(arch: &str) -> Golden {
        let p = fixture(arch).join("golden.safetensors");
        Golden { bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) }
    }
    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden.safetensors parses")
    }
    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(|s| s.to_string()).collect()
    }
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap_or_else(|_| panic!("golden has no `{name}`")).shape().to_vec()
    }
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden has no `{name}`"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden has no `{name}`"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

/// Relative comparison with an absolute floor scaled to the largest reference value: the
/// design's "1e-5 relative" for logits and loss, "1e-4 relative" for gradients, where some
/// reference entries are rounding noise around zero (see the fixture's meta.json).
pub fn assert_rel(what: &str, rel: f64, got: &[f32], want: &[f32]) {
    let max = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
    Tol::new("golden relative, atol = rel * max|ref|", rel * max.max(1e-30), rel).assert_close(what, got, want);
}

/// Every parameter's gradient against Hugging Face's (stored under the name HF uses, with or
/// without the `transformer.` prefix). Per tensor, 1e-4 relative with a floor of 1e-4 of the
/// tensor's largest value; and a global floor of 1e-6 of the largest gradient of the model,
/// since some gradients are zero in exact arithmetic (BERT's attention key biases: softmax is
/// shift-invariant) and hold only rounding noise in both (the fixture's meta.json says so).
pub fn check_grads(g: &Golden, loaded: &[(String, Tensor<Cpu, f32>)]) {
    let key_of = |name: &str| {
        let names = g.names();
        [format!("grad.{name}"), format!("grad.transformer.{name}")]
            .into_iter()
            .find(|k| names.contains(k))
            .unwrap_or_else(|| panic!("no golden gradient for `{name}`"))
    };
    let global = loaded.iter().flat_map(|(n, _)| g.f32(&key_of(n))).fold(0.0f64, |m, v| m.max((v as f64).abs()));
    for (name, p) in loaded {
        let key = key_of(name);
        let want = g.f32(&key);
        let max = want.iter().fold(0.0f64, |m, &w| m.max((w as f64).abs()));
        let tol = Tol::new("golden grads", (1e-4 * max).max(1e-6 * global), 1e-4);
        tol.assert_close(&key, &p.grad().unwrap().expect("a gradient"), &want);
    }
    let golden = g.names().iter().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(loaded.len(), golden, "every parameter of the Hugging Face model was compared");
}
