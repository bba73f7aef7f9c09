//! The adapters the server holds: each a loaded [`Adapt`] kept beside the model (never installed
//! but for the forward that uses it), by slot, with its name, task and classify verbalizer.
//!
//! Names are folder names. A name leaves at once on unload (new requests get 404), but the
//! adaptation stays until the last sequence using it has finished ("retiring").

use super::error::ApiError;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tuna_autograd::ops::Kernels;
use tuna_models::adapt::{peft, Adapt};
use tuna_models::model::{AnyModel, BasePrecision};

/// The name the base model answers to (no adapter).
pub const BASE: &str = "base";

/// What the HTTP layer knows of an adapter (shared, read without the engine).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    /// prompt, prefix, houlsby or lora.
    pub method: &'static str,
    /// The task from `tuna_task.json` (lm, completion, classify), when the folder has one.
    pub task: Option<String>,
    pub labels: Option<Vec<String>>,
    /// Positions the adaptation takes before the content (soft prompt, prefix).
    pub virtual_tokens: usize,
    /// The base precision its run trained on (`tuna_task.json`'s; f32 when it records none),
    /// named apart from the served base's `base_precision` in the API.
    #[serde(rename = "trained_base_precision", serialize_with = "precision_name")]
    pub base_precision: BasePrecision,
    /// The registry's slot: this load of the adapter, never reused (a name can be unloaded and
    /// taken by another adapter while a request checked against the first waits in the queue).
    #[serde(skip)]
    pub slot: u64,
}

/// One loaded adapter.
pub struct Loaded<B: Kernels<f32>> {
    pub info: AdapterInfo,
    pub adapt: Adapt<B, f32>,
    /// Decoders' classification: the first token of each label's verbalizer word.
    pub verbalizer: Vec<u32>,
    /// Unloaded: no longer found by name, dropped once no sequence uses it.
    pub retiring: bool,
}

/// Loaded adapters by slot, and the slot of each live name.
pub struct Registry<B: Kernels<f32>> {
    slots: HashMap<u64, Loaded<B>>,
    names: BTreeMap<String, u64>,
    next: u64,
}

impl<B: Kernels<f32>> Default for Registry<B> {
    fn default() -> Self {
        Registry { slots: HashMap::new(), names: BTreeMap::new(), next: 0 }
    }
}

/// Where the adapter of folder `dir` is: `dir` itself (a PEFT folder) or a `tuna train` run's
/// `dir/adapter`; `None` when neither holds an `adapter_config.json`.
pub fn adapter_folder(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("adapter")].into_iter().find(|d| d.join(peft::CONFIG).is_file())
}

fn precision_name<S: serde::Serializer>(p: &BasePrecision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

/// The base precision the adapter folder `dir` (a PEFT folder or a tuna run's) records in its
/// `tuna_task.json` as trained on; `None` when it has no adapter or its task file cannot be read
/// (loading it reports why).
pub fn recorded_precision(dir: &Path) -> Option<BasePrecision> {
    let folder = adapter_folder(dir)?;
    let task = tuna_trainer::TaskFile::read(&folder).ok()?;
    crate::cli::recorded_base_precision(task.as_ref(), &folder).ok()
}

/// The `note:` line for an adapter trained on another base precision than the `served` one: it
/// is served (an adapter may run on another base), but its answers are not the ones its run
/// measured, which must not go unsaid.
pub fn precision_note(info: &AdapterInfo, served: BasePrecision) -> Option<String> {
    (info.base_precision != served).then(|| {
        let file = info.path.join(tuna_trainer::TASK_FILE);
        let trained = if file.is_file() {
            format!("was trained with --base-precision {} ({})", info.base_precision, file.display())
        } else {
            format!("has no {} (taken as trained on an f32 base)", file.display())
        };
        format!(
            "note: adapter `{}` {trained} and is served on the {served} base: its answers will not be the ones \
             its run measured",
            info.name
        )
    })
}

/// A name is 1 to 64 of `[A-Za-z0-9._-]`, and not the base's.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && name != BASE;
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "invalid_name",
            "name",
            format!("adapter name `{name}`: use 1 to 64 of A-Z a-z 0-9 . _ - (and not `{BASE}`, the base model's)"),
        ))
    }
}

impl<B: Kernels<f32>> Registry<B> {
    /// Load the adapter in `dir` (a PEFT folder or a tuna run's) as `name`, checked against
    /// `model` (shapes, module names, finite values); the model itself is left as it was.
    pub fn load(&mut self, model: &mut AnyModel<B, f32>, name: &str, dir: &Path) -> Result<AdapterInfo, ApiError> {
        check_name(name)?;
        if self.names.contains_key(name) {
            return Err(ApiError::conflict(
                "adapter_exists",
                format!("an adapter named `{name}` is loaded; DELETE /v1/adapters/{name} first"),
            ));
        }
        let folder = adapter_folder(dir).ok_or_else(|| {
            ApiError::invalid(
                "adapter_not_found",
                "path",
                format!("{}: no {} there (nor in its adapter/ folder)", dir.display(), peft::CONFIG),
            )
        })?;
        // Only regular files are read: a FIFO (or a device) would block the engine's thread, and
        // with it every sequence's decoding, for as long as nothing writes to it.
        if let Ok(entries) = std::fs::read_dir(&folder) {
            for e in entries.flatten() {
                let p = e.path();
                if std::fs::metadata(&p).is_ok_and(|m| !m.is_file() && !m.is_dir()) {
                    return Err(ApiError::invalid(
                        "adapter_load_failed",
                        "path",
                        format!("{}: not a regular file (a pipe or a device): refused", p.display()),
                    ));
                }
            }
        }
        // The models crate's errors usually name the file already; the folder is said once.
        let fail = |msg: String| {
            let shown = folder.display().to_string();
            let msg = if msg.contains(&shown) { msg } else { format!("{shown}: {msg}") };
            ApiError::invalid("adapter_load_failed", "path", msg)
        };
        let task = tuna_trainer::TaskFile::read(&folder).map_err(|e| fail(e.to_string()))?;
        let base_precision =
            crate::cli::recorded_base_precision(task.as_ref(), &folder).map_err(|e| fail(e.to_string()))?;
        // The model's own (empty) adaptation is set aside while the adapter loads into it, and
        // put back whatever happens (a load that fails or panics leaves the model as it was).
        let saved = std::mem::take(model.adapt_mut());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.load_adapter(&folder)));
        let adapt = std::mem::replace(model.adapt_mut(), saved);
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail("the adapter could not be read (the loader panicked)".into())),
        }
        let method = if let Some(p) = &adapt.prompt {
            if p.ptuning.is_some() {
                "ptuning"
            } else {
                "prompt"
            }
        } else if adapt.prefix.is_some() {
            "prefix"
        } else if adapt.houlsby.is_some() {
            "houlsby"
        } else {
            "lora"
        };
        let labels = task.as_ref().and_then(|t| t.labels.clone());
        let mut verbalizer = Vec::new();
        if let (Some(t), Some(l), true) = (&task, &labels, model.is_decoder()) {
            let words = t.verbalizers.clone().unwrap_or_else(|| l.clone());
            for w in &words {
                let ids = model.encode_plain(&format!(" {w}")).map_err(|e| fail(e.to_string()))?;
                verbalizer.push(*ids.first().ok_or_else(|| fail(format!("verbalizer `{w}` has no tokens")))?);
            }
        }
        let info = AdapterInfo {
            name: name.to_string(),
            path: folder.clone(),
            method,
            task: task.map(|t| t.task),
            labels,
            virtual_tokens: adapt.prompt_len() + adapt.prefix_len(),
            base_precision,
            slot: self.next,
        };
        let slot = self.next;
        self.next += 1;
        self.slots.insert(slot, Loaded { info: info.clone(), adapt, verbalizer, retiring: false });
        self.names.insert(name.to_string(), slot);
        Ok(info)
    }

    /// Forget `name`: new requests no longer find it; sequences using it finish first.
    pub fn unload(&mut self, name: &str) -> Result<AdapterInfo, ApiError> {
        let slot = self
            .names
            .remove(name)
            .ok_or_else(|| ApiError::not_found("adapter_not_found", format!("no adapter named `{name}` is loaded")))?;
        let l = self.slots.get_mut(&slot).expect("a named slot exists");
        l.retiring = true;
        Ok(l.info.clone())
    }

    /// Drop retiring adapters no sequence uses (`in_use`: whether a slot is).
    pub fn collect(&mut self, in_use: impl Fn(u64) -> bool) {
        self.slots.retain(|&s, l| !l.retiring || in_use(s));
    }

    pub fn slot(&self, name: &str) -> Option<u64> {
        self.names.get(name).copied()
    }

    pub fn get(&self, slot: u64) -> Option<&Loaded<B>> {
        self.slots.get(&slot)
    }

    pub fn names(&self) -> Vec<String> {
        self.names.keys().cloned().collect()
    }

    pub fn infos(&self) -> BTreeMap<String, AdapterInfo> {
        self.names.iter().map(|(n, s)| (n.clone(), self.slots[s].info.clone())).collect()
    }

    /// Adaptations held, retiring ones included.
    pub fn held(&self) -> usize {
        self.slots.len()
    }

    /// `f` on `model` with `slot`'s adaptation installed (the base's for `None`), swapped back
    /// after: two moves of a few pointers, no copy of any weight. A panic in `f` is caught (the
    /// adaptation still goes back) and returned as an error; an unknown slot is an error.
    pub fn with_installed<T>(
        &mut self,
        model: &mut AnyModel<B, f32>,
        slot: Option<u64>,
        f: impl FnOnce(&mut AnyModel<B, f32>) -> T,
    ) -> Result<T, String> {
        let guarded = |model: &mut AnyModel<B, f32>| caught(|| f(model));
        match slot {
            None => guarded(model),
            Some(s) => {
                let l = self.slots.get_mut(&s).ok_or_else(|| format!("adapter slot {s} is gone"))?;
                std::mem::swap(model.adapt_mut(), &mut l.adapt);
                let out = guarded(model);
                std::mem::swap(model.adapt_mut(), &mut l.adapt);
                out
            }
        }
    }

    /// Whether `slot`'s adaptation can join a mixed-adapter batch (the bank refuses a merged
    /// LoRA); unknown slots cannot.
    pub fn mixable(&self, slot: u64) -> bool {
        self.slots.get(&slot).is_some_and(|l| !l.adapt.lora.values().any(|l| l.is_merged()))
    }

    /// `f` on `model` with the adaptations of `slots` moved into its bank (bank index `i` =
    /// `slots[i]`), moved back after: pointer moves, no copy of any weight. A panic in `f` is
    /// caught (the adaptations still go back) and returned as an error; an unknown slot is an
    /// error.
    pub fn with_bank<T>(
        &mut self,
        model: &mut AnyModel<B, f32>,
        slots: &[u64],
        f: impl FnOnce(&mut AnyModel<B, f32>) -> T,
    ) -> Result<T, String> {
        if let Some(s) = slots.iter().find(|s| !self.slots.contains_key(s)) {
            return Err(format!("adapter slot {s} is gone"));
        }
        let bank = slots
            .iter()
            .filter_map(|s| self.slots.get_mut(s).map(|l| (l.info.name.clone(), std::mem::take(&mut l.adapt))))
            .collect();
        let own = std::mem::replace(&mut model.adapt_mut().bank, bank);
        let out = caught(|| f(model));
        let bank = std::mem::replace(&mut model.adapt_mut().bank, own);
        for (s, (_, a)) in slots.iter().zip(bank) {
            if let Some(l) = self.slots.get_mut(s) {
                l.adapt = a;
            }
        }
        out
    }
}

/// `f`'s value, or its panic's message as an error.
fn caught<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        format!("the model panicked on this request: {what}")
    })
}
