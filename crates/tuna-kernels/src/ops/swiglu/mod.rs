//! swiglu: in progress (see issue 2).
