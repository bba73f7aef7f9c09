//! gguf: in progress (issue 4).
