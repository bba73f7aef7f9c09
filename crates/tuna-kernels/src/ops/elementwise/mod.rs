//! elementwise: in progress
