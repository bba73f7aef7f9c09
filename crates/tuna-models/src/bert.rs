//! bert: in progress (issue 4).
