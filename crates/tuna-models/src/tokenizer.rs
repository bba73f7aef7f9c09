//! tokenizer: in progress (issue 4).
