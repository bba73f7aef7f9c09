//! PEFT checkpoints (filled in next).
