//! generate: in progress (issue 4).
