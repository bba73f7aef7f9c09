//! The HTTP routes: OpenAI-compatible `/v1/completions` and `/v1/chat/completions` (JSON, or
//! server-sent events with `"stream": true`), `/v1/classify`, `/v1/models`, adapters at run time
//! under `/v1/adapters`, `/metrics` and `/health`. Every refusal is a JSON error in OpenAI's
//! shape; requests are checked here (model, lengths, sampling) before they reach the engine.

use super::api::{self, GenParams, Limits};
use super::engine::{Command, GenEvent, GenRequest, Shared};
use super::error::{json_response, ApiError};
use super::reply::{respond, Kind, Reply};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{mpsc::UnboundedReceiver, oneshot};

/// What the handlers share.
pub struct App {
    pub shared: Arc<Shared>,
    pub engine: Mutex<mpsc::Sender<Command>>,
    pub tokenizer: tokenizers::Tokenizer,
    /// Whether encoding adds the tokenizer's special tokens (BOS for Hugging Face folders).
    pub add_special: bool,
    pub decoder: bool,
    /// The tokenizer has ChatML's `<|im_start|>` and `<|im_end|>`.
    pub chatml: bool,
    pub limits: Limits,
    pub counter: AtomicU64,
    /// How the base's frozen block weights are held (`--base-precision`, or the adapters').
    pub base_precision: tuna_models::model::BasePrecision,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/classify", post(classify))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/adapters", get(models).post(load))
        .route("/v1/adapters/{name}", delete(unload))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("unknown_route", "no such route (see /v1/models, /health)") })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                ..ApiError::bad_request("method_not_allowed", "this route does not take that method (POST for /v1/*)")
            }
        })
        .with_state(app)
}

type Body = Result<Bytes, BytesRejection>;

/// Count the request, and a refusal when it is one.
fn counted(app: &App, r: Result<Response, ApiError>) -> Response {
    let m = &app.shared.metrics;
    m.requests.fetch_add(1, Relaxed);
    r.unwrap_or_else(|e| {
        if e.status.is_client_error() {
            m.refused.fetch_add(1, Relaxed);
        }
        e.into_response()
    })
}

fn body_object(body: Body) -> Result<serde_json::Map<String, Value>, ApiError> {
    let bytes = body.map_err(|e| ApiError {
        status: e.status(),
        ..ApiError::bad_request("invalid_body", format!("the body could not be read: {e}"))
    })?;
    api::parse_object(&bytes)
}

impl App {
    fn send(&self, c: Command) -> Result<(), ApiError> {
        let tx = self.engine.lock().map_err(|_| ApiError::unavailable("the engine stopped"))?;
        tx.send(c).map_err(|_| ApiError::unavailable("the engine stopped"))
    }

    fn refuse_when_stopping(&self) -> Result<(), ApiError> {
        if self.shared.metrics.shutting_down.load(Relaxed) {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        Ok(())
    }

    /// Check `p` against the loaded models and limits, tokenize `text`, and queue the request.
    fn submit(&self, p: &GenParams, text: &str, default_max: usize) -> Result<(Queued, usize), ApiError> {
        self.refuse_when_stopping()?;
        let adapter = api::adapter_of(&p.model);
        let (virt, slot) = match &adapter {
            None => (0, 0),
            Some(n) => {
                let a = self.shared.adapters.read().map_err(|_| ApiError::internal("adapter table poisoned"))?;
                match a.get(n) {
                    Some(info) => (info.virtual_tokens, info.slot),
                    None => {
                        let mut known = vec![super::adapters::BASE.to_string()];
                        known.extend(a.keys().cloned());
                        return Err(ApiError::unknown_model(n, &known));
                    }
                }
            }
        };
        if !self.decoder {
            return Err(ApiError::bad_request(
                "not_a_decoder",
                "the base model is BERT: it classifies, it does not generate",
            ));
        }
        let enc = self
            .tokenizer
            .encode(text, self.add_special)
            .map_err(|e| ApiError::invalid("tokenizer", "prompt", e.to_string()))?;
        let prompt = enc.get_ids().to_vec();
        let l = &self.limits;
        if prompt.is_empty() {
            return Err(ApiError::invalid("empty_prompt", "prompt", "the prompt has no tokens"));
        }
        if prompt.len() > l.max_prompt_tokens {
            return Err(ApiError::invalid(
                "prompt_too_long",
                "prompt",
                format!(
                    "the prompt has {} tokens; this server takes at most {} (--max-prompt-tokens)",
                    prompt.len(),
                    l.max_prompt_tokens
                ),
            ));
        }
        // The last new token is never fed back: it may take the position after the last.
        let room = (l.context + 1).saturating_sub(virt + prompt.len());
        let max_new = match p.max_tokens {
            Some(m) if m > room => {
                let v = if virt > 0 { format!(" and {virt} virtual tokens") } else { String::new() };
                return Err(ApiError::invalid(
                    "context_length_exceeded",
                    "max_tokens",
                    format!("a {}-token prompt{v} plus {m} new tokens exceeds the model's {} positions: ask for {room} or fewer", prompt.len(), l.context),
                ));
            }
            Some(m) => m,
            None => default_max.min(room).min(l.max_new_tokens),
        };
        if max_new == 0 {
            return Err(ApiError::invalid(
                "context_length_exceeded",
                "prompt",
                "the prompt fills the model's context: shorten it",
            ));
        }
        if !self.shared.metrics.try_enqueue(l.max_queue) {
            return Err(ApiError::queue_full(l.max_queue));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let n_prompt = prompt.len();
        let adapter = adapter.map(|n| (n, slot));
        let req = GenRequest { adapter, prompt, max_new, sampling: p.sampling.clone(), events: tx };
        if let Err(e) = self.send(Command::Generate(req)) {
            self.shared.metrics.dequeue();
            return Err(e);
        }
        Ok((rx, n_prompt))
    }
}

pub type Queued = UnboundedReceiver<GenEvent>;

async fn completions(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let o = body_object(body)?;
        // One number per request, taken once: its id and its default seed (two requests arriving
        // together never share a seed).
        let seed = app.counter.fetch_add(1, Relaxed);
        let p = api::gen_params(&o, &app.limits, seed)?;
        let prompt = api::one_string(&o, "prompt")?;
        // OpenAI's default for completions: 16 new tokens.
        let (rx, n) = app.submit(&p, &prompt, 16)?;
        respond(&app, Reply::new(seed, Kind::Completion, &p.model), &p, rx, n).await
    };
    let r = r.await;
    counted(&app, r)
}

async fn chat(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        let o = body_object(body)?;
        // One number per request, taken once: its id and its default seed (two requests arriving
        // together never share a seed).
        let seed = app.counter.fetch_add(1, Relaxed);
        let p = api::gen_params(&o, &app.limits, seed)?;
        let text = api::chatml(&o)?;
        if !app.chatml {
            return Err(ApiError::bad_request(
                "no_chat_template",
                "this model's tokenizer has no <|im_start|>/<|im_end|> tokens: chat needs ChatML (templates in Jinja \
                 are not supported); use /v1/completions",
            ));
        }
        let (rx, n) = app.submit(&p, &text, usize::MAX)?;
        respond(&app, Reply::new(seed, Kind::Chat, &p.model), &p, rx, n).await
    };
    let r = r.await;
    counted(&app, r)
}

async fn classify(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        app.refuse_when_stopping()?;
        let o = body_object(body)?;
        let model = api::req_str(&o, "model")?.to_string();
        let texts: Vec<String> = match o.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if (1..=64).contains(&a.len()) && a.iter().all(Value::is_string) => {
                a.iter().filter_map(|v| v.as_str().map(String::from)).collect()
            }
            _ => {
                return Err(ApiError::invalid(
                    "invalid_value",
                    "input",
                    "`input`: a string or a list of 1 to 64 strings",
                ))
            }
        };
        if api::adapter_of(&model).is_none() {
            return Err(ApiError::invalid(
                "not_a_classifier",
                "model",
                "the base model has no classes: name a classify adapter",
            ));
        }
        let (tx, rx) = oneshot::channel();
        app.send(Command::Classify { adapter: model.clone(), texts, reply: tx })?;
        let rows = rx.await.map_err(|_| ApiError::unavailable("the engine stopped"))??;
        let data: Vec<Value> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let best = row.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|x| x.0.clone());
                let scores: Vec<Value> = row.iter().map(|(l, s)| json!({"label": l, "score": s})).collect();
                json!({"index": i, "label": best, "scores": scores})
            })
            .collect();
        Ok(json_response(StatusCode::OK, &json!({"object": "list", "model": model, "data": data})))
    };
    let r = r.await;
    counted(&app, r)
}

/// Every model the server answers to (the base, then the adapters by name), as OpenAI lists them.
fn model_entries(app: &App) -> Vec<(String, Value)> {
    let adapters = app.shared.adapters.read().map(|a| a.clone()).unwrap_or_default();
    let base = super::adapters::BASE.to_string();
    let mut data = vec![(
        base.clone(),
        json!({"id": base, "object": "model", "owned_by": "tuna", "base_precision": app.base_precision.name()}),
    )];
    for (name, info) in adapters {
        let entry = json!({"id": name, "object": "model", "owned_by": "tuna", "parent": super::adapters::BASE,
                           "method": info.method, "task": info.task, "labels": info.labels, "path": info.path,
                           "virtual_tokens": info.virtual_tokens,
                           "trained_base_precision": info.base_precision.name()});
        data.push((name, entry));
    }
    data
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let data: Vec<Value> = model_entries(&app).into_iter().map(|(_, e)| e).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// One model (what the `openai` client's `models.retrieve` asks for); 404 naming the known ones.
async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    let entries = model_entries(&app);
    match entries.iter().find(|(n, _)| *n == id) {
        Some((_, e)) => json_response(StatusCode::OK, e),
        None => {
            let known: Vec<String> = entries.into_iter().map(|(n, _)| n).collect();
            counted(&app, Err(ApiError::unknown_model(&id, &known)))
        }
    }
}

async fn load(State(app): State<Arc<App>>, body: Body) -> Response {
    let r = async {
        app.refuse_when_stopping()?;
        let o = body_object(body)?;
        let name = api::req_str(&o, "name")?.to_string();
        let path = std::path::PathBuf::from(api::req_str(&o, "path")?);
        let (tx, rx) = oneshot::channel();
        app.send(Command::Load { name, path, reply: tx })?;
        let info = rx.await.map_err(|_| ApiError::unavailable("the engine stopped"))??;
        Ok(json_response(StatusCode::CREATED, &json!({"object": "adapter", "loaded": true, "adapter": info})))
    };
    let r = r.await;
    counted(&app, r)
}

async fn unload(State(app): State<Arc<App>>, Path(name): Path<String>) -> Response {
    let r = async {
        if api::adapter_of(&name).is_none() {
            return Err(ApiError::invalid("invalid_name", "name", "the base model cannot be unloaded"));
        }
        let (tx, rx) = oneshot::channel();
        app.send(Command::Unload { name: name.clone(), reply: tx })?;
        rx.await.map_err(|_| ApiError::unavailable("the engine stopped"))??;
        Ok(json_response(StatusCode::OK, &json!({"object": "adapter", "name": name, "deleted": true})))
    };
    let r = r.await;
    counted(&app, r)
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let m = &app.shared.metrics;
    let engine_alive = app.engine.lock().is_ok_and(|tx| tx.send(Command::Ping).is_ok());
    let (status, code) = if m.shutting_down.load(Relaxed) {
        ("shutting_down", StatusCode::SERVICE_UNAVAILABLE)
    } else if !engine_alive {
        ("engine_stopped", StatusCode::SERVICE_UNAVAILABLE)
    } else {
        ("ok", StatusCode::OK)
    };
    json_response(
        code,
        &json!({"status": status, "adapters": m.adapters.load(Relaxed), "queue_depth": m.queued.load(Relaxed),
                "active": m.active.load(Relaxed)}),
    )
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.shared.metrics.render(app.limits.max_batch, app.limits.max_queue);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
