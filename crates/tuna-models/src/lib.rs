//! Models: GPT-2, Llama, BERT (issue 4).
