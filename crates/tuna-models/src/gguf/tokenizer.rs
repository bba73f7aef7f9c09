//! Tokenizer metadata in GGUF (`tokenizer.ggml.*`) and a byte-level BPE `tokenizers::Tokenizer`
//! built from it (the "gpt2" tokenizer model, as GPT-2 and SmolLM2 use).

use super::GgufFile;
use crate::error::{Error, Result};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// llama.cpp pre-tokenizer names (`tokenizer.ggml.pre`) that split digits one by one before the
/// GPT-2 regex.
const DIGIT_SPLITTING_PRE: &[&str] = &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"];

impl GgufFile {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE), "llama" (SentencePiece), ...
    pub fn tokenizer_model(&self) -> Option<&str> {
        self.meta("tokenizer.ggml.model").and_then(|v| v.as_str())
    }

    /// `tokenizer.ggml.pre`, llama.cpp's name for the pre-tokenizer.
    pub fn tokenizer_pre(&self) -> Option<&str> {
        self.meta("tokenizer.ggml.pre").and_then(|v| v.as_str())
    }

    fn string_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .meta(key)
            .ok_or_else(|| self.format_err(format!("missing metadata `{key}`")))?
            .as_array()
            .ok_or_else(|| self.format_err(format!("metadata `{key}` is not an array")))?;
        arr.iter()
            .enumerate()
            .map(|(i, v)| v.as_str().ok_or_else(|| self.format_err(format!("`{key}`[{i}] is {v:?}, not a string"))))
            .collect()
    }

    /// `tokenizer.ggml.tokens`: the vocabulary, token id = index.
    pub fn tokens(&self) -> Result<Vec<&str>> {
        self.string_array("tokenizer.ggml.tokens")
    }

    /// `tokenizer.ggml.merges`: BPE merges as "left right", highest priority first.
    pub fn merges(&self) -> Result<Vec<&str>> {
        self.string_array("tokenizer.ggml.merges")
    }

    /// `tokenizer.ggml.token_type` (see [`token_type`]), if present.
    pub fn token_types(&self) -> Result<Option<Vec<i32>>> {
        let key = "tokenizer.ggml.token_type";
        let Some(v) = self.meta(key) else { return Ok(None) };
        let arr = v.as_array().ok_or_else(|| self.format_err(format!("metadata `{key}` is not an array")))?;
        arr.iter()
            .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| self.format_err(format!("metadata `{key}` holds non-integers")))
    }

    fn token_id(&self, key: &str) -> Option<u32> {
        self.meta(key).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok())
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.token_id("tokenizer.ggml.bos_token_id")
    }
    pub fn eos_token_id(&self) -> Option<u32> {
        self.token_id("tokenizer.ggml.eos_token_id")
    }
    pub fn padding_token_id(&self) -> Option<u32> {
        self.token_id("tokenizer.ggml.padding_token_id")
    }
    pub fn unknown_token_id(&self) -> Option<u32> {
        self.token_id("tokenizer.ggml.unknown_token_id")
    }
    /// `tokenizer.chat_template` (Jinja), if present.
    pub fn chat_template(&self) -> Option<&str> {
        self.meta("tokenizer.chat_template").and_then(|v| v.as_str())
    }

    /// A `tokenizers::Tokenizer` for a "gpt2" (byte-level BPE) vocabulary: BPE over the tokens
    /// and merges, the ByteLevel pre-tokenizer (after single-digit splitting for the pre-tokenizers
    /// llama.cpp treats so, e.g. "smollm"), ByteLevel decoder; CONTROL tokens become special
    /// added tokens, USER_DEFINED ones plain added tokens; BOS prepended if
    /// `tokenizer.ggml.add_bos_token` is true.
    pub fn build_tokenizer(&self) -> Result<Tokenizer> {
        let model = self.tokenizer_model();
        if model != Some("gpt2") {
            return Err(Error::Unsupported {
                path: self.path.clone(),
                what: format!("tokenizer model {model:?} (tuna builds \"gpt2\" byte-level BPE from GGUF)"),
            });
        }
        let tokens = self.tokens()?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect();
        if vocab.len() != tokens.len() {
            return Err(self.format_err("`tokenizer.ggml.tokens` holds duplicate tokens".into()));
        }
        let merges = self
            .merges()?
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| self.format_err(format!("`tokenizer.ggml.merges`[{i}] = {m:?} has no space")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| self.format_err(format!("building BPE from GGUF vocabulary: {e}")))?;
        let mut tok = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = if self.tokenizer_pre().is_some_and(|p| DIGIT_SPLITTING_PRE.contains(&p)) {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        } else {
            byte_level.into()
        };
        tok.with_pre_tokenizer(Some(pre));
        tok.with_decoder(Some(ByteLevel::default()));
        let add_bos = matches!(self.meta("tokenizer.ggml.add_bos_token"), Some(super::MetaValue::Bool(true)));
        let post: PostProcessorWrapper = match (add_bos, self.bos_token_id()) {
            (true, Some(id)) => {
                let bos =
                    tokens.get(id as usize).ok_or_else(|| self.format_err(format!("BOS id {id} out of range")))?;
                let err = |e: String| Error::Tokenizer(format!("{}: BOS template: {e}", self.path.display()));
                let mut builder = TemplateProcessing::builder();
                builder.try_single(format!("{bos} $A")).map_err(err)?;
                builder.special_tokens(vec![(bos.to_string(), id)]);
                builder.build().map_err(|e| err(e.to_string()))?.into()
            }
            _ => ByteLevel::default().trim_offsets(false).into(),
        };
        tok.with_post_processor(Some(post));
        if let Some(types) = self.token_types()? {
            let added = |want: i32| -> Vec<AddedToken> {
                let typed = types.iter().zip(&tokens).filter(|(&ty, _)| ty == want);
                typed
                    .map(|(_, t)| AddedToken::from(t.to_string(), want == token_type::CONTROL).normalized(false))
                    .collect()
            };
            tok.add_special_tokens(&added(token_type::CONTROL));
            tok.add_tokens(&added(token_type::USER_DEFINED));
        }
        Ok(tok)
    }
}
