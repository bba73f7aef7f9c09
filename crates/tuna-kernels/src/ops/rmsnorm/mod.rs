//! rmsnorm: in progress (see issue 2).
