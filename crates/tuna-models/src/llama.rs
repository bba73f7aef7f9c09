//! llama: in progress (issue 4).
