//! grad: in progress (see issue 2).
