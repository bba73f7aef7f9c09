//! tuna's op set (the README's op table), one module per op family.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
pub mod gelu;
pub mod grad;
pub mod layernorm;
pub mod lowp;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
