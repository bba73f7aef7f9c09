//! tuna-trainer: the model-independent parts of training — data files ([`data`]), batching with a
//! resumable cursor ([`batch`]), the learning-rate schedule ([`schedule`]), atomic checkpoints
//! ([`checkpoint`]), the metrics log and summary formatting ([`metrics`]) and the progress line
//! ([`progress`]). The training loop and the CLI build on these.

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod progress;
pub mod schedule;

pub use batch::{
    Batch, BatchConfig, BatchError, Batcher, Cursor, Encoded, PadSide, SplitMix64, Truncate, IGNORE_INDEX,
};
pub use checkpoint::{
    fnv1a64, write_atomic, CheckpointError, Checkpoints, Direction, FileEntry, Fnv64, LatestValid, Loaded, Manifest,
};
pub use data::{load, DataError, Example, FieldProblem, Fields, LabelSet, Record, Task};
pub use metrics::{human_bytes, human_duration, read_log, si, tokens_per_s, MetricsError, MetricsLog, Split, Summary};
pub use progress::Progress;
pub use schedule::{Decay, Schedule};
