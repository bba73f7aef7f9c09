//! hf: in progress (issue 4).
