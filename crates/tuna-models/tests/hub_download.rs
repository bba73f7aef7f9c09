//! Downloads from a hub (`tuna_models::hub::download`) against a loopback HTTP server that serves
//! the tiny Llama fixture in the hub's URL layout: the API's file list, `resolve/<commit>/<file>`
//! with its ETag and size, LFS files redirected to a "CDN" (the same server as `localhost`), ranges. The server runs on a thread
//! bound to 127.0.0.1:0, answers one request per connection with 5 s socket timeouts, and stops when
//! its test drops it (or after 60 s whatever happens).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tuna_kernels::Cpu;
use tuna_models::hub::download::Hub;
use tuna_models::hub::{resolve_in, resolve_with};
use tuna_models::model::AnyModel;

const ORG: &str = "tiny-org";
const COMMIT: &str = "c0ffee0123456789abcdef0123456789abcdef01";

#[derive(Clone, Default)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many bytes of the body (Content-Length still says all): a broken download.
    cut: Option<usize>,
}

struct Server {
    url: String,
    stop: Arc<AtomicBool>,
    /// `METHOD path range=... auth=...` per request, in order.
    seen: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(routes: HashMap<String, Resp>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("http://127.0.0.1:{port}");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = answer(s, port, &routes, &seen2);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => break,
                }
            }
        });
        Server { url, stop, seen, thread: Some(thread) }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// One request on `s`, answered from `routes` (404 otherwise), then the connection closes. `CDN`
/// in a header stands for this server under another host name (`localhost`, where the hub is
/// `127.0.0.1`), as the hub's CDN is another host.
fn answer(s: TcpStream, port: u16, routes: &HashMap<String, Resp>, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (mut range, mut auth) = (String::new(), String::new());
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = v.trim().to_string(),
                "authorization" => auth = v.trim().to_string(),
                _ => {}
            }
        }
    }
    seen.lock().unwrap().push(format!("{method} {path} range={range} auth={auth}"));
    let mut resp = routes.get(&path).cloned().unwrap_or(Resp { status: 404, ..Resp::default() });
    let mut extra = String::new();
    if let Some(from) = range.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse().ok()) {
        let from: usize = from;
        if resp.status == 200 && method == "GET" && from < resp.body.len() {
            extra = format!("Content-Range: bytes {from}-{}/{}\r\n", resp.body.len() - 1, resp.body.len());
            resp.body.drain(..from);
            resp.cut = resp.cut.map(|c| c.saturating_sub(from));
            resp.status = 206;
        }
    }
    let mut w = s;
    let mut head =
        format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n", resp.status, resp.body.len());
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {}\r\n", v.replace("CDN", &format!("http://localhost:{port}"))));
    }
    head.push_str(&extra);
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    if method != "HEAD" {
        w.write_all(&resp.body[..resp.cut.unwrap_or(resp.body.len()).min(resp.body.len())])?;
    }
    w.flush()?;
    w.shutdown(std::net::Shutdown::Both)
}

fn sha256(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A 40-hex stand-in for a small file's git etag.
fn git_etag(i: usize) -> String {
    format!("{:040x}", 0xe7a9_0000 + i)
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

/// The repository `ORG/name` at `COMMIT` (also as `main`) holding `files`: `.safetensors` and
/// `.gguf` files are LFS files (the hub's answer is a redirect to the CDN's `/cdn/<sha256>` carrying
/// `X-Linked-Etag`/`X-Linked-Size`; `lfs_etag` overrides the announced etag), the others are
/// served directly with a git etag. Returns the routes and each file's etag.
fn repo(
    name: &str,
    files: &[(String, Vec<u8>)],
    lfs_etag: Option<&str>,
) -> (HashMap<String, Resp>, HashMap<String, String>) {
    let mut routes = HashMap::new();
    let mut etags = HashMap::new();
    let siblings: Vec<_> = files.iter().map(|(f, _)| serde_json::json!({ "rfilename": f })).collect();
    let info = serde_json::json!({ "id": format!("{ORG}/{name}"), "sha": COMMIT, "siblings": siblings });
    for rev in ["main", COMMIT] {
        let body = info.to_string().into_bytes();
        routes
            .insert(format!("/api/models/{ORG}/{name}/revision/{rev}"), Resp { status: 200, body, ..Resp::default() });
    }
    for (i, (f, bytes)) in files.iter().enumerate() {
        let path = format!("/{ORG}/{name}/resolve/{COMMIT}/{f}");
        let commit = ("X-Repo-Commit".to_string(), COMMIT.to_string());
        if f.ends_with(".safetensors") || f.ends_with(".gguf") {
            let sha = sha256(bytes);
            let etag = lfs_etag.map_or(sha.clone(), str::to_string);
            let headers = vec![
                ("Location".into(), format!("CDN/cdn/{sha}")),
                ("X-Linked-Etag".into(), format!("\"{etag}\"")),
                ("X-Linked-Size".into(), bytes.len().to_string()),
                commit,
            ];
            routes.insert(path, Resp { status: 302, headers, ..Resp::default() });
            let cdn = vec![("ETag".to_string(), "\"cdn-etag\"".to_string())];
            routes.insert(format!("/cdn/{sha}"), Resp { status: 200, headers: cdn, body: bytes.clone(), cut: None });
            etags.insert(f.clone(), etag);
        } else {
            let headers = vec![("ETag".into(), format!("\"{}\"", git_etag(i))), commit];
            routes.insert(path, Resp { status: 200, headers, body: bytes.clone(), cut: None });
            etags.insert(f.clone(), git_etag(i));
        }
    }
    (routes, etags)
}

/// The tiny Llama fixture's files (among them some tuna does not load: golden.safetensors,
/// meta.json, tokens.json) plus a `pytorch_model.bin` it does not load either.
fn llama_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())
        })
        .collect();
    files.push(("pytorch_model.bin".into(), b"not for tuna".to_vec()));
    files.sort();
    files
}

fn hub(url: &str) -> Hub {
    Hub { endpoint: url.to_string(), token: Some("t0k".into()), timeout: Duration::from_secs(5) }
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tuna-hubdl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn names(dir: &Path) -> Vec<String> {
    let mut n: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    n.sort();
    n
}

fn fixture_bytes(f: &str) -> Vec<u8> {
    std::fs::read(fixture().join(f)).unwrap()
}

#[test]
fn a_download_lays_out_what_tuna_loads_in_the_cache_and_then_loads_offline() {
    let (routes, etags) = repo("tiny-llama", &llama_files(), None);
    let srv = Server::start(routes);
    let cache = tmp("layout");
    let snap = hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None).unwrap();
    let repo_dir = cache.join("models--tiny-org--tiny-llama");
    assert_eq!(snap, repo_dir.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    // Only what tuna loads; each a relative link to its complete blob.
    let want = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"];
    assert_eq!(names(&snap), want);
    for f in want {
        assert_eq!(std::fs::read_link(snap.join(f)).unwrap(), Path::new("../../blobs").join(&etags[f]), "{f}");
        assert_eq!(std::fs::read(snap.join(f)).unwrap(), fixture_bytes(f), "{f}");
    }
    assert_eq!(etags["model.safetensors"], sha256(&fixture_bytes("model.safetensors")));
    assert!(names(&repo_dir.join("blobs")).iter().all(|b| !b.ends_with(".incomplete")));
    // The token goes to the hub, not to the CDN (another host) it redirects to.
    let seen = srv.seen();
    assert!(
        seen.iter()
            .any(|s| s.starts_with("GET /api/models/tiny-org/tiny-llama/revision/main ")
                && s.ends_with("auth=Bearer t0k"))
    );
    let cdn: Vec<_> = seen.iter().filter(|s| s.starts_with("GET /cdn/")).collect();
    assert_eq!(cdn.len(), 1, "{seen:?}");
    assert!(cdn[0].ends_with("auth="), "{}", cdn[0]);
    // Again: nothing is fetched a second time.
    let before = srv.seen().len();
    hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None).unwrap();
    let again = &srv.seen()[before..];
    assert!(again.iter().all(|s| !s.starts_with("GET /tiny-org/") && !s.starts_with("GET /cdn/")), "{again:?}");
    drop(srv);
    // Offline (no hub), by id and by commit: the same snapshot, which loads as the fixture does.
    assert_eq!(resolve_with("tiny-org/tiny-llama", &cache, None).unwrap(), snap);
    assert_eq!(resolve_in(&cache, ORG, "tiny-llama", COMMIT, None).unwrap(), snap);
    let dev = Arc::new(Cpu);
    let by_id = AnyModel::<Cpu, f32>::open(&dev, &snap, |_| false).unwrap();
    let by_path = AnyModel::<Cpu, f32>::open(&dev, &fixture(), |_| false).unwrap();
    assert_eq!(by_id.base_param_count(), by_path.base_param_count());
    assert_eq!(by_id.encode("The cat sat").unwrap(), by_path.encode("The cat sat").unwrap());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_broken_download_leaves_no_snapshot_entry_and_the_next_one_resumes() {
    let files = llama_files();
    let (mut routes, etags) = repo("tiny-llama", &files, None);
    let sha = etags["model.safetensors"].clone();
    let len = fixture_bytes("model.safetensors").len();
    routes.get_mut(&format!("/cdn/{sha}")).unwrap().cut = Some(len / 2);
    let srv = Server::start(routes);
    let cache = tmp("broken");
    let e = hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None).unwrap_err();
    assert!(
        e.contains("model.safetensors") && e.contains("broke off") && e.contains(&format!("of {len} bytes")),
        "{e}"
    );
    drop(srv);
    let repo_dir = cache.join("models--tiny-org--tiny-llama");
    let snap = repo_dir.join("snapshots").join(COMMIT);
    assert!(std::fs::symlink_metadata(snap.join("model.safetensors")).is_err());
    assert!(!repo_dir.join("refs/main").exists());
    assert!(!repo_dir.join("blobs").join(&sha).exists());
    let part = repo_dir.join("blobs").join(format!("{sha}.incomplete"));
    assert_eq!(std::fs::metadata(&part).unwrap().len() as usize, len / 2);
    let e = resolve_with("tiny-org/tiny-llama", &cache, None).unwrap_err().to_string();
    assert!(e.contains("refs/main does not exist"), "{e}");
    // The next try asks for the rest only.
    let srv = Server::start(repo("tiny-llama", &files, None).0);
    let snap2 = hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None).unwrap();
    assert_eq!(snap2, snap);
    let seen = srv.seen();
    assert!(seen.iter().any(|s| s.starts_with(&format!("GET /cdn/{sha} range=bytes={}-", len / 2))), "{seen:?}");
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), fixture_bytes("model.safetensors"));
    assert!(!part.exists());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_blob_whose_sha256_is_not_its_etag_is_refused() {
    let wrong = sha256(b"some other file");
    let srv = Server::start(repo("tiny-llama", &llama_files(), Some(&wrong)).0);
    let cache = tmp("sha");
    let e = hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None).unwrap_err();
    let real = sha256(&fixture_bytes("model.safetensors"));
    assert!(e.contains("sha256 mismatch") && e.contains(&wrong) && e.contains(&real), "{e}");
    let repo_dir = cache.join("models--tiny-org--tiny-llama");
    let blobs = names(&repo_dir.join("blobs"));
    assert!(blobs.iter().all(|b| !b.starts_with(&wrong)), "{blobs:?}");
    assert!(std::fs::symlink_metadata(repo_dir.join("snapshots").join(COMMIT).join("model.safetensors")).is_err());
    assert!(!repo_dir.join("refs/main").exists());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn an_unreachable_hub_is_an_error_naming_the_cache_folder_and_the_endpoint() {
    // A port nothing listens on any more.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cache = tmp("unreachable");
    let e = resolve_with("tiny-org/tiny-llama", &cache, Some(&hub(&endpoint))).unwrap_err().to_string();
    let looked = cache.join("models--tiny-org--tiny-llama");
    assert!(e.contains(&format!("{} does not exist", looked.display())), "{e}");
    assert!(e.contains(&format!("the hub at {endpoint} could not be reached")), "{e}");
    // Offline: the same folder, and why nothing was downloaded.
    let e = resolve_with("tiny-org/tiny-llama", &cache, None).unwrap_err().to_string();
    assert!(e.contains(&format!("{} does not exist", looked.display())) && e.contains("HF_HUB_OFFLINE"), "{e}");
    assert!(!looked.exists());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_gguf_repository_gives_its_one_file_or_the_one_picked() {
    let files: Vec<(String, Vec<u8>)> = vec![
        ("README.md".into(), b"# tiny".to_vec()),
        ("m.Q4_1.gguf".into(), b"GGUF q4_1 bytes".to_vec()),
        ("m.Q8_0.gguf".into(), b"GGUF q8_0 bytes, longer".to_vec()),
    ];
    let srv = Server::start(repo("tiny-gguf", &files, None).0);
    let cache = tmp("gguf");
    let h = hub(&srv.url);
    let e = h.download(&cache, ORG, "tiny-gguf", "main", None).unwrap_err();
    assert!(e.contains("several .gguf files (m.Q4_1.gguf, m.Q8_0.gguf)") && e.contains("`org/name:Q4_1`"), "{e}");
    let e = h.download(&cache, ORG, "tiny-gguf", "main", Some("Q5_K")).unwrap_err();
    assert!(e.contains("no .gguf file ends with `Q5_K.gguf`"), "{e}");
    let path = resolve_with("tiny-org/tiny-gguf:q8_0", &cache, Some(&h)).unwrap();
    let snap = cache.join("models--tiny-org--tiny-gguf/snapshots").join(COMMIT);
    assert_eq!(path, snap.join("m.Q8_0.gguf"));
    assert_eq!(names(&snap), ["m.Q8_0.gguf"]);
    assert_eq!(std::fs::read(&path).unwrap(), files[2].1);
    drop(srv);
    assert_eq!(resolve_with("tiny-org/tiny-gguf", &cache, None).unwrap(), path);
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn a_sharded_checkpoint_brings_its_index_and_shards() {
    // The fixture's weights as one shard under an index naming each of its tensors.
    let weights = fixture_bytes("model.safetensors");
    let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    let shard = "model-00001-of-00001.safetensors";
    let map: serde_json::Map<String, serde_json::Value> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .map(|k| (k.clone(), shard.into()))
        .collect();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map }).to_string().into_bytes();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("config.json".into(), fixture_bytes("config.json")),
        ("model.safetensors.index.json".into(), index),
        (shard.into(), weights),
        ("tokenizer.json".into(), fixture_bytes("tokenizer.json")),
    ];
    let srv = Server::start(repo("tiny-sharded", &files, None).0);
    let cache = tmp("sharded");
    let snap = hub(&srv.url).download(&cache, ORG, "tiny-sharded", "main", None).unwrap();
    drop(srv);
    assert_eq!(
        names(&snap),
        ["config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    );
    let dev = Arc::new(Cpu);
    let m = AnyModel::<Cpu, f32>::open(&dev, &snap, |_| false).unwrap();
    let by_path = AnyModel::<Cpu, f32>::open(&dev, &fixture(), |_| false).unwrap();
    assert_eq!(m.base_param_count(), by_path.base_param_count());
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn two_downloads_of_one_model_at_once_fetch_each_blob_once() {
    let (routes, etags) = repo("tiny-llama", &llama_files(), None);
    let srv = Server::start(routes);
    let cache = tmp("concurrent");
    let snaps: Vec<PathBuf> = std::thread::scope(|s| {
        let runs: Vec<_> =
            (0..2).map(|_| s.spawn(|| hub(&srv.url).download(&cache, ORG, "tiny-llama", "main", None))).collect();
        runs.into_iter().map(|r| r.join().unwrap().unwrap()).collect()
    });
    assert_eq!(snaps[0], snaps[1]);
    let seen = srv.seen();
    for f in ["config.json", "model.safetensors"] {
        let path = if f == "config.json" {
            format!("GET /{ORG}/tiny-llama/resolve/{COMMIT}/{f} ")
        } else {
            format!("GET /cdn/{} ", etags[f])
        };
        assert_eq!(seen.iter().filter(|s| s.starts_with(&path)).count(), 1, "{f}: {seen:?}");
        assert_eq!(std::fs::read(snaps[0].join(f)).unwrap(), fixture_bytes(f));
    }
    std::fs::remove_dir_all(&cache).unwrap();
}
