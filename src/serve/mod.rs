//! `tuna serve`: one base model in memory, every adapter folder of `--adapters` (and those loaded
//! later through the API) served under its folder's name by an HTTP server with OpenAI-compatible
//! completions and chat, classification, run-time adapter loading, metrics and graceful shutdown.
//!
//! Layout: [`engine`] (the model's thread and the continuous-batching scheduler), [`step`] (the
//! per-step model work behind one trait), [`adapters`] (the adapter registry), [`http`] (routes),
//! [`api`] (request checking), [`reply`] (JSON answers and server-sent events), [`metrics`],
//! [`error`] (OpenAI-shaped errors).

pub mod adapters;
pub mod api;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod mixed;
pub mod reply;
pub mod step;

use anyhow::{anyhow, bail, Context, Result};
use engine::{Command, Engine, Shared};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::Duration;
use tuna_autograd::ops::Kernels;
use tuna_kernels::{Cpu, Cuda, Device};
use tuna_models::model::{AnyModel, BasePrecision};

/// `tuna serve`'s settings.
#[derive(Clone)]
pub struct ServeSettings {
    pub model: PathBuf,
    pub adapters: Option<PathBuf>,
    pub host: String,
    pub port: u16,
    pub max_queue: usize,
    /// `None`: the model's context.
    pub max_prompt_tokens: Option<usize>,
    pub max_new_tokens: usize,
    pub max_batch: usize,
    /// How long shutdown waits for requests in flight before ending them with an error.
    pub shutdown_grace: Duration,
    pub device: Device,
    /// A pause after each decoding step (a testing aid; zero in use).
    pub step_delay: Duration,
    /// Decode the batch in one mixed-adapter forward ([`mixed::MixedStepper`]); `false`: a
    /// batch-of-one forward per sequence ([`step::SwapStepper`]).
    pub mixed: bool,
    /// `--base-precision` as given; `None`: the one every adapter of `adapters` records as
    /// trained on ([`agreed_precision`]), else f32.
    pub base_precision: Option<BasePrecision>,
}

/// What the engine thread reports once the model and adapters are loaded.
struct Ready {
    tokenizer: tokenizers::Tokenizer,
    add_special: bool,
    decoder: bool,
    context: usize,
    base_precision: BasePrecision,
}

/// Run the server until SIGTERM or SIGINT; returns once requests in flight are finished (or
/// ended after the grace period).
pub fn run(s: ServeSettings) -> Result<()> {
    if s.max_batch == 0 || s.max_queue == 0 || s.max_new_tokens == 0 {
        bail!("--max-batch, --max-queue and --max-new-tokens must be at least 1");
    }
    let shared = Arc::new(Shared { metrics: Default::default(), adapters: RwLock::new(Default::default()) });
    let (tx, rx) = mpsc::channel::<Command>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Ready>>();
    let (settings, sh) = (s.clone(), shared.clone());
    let engine = std::thread::Builder::new().name("tuna-engine".into()).spawn(move || {
        let started = match settings.device {
            Device::Cpu => start(&Arc::new(Cpu), &settings, sh),
            Device::Cuda(n) => match Cuda::new(n) {
                Ok(d) => start(&Arc::new(d), &settings, sh),
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow!("{e}")));
                    return;
                }
            },
        };
        match started {
            Ok((ready, run)) => {
                let _ = ready_tx.send(Ok(ready));
                run(rx);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
            }
        }
    })?;
    let ready = ready_rx.recv().map_err(|_| anyhow!("the engine thread stopped while loading"))??;
    let max_prompt = s.max_prompt_tokens.unwrap_or(ready.context);
    if max_prompt == 0 || max_prompt > ready.context {
        bail!("--max-prompt-tokens {max_prompt}: expected 1 to the model's {} positions", ready.context);
    }
    let chatml = ["<|im_start|>", "<|im_end|>"].iter().all(|t| ready.tokenizer.token_to_id(t).is_some());
    let app = Arc::new(http::App {
        shared: shared.clone(),
        engine: Mutex::new(tx.clone()),
        tokenizer: ready.tokenizer,
        add_special: ready.add_special,
        decoder: ready.decoder,
        chatml,
        limits: api::Limits {
            max_queue: s.max_queue,
            max_prompt_tokens: max_prompt,
            max_new_tokens: s.max_new_tokens,
            max_batch: s.max_batch,
            context: ready.context,
        },
        counter: AtomicU64::new(0),
        base_precision: ready.base_precision,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(serve(&s, app, tx.clone()))?;
    // The server has stopped: the engine ends what is left at once.
    let _ = tx.send(Command::Shutdown { grace: Duration::ZERO });
    drop(tx);
    let t0 = std::time::Instant::now();
    while !engine.is_finished() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = &shared.metrics;
    eprintln!(
        "stopped: {} requests, {} completed, {} cancelled, {} tokens generated",
        m.requests.load(Relaxed),
        m.completed.load(Relaxed),
        m.cancelled.load(Relaxed),
        m.generated_tokens.load(Relaxed)
    );
    Ok(())
}

/// Bind, print the address on stdout (`listening on http://HOST:PORT`), serve until a signal.
async fn serve(s: &ServeSettings, app: Arc<http::App>, tx: mpsc::Sender<Command>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((s.host.as_str(), s.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", s.host, s.port))?;
    let addr = listener.local_addr()?;
    // The handlers are in place before the address is printed: a signal right after it is caught.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();
    let (stop, hard) = (Arc::new(tokio::sync::Notify::new()), Arc::new(tokio::sync::Notify::new()));
    let (grace, shared) = (s.shutdown_grace, app.shared.clone());
    let (stop2, hard2) = (stop.clone(), hard.clone());
    tokio::spawn(async move {
        futures_util::future::select(std::pin::pin!(term.recv()), std::pin::pin!(int.recv())).await;
        shared.metrics.shutting_down.store(true, Relaxed);
        let m = &shared.metrics;
        eprintln!(
            "shutting down: {} active and {} queued requests get up to {:.1} s to finish",
            m.active.load(Relaxed),
            m.queued.load(Relaxed),
            grace.as_secs_f64()
        );
        let _ = tx.send(Command::Shutdown { grace });
        stop2.notify_one();
        hard2.notify_one();
    });
    let server = axum::serve(listener, http::router(app)).with_graceful_shutdown(async move { stop.notified().await });
    let overdue = async {
        hard.notified().await;
        tokio::time::sleep(grace + Duration::from_secs(5)).await
    };
    let server = std::future::IntoFuture::into_future(server);
    match futures_util::future::select(std::pin::pin!(server), std::pin::pin!(overdue)).await {
        futures_util::future::Either::Left((r, _)) => r?,
        futures_util::future::Either::Right(_) => {
            eprintln!("connections still open 5 s after the grace period: closing them")
        }
    }
    Ok(())
}

type RunEngine = Box<dyn FnOnce(mpsc::Receiver<Command>)>;

/// The base precision every one of `recorded` (the adapters' task files') is, when they agree;
/// `None` for none or a mix.
pub fn agreed_precision(recorded: &[BasePrecision]) -> Option<BasePrecision> {
    let first = *recorded.first()?;
    recorded.iter().all(|&p| p == first).then_some(first)
}

/// Open the model and load the adapters of `--adapters` (a folder that fails to load is reported
/// on stderr, naming it, and skipped: the others are served). The base is held in
/// `--base-precision`, else in the precision every adapter there trained on (else f32); each
/// adapter trained on another is served with a `note:` on stderr.
fn start<B: Kernels<f32>>(dev: &Arc<B>, s: &ServeSettings, shared: Arc<Shared>) -> Result<(Ready, RunEngine)> {
    let model = s.model.as_path();
    // The adapters' folders first: the base's precision may follow them.
    let mut folders: Vec<PathBuf> = Vec::new();
    if let Some(dir) = &s.adapters {
        let entries = std::fs::read_dir(dir).with_context(|| format!("--adapters {}", dir.display()))?;
        folders = entries.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
        folders.sort();
    }
    let recorded: Vec<BasePrecision> = folders.iter().filter_map(|f| adapters::recorded_precision(f)).collect();
    let agreed = agreed_precision(&recorded).filter(|&p| p != BasePrecision::F32 && s.base_precision.is_none());
    let (adapters_dir, base) = (s.adapters.as_deref().unwrap_or(Path::new("")), s.base_precision.or(agreed));
    if let Some(p) = agreed {
        eprintln!(
            "base precision {p}: the one every adapter of {} was trained with (their tuna_task.json); \
             --base-precision f32 serves an f32 base",
            adapters_dir.display()
        );
    }
    // Held in the adapters' precision and failing: say where the precision came from.
    let explain = |e: tuna_models::Error| match agreed {
        Some(p) => anyhow!(
            "{e} (the base precision {p} is the one every adapter of {} records as trained on; --base-precision f32 \
             serves an f32 base)",
            adapters_dir.display()
        ),
        None => e.into(),
    };
    let mut m = AnyModel::<B, f32>::open_with(dev, model, |_| false, base.unwrap_or_default()).map_err(explain)?;
    if m.is_encoder_decoder() {
        bail!(
            "{}: tuna serve batches requests through decoder-only models (GPT-2, Llama) and BERT; T5 is not served yet \
             (tuna generate runs it)",
            model.display()
        );
    }
    let mut registry = adapters::Registry::default();
    for f in folders {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if adapters::adapter_folder(&f).is_none() {
            eprintln!("skipped {}: no adapter_config.json there (nor in its adapter/ folder)", f.display());
            continue;
        }
        match registry.load(&mut m, &name, &f) {
            Ok(i) => {
                eprintln!("adapter `{name}`: {} from {}", i.method, i.path.display());
                if let Some(n) = adapters::precision_note(&i, m.base_precision()) {
                    eprintln!("{n}");
                }
            }
            Err(e) => {
                eprintln!("warning: adapter folder {} not loaded (the others are served): {}", f.display(), e.message)
            }
        }
    }
    let ready = Ready {
        tokenizer: m.tokenizer.clone(),
        add_special: m.add_special,
        decoder: m.is_decoder(),
        context: m.max_positions(),
        base_precision: m.base_precision(),
    };
    let mut engine = Engine::new(m, registry, shared, s.max_batch);
    engine.step_delay = s.step_delay;
    engine.mixed = s.mixed;
    Ok((ready, Box::new(move |rx| engine.run(rx))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_base_follows_the_adapters_only_when_they_all_agree() {
        use BasePrecision::*;
        assert_eq!(agreed_precision(&[]), None);
        assert_eq!(agreed_precision(&[Int8]), Some(Int8));
        assert_eq!(agreed_precision(&[Bf16, Bf16, Bf16]), Some(Bf16));
        assert_eq!(agreed_precision(&[Int8, F32]), None);
        assert_eq!(agreed_precision(&[F32, F32]), Some(F32));
    }
}
