//! Sequence lengths against the model's positions: what `--max-len` resolves to, checked before
//! the first step (virtual tokens counted), so a long example can never run past the position table
//! in the middle of a run.

use crate::error::{Result, TrainError};
use tuna_models::adapt::Method;

/// `--max-len` when not given (lowered to what the model has room for).
pub const DEFAULT_MAX_LEN: usize = 128;

/// Sizes of a method's new parameters against the model's width `hidden`, checked before anything
/// is allocated (a LoRA rank of a billion would abort the process, not fail).
pub fn check_method_size(method: &Method, hidden: usize) -> Result<()> {
    let (flag, v, max) = match method {
        Method::Lora(c) => ("--lora-r", c.r, 4 * hidden),
        Method::Houlsby { bottleneck } => ("--bottleneck", *bottleneck, 4 * hidden),
        Method::Prefix { projection: Some(h), .. } => ("--prefix-hidden", *h, 16 * hidden),
        Method::PTuning { hidden: Some(h), .. } => ("--ptuning-hidden", *h, 16 * hidden),
        _ => return Ok(()),
    };
    if v > max {
        return Err(TrainError::Invalid(format!("{flag} {v}: at most {max} for this model (its width is {hidden})")));
    }
    Ok(())
}

/// The fewest tokens an example of `task` may have: 2 where tokens are predicted, 1 to classify.
pub fn min_len(task: crate::data::Task) -> usize {
    if task == crate::data::Task::Classify {
        1
    } else {
        2
    }
}

/// The tokens per example: `asked` (`--max-len`) when it fits in `max_positions` beside `virtual_`
/// tokens, an error naming the largest that fits when it does not; without `asked`,
/// [`DEFAULT_MAX_LEN`] or the room left, whichever is smaller. At least `min_len` tokens (2 for
/// `lm` and `completion`: one is predicted from the other; 1 for `classify`).
pub fn resolve_max_len(asked: Option<usize>, max_positions: usize, virtual_: usize, min_len: usize) -> Result<usize> {
    if virtual_.saturating_add(min_len) > max_positions {
        return Err(TrainError::Invalid(format!(
            "{virtual_} virtual tokens leave {} of the model's {max_positions} positions for text, fewer than the \
             {min_len} the task needs: use fewer virtual tokens",
            max_positions.saturating_sub(virtual_)
        )));
    }
    let room = max_positions - virtual_;
    match asked {
        Some(m) if m < min_len => {
            Err(TrainError::Invalid(format!("--max-len {m}: the task needs at least {min_len} tokens per example")))
        }
        Some(m) if m > room => {
            let beside = if virtual_ > 0 { format!(" + {virtual_} virtual tokens") } else { String::new() };
            Err(TrainError::Invalid(format!(
                "--max-len {m}{beside} exceeds the model's {max_positions} positions: use --max-len {room} or less"
            )))
        }
        Some(m) => Ok(m),
        None => Ok(DEFAULT_MAX_LEN.min(room)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_len_fits_the_positions_beside_the_virtual_tokens() {
        assert_eq!(resolve_max_len(None, 64, 0, 2).unwrap(), 64);
        assert_eq!(resolve_max_len(None, 64, 20, 2).unwrap(), 44);
        assert_eq!(resolve_max_len(None, 1024, 20, 2).unwrap(), DEFAULT_MAX_LEN);
        assert_eq!(resolve_max_len(Some(44), 64, 20, 2).unwrap(), 44);
        let e = resolve_max_len(Some(128), 64, 0, 2).unwrap_err().to_string();
        assert!(e.contains("--max-len 128 exceeds the model's 64 positions: use --max-len 64 or less"), "{e}");
        let e = resolve_max_len(Some(50), 64, 20, 2).unwrap_err().to_string();
        assert!(e.contains("--max-len 50 + 20 virtual tokens") && e.contains("--max-len 44 or less"), "{e}");
        let e = resolve_max_len(None, 64, 100_000, 2).unwrap_err().to_string();
        assert!(e.contains("100000 virtual tokens leave 0 of the model's 64 positions"), "{e}");
        // A task that predicts tokens needs two; classification one.
        assert!(resolve_max_len(None, 64, 63, 2).is_err());
        assert_eq!(resolve_max_len(None, 64, 63, 1).unwrap(), 1);
        assert!(resolve_max_len(Some(1), 64, 0, 2).unwrap_err().to_string().contains("at least 2 tokens"));
        assert!(resolve_max_len(Some(0), 64, 0, 1).is_err());
        let lora = Method::Lora(tuna_models::adapt::LoraConfig { r: 1000, alpha: 16.0, dropout: 0.0, targets: vec![] });
        assert!(check_method_size(&lora, 32).unwrap_err().to_string().contains("--lora-r 1000: at most 128"));
        assert!(check_method_size(&Method::Houlsby { bottleneck: 32 }, 32).is_ok());
        let ptuning = |h| Method::PTuning { n: 4, encoder: tuna_models::adapt::EncoderKind::Lstm, hidden: h };
        let e = check_method_size(&ptuning(Some(513)), 32).unwrap_err().to_string();
        assert!(e.contains("--ptuning-hidden 513: at most 512"), "{e}");
        assert!(check_method_size(&ptuning(Some(512)), 32).is_ok() && check_method_size(&ptuning(None), 32).is_ok());
    }
}
