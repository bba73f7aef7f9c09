//! What a generation sends back: the whole answer as one JSON object, or server-sent events
//! (one chunk per piece of text, the finish reason, optionally the token counts, then `[DONE]`),
//! in the shapes of OpenAI's completions and chat completions.

use super::api::GenParams;
use super::engine::GenEvent;
use super::error::{json_response, ApiError};
use super::http::{App, Queued};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::Arc;

/// The text of a generation as it streams: each token's addition to the decoded text, held back
/// while it ends in a partial character.
struct Detok {
    ids: Vec<u32>,
    sent: String,
}

impl Detok {
    fn push(&mut self, tok: &tokenizers::Tokenizer, id: u32) -> String {
        self.ids.push(id);
        self.delta(tok, false)
    }

    fn delta(&mut self, tok: &tokenizers::Tokenizer, last: bool) -> String {
        let text = tok.decode(&self.ids, true).unwrap_or_default();
        if (!last && text.ends_with('\u{FFFD}')) || !text.starts_with(&self.sent) {
            return String::new();
        }
        let d = text[self.sent.len()..].to_string();
        self.sent = text;
        d
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Completion,
    Chat,
}

pub struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
}

impl Reply {
    /// The reply to request number `n` (its id; see `http::completions`).
    pub fn new(n: u64, kind: Kind, model: &str) -> Self {
        let id = match kind {
            Kind::Completion => format!("cmpl-{n}"),
            Kind::Chat => format!("chatcmpl-{n}"),
        };
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Reply { kind, id, model: model.to_string(), created }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, chunk: bool, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model,
               "choices": if choice.is_null() { json!([]) } else { json!([choice]) }})
    }

    fn chunk(&self, delta: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if role {
                    d.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = delta {
                    d.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": d, "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(true, choice)
    }

    fn full(&self, text: &str, finish: &str, usage: Value) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = self.envelope(false, choice);
        v["usage"] = usage;
        v
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn finish_reason(eos: bool) -> &'static str {
    if eos {
        "stop"
    } else {
        "length"
    }
}

/// The whole answer as JSON, or a stream of server-sent events.
pub async fn respond(
    app: &Arc<App>,
    reply: Reply,
    p: &GenParams,
    mut rx: Queued,
    n_prompt: usize,
) -> Result<Response, ApiError> {
    if p.stream {
        return Ok(stream(app.clone(), reply, rx, n_prompt, p.include_usage));
    }
    let mut ids = Vec::new();
    let eos = loop {
        match rx.recv().await {
            Some(GenEvent::Token(t)) => ids.push(t),
            Some(GenEvent::Done { eos }) => break eos,
            Some(GenEvent::Error(e)) => return Err(e),
            None => return Err(ApiError::unavailable("the engine stopped")),
        }
    };
    let text = app.tokenizer.decode(&ids, true).map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &reply.full(&text, finish_reason(eos), usage(n_prompt, ids.len()))))
}

struct Streaming {
    app: Arc<App>,
    reply: Reply,
    rx: Queued,
    detok: Detok,
    pending: VecDeque<String>,
    ended: bool,
    n_prompt: usize,
    include_usage: bool,
}

fn stream(app: Arc<App>, reply: Reply, rx: Queued, n_prompt: usize, include_usage: bool) -> Response {
    let mut pending = VecDeque::new();
    if reply.kind == Kind::Chat {
        pending.push_back(reply.chunk(Some(""), None, true).to_string());
    }
    let st = Streaming {
        app,
        reply,
        rx,
        detok: Detok { ids: Vec::new(), sent: String::new() },
        pending,
        ended: false,
        n_prompt,
        include_usage,
    };
    let events = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(Event::default().data(data)), st));
            }
            if st.ended {
                return None;
            }
            let tok = &st.app.tokenizer;
            match st.rx.recv().await {
                Some(GenEvent::Token(t)) => {
                    let d = st.detok.push(tok, t);
                    if !d.is_empty() {
                        st.pending.push_back(st.reply.chunk(Some(&d), None, false).to_string());
                    }
                }
                Some(GenEvent::Done { eos }) => {
                    let d = st.detok.delta(tok, true);
                    if !d.is_empty() {
                        st.pending.push_back(st.reply.chunk(Some(&d), None, false).to_string());
                    }
                    st.pending.push_back(st.reply.chunk(None, Some(finish_reason(eos)), false).to_string());
                    if st.include_usage {
                        let mut u = st.reply.envelope(true, Value::Null);
                        u["usage"] = usage(st.n_prompt, st.detok.ids.len());
                        st.pending.push_back(u.to_string());
                    }
                    st.pending.push_back("[DONE]".into());
                    st.ended = true;
                }
                Some(GenEvent::Error(e)) => {
                    st.pending.push_back(e.body().to_string());
                    st.ended = true;
                }
                None => {
                    st.pending.push_back(ApiError::unavailable("the engine stopped").body().to_string());
                    st.ended = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}
