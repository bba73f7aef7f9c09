//! gpt2: in progress (issue 4).
