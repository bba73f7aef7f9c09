//! cross_entropy: in progress (see issue 2).
