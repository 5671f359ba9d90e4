//! Load generator for the OpenAI-compatible API: concurrent streaming chat clients on one
//! server, reporting throughput and TTFT / inter-token latency percentiles as JSON.
//!
//! ```sh
//! cargo run --release -p deepseek-engine -- serve --port 8000 &
//! cargo run --release -p deepseek-engine --example loadgen -- \
//!     --url http://127.0.0.1:8000 --clients 8 --requests 64 --max-tokens 64
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

struct Args {
    url: String,
    clients: usize,
    requests: usize,
    max_tokens: usize,
    prompt_words: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        url: "http://127.0.0.1:8000".into(),
        clients: 8,
        requests: 64,
        max_tokens: 64,
        prompt_words: 32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = val()?,
            "--clients" => a.clients = val()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--requests" => a.requests = val()?.parse().map_err(|e| format!("--requests: {e}"))?,
            "--max-tokens" => {
                a.max_tokens = val()?.parse().map_err(|e| format!("--max-tokens: {e}"))?
            }
            "--prompt-words" => {
                a.prompt_words = val()?.parse().map_err(|e| format!("--prompt-words: {e}"))?
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Sample {
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    tokens: usize,
    ok: bool,
}

async fn one(client: &reqwest::Client, a: &Args, i: usize) -> Sample {
    let prompt: String = (0..a.prompt_words)
        .map(|w| format!("word{} ", (w * 7 + i) % 97))
        .collect();
    let body = json!({
        "model": null, "messages": [{ "role": "user", "content": prompt }],
        "max_tokens": a.max_tokens, "stream": true, "stream_options": { "include_usage": true },
        "ignore_eos": true, "temperature": 0.8, "seed": i,
    });
    let mut s = Sample::default();
    let started = Instant::now();
    let Ok(resp) = client
        .post(format!("{}/v1/chat/completions", a.url))
        .json(&body)
        .send()
        .await
    else {
        return s;
    };
    if !resp.status().is_success() {
        return s;
    }
    let mut last = started;
    let mut buf = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(bytes)) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                s.ok = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                s.tokens = n as usize;
            }
            let delta = &v["choices"][0]["delta"];
            if delta["content"].as_str().is_some_and(|c| !c.is_empty())
                || delta["reasoning_content"].is_string()
            {
                let now = Instant::now();
                match s.ttft {
                    None => s.ttft = Some(now - started),
                    Some(_) => s.gaps.push(now - last),
                }
                last = now;
            }
        }
    }
    s
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()
        .expect("HTTP client");
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = std::sync::Arc::new(a);
    let workers: Vec<_> = (0..a.clients)
        .map(|_| {
            let (client, a, next) = (client.clone(), a.clone(), next.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= a.requests {
                        break;
                    }
                    out.push(one(&client, &a, i).await);
                }
                out
            })
        })
        .collect();
    let mut samples = Vec::new();
    for w in workers {
        samples.extend(w.await.unwrap_or_default());
    }
    let wall = started.elapsed().as_secs_f64();
    let ok = samples.iter().filter(|s| s.ok).count();
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = samples
        .iter()
        .filter_map(|s| s.ttft)
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    let mut itl: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.gaps.iter())
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    println!(
        "{}",
        json!({
            "clients": a.clients, "requests": a.requests, "succeeded": ok, "wall_s": wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens as f64 / wall, "requests_per_s": ok as f64 / wall,
            "ttft_ms": { "p50": pct(&mut ttft, 0.5), "p90": pct(&mut ttft, 0.9), "p99": pct(&mut ttft, 0.99) },
            "itl_ms": { "p50": pct(&mut itl, 0.5), "p90": pct(&mut itl, 0.9), "p99": pct(&mut itl, 0.99) },
        })
    );
}
