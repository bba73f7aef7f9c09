//! tuna-trainer: the model-independent parts of training — data files ([`data`]), batching with a
//! resumable cursor ([`batch`]), the learning-rate schedule ([`schedule`]), atomic checkpoints
//! ([`checkpoint`]), the metrics log and summary formatting ([`metrics`]) and the progress line
//! ([`progress`]); the model a run trains ([`model`]), tasks and losses ([`task`]) and the training
//! loop with checkpoints and resume ([`run`]).

pub mod batch;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod fingerprint;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod progress;
pub mod run;
pub mod run_dir;
pub mod schedule;
pub mod task;

pub use batch::{
    Batch, BatchConfig, BatchError, Batcher, Cursor, Encoded, PadSide, SplitMix64, Truncate, IGNORE_INDEX,
};
pub use checkpoint::{
    fnv1a64, write_atomic, CheckpointError, Checkpoints, Direction, FileEntry, Fnv64, LatestValid, Loaded, Manifest,
};
pub use data::{load, DataError, Example, FieldProblem, Fields, LabelSet, Record, Task};
pub use error::TrainError;
pub use metrics::{human_bytes, human_duration, read_log, si, tokens_per_s, MetricsError, MetricsLog, Split, Summary};
pub use model::Model;
pub use progress::Progress;
pub use run::{
    describe_eval, eval_file, evaluate, export, load_adapted, profile, train, EvalMetrics, Profile,
    ProfileRow, RunSummary, TrainConfig,
};
pub use run_dir::{existing_run, lock, FolderLock, OutMode};
pub use schedule::{Decay, Schedule};
pub use task::{TaskFile, TaskSpec, TASK_FILE};
