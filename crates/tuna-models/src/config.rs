//! config: in progress (issue 4).
