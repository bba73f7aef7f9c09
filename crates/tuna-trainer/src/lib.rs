//! tuna-trainer: the model-independent parts of training — data files ([`data`]), batching with a
//! resumable cursor ([`batch`]), the learning-rate schedule ([`schedule`]), atomic checkpoints
//! ([`checkpoint`]), the metrics log and summary formatting ([`metrics`]) and the progress line
//! ([`progress`]); the model a run trains ([`model`]), tasks and losses ([`task`]); and a run split
//! by concern: its settings and summary ([`config`]), its output folder ([`run_dir`]), the loop
//! ([`run`]), its resumable state (`state`), evaluation ([`eval`]), the export ([`mod@export`]),
//! profiling ([`mod@profile`]) and multi-task runs ([`multi`]); and the prompt-engineered baseline that trains nothing ([`baseline`]).

pub mod baseline;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod fingerprint;
pub mod limits;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod multi;
pub mod plan;
pub mod profile;
pub mod progress;
pub mod run;
pub mod run_dir;
pub mod schedule;
mod state;
pub mod task;

pub use baseline::{prompt_engineered, BaselineConfig, PromptFile, PROMPT_FILE};
pub use batch::{Batch, BatchConfig, BatchError, Batcher, Cursor, Encoded, PadSide, Truncate, IGNORE_INDEX};
pub use checkpoint::{
    fnv1a64, write_atomic, CheckpointError, Checkpoints, Direction, FileEntry, FileReader, Fnv64, LatestValid, Loaded,
    Manifest,
};
pub use config::{Hurting, Precision, RunSummary, TrainConfig};
pub use data::{load, DataError, Example, FieldProblem, Fields, LabelSet, Record, Task};
pub use error::TrainError;
pub use eval::{describe_eval, eval_file, evaluate, EvalMetrics};
pub use export::{export, peak_rss_bytes};
pub use metrics::{human_bytes, human_duration, read_log, si, tokens_per_s, MetricsError, MetricsLog, Split, Summary};
pub use model::{Backend, Model, RunFloat};
pub use multi::{train_multi, train_multi_as, MultiConfig, MultiSummary, TaskSummary};
pub use profile::{profile, profile_as, Profile, ProfileRow};
pub use progress::Progress;
pub use run::{train, train_as};
pub use run_dir::{existing_run, lock, FolderLock, OutMode};
pub use schedule::{Decay, Schedule};
pub use state::saved_precision;
pub use task::{TaskFile, TaskSpec, TASK_FILE};
