//! Downloads from a Hugging Face hub into the local hub cache, in the layout `transformers` and
//! `huggingface-cli` use, so that each reads what the other wrote.
//!
//! The hub: `GET {endpoint}/api/models/{org}/{name}/revision/{rev}` names the commit (`sha`) and the
//! repository's files (`siblings`); each file is at `{endpoint}/{org}/{name}/resolve/{commit}/{file}`,
//! whose answer (before any redirect to a CDN) carries the file's `ETag` (`X-Linked-Etag` for LFS
//! files, then a sha256) and size (`X-Linked-Size`, else `Content-Length`).
//!
//! Only what tuna loads is fetched (see [`wanted`]). Each file goes to `blobs/<etag>.incomplete`
//! under a lock (`{cache}/.locks/models--{org}--{name}/{etag}.lock`, where `huggingface_hub` locks
//! too), resumes from what an earlier, broken download left (an HTTP range), is checked (its size;
//! its sha256 when the etag is one), synced and renamed to `blobs/<etag>`; only then does
//! `snapshots/<commit>/<file>` link to it, and only once every file is there is `refs/<rev>` written.
//! A broken or refused download therefore leaves no snapshot entry for the file and no ref, and a
//! second download of the same model at the same time waits for the first's lock, then finds the
//! blob there.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where and how to download: the hub's endpoint and a token. [`Hub::from_env`] reads them from
/// the environment; tests build one directly.
#[derive(Clone, Debug)]
pub struct Hub {
    /// `https://huggingface.co`, or a mirror (no trailing `/`).
    pub endpoint: String,
    /// Sent as `Authorization: Bearer` to the endpoint (never to a CDN it redirects to).
    pub token: Option<String>,
    /// How long to wait to connect, for an answer's headers, and for each read of a body.
    pub timeout: Duration,
}

/// The hub's public endpoint, where `$HF_ENDPOINT` is unset.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

impl Hub {
    /// `$HF_ENDPOINT` (default [`DEFAULT_ENDPOINT`]); the token `$HF_TOKEN`, else the file
    /// `$HF_TOKEN_PATH`, else `$HF_HOME/token` (where `huggingface-cli login` keeps it); 30 s timeouts.
    pub fn from_env() -> Hub {
        let var = |k: &str| std::env::var(k).ok().map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let token_file = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| {
            var("HF_HOME")
                .map(PathBuf::from)
                .or_else(|| var("XDG_CACHE_HOME").map(|c| Path::new(&c).join("huggingface")))
                .or_else(|| var("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))
                .map(|h| h.join("token"))
        });
        let token = var("HF_TOKEN").or_else(|| {
            let t = std::fs::read_to_string(token_file?).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        });
        Hub {
            endpoint: var("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token,
            timeout: Duration::from_secs(30),
        }
    }

    /// Download what tuna loads of `org/name` at `rev` (a branch, tag or commit) into the hub cache
    /// folder `cache` and return the snapshot folder. `pick` chooses among several `.gguf` files
    /// (see [`wanted`]). `Err` says what failed, naming the URL.
    pub fn download(
        &self,
        cache: &Path,
        org: &str,
        name: &str,
        rev: &str,
        pick: Option<&str>,
    ) -> Result<PathBuf, String> {
        if rev.starts_with('.') {
            return Err(format!("{org}/{name}: `{rev}` is not a revision"));
        }
        let agent = self.agent();
        let api = format!("{}/api/models/{org}/{name}/revision/{}", self.endpoint, encode(rev));
        let info: serde_json::Value = {
            let mut resp = self.send(agent.get(&api), &api)?;
            let text = resp.body_mut().read_to_string().map_err(|e| format!("{api}: {e}"))?;
            serde_json::from_str(&text).map_err(|e| format!("{api}: not the hub's JSON ({e})"))?
        };
        let commit = info["sha"].as_str().filter(|s| safe_name(s)).ok_or_else(|| format!("{api}: no commit `sha`"))?;
        let siblings: Vec<String> = info["siblings"]
            .as_array()
            .ok_or_else(|| format!("{api}: no `siblings` list"))?
            .iter()
            .filter_map(|s| s["rfilename"].as_str().map(String::from))
            .collect();
        let files = wanted(&siblings, pick).map_err(|e| format!("{org}/{name}@{rev}: {e}"))?;
        let repo = cache.join(format!("models--{org}--{name}"));
        let snap = repo.join("snapshots").join(commit);
        let get = |file: &str| self.fetch(&agent, cache, org, name, commit, file);
        // config.json last: a snapshot folder with it is taken as complete (`resolve_in`), so a
        // download that breaks off before the end leaves one without it, which the next run resumes.
        for f in files.iter().filter(|f| *f != "config.json") {
            get(f)?;
        }
        // A sharded checkpoint: its index names the shards.
        if files.iter().any(|f| f == INDEX) {
            let text = std::fs::read_to_string(snap.join(INDEX)).map_err(|e| format!("{INDEX}: {e}"))?;
            let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{INDEX}: {e}"))?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .ok_or_else(|| format!("{INDEX}: no `weight_map`"))?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort();
            shards.dedup();
            for s in shards {
                if !siblings.iter().any(|x| x == s) {
                    return Err(format!("{INDEX} names {s}, which {org}/{name} does not have"));
                }
                get(s)?;
            }
        }
        if files.iter().any(|f| f == "config.json") {
            get("config.json")?;
        }
        if rev != commit {
            let refs = repo.join("refs");
            let path = refs.join(rev);
            std::fs::create_dir_all(&refs).map_err(|e| io_err(&refs, e))?;
            let tmp = refs.join(format!(".{rev}.{}.tmp", unique()));
            std::fs::write(&tmp, commit).and_then(|()| std::fs::rename(&tmp, &path)).map_err(|e| io_err(&path, e))?;
        }
        Ok(snap)
    }

    fn agent(&self) -> ureq::Agent {
        let loopback = self.endpoint.starts_with("http://127.")
            || self.endpoint.starts_with("http://localhost")
            || self.endpoint.starts_with("http://[::1]");
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // The token follows a redirect on the hub's own https host (a renamed repository), not
            // one to a CDN.
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
            .timeout_connect(Some(self.timeout))
            .timeout_recv_response(Some(self.timeout))
            .timeout_per_read(Some(self.timeout))
            .user_agent(concat!("tuna/", env!("CARGO_PKG_VERSION")));
        if loopback {
            // A local mirror (and the tests) is not reached through a proxy the environment names.
            config = config.proxy(None);
        }
        config.build().into()
    }

    /// `req` with the token when `url` is on the hub's own origin (never to another host, such as
    /// a CDN a redirect names), sent; an error status is an `Err` naming `url`.
    fn send(
        &self,
        req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
        url: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, String> {
        let req = match &self.token {
            Some(t) if origin(url) == origin(&self.endpoint) => req.header("Authorization", format!("Bearer {t}")),
            _ => req,
        };
        let resp = req.call().map_err(|e| match e {
            ureq::Error::Io(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound
            | ureq::Error::Timeout(_) => {
                format!("the hub at {} could not be reached ({url}: {e})", self.endpoint)
            }
            e => format!("{url}: {e}"),
        })?;
        let status = resp.status().as_u16();
        match status {
            200..=399 => Ok(resp),
            401 | 403 => Err(format!(
                "{url}: HTTP {status} (a gated or private model needs a token: HF_TOKEN or `huggingface-cli login`)"
            )),
            404 => Err(format!("{url}: HTTP 404 (no such model, revision or file)")),
            _ => Err(format!("{url}: HTTP {status}")),
        }
    }

    /// One file of the snapshot `commit`: its blob (downloaded unless there) and its link.
    fn fetch(
        &self,
        agent: &ureq::Agent,
        cache: &Path,
        org: &str,
        name: &str,
        commit: &str,
        file: &str,
    ) -> Result<(), String> {
        if file.split('/').any(|c| c.is_empty() || c == "." || c == "..") || file.starts_with('/') {
            return Err(format!("{org}/{name}: refusing the file name {file:?}"));
        }
        let url = format!("{}/{org}/{name}/resolve/{commit}/{}", self.endpoint, encode_path(file));
        let repo = &cache.join(format!("models--{org}--{name}"));
        let meta = self.head(agent, &url)?;
        let blobs = repo.join("blobs");
        let blob = blobs.join(&meta.etag);
        if std::fs::metadata(&blob).ok().map(|m| m.len()) != Some(meta.size) {
            let locks = cache.join(".locks").join(format!("models--{org}--{name}"));
            std::fs::create_dir_all(&locks).map_err(|e| io_err(&locks, e))?;
            std::fs::create_dir_all(&blobs).map_err(|e| io_err(&blobs, e))?;
            let lock_path = locks.join(format!("{}.lock", meta.etag));
            let lock = std::fs::File::create(&lock_path).map_err(|e| io_err(&lock_path, e))?;
            lock.lock().map_err(|e| io_err(&lock_path, e))?;
            // Another process may have finished it while this one waited.
            if std::fs::metadata(&blob).ok().map(|m| m.len()) != Some(meta.size) {
                self.download_blob(agent, &url, &blob, &meta)?;
            }
            drop(lock);
        }
        // The link, replaced atomically: `../../blobs/<etag>` from a top-level file, one `../` more
        // per folder.
        let link = repo.join("snapshots").join(commit).join(file);
        let dir = link.parent().unwrap_or(repo);
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let target = Path::new(&"../".repeat(file.matches('/').count() + 2)).join("blobs").join(&meta.etag);
        let tmp = dir.join(format!(".{}.{}.link", meta.etag, unique()));
        let _ = std::fs::remove_file(&tmp);
        symlink(&target, &tmp).and_then(|()| std::fs::rename(&tmp, &link)).map_err(|e| io_err(&link, e))
    }

    /// The file's etag and size, from the hub's own answer (an LFS file's redirect to its CDN
    /// carries them; a redirect without them, a renamed repository, is followed).
    fn head(&self, agent: &ureq::Agent, url: &str) -> Result<Meta, String> {
        let mut at = url.to_string();
        for _ in 0..5 {
            let req = agent.head(&at).header("Accept-Encoding", "identity").config().max_redirects(0).build();
            let resp = self.send(req, &at)?;
            let h = |k: &str| resp.headers().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
            let etag = h("x-linked-etag").or_else(|| h("etag"));
            if resp.status().is_redirection() && etag.is_none() {
                let loc = h("location").ok_or_else(|| format!("{at}: a redirect without a Location"))?;
                at = if loc.starts_with('/') { format!("{}{loc}", origin(&at)) } else { loc };
                continue;
            }
            let etag = etag.ok_or_else(|| format!("{at}: the answer has no ETag"))?;
            let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
            if !safe_name(&etag) {
                return Err(format!("{at}: an ETag that is not a file name ({etag:?})"));
            }
            let size = h("x-linked-size")
                .or_else(|| h("content-length"))
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| format!("{at}: the answer gives no size"))?;
            return Ok(Meta { etag, size });
        }
        Err(format!("{url}: too many redirects"))
    }

    /// `blob` fetched from `url` through `<blob>.incomplete`, resumed from what that holds.
    fn download_blob(&self, agent: &ureq::Agent, url: &str, blob: &Path, meta: &Meta) -> Result<(), String> {
        let part = blob.with_file_name(format!("{}.incomplete", meta.etag));
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&part)
            .map_err(|e| io_err(&part, e))?;
        let mut have = out.metadata().map_err(|e| io_err(&part, e))?.len();
        if have > meta.size {
            have = 0;
        }
        if have < meta.size {
            let mut req = agent.get(url).header("Accept-Encoding", "identity");
            if have > 0 {
                req = req.header("Range", format!("bytes={have}-"));
            }
            let mut resp = self.send(req, url)?;
            if resp.status().as_u16() != 206 {
                have = 0; // The whole file came back: start over.
            } else {
                let range = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
                if !range.starts_with(&format!("bytes {have}-")) {
                    let _ = out.set_len(0);
                    return Err(format!(
                        "{url}: asked for the bytes from {have}, the answer holds {range:?}; {} emptied for the next try",
                        part.display()
                    ));
                }
            }
            out.set_len(have).and_then(|()| out.seek(SeekFrom::Start(have))).map_err(|e| io_err(&part, e))?;
            // More than the hub announced is an error too (the limit), not a longer file.
            let mut body = resp.body_mut().with_config().limit(meta.size - have).reader();
            let copied = std::io::copy(&mut body, &mut out);
            out.flush().map_err(|e| io_err(&part, e))?;
            let got = out.stream_position().map_err(|e| io_err(&part, e))?;
            if let Err(e) = copied {
                return Err(format!(
                    "{url}: the download broke off after {got} of {} bytes ({e}); {} keeps them and the next try resumes",
                    meta.size,
                    part.display()
                ));
            }
        }
        out.sync_all().map_err(|e| io_err(&part, e))?;
        let len = out.metadata().map_err(|e| io_err(&part, e))?.len();
        if len != meta.size {
            return Err(format!(
                "{url}: received {len} bytes, the hub announced {}; {} keeps them and the next try resumes",
                meta.size,
                part.display()
            ));
        }
        if meta.etag.len() == 64 && meta.etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            out.seek(SeekFrom::Start(0)).map_err(|e| io_err(&part, e))?;
            let got = sha256_hex(&mut out).map_err(|e| io_err(&part, e))?;
            if !got.eq_ignore_ascii_case(&meta.etag) {
                let _ = std::fs::remove_file(&part);
                return Err(format!(
                    "{url}: sha256 mismatch, the hub announced {} and the {} bytes received hash to {got}; discarded",
                    meta.etag, meta.size
                ));
            }
        }
        drop(out);
        std::fs::rename(&part, blob).map_err(|e| io_err(blob, e))?;
        if let Some(dir) = blob.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
        }
        Ok(())
    }
}

struct Meta {
    etag: String,
    size: u64,
}

const INDEX: &str = "model.safetensors.index.json";

/// The files of a repository (`siblings`, its file names) that tuna loads: for a Hugging Face
/// model (it has `config.json`), `config.json`, the tokenizer and generation files it has
/// (`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json`)
/// and `model.safetensors`, else the sharded index (its shards come after it); for a GGUF
/// repository, its one top-level `.gguf` file, or among several the one whose name ends with
/// `{pick}.gguf` (case aside: `pick` `Q4_1` takes `model.Q4_1.gguf`).
pub fn wanted(siblings: &[String], pick: Option<&str>) -> Result<Vec<String>, String> {
    let has = |f: &str| siblings.iter().any(|s| s == f);
    if has("config.json") && pick.is_none() {
        let mut files: Vec<String> = ["config.json", "tokenizer.json", "tokenizer_config.json"]
            .into_iter()
            .chain(["special_tokens_map.json", "generation_config.json"])
            .filter(|f| has(f))
            .map(String::from)
            .collect();
        if has("model.safetensors") {
            files.push("model.safetensors".into());
        } else if has(INDEX) {
            files.push(INDEX.into());
        } else {
            return Err("has config.json but neither model.safetensors nor model.safetensors.index.json \
                        (tuna reads safetensors)"
                .into());
        }
        return Ok(files);
    }
    let ggufs: Vec<&String> = siblings.iter().filter(|s| s.ends_with(".gguf") && !s.contains('/')).collect();
    let chosen: Vec<&String> = match pick {
        None => ggufs.clone(),
        Some(p) => {
            let suffix = format!("{}.gguf", p.trim_end_matches(".gguf")).to_ascii_lowercase();
            ggufs.iter().copied().filter(|g| g.to_ascii_lowercase().ends_with(&suffix)).collect()
        }
    };
    let list = || ggufs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    match (chosen.len(), pick) {
        (1, _) => Ok(vec![chosen[0].clone()]),
        (0, None) => Err("has neither config.json nor a .gguf file".into()),
        (0, Some(p)) => Err(format!("no .gguf file ends with `{p}.gguf` (it has: {})", list())),
        (_, None) => {
            Err(format!("has several .gguf files ({}): pick one by the end of its name, as in `org/name:Q4_1`", list()))
        }
        (_, Some(p)) => Err(format!("several .gguf files end with `{p}.gguf` ({})", list())),
    }
}

/// `HF_HUB_OFFLINE` says never to download (`1`, `true`, `yes`, `on`, as `huggingface_hub` reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The lowercase hex sha256 of what `r` reads.
fn sha256_hex(r: &mut impl Read) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A name that is one plain path component (an etag, a commit).
fn safe_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `s` percent-encoded as one URL path segment.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A file path percent-encoded segment by segment.
fn encode_path(p: &str) -> String {
    p.split('/').map(encode).collect::<Vec<_>>().join("/")
}

/// `scheme://host[:port]` of `url`.
fn origin(url: &str) -> &str {
    let rest = url.find("://").map_or(0, |i| i + 3);
    url[rest..].find('/').map_or(url, |i| &url[..rest + i])
}

/// A name part no other writer in this or another process uses at the same time.
fn unique() -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

fn io_err(path: &Path, e: std::io::Error) -> String {
    format!("{}: {e}", path.display())
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, link)
}
