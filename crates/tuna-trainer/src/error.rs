//! The trainer's error type: each variant says what went wrong and where (file, line, step).

use crate::batch::BatchError;
use crate::checkpoint::CheckpointError;
use crate::data::DataError;
use crate::metrics::MetricsError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Malformed or unreadable data (names the file, line and field); exit code 2.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model or adapter could not be loaded or run.
    #[error(transparent)]
    Model(#[from] tuna_models::Error),
    #[error(transparent)]
    Autograd(#[from] tuna_autograd::Error),
    #[error(transparent)]
    Kernel(#[from] tuna_kernels::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The loss or the gradient norm became NaN or infinite; the run stopped before updating any
    /// weight. `what` names which ("training loss" or "gradient norm"); `kept` says what is on
    /// disk to resume from: the newest checkpoint's step and folder, or that none was saved yet;
    /// `in_backward`: the run updates inside the backward (`--update-in-backward`).
    #[error("step {step}: the {what} is {value} (not finite); stopped without saving this step{}. {kept}", if *in_backward { " (with --update-in-backward, the tensors whose gradients completed before it were updated in memory only)" } else { "" })]
    NonFinite { step: u64, what: &'static str, value: f64, kept: String, in_backward: bool },
    /// A setting or input out of its domain.
    #[error("{0}")]
    Invalid(String),
    /// The output folder is locked by another running process (named by its PID).
    #[error("{}: in use by {holder} (another tuna train, compare or export writing this folder): wait for it to finish or choose another --out", dir.display())]
    Locked { dir: std::path::PathBuf, holder: String },
    /// Resuming onto a base model other than the one the checkpoint was trained on.
    #[error("{}: the checkpoint was trained on another base model ({what}); resume with the model it was made with", dir.display())]
    OtherBase { dir: std::path::PathBuf, what: String },
    /// An error in one task of a multi-task run (named as in the tasks file `file`).
    #[error("{}: task `{name}`: {source}", file.display())]
    InTask { file: std::path::PathBuf, name: String, source: Box<TrainError> },
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl TrainError {
    /// The process exit code for this error: 2 for bad data, 3 for a non-finite loss, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            TrainError::Data(_) => 2,
            TrainError::NonFinite { .. } => 3,
            TrainError::InTask { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
