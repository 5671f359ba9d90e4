//! The render-engine contract, checked without a cluster.
//!
//! The operator renders a group's StatefulSet. This test takes the engine container's command,
//! args, env, ports and probes from that StatefulSet for the CPU demo and starts the real
//! `deepseek-engine` binary once per rank with exactly those. Only the cluster parts are
//! replaced: pod DNS names become 127.0.0.1, the pod ports become free local ports (all ranks
//! share one host here), and downward-API env vars get the values the kubelet would give them.
//! Then the rendered probes must pass on every rank, a chat request through the leader must
//! answer, and SIGTERM to every rank (a deleted group) must end each cleanly within the pod's
//! termination grace. A flag the engine does not know, an env var it reads differently, a
//! probe path it does not serve, a rank port it does not listen on or a drain longer than the
//! grace fails here, not in a cluster.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deepseek_e2e::{http, read_repo_file, workspace_binary};
use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::render::{self, RANK_LABEL};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

const NAMESPACE: &str = "contract";
/// How long the ranks get to load the built-in model and join their group.
const STARTUP: Duration = Duration::from_secs(90);

/// Engine processes that are killed when the test ends, also when it panics.
struct Ranks {
    children: Vec<(usize, Child, PathBuf)>,
}

impl Ranks {
    /// Every rank's log, for the failure message.
    fn logs(&self) -> String {
        self.children
            .iter()
            .map(|(rank, _, log)| {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- rank {rank} ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails with the logs if a rank has exited.
    fn assert_running(&mut self) {
        let mut exited = Vec::new();
        for (rank, child, _) in &mut self.children {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push(format!("rank {rank} exited with {status}"));
            }
        }
        assert!(exited.is_empty(), "{}\n{}", exited.join("; "), self.logs());
    }
}

impl Ranks {
    /// Sends SIGTERM to every rank at once, as the kubelet does when a group's pods are
    /// deleted, and fails unless each exits cleanly before `bound` (the pod's
    /// `terminationGracePeriodSeconds`, after which the kubelet would kill it).
    fn terminate_within(&mut self, bound: Duration) {
        let start = Instant::now();
        for (rank, child, _) in &self.children {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill -TERM rank {rank}");
        }
        for i in 0..self.children.len() {
            let status = loop {
                let (rank, child, _) = &mut self.children[i];
                let rank = *rank;
                if let Some(status) = child.try_wait().expect("wait for a rank") {
                    break status;
                }
                assert!(
                    start.elapsed() < bound,
                    "rank {rank} still runs {bound:?} after SIGTERM, when the kubelet kills it\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            assert!(
                status.success(),
                "rank {} exited with {status} after SIGTERM\n{}",
                self.children[i].0,
                self.logs()
            );
        }
    }
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

fn cpu_demo() -> DeepSeekDeployment {
    let text = read_repo_file("examples/tiny-cpu.yaml");
    let mut dsd: DeepSeekDeployment = serde_saphyr::from_str(&text).expect("example parses");
    dsd.metadata.namespace = Some(NAMESPACE.into());
    dsd.metadata.uid = Some("00000000-0000-0000-0000-000000000001".into());
    dsd
}

fn port_named(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container has no port named {name}"))
        .container_port
}

/// Path and container port a rendered HTTP probe checks.
fn probe_target(c: &Container, probe: &Option<Probe>, what: &str) -> (String, i32) {
    let get = probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what} probe is not an HTTP GET"));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(name) => port_named(c, name),
    };
    (get.path.clone().expect("probe path"), port)
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("rendered args lack {flag}: {args:?}"));
    &args[i + 1]
}

/// The env a pod of rank `rank` sees: literal values as rendered, downward-API fields as the
/// kubelet resolves them. A field reference this test does not know fails, so a new one gets
/// looked at here.
fn pod_env(c: &Container, pod_name: &str, rank: usize) -> BTreeMap<String, String> {
    c.env
        .iter()
        .flatten()
        .map(|e| {
            let value = match (&e.value, &e.value_from) {
                (Some(v), None) => v.clone(),
                (None, Some(from)) => {
                    let field = &from
                        .field_ref
                        .as_ref()
                        .unwrap_or_else(|| panic!("{} is not a field reference", e.name))
                        .field_path;
                    if *field == format!("metadata.labels['{RANK_LABEL}']") {
                        rank.to_string()
                    } else if field == "metadata.name" {
                        pod_name.to_string()
                    } else {
                        panic!("{}: unknown field reference {field}", e.name)
                    }
                }
                _ => panic!("{} has neither one value nor one source", e.name),
            };
            (e.name.clone(), value)
        })
        .collect()
}

fn wait_ok(ranks: &mut Ranks, addr: &str, path: &str, deadline: Instant) {
    loop {
        ranks.assert_running();
        if let Ok(r) = http::request(addr, "GET", path, None, Duration::from_secs(5))
            && r.status == 200
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} on {addr} did not answer 200 within {STARTUP:?}\n{}",
            ranks.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_engine_serves_the_group_exactly_as_the_operator_renders_it() {
    let dsd = cpu_demo();
    let desired = render::desired(&dsd).expect("the CPU demo renders");
    let group = &desired.groups[0];
    let sts = &group.statefulset;
    let pods = sts.spec.replicas.expect("replicas") as usize;
    assert!(
        pods >= 2,
        "the CPU demo must exercise the multi-process group path, got {pods} pod(s) per group"
    );
    let pod_spec = sts.spec.template.spec.clone().expect("pod template");
    assert!(
        pod_spec.init_containers.is_none(),
        "the CPU demo needs no model download"
    );
    let engine = pod_spec
        .containers
        .iter()
        .find(|c| c.name == "engine")
        .expect("engine container")
        .clone();

    // The command is the binary name the engine image puts on PATH.
    let command = engine.command.clone().expect("command");
    assert_eq!(command, ["deepseek-engine"], "engine command");
    let args = engine.args.clone().expect("args");

    // Ports and probes agree with the args.
    let http_port = port_named(&engine, render::HTTP_PORT_NAME);
    let rank_port = port_named(&engine, render::RANK_PORT_NAME);
    assert_eq!(arg_value(&args, "--port"), http_port.to_string());
    let startup = probe_target(&engine, &engine.startup_probe, "startup");
    let liveness = probe_target(&engine, &engine.liveness_probe, "liveness");
    let readiness = probe_target(&engine, &engine.readiness_probe, "readiness");
    for (path, port) in [&startup, &liveness, &readiness] {
        assert_eq!(*port, http_port, "probe {path} checks the HTTP port");
    }

    // LEADER_ADDR names rank 0's pod through the group's headless Service, on the rank port.
    let sts_name = sts.metadata.name.clone().expect("name");
    let service_name = sts.spec.service_name.clone().expect("serviceName");
    assert_eq!(
        group.service.metadata.name.as_deref(),
        Some(service_name.as_str())
    );
    let rank0 = pod_env(&engine, &format!("{sts_name}-0"), 0);
    let expected_leader = format!("{sts_name}-0.{service_name}.{NAMESPACE}.svc:{rank_port}");
    assert_eq!(rank0["LEADER_ADDR"], expected_leader);
    assert_eq!(rank0["WORLD_SIZE"], pods.to_string());
    assert!(
        group
            .service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .is_some_and(|ports| ports.iter().any(|p| p.port == rank_port)),
        "the headless Service exposes the rank port"
    );

    // One local process per rank; the cluster's names and ports mapped to this host.
    let binary = workspace_binary("deepseek-engine", "deepseek-engine");
    let logs = std::env::temp_dir().join(format!("deepseek-contract-{}", std::process::id()));
    std::fs::create_dir_all(&logs).expect("log dir");
    let local_rank_port = free_port();
    let http_ports: Vec<u16> = (0..pods).map(|_| free_port()).collect();
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for (rank, port) in http_ports.iter().enumerate() {
        let pod_name = format!("{sts_name}-{rank}");
        let mut env = pod_env(&engine, &pod_name, rank);
        env.insert("LEADER_ADDR".into(), format!("127.0.0.1:{local_rank_port}"));
        let mut args = args.clone();
        let i = args.iter().position(|a| a == "--port").expect("--port");
        args[i + 1] = port.to_string();
        let log = logs.join(format!("rank{rank}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(&binary)
            .args(&args)
            .env_clear()
            .envs(&env)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        ranks.children.push((rank, child, log));
    }

    // The kubelet's order: startup probe, then liveness and readiness, on every pod.
    let deadline = Instant::now() + STARTUP;
    for port in &http_ports {
        let addr = format!("127.0.0.1:{port}");
        wait_ok(&mut ranks, &addr, &startup.0, deadline);
        wait_ok(&mut ranks, &addr, &liveness.0, deadline);
        wait_ok(&mut ranks, &addr, &readiness.0, deadline);
    }

    // The serving Service sends requests to rank 0 only; it must answer a chat request under
    // the served name the operator passed.
    let served = &rank0["SERVED_MODEL_NAME"];
    let leader = format!("127.0.0.1:{}", http_ports[0]);
    let request = serde_json::json!({
        "model": served,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8,
        "temperature": 0
    })
    .to_string();
    let reply = http::request(
        &leader,
        "POST",
        "/v1/chat/completions",
        Some(&request),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("chat request failed: {e}\n{}", ranks.logs()));
    assert_eq!(
        reply.status,
        200,
        "chat reply: {}\n{}",
        reply.body,
        ranks.logs()
    );
    let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON reply");
    assert_eq!(body["model"], served.as_str(), "{body}");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant", "{body}");
    let generated = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!(generated > 0, "no tokens generated: {body}");

    // The leader's /metrics carries the names the autoscaler reads.
    let metrics =
        http::request(&leader, "GET", "/metrics", None, Duration::from_secs(5)).expect("metrics");
    for name in ["vllm:kv_cache_usage_perc", "vllm:num_requests_waiting"] {
        assert!(metrics.body.contains(name), "leader /metrics lacks {name}");
    }
    ranks.assert_running();

    // Deleting the group's pods: SIGTERM to every rank; each drains and exits cleanly within
    // the pod's termination grace.
    let grace = pod_spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    let drain: i64 = arg_value(&args, "--shutdown-grace-seconds")
        .parse()
        .expect("a number of seconds");
    assert!(grace > drain, "the kubelet waits past the engine's drain");
    ranks.terminate_within(Duration::from_secs(grace as u64));
    drop(ranks);
    let _ = std::fs::remove_dir_all(&logs);
}
