//! ops (next)
