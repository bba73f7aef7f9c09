//! Embedding lookup with soft-prompt injection.

use super::{finish_slots, unfilled, AccSlot, Kernels};
use crate::error::{Error, Result};
use crate::graph::{launched, output, Input};
use crate::ints::Ints;
use crate::tensor::{Float, Tensor};
use tuna_kernels::ops::embedding::{validate_at, validate_ids, EmbedParams, SoftPrompt};

/// A soft prompt: `vectors` (`[n, hidden]`, usually trainable) inserted into every row of the
/// batch at position `at[b]` (`[batch]`; 0 puts the prompt first, as PEFT does).
pub struct Prompt<'a, B: Kernels<E>, E: Float> {
    pub vectors: &'a Tensor<B, E>,
    pub at: &'a Ints<B, u32>,
}

/// `table[ids]` (`[batch, seq] -> [batch, seq + n, hidden]`) with the prompt's `n` vectors
/// inserted. The backward scatters only into what needs a gradient: the table, the prompt, or both.
pub fn embedding<B: Kernels<E>, E: Float>(
    table: &Tensor<B, E>,
    ids: &Ints<B, u32>,
    prompt: Option<Prompt<'_, B, E>>,
) -> Result<Tensor<B, E>> {
    let [vocab, hidden] = *table.shape() else {
        return Err(Error::Shape {
            op: "embedding",
            what: "table must be [vocab, hidden]",
            left: table.shape().to_vec(),
            right: vec![],
        });
    };
    let [batch, seq] = *ids.shape() else {
        return Err(Error::Shape {
            op: "embedding",
            what: "ids must be [batch, seq]",
            left: ids.shape().to_vec(),
            right: vec![],
        });
    };
    validate_ids(ids.host(), vocab)?;
    let mut p = EmbedParams::new(batch, seq, vocab, hidden);
    if let Some(pr) = &prompt {
        if pr.vectors.shape().len() != 2 || pr.vectors.shape()[1] != hidden {
            return Err(Error::Shape {
                op: "embedding",
                what: "prompt vectors vs [n, hidden]",
                left: pr.vectors.shape().to_vec(),
                right: vec![0, hidden],
            });
        }
        if pr.at.shape() != [batch] {
            return Err(Error::Shape {
                op: "embedding",
                what: "prompt positions vs [batch]",
                left: pr.at.shape().to_vec(),
                right: vec![batch],
            });
        }
        validate_at(pr.at.host(), seq)?;
        p = p.with_prompt(pr.vectors.shape()[0]);
    }
    let dev = table.device();
    let mut out = unfilled::<B, E>(dev, p.out_elems())?;
    {
        let vectors = prompt.as_ref().map(|pr| pr.vectors.buf());
        let sp = match (&prompt, &vectors) {
            (Some(pr), Some(v)) => Some(SoftPrompt { vectors: &**v, at: pr.at.buf() }),
            _ => None,
        };
        dev.embed_fwd(&p, &table.buf(), ids.buf(), sp, B::buf_mut(&mut out))?;
    }
    let shape = vec![batch, seq + p.n_prompt as usize, hidden];
    let mut inputs: Vec<&dyn Input> = vec![table];
    if let Some(pr) = &prompt {
        inputs.push(pr.vectors);
    }
    Ok(output("embedding", &inputs, dev, shape, out, |out_cell, _| {
        let (ids, dev) = (ids.clone(), dev.clone());
        let at = prompt.as_ref().map(|pr| pr.at.clone());
        let (ct, cp) = (table.cell(), prompt.as_ref().and_then(|pr| pr.vectors.cell()));
        Box::new(move || {
            let Some(g) = out_cell.take() else { return Ok(()) };
            launched("embedding.bwd");
            let mut st = AccSlot::optional(&*dev, &ct, p.table_elems())?;
            let mut sp = AccSlot::optional(&*dev, &cp, p.prompt_elems())?;
            let (dt, dp) = (st.as_mut().map(|s| s.buf()), sp.as_mut().map(|s| s.buf()));
            dev.embed_bwd(&p, ids.buf(), at.as_ref().map(|a| a.buf()), B::buf(&g), dt, dp)?;
            finish_slots(&*dev, std::iter::empty(), [st, sp])
        })
    }))
}
