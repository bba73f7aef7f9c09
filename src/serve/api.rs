//! OpenAI-style request bodies, read field by field so that each wrong field gets a 400 naming
//! it: the model, the prompt (or chat messages in ChatML), and the sampling parameters, each
//! range-checked against the server's limits.

use super::adapters::BASE;
use super::error::ApiError;
use serde_json::{Map, Value};
use tuna_models::generate::Sampling;

/// The server's limits on one request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_queue: usize,
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
    pub max_batch: usize,
    /// The model's positions.
    pub context: usize,
}

/// A generation request's settings, before tokenizing.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// As asked (`base` or an adapter's name).
    pub model: String,
    /// `None` when the client left `max_tokens` out.
    pub max_tokens: Option<usize>,
    pub sampling: Sampling,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carrying the token counts.
    pub include_usage: bool,
}

/// The body as a JSON object (a 400 for anything else).
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::bad_request("invalid_json", "the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))),
    }
}

fn wrong(param: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid("invalid_type", param, format!("`{param}` must be {want}, got {got}"))
}

/// A field, with `null` read as absent.
fn field<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    o.get(k).filter(|v| !v.is_null())
}

pub fn opt_f64(o: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    field(o, k).map(|v| v.as_f64().ok_or_else(|| wrong(k, "a number", v))).transpose()
}

pub fn opt_u64(o: &Map<String, Value>, k: &str) -> Result<Option<u64>, ApiError> {
    field(o, k).map(|v| v.as_u64().ok_or_else(|| wrong(k, "a non-negative integer", v))).transpose()
}

pub fn opt_bool(o: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    field(o, k).map(|v| v.as_bool().ok_or_else(|| wrong(k, "true or false", v))).transpose()
}

pub fn req_str<'a>(o: &'a Map<String, Value>, k: &str) -> Result<&'a str, ApiError> {
    match field(o, k) {
        None => Err(ApiError::invalid("missing_field", k, format!("`{k}` is required"))),
        Some(v) => v.as_str().ok_or_else(|| wrong(k, "a string", v)),
    }
}

/// One string, or a list of exactly one string (OpenAI's batch form with one prompt).
pub fn one_string(o: &Map<String, Value>, k: &str) -> Result<String, ApiError> {
    match field(o, k) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => Ok(a[0].as_str().unwrap_or_default().into()),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "unsupported",
            k,
            format!(
                "`{k}` as a list (of prompts or of token ids) is not supported: one string per request (send several \
                 requests; they are batched)"
            ),
        )),
        None => Err(ApiError::invalid("missing_field", k, format!("`{k}` is required"))),
        Some(v) => Err(wrong(k, "a string", v)),
    }
}

/// The model, the token budget, sampling and streaming of a completion or chat request.
/// `seed` seeds sampling when the request gives none.
pub fn gen_params(o: &Map<String, Value>, limits: &Limits, seed: u64) -> Result<GenParams, ApiError> {
    let model = req_str(o, "model")?.to_string();
    if let Some(n) = opt_u64(o, "n")? {
        if n != 1 {
            return Err(ApiError::invalid("unsupported", "n", format!("n = {n}: one choice per request (n = 1)")));
        }
    }
    if opt_u64(o, "best_of")?.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid("unsupported", "best_of", "best_of is not supported (leave it out or 1)"));
    }
    for k in ["stop", "logit_bias", "suffix", "tools", "functions", "response_format"] {
        let empty =
            |v: &Value| v.as_array().is_some_and(|a| a.is_empty()) || v.as_object().is_some_and(|m| m.is_empty());
        if field(o, k).is_some_and(|v| !empty(v)) {
            return Err(ApiError::invalid("unsupported", k, format!("`{k}` is not supported by this server")));
        }
    }
    match field(o, "logprobs") {
        None | Some(Value::Bool(false)) => {}
        Some(_) => return Err(ApiError::invalid("unsupported", "logprobs", "logprobs are not supported")),
    }
    if opt_bool(o, "echo")? == Some(true) {
        return Err(ApiError::invalid("unsupported", "echo", "echo is not supported"));
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if opt_f64(o, k)?.is_some_and(|p| p != 0.0) {
            return Err(ApiError::invalid("unsupported", k, format!("`{k}` other than 0 is not supported")));
        }
    }
    // `max_completion_tokens` is the chat API's newer name.
    let asked = match opt_u64(o, "max_completion_tokens")? {
        Some(m) => Some(("max_completion_tokens", m)),
        None => opt_u64(o, "max_tokens")?.map(|m| ("max_tokens", m)),
    };
    let max_tokens = match asked {
        None => None,
        Some((k, 0)) => return Err(ApiError::invalid("invalid_value", k, format!("`{k}` must be at least 1"))),
        Some((k, m)) if m > limits.max_new_tokens as u64 => {
            return Err(ApiError::invalid(
                "max_tokens_exceeded",
                k,
                format!(
                    "`{k}` = {m} exceeds this server's limit of {} new tokens (--max-new-tokens)",
                    limits.max_new_tokens
                ),
            ))
        }
        Some((_, m)) => Some(m as usize),
    };
    let temperature = opt_f64(o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "invalid_value",
            "temperature",
            format!("temperature {temperature}: expected 0 to 2"),
        ));
    }
    let top_p = opt_f64(o, "top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(ApiError::invalid(
                "invalid_value",
                "top_p",
                format!("top_p {p}: expected more than 0, at most 1"),
            ));
        }
    }
    let top_k = opt_u64(o, "top_k")?;
    if top_k == Some(0) {
        return Err(ApiError::invalid("invalid_value", "top_k", "top_k must be at least 1"));
    }
    let seed = opt_u64(o, "seed")?.unwrap_or(seed);
    // A temperature too small for f32 (below 1e-45) is 0 there: greedy, its limit.
    let sampling = if temperature as f32 == 0.0 {
        Sampling::Greedy
    } else {
        Sampling::Sample {
            temperature: temperature as f32,
            top_k: top_k.map(|k| k.min(u32::MAX as u64) as usize),
            top_p: top_p.filter(|&p| p < 1.0).map(|p| p as f32),
            seed,
        }
    };
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let include_usage = match field(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")?.unwrap_or(false),
        Some(v) => return Err(wrong("stream_options", "an object", v)),
    };
    Ok(GenParams { model, max_tokens, sampling, stream, include_usage })
}

/// The chat `messages` in ChatML (`<|im_start|>role\ncontent<|im_end|>\n` each, then the
/// assistant's turn opened). A content is a string or a list of `{"type": "text", "text": ...}`.
pub fn chatml(o: &Map<String, Value>) -> Result<String, ApiError> {
    let msgs = match field(o, "messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid("invalid_value", "messages", "`messages` is empty")),
        None => return Err(ApiError::invalid("missing_field", "messages", "`messages` is required")),
        Some(v) => return Err(wrong("messages", "a list of messages", v)),
    };
    let mut s = String::new();
    for (i, m) in msgs.iter().enumerate() {
        let p = format!("messages[{i}]");
        let m = m.as_object().ok_or_else(|| wrong(&p, "an object with role and content", m))?;
        let role = match field(m, "role").and_then(Value::as_str) {
            Some(r @ ("system" | "user" | "assistant" | "developer")) => {
                if r == "developer" {
                    "system"
                } else {
                    r
                }
            }
            _ => {
                return Err(ApiError::invalid("invalid_value", &format!("{p}.role"), "role: system, user or assistant"))
            }
        };
        let content = match field(m, "content") {
            Some(Value::String(c)) => c.clone(),
            Some(Value::Array(parts)) => {
                let mut c = String::new();
                for part in parts {
                    match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => c.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                "unsupported",
                                &format!("{p}.content"),
                                "only text content parts ({\"type\": \"text\", \"text\": ...})",
                            ))
                        }
                    }
                }
                c
            }
            _ => return Err(ApiError::invalid("invalid_value", &format!("{p}.content"), "content must be a string")),
        };
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    s.push_str("<|im_start|>assistant\n");
    Ok(s)
}

/// The adapter a model name selects: `None` for the base.
pub fn adapter_of(model: &str) -> Option<String> {
    (model != BASE).then(|| model.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_queue: 4, max_prompt_tokens: 32, max_new_tokens: 16, max_batch: 4, context: 64 }
    }

    fn params(body: &str) -> Result<GenParams, ApiError> {
        gen_params(&parse_object(body.as_bytes())?, &limits(), 7)
    }

    #[test]
    fn parameters_are_range_checked_by_name() {
        let code = |b: &str| params(b).unwrap_err();
        assert_eq!(code(r#"{"model": "a", "temperature": 3}"#).param.as_deref(), Some("temperature"));
        assert_eq!(code(r#"{"model": "a", "top_p": 0}"#).param.as_deref(), Some("top_p"));
        assert_eq!(code(r#"{"model": "a", "top_k": 0}"#).param.as_deref(), Some("top_k"));
        assert_eq!(code(r#"{"model": "a", "max_tokens": 17}"#).code, "max_tokens_exceeded");
        assert_eq!(code(r#"{"model": "a", "max_tokens": -1}"#).code, "invalid_type");
        assert_eq!(code(r#"{"model": "a", "n": 2}"#).param.as_deref(), Some("n"));
        assert_eq!(code(r#"{"model": 5}"#).param.as_deref(), Some("model"));
        assert_eq!(code(r#"{"temperature": 1}"#).code, "missing_field");
        assert_eq!(code("[1]").code, "invalid_json");
        assert_eq!(code("{").code, "invalid_json");
        let p = params(r#"{"model": "a", "temperature": 1e-300}"#).unwrap();
        assert_eq!(p.sampling, Sampling::Greedy, "a temperature that is 0 in f32 is greedy");
        let p = params(r#"{"model": "a", "temperature": 0, "max_tokens": 5, "stream": true}"#).unwrap();
        assert_eq!((p.sampling, p.max_tokens, p.stream), (Sampling::Greedy, Some(5), true));
        let p = params(r#"{"model": "a", "top_p": 0.5, "seed": 3}"#).unwrap();
        assert_eq!(p.sampling, Sampling::Sample { temperature: 1.0, top_k: None, top_p: Some(0.5), seed: 3 });
    }

    #[test]
    fn chat_messages_become_chatml() {
        let o = parse_object(
            br#"{"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(
            chatml(&o).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let bad = parse_object(br#"{"messages": [{"role": "robot", "content": "x"}]}"#).unwrap();
        assert_eq!(chatml(&bad).unwrap_err().param.as_deref(), Some("messages[0].role"));
    }
}
