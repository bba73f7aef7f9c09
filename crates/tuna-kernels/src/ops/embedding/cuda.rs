//! Embedding on CUDA: launch glue for `kernels/embedding.cu`.
//!
//! One launch configuration per kernel: the forward runs one block of [`BLOCK`] threads per
//! output row; the table gradient one block per token (f32 `atomicAdd`: summation order, and so the
//! last bits, vary between runs); the prompt gradient one thread per (prompt row, column),
//! summing over the batch in order. Ids are expected to have been checked with
//! [`super::validate_ids`] on the host before upload (see the module docs for what a bad id does).

use super::{check_bwd, check_fwd, EmbedParams, EmbeddingKernel, SoftPrompt};
use crate::cuda::{grid_rows, symbol, Cuda, CudaElem};
use crate::cuda::{CudaBuf, KernelArg, Launch};
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

// SAFETY: #[repr(C)] plain-old-data (six u32) mirrored field by field by `struct EmbedParams` in embedding.cu.
unsafe impl KernelArg for EmbedParams {}

const BLOCK: u32 = 256;
const PROMPT_BLOCK: u32 = 128;

/// A grid dimension of `n` blocks, or an error when CUDA cannot launch that many.
fn blocks(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).ok().filter(|&b| b <= i32::MAX as u32).ok_or_else(|| Error::Unsupported {
        op: "embedding",
        device: "cuda".into(),
        msg: format!("{n} {what} exceed the grid limit of 2^31-1 blocks"),
    })
}

impl<E: CudaElem> EmbeddingKernel<E> for Cuda {
    fn embed_fwd(
        &self,
        p: &EmbedParams,
        table: &CudaBuf<E>,
        ids: &CudaBuf<u32>,
        prompt: Option<SoftPrompt<'_, Self, E>>,
        out: &mut CudaBuf<E>,
    ) -> Result<()> {
        check_fwd::<Cuda, E>(p, table, ids, prompt.as_ref(), out)?;
        let rows = p.batch as usize * p.out_len();
        if rows == 0 {
            return Ok(());
        }
        let grid = blocks(rows, "output rows")?;
        // Without a prompt the kernel never reads `prompt` or `at` (n_prompt == 0): pass valid
        // device pointers of the right types in their place.
        let (vectors, at) = prompt.map_or((table, ids), |sp| (sp.vectors, sp.at));
        let mut b = Launch::new("embedding", symbol::<E>("embedding", "fwd"));
        b.arg(p).arg(table).arg(ids).arg(vectors).arg(at).arg(out);
        // SAFETY: arguments match embedding_fwd_<E>(EmbedParams, const T*, const u32*, const T*,
        // const u32*, T*); every length was checked against `p`, one block per output row.
        unsafe { self.launch(b, grid_rows(grid as usize, BLOCK, 0)) }?;
        Ok(())
    }

    fn embed_bwd(
        &self,
        p: &EmbedParams,
        ids: &CudaBuf<u32>,
        at: Option<&CudaBuf<u32>>,
        d_out: &CudaBuf<E>,
        d_table: Option<&mut CudaBuf<f32>>,
        d_prompt: Option<&mut CudaBuf<f32>>,
    ) -> Result<()> {
        check_bwd::<Cuda, E>(p, ids, at, d_out, d_table.as_deref(), d_prompt.as_deref())?;
        // `at` is read only when n_prompt > 0, in which case it is present (checked above).
        let at = at.unwrap_or(ids);
        let tokens = p.ids_elems();
        if let Some(d_table) = d_table.filter(|_| tokens > 0) {
            let grid = blocks(tokens, "tokens")?;
            let mut b = Launch::new("embedding", symbol::<E>("embedding", "bwd_table"));
            b.arg(p).arg(ids).arg(at).arg(d_out).arg(d_table);
            // SAFETY: arguments match embedding_bwd_table_<E>(EmbedParams, const u32*, const u32*,
            // const T*, float*); lengths checked; one block per token, ids >= vocab are skipped.
            unsafe { self.launch(b, grid_rows(grid as usize, BLOCK, 0)) }?;
        }
        if let Some(d_prompt) = d_prompt {
            // check_bwd allows d_prompt only with n_prompt > 0, and hidden > 0.
            let cols = (p.hidden as usize).div_ceil(PROMPT_BLOCK as usize) as u32;
            let cfg =
                LaunchConfig { grid_dim: (p.n_prompt, cols, 1), block_dim: (PROMPT_BLOCK, 1, 1), shared_mem_bytes: 0 };
            let mut b = Launch::new("embedding", symbol::<E>("embedding", "bwd_prompt"));
            b.arg(p).arg(at).arg(d_out).arg(d_prompt);
            // SAFETY: arguments match embedding_bwd_prompt_<E>(EmbedParams, const u32*, const T*,
            // float*); lengths checked; threads past `hidden` return before any access.
            unsafe { self.launch(b, cfg) }?;
        }
        Ok(())
    }
}
