//! The test side of `tuna serve` for `tests/cli_serve.rs`: starting the server on a free port and
//! reading its address, a minimal HTTP/1.1 client on a raw `TcpStream` (`Connection: close`,
//! chunked bodies joined), OpenAI-shaped errors and server-sent events read back, `/metrics`
//! values, the server's RSS, and SIGTERM.

use crate::common::fixture;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `tuna serve` and its address.
pub struct Server {
    pub child: Child,
    pub addr: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Server {
    pub fn start(dir: Option<&Path>, extra: &[&str]) -> Server {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tuna"));
        c.args(["serve", "--model", &fixture("llama"), "--port", "0"]);
        if let Some(d) = dir {
            c.args(["--adapters", &d.display().to_string()]);
        }
        let mut child = c.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start tuna serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let addr = line.trim().strip_prefix("listening on http://").unwrap_or_else(|| panic!("first line: {line:?}"));
        Server { child, addr: addr.to_string(), stderr: Some(stderr) }
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Resp {
        request(&self.addr, method, path, body)
    }

    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.req("POST", path, Some(&body.to_string()))
    }

    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    pub fn metric(&self, name: &str) -> f64 {
        let m = self.req("GET", "/metrics", None);
        assert_eq!(m.status, 200);
        let line =
            m.body.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}: {}", m.body));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// SIGTERM, then the exit status and stderr.
    pub fn terminate(mut self) -> (i32, String) {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, self.stderr.take().unwrap().join().unwrap())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Resp {
    pub status: u16,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, self.body))
    }

    /// The error's code, checking the OpenAI shape.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()) && e.get("type").is_some(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e["code"].as_str().unwrap_or_default().to_string()
    }

    /// A stream's events (`data:` payloads), `[DONE]` included.
    pub fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(String::from).collect()
    }
}

pub fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end: {text:?}"));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    Resp { status, body: if chunked { dechunk(rest) } else { rest.to_string() } }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}
