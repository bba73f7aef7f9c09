//! The engine: one thread that owns the model and the adapters and runs the scheduler. Requests
//! wait in a queue and join the decoding batch (up to `max_batch` sequences, any mix of adapters)
//! between steps; each step advances every active sequence by one token through the [`Stepper`];
//! a sequence leaves the batch when it ends (end of sequence, its token budget, an error, its
//! client gone) and its place goes to the next in the queue. Loads, unloads and classification
//! run between steps.

use super::adapters::{AdapterInfo, Registry};
use super::error::ApiError;
use super::metrics::Metrics;
use super::mixed::{MixedStepper, Stacked};
use super::step::{Seq, Stepper, SwapStepper};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc::UnboundedSender, oneshot};
use tuna_autograd::ops::Kernels;
use tuna_models::generate::Sampling;
use tuna_models::model::AnyModel;

/// What a generation sends back, in order: tokens, then one `Done` or one `Error`.
#[derive(Debug)]
pub enum GenEvent {
    Token(u32),
    /// `true`: ended on the end-of-sequence token ("stop"); `false`: the token budget ("length").
    Done {
        eos: bool,
    },
    Error(ApiError),
}

/// One generation request, checked by the HTTP layer (lengths, sampling).
pub struct GenRequest {
    /// The adapter's name and the slot it was checked against, `None` for the base model.
    pub adapter: Option<(String, u64)>,
    pub prompt: Vec<u32>,
    pub max_new: usize,
    pub sampling: Sampling,
    pub events: UnboundedSender<GenEvent>,
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;

pub enum Command {
    Generate(GenRequest),
    /// Label scores (softmax) of each text through a classify adapter.
    Classify {
        adapter: String,
        texts: Vec<String>,
        reply: Reply<Vec<Vec<(String, f64)>>>,
    },
    Load {
        name: String,
        path: PathBuf,
        reply: Reply<AdapterInfo>,
    },
    Unload {
        name: String,
        reply: Reply<AdapterInfo>,
    },
    /// Stop taking requests; finish those in flight for up to `grace`, then end them with an error.
    Shutdown {
        grace: Duration,
    },
    /// Nothing: `/health` checks that the engine still takes commands.
    Ping,
}

/// What the HTTP layer reads without asking the engine.
pub struct Shared {
    pub metrics: Metrics,
    pub adapters: RwLock<BTreeMap<String, AdapterInfo>>,
}

/// A sequence in the batch and where its events go.
struct Active<B: Kernels<f32>> {
    seq: Seq<B>,
    max_new: usize,
    events: UnboundedSender<GenEvent>,
}

/// The per-step model work the scheduler uses: one mixed-adapter forward for the decoding
/// sequences ([`MixedStepper`], `mixed`), or a batch-of-one forward each ([`SwapStepper`]).
fn stepper<'a, B: Kernels<f32>>(
    model: &'a mut AnyModel<B, f32>,
    registry: &'a mut Registry<B>,
    mixed: bool,
    stacked: &'a mut Option<Stacked<B>>,
) -> Box<dyn Stepper<B> + 'a> {
    if mixed {
        Box::new(MixedStepper { model, registry, stacked, batched: 0, restacked: 0 })
    } else {
        Box::new(SwapStepper { model, registry })
    }
}

pub struct Engine<B: Kernels<f32>> {
    pub model: AnyModel<B, f32>,
    pub registry: Registry<B>,
    pub shared: Arc<Shared>,
    pub max_batch: usize,
    /// A pause after each step (tests use it to keep requests in flight; 0 otherwise).
    pub step_delay: Duration,
    /// Which [`Stepper`] runs the steps (see [`stepper`]); mixed unless set otherwise.
    pub mixed: bool,
    queue: VecDeque<GenRequest>,
    active: Vec<Active<B>>,
    deadline: Option<Instant>,
    /// The mixed stepper's batch cache, kept between steps (see [`Stacked`]).
    stacked: Option<Stacked<B>>,
}

impl<B: Kernels<f32>> Engine<B> {
    pub fn new(model: AnyModel<B, f32>, registry: Registry<B>, shared: Arc<Shared>, max_batch: usize) -> Self {
        let e = Engine {
            model,
            registry,
            shared,
            max_batch,
            step_delay: Duration::ZERO,
            mixed: true,
            queue: VecDeque::new(),
            active: Vec::new(),
            deadline: None,
            stacked: None,
        };
        e.publish();
        e
    }

    /// Run until shut down (and drained) or every sender is gone.
    pub fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.active.is_empty() && self.queue.is_empty() {
                if self.deadline.is_some() {
                    break;
                }
                match rx.recv() {
                    Ok(c) => self.handle(c),
                    Err(_) => break,
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.handle(c);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                self.cancel_all("the server shut down before this request finished");
                continue;
            }
            self.drop_abandoned();
            self.admit();
            self.step();
            let slots: Vec<Option<u64>> = self.active.iter().map(|a| a.seq.slot).collect();
            self.registry.collect(|s| slots.contains(&Some(s)));
        }
        // Anything that arrives from now on is refused.
        while let Ok(c) = rx.try_recv() {
            self.deadline = Some(Instant::now());
            self.handle(c);
        }
    }

    fn handle(&mut self, c: Command) {
        match c {
            Command::Generate(r) => {
                if self.deadline.is_some() {
                    self.shared.metrics.dequeue();
                    let _ = r.events.send(GenEvent::Error(ApiError::unavailable("the server is shutting down")));
                } else {
                    self.queue.push_back(r);
                }
            }
            Command::Classify { adapter, texts, reply } => {
                let _ = reply.send(self.classify(&adapter, &texts));
            }
            Command::Load { name, path, reply } => {
                let r = self.registry.load(&mut self.model, &name, &path);
                // Served on another base than it trained on: allowed, but said (as at startup).
                if let Some(n) =
                    r.as_ref().ok().and_then(|i| super::adapters::precision_note(i, self.model.base_precision()))
                {
                    eprintln!("{n}");
                }
                self.publish();
                let _ = reply.send(r);
            }
            Command::Unload { name, reply } => {
                let r = self.registry.unload(&name);
                self.publish();
                let _ = reply.send(r);
            }
            Command::Shutdown { grace } => self.deadline = Some(Instant::now() + grace),
            Command::Ping => {}
        }
    }

    /// The adapters' names and facts, for the HTTP layer.
    fn publish(&self) {
        if let Ok(mut a) = self.shared.adapters.write() {
            *a = self.registry.infos();
        }
        self.shared.metrics.adapters.store(self.registry.names().len(), Relaxed);
    }

    /// End sequences and queued requests whose client is gone.
    fn drop_abandoned(&mut self) {
        let m = &self.shared.metrics;
        let before = self.active.len() + self.queue.len();
        self.active.retain(|a| !a.events.is_closed());
        let queued = self.queue.len();
        self.queue.retain(|r| !r.events.is_closed());
        for _ in self.queue.len()..queued {
            m.dequeue();
        }
        let gone = before - self.active.len() - self.queue.len();
        m.cancelled.fetch_add(gone as u64, Relaxed);
        m.active.store(self.active.len(), Relaxed);
    }

    /// Move queued requests into the batch while it has room; one whose adapter has gone since
    /// it was checked is answered 404.
    fn admit(&mut self) {
        while self.active.len() < self.max_batch {
            let Some(r) = self.queue.pop_front() else { break };
            let m = &self.shared.metrics;
            m.dequeue();
            let slot = match &r.adapter {
                None => None,
                // The adapter the request was checked against (its virtual tokens against the
                // context), not whatever holds its name now.
                Some((n, want)) => match self.registry.slot(n) {
                    Some(s) if s == *want => Some(s),
                    Some(_) => {
                        m.refused.fetch_add(1, Relaxed);
                        let e = ApiError::not_found(
                            "model_not_found",
                            format!("adapter `{n}` was unloaded and replaced while this request waited: send it again"),
                        );
                        let _ = r.events.send(GenEvent::Error(e));
                        continue;
                    }
                    None => {
                        m.refused.fetch_add(1, Relaxed);
                        let _ = r.events.send(GenEvent::Error(ApiError::unknown_model(n, &self.registry.names())));
                        continue;
                    }
                },
            };
            m.prompt_tokens.fetch_add(r.prompt.len() as u64, Relaxed);
            let mut cache = stepper(&mut self.model, &mut self.registry, self.mixed, &mut self.stacked).new_cache();
            // Room for the whole sequence (a soft prompt's columns too): its cache's buffers never
            // regrow.
            let virt = slot.and_then(|s| self.registry.get(s)).map_or(0, |l| l.info.virtual_tokens);
            cache.reserve(virt + r.prompt.len() + r.max_new);
            let seq = Seq::new(slot, r.prompt, r.sampling, cache);
            self.active.push(Active { seq, max_new: r.max_new, events: r.events });
        }
        self.shared.metrics.active.store(self.active.len(), Relaxed);
    }

    /// One token more for every active sequence; finished ones leave the batch.
    fn step(&mut self) {
        if self.active.is_empty() {
            return;
        }
        let eos = self.model.eos_id();
        let (results, batched, restacked) = {
            let mut seqs: Vec<&mut Seq<B>> = self.active.iter_mut().map(|a| &mut a.seq).collect();
            let mut st = stepper(&mut self.model, &mut self.registry, self.mixed, &mut self.stacked);
            (st.step(&mut seqs), st.batched_rows(), st.restacked_rows())
        };
        let m = &self.shared.metrics;
        m.batched_rows.fetch_add(batched as u64, Relaxed);
        m.restacked_rows.fetch_add(restacked as u64, Relaxed);
        let mut produced = 0;
        let mut keep = Vec::with_capacity(self.active.len());
        for (a, r) in std::mem::take(&mut self.active).into_iter().zip(results) {
            match r {
                Ok(t) => {
                    produced += 1;
                    let _ = a.events.send(GenEvent::Token(t));
                    let end = eos == Some(t);
                    if end || a.seq.out.len() >= a.max_new {
                        let _ = a.events.send(GenEvent::Done { eos: end });
                        m.completed.fetch_add(1, Relaxed);
                    } else {
                        keep.push(a);
                    }
                }
                Err(e) => {
                    m.failed.fetch_add(1, Relaxed);
                    let _ = a.events.send(GenEvent::Error(ApiError::internal(e)));
                }
            }
        }
        self.active = keep;
        if self.active.is_empty() {
            self.stacked = None; // nobody left to hand the rows back to
        }
        m.step(produced);
        if !self.step_delay.is_zero() {
            std::thread::sleep(self.step_delay);
        }
        m.active.store(self.active.len(), Relaxed);
    }

    /// Every request in flight ends with a 503 (shutdown's grace ran out).
    fn cancel_all(&mut self, why: &str) {
        let m = &self.shared.metrics;
        for a in self.active.drain(..) {
            m.cancelled.fetch_add(1, Relaxed);
            let _ = a.events.send(GenEvent::Error(ApiError::unavailable(why)));
        }
        for r in self.queue.drain(..) {
            m.dequeue();
            m.cancelled.fetch_add(1, Relaxed);
            let _ = r.events.send(GenEvent::Error(ApiError::unavailable(why)));
        }
        m.active.store(0, Relaxed);
        self.stacked = None;
    }

    /// Label probabilities of each text through classify adapter `name`.
    fn classify(&mut self, name: &str, texts: &[String]) -> Result<Vec<Vec<(String, f64)>>, ApiError> {
        let slot = self.registry.slot(name).ok_or_else(|| ApiError::unknown_model(name, &self.registry.names()))?;
        let l = self.registry.get(slot).expect("a named slot exists");
        let (labels, verbalizer, virt) = match (&l.info.task, &l.info.labels) {
            (Some(t), Some(labels)) if t == "classify" => (labels.clone(), l.verbalizer.clone(), l.info.virtual_tokens),
            _ => {
                return Err(ApiError::invalid(
                    "not_a_classifier",
                    "model",
                    format!(
                        "adapter `{name}` was not trained for classification (its tuna_task.json says task {}); \
                         use /v1/completions",
                        l.info.task.as_deref().unwrap_or("nothing: there is none")
                    ),
                ))
            }
        };
        let limit = self.model.max_positions().saturating_sub(virt);
        let mut out = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let ids = self.model.encode(text).map_err(|e| ApiError::invalid("tokenizer", "input", e.to_string()))?;
            if ids.is_empty() || ids.len() > limit {
                return Err(ApiError::invalid(
                    "context_length_exceeded",
                    "input",
                    format!("input {i} has {} tokens; 1 to {limit} fit this model with this adapter", ids.len()),
                ));
            }
            let mask = vec![1u8; ids.len()];
            let scores = self
                .registry
                .with_installed(&mut self.model, Some(slot), |m| {
                    tuna_autograd::no_grad(|| m.class_scores(&ids, &mask, 1, &verbalizer).and_then(|t| Ok(t.to_vec()?)))
                })
                .map_err(ApiError::internal)?
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let exp: Vec<f64> = scores.iter().map(|&s| (s as f64 - max).exp()).collect();
            let z: f64 = exp.iter().sum();
            out.push(labels.iter().cloned().zip(exp.iter().map(|e| e / z)).collect());
        }
        Ok(out)
    }
}
