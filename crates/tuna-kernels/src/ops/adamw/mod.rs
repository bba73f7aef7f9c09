//! adamw: in progress (see issue 2).
