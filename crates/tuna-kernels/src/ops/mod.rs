//! The op set of DESIGN.md, one module per op family.

pub mod gelu;
pub mod matmul;
