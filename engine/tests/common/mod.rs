//! Engine processes for tests: spawn `deepseek-engine`, wait on its log lines, its HTTP
//! answers and its exit, and signal it. Every wait has a generous bound that only turns a hang
//! into a failure with the process's log attached.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any wait may take before the test fails.
pub const BOUND: Duration = Duration::from_secs(120);

/// The engine binary, outside any group, logging at info.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepseek-engine"));
    c.env("RUST_LOG", "info")
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("LEADER_ADDR")
        .env_remove("LOCAL_WORLD_SIZE")
        .env_remove("LOG_FORMAT")
        .env_remove("NO_COLOR");
    c
}

/// `serve` on a free loopback port with JSON logs, the random-weight `builtin` model on the
/// CPU, and a KV cache small enough for many test processes at once.
pub fn serve() -> Command {
    serve_model("builtin")
}

/// [`serve`] with another `--model`.
pub fn serve_model(model: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = bin();
    c.args([
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--backend",
        "cpu",
        "--model",
    ])
    .arg(model)
    .args(["--log-format", "json", "--kv-cache-memory-gb", "0.1"]);
    c
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

/// A running engine process; dropping it resumes (if stopped) and kills it.
pub struct Engine {
    pub child: Child,
    log: Arc<(Mutex<Log>, Condvar)>,
    addr: Option<String>,
}

impl Engine {
    pub fn spawn(mut cmd: Command) -> Engine {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log: Arc<(Mutex<Log>, Condvar)> = Arc::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().lines.push(line);
                sink.1.notify_all();
            }
            sink.0.lock().unwrap().closed = true;
            sink.1.notify_all();
        });
        Engine {
            child,
            log,
            addr: None,
        }
    }

    /// Everything the process has written to stderr so far.
    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().lines.join("\n")
    }

    pub fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().lines.clone()
    }

    /// Waits for a stderr line that satisfies `pred` and returns it.
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + BOUND;
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().unwrap();
        loop {
            if let Some(l) = log.lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(
                !log.closed && now < deadline,
                "no log line {what}; the log:\n{}",
                log.lines.join("\n")
            );
            log = cv.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Waits for a JSON log event whose message contains `message`.
    pub fn wait_event(&self, message: &str) -> Value {
        let line = self.wait_line(message, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(message))
            })
        });
        serde_json::from_str(&line).unwrap()
    }

    /// The HTTP address, from the JSON "HTTP listening" event.
    pub fn addr(&mut self) -> String {
        if self.addr.is_none() {
            let ev = self.wait_event("HTTP listening");
            self.addr = Some(ev["fields"]["addr"].as_str().unwrap().to_string());
        }
        self.addr.clone().unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.child.id());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader thread has the last lines once stderr closes.
                self.wait_closed();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit; the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_closed(&self) {
        let (lock, cv) = &*self.log;
        let mut log = lock.lock().unwrap();
        let deadline = Instant::now() + BOUND;
        while !log.closed && Instant::now() < deadline {
            log = cv.wait_timeout(log, Duration::from_millis(100)).unwrap().0;
        }
    }

    /// Polls `path` every 100 ms until it answers `status`.
    pub fn wait_status(&mut self, path: &str, status: u16) {
        let addr = self.addr();
        let deadline = Instant::now() + BOUND;
        loop {
            let got = http(&addr, "GET", path, None).ok().map(|r| r.status);
            if got == Some(status) {
                return;
            }
            if let Some(exit) = self.child.try_wait().unwrap() {
                panic!(
                    "the process exited ({exit}) while {path} answered {got:?}, not {status}; the log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{path} answered {got:?}, not {status}; the log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(self.child.id().to_string())
                .status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?} ({})", self.body, self.status))
    }
}

/// Writes an HTTP/1.0 request (the server closes the connection after the body, so a
/// streamed body needs no chunk decoding) and reads the status line and headers.
fn send(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(BOUND))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    Ok((status, r))
}

pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<Response> {
    let (status, mut r) = send(addr, method, path, body)?;
    let mut body = String::new();
    r.read_to_string(&mut body)?;
    Ok(Response { status, body })
}

/// A server-sent event stream: the payload of each `data:` line, until the connection closes.
pub struct Sse(BufReader<TcpStream>);

impl Iterator for Sse {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            match self.0.read_line(&mut line) {
                Ok(0) | Err(_) => return None,
                Ok(_) => {
                    if let Some(data) = line.trim_end().strip_prefix("data:") {
                        return Some(data.trim_start().to_string());
                    }
                }
            }
        }
    }
}

pub fn stream(addr: &str, path: &str, body: &Value) -> Sse {
    let (status, r) = send(addr, "POST", path, Some(body)).unwrap();
    assert_eq!(status, 200, "POST {path}");
    Sse(r)
}
