//! Autograd: Tensor, tape, backward (issue 3).
