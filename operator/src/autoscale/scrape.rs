//! The autoscaler's I/O edge: reads each group leader's signals, either from its `/metrics`
//! (port 8000, Prometheus text format) or from a Prometheus server's query API. Every read has
//! a timeout; a group that does not answer, answers with an error, or lacks a metric gets
//! `None` for it, which the decision treats as "no data" (never a reason to scale down).
//!
//! The client is a bare HTTP/1.1 GET over hyper: leader pods are reached by pod IP inside the
//! cluster, and an in-cluster Prometheus by its Service, so no TLS is needed.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::{BoxFuture, join_all};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::promtext;
use crate::api::PrometheusSpec;

/// Engine metric names read by the autoscaler. The `vllm:` names are vLLM's, kept by the
/// engine so that existing dashboards and autoscalers work unchanged.
pub mod names {
    /// KV-cache blocks in use, 0..1: the mean over an expert-parallel group's ranks.
    pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
    /// KV-cache blocks in use in the fullest rank's partition, 0..1. A sequence's blocks stay in
    /// one rank's partition, so a full rank preempts while the mean reads lower; the autoscaler
    /// reads this where the engine exports it (it is never below the mean).
    pub const FULLEST_PARTITION_KV_CACHE_USAGE: &str =
        "deepseek_engine_kv_cache_fullest_partition_usage_perc";
    /// Requests waiting to be scheduled.
    pub const REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
    /// Requests being decoded.
    pub const REQUESTS_RUNNING: &str = "vllm:num_requests_running";
    /// Blocks in use plus blocks running requests still need, over all blocks.
    pub const PROJECTED_KV_CACHE_USAGE: &str = "deepseek_engine_kv_cache_projected_usage_perc";
    /// Model loading progress, 0..1.
    pub const LOAD_PROGRESS: &str = "deepseek_engine_model_load_progress";
}

/// One group leader to read.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Group index.
    pub group: i32,
    /// Leader pod name.
    pub pod: String,
    /// Leader pod IP; without one the pod cannot be read directly.
    pub ip: Option<String>,
}

/// What was read for one leader; `None` is no data.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Reading {
    /// `deepseek_engine_kv_cache_fullest_partition_usage_perc`, or `vllm:kv_cache_usage_perc`
    /// from an engine without it: the larger of the two.
    pub kv_cache_usage: Option<f64>,
    /// `deepseek_engine_kv_cache_projected_usage_perc`.
    pub projected_kv_cache_usage: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub requests_waiting: Option<f64>,
    /// `vllm:num_requests_running`.
    pub requests_running: Option<f64>,
    /// `deepseek_engine_model_load_progress`.
    pub load_progress: Option<f64>,
}

/// One round of reads for one deployment.
#[derive(Clone, Debug)]
pub struct Request {
    /// Namespace of the deployment.
    pub namespace: String,
    /// Name of the deployment.
    pub name: String,
    /// Read from this Prometheus server instead of the leaders.
    pub prometheus: Option<PrometheusSpec>,
    /// Time allowed for the whole round.
    pub timeout: Duration,
    /// Leaders to read.
    pub targets: Vec<Target>,
}

/// Reads leaders' signals. The controller holds one; tests put a scripted one in its place.
pub trait MetricsReader: Send + Sync {
    /// Readings by group index; a group missing from the map had no data at all.
    fn read<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, BTreeMap<i32, Reading>>;
}

/// The reader used in a cluster: HTTP to the leaders or to Prometheus.
#[derive(Clone, Debug, Default)]
pub struct HttpReader;

impl MetricsReader for HttpReader {
    fn read<'a>(&'a self, req: &'a Request) -> BoxFuture<'a, BTreeMap<i32, Reading>> {
        Box::pin(async move {
            match &req.prometheus {
                Some(p) => read_prometheus(p, req).await,
                None => read_leaders(req).await,
            }
        })
    }
}

/// A reading from an engine's `/metrics` text.
pub fn reading_from_text(text: &str) -> Reading {
    let s = promtext::parse(text);
    Reading {
        kv_cache_usage: [
            names::FULLEST_PARTITION_KV_CACHE_USAGE,
            names::KV_CACHE_USAGE,
        ]
        .into_iter()
        .filter_map(|name| promtext::max(&s, name))
        .reduce(f64::max),
        projected_kv_cache_usage: promtext::max(&s, names::PROJECTED_KV_CACHE_USAGE),
        requests_waiting: promtext::sum(&s, names::REQUESTS_WAITING),
        requests_running: promtext::sum(&s, names::REQUESTS_RUNNING),
        load_progress: promtext::max(&s, names::LOAD_PROGRESS),
    }
}

async fn read_leaders(req: &Request) -> BTreeMap<i32, Reading> {
    let reads = req.targets.iter().map(|t| async move {
        let ip = t.ip.as_deref()?;
        let authority = if ip.contains(':') {
            format!("[{ip}]:{}", crate::render::HTTP_PORT)
        } else {
            format!("{ip}:{}", crate::render::HTTP_PORT)
        };
        let got = tokio::time::timeout(req.timeout, http_get(&authority, "/metrics")).await;
        match got {
            Ok(Ok(text)) => Some((t.group, reading_from_text(&text))),
            Ok(Err(e)) => {
                tracing::debug!(pod = %t.pod, error = %e, "could not read /metrics");
                None
            }
            Err(_) => {
                tracing::debug!(pod = %t.pod, "reading /metrics timed out");
                None
            }
        }
    });
    join_all(reads).await.into_iter().flatten().collect()
}

/// The default per-leader queries; `$namespace` and `$name` are filled in later.
pub fn default_queries() -> [(&'static str, String); 4] {
    let sel = r#"{namespace="$namespace",pod=~"$name-g[0-9]+-0"}"#;
    [
        (
            "kv",
            format!(
                "max by (pod) ({}{sel} or {}{sel})",
                names::FULLEST_PARTITION_KV_CACHE_USAGE,
                names::KV_CACHE_USAGE
            ),
        ),
        (
            "projected",
            format!("max by (pod) ({}{sel})", names::PROJECTED_KV_CACHE_USAGE),
        ),
        (
            "waiting",
            format!("sum by (pod) ({}{sel})", names::REQUESTS_WAITING),
        ),
        (
            "running",
            format!("sum by (pod) ({}{sel})", names::REQUESTS_RUNNING),
        ),
    ]
}

/// The four queries for a deployment, overrides applied and placeholders filled in.
pub fn queries(p: &PrometheusSpec, namespace: &str, name: &str) -> [String; 4] {
    let [kv, projected, waiting, running] = default_queries().map(|(_, q)| q);
    let pick = |o: &Option<String>, d: String| o.clone().unwrap_or(d);
    [
        pick(&p.kv_cache_usage_query, kv),
        pick(&p.projected_kv_cache_usage_query, projected),
        pick(&p.requests_waiting_query, waiting),
        pick(&p.requests_running_query, running),
    ]
    .map(|q| q.replace("$namespace", namespace).replace("$name", name))
}

/// Values by pod from a Prometheus instant-query answer (`resultType` `vector`).
pub fn parse_query_result(body: &str) -> Result<BTreeMap<String, f64>, String> {
    let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    if v["status"] != "success" {
        return Err(format!(
            "query failed: {}",
            v["error"].as_str().unwrap_or("no error text")
        ));
    }
    let mut out = BTreeMap::new();
    for r in v["data"]["result"].as_array().into_iter().flatten() {
        let Some(pod) = r["metric"]["pod"].as_str() else {
            continue;
        };
        let Some(x) = r["value"][1].as_str().and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        if x.is_finite() {
            out.insert(pod.to_string(), x);
        }
    }
    Ok(out)
}

/// Splits `http://host[:port][/prefix]` into authority and path prefix.
pub fn split_url(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return None;
    }
    let authority = if authority.rsplit_once(':').is_some_and(|(_, p)| {
        !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !authority.ends_with(']')
    }) {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Some((authority, path.to_string()))
}

/// Percent-encodes a query parameter value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn read_prometheus(p: &PrometheusSpec, req: &Request) -> BTreeMap<i32, Reading> {
    let Some((authority, prefix)) = split_url(&p.url) else {
        tracing::warn!(url = %p.url, "autoscaling.prometheus.url is not an http:// URL");
        return BTreeMap::new();
    };
    let qs = queries(p, &req.namespace, &req.name);
    let fetch = |q: String| {
        let authority = authority.clone();
        let path = format!("{prefix}/api/v1/query?query={}", encode(&q));
        async move {
            let got = tokio::time::timeout(req.timeout, http_get(&authority, &path)).await;
            match got {
                Ok(Ok(body)) => parse_query_result(&body).unwrap_or_else(|e| {
                    tracing::warn!(query = %q, error = %e, "Prometheus query failed");
                    BTreeMap::new()
                }),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not reach Prometheus");
                    BTreeMap::new()
                }
                Err(_) => {
                    tracing::warn!("Prometheus query timed out");
                    BTreeMap::new()
                }
            }
        }
    };
    let [kv, projected, waiting, running] = qs;
    let (kv, projected, waiting, running) =
        futures::join!(fetch(kv), fetch(projected), fetch(waiting), fetch(running));
    let mut out = BTreeMap::new();
    for t in &req.targets {
        let r = Reading {
            kv_cache_usage: kv.get(&t.pod).copied(),
            projected_kv_cache_usage: projected.get(&t.pod).copied(),
            requests_waiting: waiting.get(&t.pod).copied(),
            requests_running: running.get(&t.pod).copied(),
            load_progress: None,
        };
        if r != Reading::default() {
            out.insert(t.group, r);
        }
    }
    out
}

/// GET `path` from `authority` (`host:port`) over HTTP/1.1; the body as text on 2xx.
async fn http_get(authority: &str, path: &str) -> Result<String, String> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {authority}: {e}"))?;
    // The connection task ends when the response is read and `sender` is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::ACCEPT, "text/plain, application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path} from {authority}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading body from {authority}: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("GET {path} from {authority}: HTTP {status}"));
    }
    String::from_utf8(body.to_vec()).map_err(|e| format!("body from {authority}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_urls_split_into_authority_and_prefix() {
        assert_eq!(
            split_url("http://prom.monitoring.svc:9090"),
            Some(("prom.monitoring.svc:9090".into(), String::new()))
        );
        assert_eq!(
            split_url("http://prom/sub/path/"),
            Some(("prom:80".into(), "/sub/path".into()))
        );
        assert_eq!(split_url("https://prom:9090"), None);
        assert_eq!(split_url("http:///x"), None);
    }

    #[test]
    fn default_queries_select_the_leaders_of_one_deployment_and_overrides_win() {
        let mut p = PrometheusSpec {
            url: "http://prom:9090".into(),
            kv_cache_usage_query: None,
            projected_kv_cache_usage_query: None,
            requests_waiting_query: None,
            requests_running_query: None,
        };
        let q = queries(&p, "inference", "v32");
        assert_eq!(
            q[0],
            concat!(
                r#"max by (pod) (deepseek_engine_kv_cache_fullest_partition_usage_perc{namespace="inference",pod=~"v32-g[0-9]+-0"}"#,
                r#" or vllm:kv_cache_usage_perc{namespace="inference",pod=~"v32-g[0-9]+-0"})"#
            )
        );
        assert!(q[2].starts_with("sum by (pod) (vllm:num_requests_waiting{"));
        p.requests_running_query = Some("my_running{ns=\"$namespace\"}".into());
        assert_eq!(
            queries(&p, "inference", "v32")[3],
            "my_running{ns=\"inference\"}"
        );
        assert_eq!(encode("a b{\"x\"}"), "a%20b%7B%22x%22%7D");
    }

    #[test]
    fn the_kv_signal_is_the_fullest_ranks_where_the_engine_exports_it() {
        let ep = "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n\
                  deepseek_engine_kv_cache_fullest_partition_usage_perc 0.97\n";
        assert_eq!(reading_from_text(ep).kv_cache_usage, Some(0.97));
        let older = "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(reading_from_text(older).kv_cache_usage, Some(0.5));
        assert_eq!(reading_from_text("").kv_cache_usage, None);
    }

    #[test]
    fn query_answers_map_pods_to_values_and_errors_are_reported() {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"pod":"v32-g0-0"},"value":[1700000000.1,"0.5"]},
            {"metric":{"pod":"v32-g1-0"},"value":[1700000000.1,"NaN"]},
            {"metric":{},"value":[1700000000.1,"9"]}]}}"#;
        let m = parse_query_result(body).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["v32-g0-0"], 0.5);
        let err = parse_query_result(r#"{"status":"error","error":"parse error"}"#).unwrap_err();
        assert!(err.contains("parse error"), "{err}");
    }

    #[tokio::test]
    async fn leaders_are_read_over_http_and_a_silent_one_times_out_as_no_data() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            let body =
                "vllm:kv_cache_usage_perc{model_name=\"m\"} 0.42\nvllm:num_requests_running 3\n";
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            // A second connection is accepted and never answered.
            let (_silent, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let text = http_get(&addr.to_string(), "/metrics").await.unwrap();
        let r = reading_from_text(&text);
        assert_eq!(r.kv_cache_usage, Some(0.42));
        assert_eq!(r.requests_running, Some(3.0));
        assert_eq!(r.requests_waiting, None);
        let slow = tokio::time::timeout(
            Duration::from_millis(200),
            http_get(&addr.to_string(), "/metrics"),
        )
        .await;
        assert!(slow.is_err(), "a silent leader times out");
    }
}
