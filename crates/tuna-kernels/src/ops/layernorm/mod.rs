//! layernorm: in progress (see issue 2).
