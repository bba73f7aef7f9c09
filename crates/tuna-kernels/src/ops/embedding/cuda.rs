//! Embedding on CUDA: launch glue for `kernels/embedding.cu`.
//!
//! One launch configuration per kernel: the forward runs one block of [`BLOCK`] threads per
//! output row; the table gradient one block per token (f32 `atomicAdd`: summation order, and so the
//! last bits, vary between runs); the prompt gradient one thread per (prompt row, column),
//! summing over the batch in order. Ids are expected to have been checked with
//! [`super::validate_ids`] on the host before upload (see the module docs for what a bad id does).

use super::{check_bwd, check_fwd, EmbedParams, EmbeddingKernel, SoftPrompt};
use crate::cuda::{grid_rows, symbol, Cuda, CudaElem};
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

// SAFETY: #[repr(C)] plain-old-data (six u32) mirrored field by field by `struct EmbedParams` in embedding.cu.
unsafe impl DeviceRepr for EmbedParams {}

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
        table: &CudaSlice<E>,
        ids: &CudaSlice<u32>,
        prompt: Option<SoftPrompt<'_, Self, E>>,
        out: &mut CudaSlice<E>,
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
        let f = self.function("embedding", &symbol::<E>("embedding", "fwd"))?;
        let mut b = self.stream().launch_builder(&f);
        b.arg(p).arg(table).arg(ids).arg(vectors).arg(at).arg(out);
        // SAFETY: arguments match embedding_fwd_<E>(EmbedParams, const T*, const u32*, const T*,
        // const u32*, T*); every length was checked against `p`, one block per output row.
        unsafe { b.launch(grid_rows(grid as usize, BLOCK, 0)) }.map_err(|e| Error::cuda("embedding_fwd", e))?;
        Ok(())
    }

    fn embed_bwd(
        &self,
        p: &EmbedParams,
        ids: &CudaSlice<u32>,
        at: Option<&CudaSlice<u32>>,
        d_out: &CudaSlice<E>,
        d_table: Option<&mut CudaSlice<f32>>,
        d_prompt: Option<&mut CudaSlice<f32>>,
    ) -> Result<()> {
        check_bwd::<Cuda, E>(p, ids, at, d_out, d_table.as_deref(), d_prompt.as_deref())?;
        // `at` is read only when n_prompt > 0, in which case it is present (checked above).
        let at = at.unwrap_or(ids);
        let tokens = p.ids_elems();
        if let Some(d_table) = d_table.filter(|_| tokens > 0) {
            let grid = blocks(tokens, "tokens")?;
            let f = self.function("embedding", &symbol::<E>("embedding", "bwd_table"))?;
            let mut b = self.stream().launch_builder(&f);
            b.arg(p).arg(ids).arg(at).arg(d_out).arg(d_table);
            // SAFETY: arguments match embedding_bwd_table_<E>(EmbedParams, const u32*, const u32*,
            // const T*, float*); lengths checked; one block per token, ids >= vocab are skipped.
            unsafe { b.launch(grid_rows(grid as usize, BLOCK, 0)) }
                .map_err(|e| Error::cuda("embedding_bwd_table", e))?;
        }
        if let Some(d_prompt) = d_prompt {
            // check_bwd allows d_prompt only with n_prompt > 0, and hidden > 0.
            let cols = (p.hidden as usize).div_ceil(PROMPT_BLOCK as usize) as u32;
            let cfg =
                LaunchConfig { grid_dim: (p.n_prompt, cols, 1), block_dim: (PROMPT_BLOCK, 1, 1), shared_mem_bytes: 0 };
            let f = self.function("embedding", &symbol::<E>("embedding", "bwd_prompt"))?;
            let mut b = self.stream().launch_builder(&f);
            b.arg(p).arg(at).arg(d_out).arg(d_prompt);
            // SAFETY: arguments match embedding_bwd_prompt_<E>(EmbedParams, const u32*, const T*,
            // float*); lengths checked; threads past `hidden` return before any access.
            unsafe { b.launch(cfg) }.map_err(|e| Error::cuda("embedding_bwd_prompt", e))?;
        }
        Ok(())
    }
}
