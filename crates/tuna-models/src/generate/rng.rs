//! The seeded generator sampling uses: the kernel crate's SplitMix64 (reproducible across
//! platforms and runs).

pub use tuna_kernels::rng::SplitMix64;
