//! Trainer: data, loop, optimizer, checkpoints (issue 6).
