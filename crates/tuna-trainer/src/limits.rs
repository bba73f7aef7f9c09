//! Sequence lengths against the model's positions: what `--max-len` resolves to, checked before
//! the first step (virtual tokens counted), so a long example can never run past the position table
//! in the middle of a run.

use crate::error::{Result, TrainError};
use tuna_models::adapt::Method;

/// `--max-len` when not given (lowered to what the model has room for).
pub const DEFAULT_MAX_LEN: usize = 128;

/// The positions `method` puts before the content: `n` for prompt and prefix methods, else 0.
pub fn method_virtual_tokens(method: &Method) -> usize {
    match method {
        Method::Prompt { n, .. } | Method::Prefix { n, .. } | Method::PTuningV2 { n } => *n,
        _ => 0,
    }
}

/// The tokens per example: `asked` (`--max-len`) when it fits in `max_positions` beside `virtual_`
/// tokens, an error naming the largest that fits when it does not; without `asked`,
/// [`DEFAULT_MAX_LEN`] or the room left, whichever is smaller.
pub fn resolve_max_len(asked: Option<usize>, max_positions: usize, virtual_: usize) -> Result<usize> {
    if virtual_ >= max_positions {
        return Err(TrainError::Invalid(format!(
            "{virtual_} virtual tokens leave no room for text in the model's {max_positions} positions: \
             use at most {} (--virtual-tokens)",
            max_positions.saturating_sub(2)
        )));
    }
    let room = max_positions - virtual_;
    match asked {
        Some(0) => Err(TrainError::Invalid("--max-len 0: expected at least 1 token".into())),
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
        assert_eq!(resolve_max_len(None, 64, 0).unwrap(), 64);
        assert_eq!(resolve_max_len(None, 64, 20).unwrap(), 44);
        assert_eq!(resolve_max_len(None, 1024, 20).unwrap(), DEFAULT_MAX_LEN);
        assert_eq!(resolve_max_len(Some(44), 64, 20).unwrap(), 44);
        let e = resolve_max_len(Some(128), 64, 0).unwrap_err().to_string();
        assert!(e.contains("--max-len 128 exceeds the model's 64 positions: use --max-len 64 or less"), "{e}");
        let e = resolve_max_len(Some(50), 64, 20).unwrap_err().to_string();
        assert!(e.contains("--max-len 50 + 20 virtual tokens") && e.contains("--max-len 44 or less"), "{e}");
        let e = resolve_max_len(None, 64, 100_000).unwrap_err().to_string();
        assert!(e.contains("100000 virtual tokens leave no room"), "{e}");
        assert!(resolve_max_len(Some(0), 64, 0).is_err());
    }
}
