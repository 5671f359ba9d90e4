//! A test double of the kubelet, for running the operator's pods against a real control plane
//! with no container runtime. Everything else (apiserver, StatefulSet controller, garbage
//! collector) is upstream's; this only plays the node.
//!
//! It registers a Node, binds pending pods that fit it (no scheduler runs), and runs each
//! container of a pod bound to it as a local process: the workspace binary that stands for the
//! container's image ([`launch::ImageBinary`]), with the container's arguments and environment.
//! Each pod gets its own loopback address (127.B.x.y); [`launch`] says how addresses, pod DNS
//! names and mount paths are rewritten to fit a shared host. Probes set the pod's conditions,
//! an exiting process is a container failure (terminated state, then a restart counted in
//! `restartCount` under the pod's restart policy), and a pod marked for deletion has its
//! processes stopped (SIGTERM, SIGKILL after the grace period) and is then deleted.
//!
//! Not modelled: liveness probes (a failing one never restarts a container), resource limits,
//! image pulls, exec/logs/port-forward through the API server, node heartbeats (no node
//! lifecycle controller runs).
//!
//! Every process it starts is recorded in `<state_dir>/pids/` (pid and executable), so the
//! control plane's down.sh stops them too if the agent's process dies first.

pub mod launch;
pub mod probe;
pub mod status;

mod pod;
pub use pod::log_path;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use launch::{ImageBinary, Network, PodDnsName};

/// Errors of the node agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A local file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        source: std::io::Error,
    },
    /// The agent's task ended abnormally.
    #[error("the node agent task failed: {0}")]
    Task(String),
}

/// Result alias of the node agent.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings of a node agent.
#[derive(Clone, Debug)]
pub struct Config {
    /// Name of the Node it registers.
    pub node_name: String,
    /// The binaries that stand for container images.
    pub images: Vec<ImageBinary>,
    /// Where pod sandboxes (`pods/<uid>/`) and pid files (`pids/`) go.
    pub state_dir: PathBuf,
    /// Host and port of the API server, given to pods as `KUBERNETES_SERVICE_HOST`/`_PORT`
    /// and in the kubeconfig written next to a mounted service-account token.
    pub api_server: (String, u16),
    /// How often startup and readiness probes run. The kubelet uses each probe's period; a
    /// shorter one only makes readiness show sooner.
    pub probe_interval: Duration,
}

/// A pod as the agent's network knows it.
#[derive(Clone, Debug, Default)]
struct NetEntry {
    namespace: String,
    hostname: Option<String>,
    subdomain: Option<String>,
    labels: BTreeMap<String, String>,
    ready: bool,
    /// Marked for deletion: the name no longer leads here (see [`Resolver`]).
    terminating: bool,
    ip: Option<Ipv4Addr>,
    /// Host ports standing for container ports named after this pod's DNS name.
    host_ports: BTreeMap<u16, u16>,
}

/// Pod addresses and the lookups the cluster DNS would answer.
#[derive(Debug)]
struct Net {
    /// The second octet of every pod address of this agent.
    block: u8,
    next: u32,
    pods: HashMap<String, NetEntry>,
}

impl Net {
    fn new() -> Self {
        // Agents of different processes on one host start in different blocks; a clash is
        // still caught by the port check in `allocate`.
        let block = 100 + (std::process::id() % 150) as u8;
        Net {
            block,
            next: 2,
            pods: HashMap::new(),
        }
    }

    fn observe(&mut self, pod: &Pod) {
        let uid = pod.uid().unwrap_or_default();
        let entry = self.pods.entry(uid).or_default();
        let spec = pod.spec.as_ref();
        entry.namespace = pod.namespace().unwrap_or_default();
        entry.hostname = spec
            .and_then(|s| s.hostname.clone())
            .or_else(|| pod.metadata.name.clone());
        entry.subdomain = spec.and_then(|s| s.subdomain.clone());
        entry.labels = pod.labels().clone();
        entry.ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        entry.terminating = pod.metadata.deletion_timestamp.is_some();
    }

    fn forget(&mut self, uid: &str) {
        self.pods.remove(uid);
    }

    /// A fresh loopback address on which every port in `ports` is free.
    fn allocate(&mut self, uid: &str, ports: &[u16]) -> Option<Ipv4Addr> {
        if let Some(ip) = self.pods.get(uid).and_then(|e| e.ip) {
            return Some(ip);
        }
        for _ in 0..65_000 {
            let n = self.next;
            self.next = self.next.wrapping_add(1);
            let (hi, lo) = ((n >> 8) as u8, n as u8);
            if lo == 0 || lo == 255 || n > 0xfffe {
                if n > 0xfffe {
                    self.next = 2;
                }
                continue;
            }
            let ip = Ipv4Addr::new(127, self.block, hi, lo);
            let taken = self.pods.values().any(|e| e.ip == Some(ip));
            if !taken && ports.iter().all(|&p| TcpListener::bind((ip, p)).is_ok()) {
                self.pods.entry(uid.to_string()).or_default().ip = Some(ip);
                return Some(ip);
            }
        }
        None
    }
}

/// The agent's DNS: a pod DNS name resolves when a headless Service of that name selects a
/// pod with that hostname and subdomain, and that pod is ready or the Service publishes
/// not-ready addresses, and is not being deleted.
///
/// A process gets the answer once, at start, where a real one would look the name up again
/// on every connection. So a pod being deleted does not answer: a group's new rank started
/// while the old rank 0 is still going away would otherwise keep the old address for good.
/// It waits instead, and starts once the new pod of that name has its address.
struct Resolver<'a> {
    net: &'a mut Net,
    services: &'a Store<Service>,
}

impl Network for Resolver<'_> {
    fn resolve(&mut self, name: &PodDnsName, port: Option<u16>) -> Option<(Ipv4Addr, Option<u16>)> {
        let svc = self
            .services
            .get(&ObjectRef::new(&name.subdomain).within(&name.namespace))?;
        let spec = svc.spec.as_ref()?;
        if spec.cluster_ip.as_deref() != Some("None") {
            return None;
        }
        let selector = spec.selector.clone().unwrap_or_default();
        let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
        let entry = self.net.pods.values_mut().find(|e| {
            e.namespace == name.namespace
                && e.hostname.as_deref() == Some(name.hostname.as_str())
                && e.subdomain.as_deref() == Some(name.subdomain.as_str())
                && !selector.is_empty()
                && selector.iter().all(|(k, v)| e.labels.get(k) == Some(v))
                && (publish_not_ready || e.ready)
                && !e.terminating
        })?;
        let ip = entry.ip?;
        let host_port = match port {
            None => None,
            Some(p) => match entry.host_ports.get(&p) {
                Some(&hp) => Some(hp),
                None => {
                    let hp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
                        .ok()?
                        .local_addr()
                        .ok()?
                        .port();
                    entry.host_ports.insert(p, hp);
                    Some(hp)
                }
            },
        };
        Some((ip, host_port))
    }
}

/// What the agent's tasks share.
struct Shared {
    client: Client,
    config: Config,
    net: Mutex<Net>,
    services: Store<Service>,
    /// Bumped on every pod or Service event: a name may resolve now.
    changed: watch::Sender<u64>,
    /// Set once when the agent stops.
    stop: watch::Receiver<bool>,
}

impl Shared {
    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn node_labels(&self) -> BTreeMap<String, String> {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        BTreeMap::from([
            (
                "kubernetes.io/hostname".to_string(),
                self.config.node_name.clone(),
            ),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), arch.to_string()),
        ])
    }
}

/// A running node agent.
pub struct NodeAgent {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent").finish_non_exhaustive()
    }
}

impl NodeAgent {
    /// Registers the Node and starts running the pods bound to it.
    pub async fn start(client: Client, config: Config) -> Result<Self> {
        for dir in ["pods", "pids"] {
            let path = config.state_dir.join(dir);
            std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                what: format!("creating {}", path.display()),
                source,
            })?;
        }
        let (store, writer) = reflector::store();
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            client,
            config,
            net: Mutex::new(Net::new()),
            services: store,
            changed: watch::channel(0).0,
            stop: stop_rx,
        });
        register_node(&shared).await?;
        let task = tokio::spawn(run(shared, writer));
        Ok(NodeAgent {
            stop: stop_tx,
            task,
        })
    }

    /// Stops every pod process (SIGKILL) and the agent, and removes the Node.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}

async fn register_node(shared: &Shared) -> Result<()> {
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let name = &shared.config.node_name;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": shared.node_labels()},
    });
    let pp = PatchParams::apply("deepseek-node-agent").force();
    nodes.patch(name, &pp, &Patch::Apply(&node)).await?;
    let capacity = serde_json::json!({
        "cpu": cpus.to_string(), "memory": "64Gi", "pods": "250", "ephemeral-storage": "100Gi",
    });
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let status = serde_json::json!({
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "the node agent runs pods as local processes",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "nodeInfo": {
                "architecture": std::env::consts::ARCH, "operatingSystem": "linux",
                "kubeletVersion": "v1.37.2", "kubeProxyVersion": "",
                "containerRuntimeVersion": "process://", "kernelVersion": "", "osImage": "",
                "bootID": "", "machineID": "", "systemUUID": "",
            },
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Why a pending pod does not fit this node, if it does not.
fn unschedulable(pod: &Pod, node_labels: &BTreeMap<String, String>) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    for (k, v) in spec.node_selector.iter().flatten() {
        if node_labels.get(k) != Some(v) {
            return Some(format!("node selector {k}={v} does not match the node"));
        }
    }
    let basic = |r: &str| {
        matches!(r, "cpu" | "memory" | "ephemeral-storage") || r.starts_with("hugepages-")
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let res = c.resources.as_ref();
        let names = res
            .and_then(|r| r.requests.as_ref())
            .into_iter()
            .chain(res.and_then(|r| r.limits.as_ref()))
            .flat_map(|m| m.keys());
        for name in names {
            if !basic(name) {
                return Some(format!("0/1 nodes have {name}"));
            }
        }
    }
    None
}

/// Resolves once the agent is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

struct PodTask {
    tx: watch::Sender<Pod>,
    handle: JoinHandle<()>,
}

async fn run(shared: Arc<Shared>, writer: reflector::store::Writer<Service>) -> Result<()> {
    let pods: Api<Pod> = Api::all(shared.client.clone());
    let services: Api<Service> = Api::all(shared.client.clone());
    let mut pod_events = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut svc_events =
        reflector::reflector(writer, watcher(services, watcher::Config::default()))
            .default_backoff()
            .boxed();
    let mut stop = shared.stop.clone();
    let mut tasks: HashMap<String, PodTask> = HashMap::new();
    let mut listing: Option<HashSet<String>> = None;
    let mut refused: HashMap<String, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            event = pod_events.next() => match event {
                Some(Ok(watcher::Event::Init)) => listing = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let Some(seen) = listing.as_mut() {
                        seen.insert(pod.uid().unwrap_or_default());
                    }
                    on_pod(&shared, &pods, &mut tasks, &mut refused, pod).await;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    if let Some(seen) = listing.take() {
                        let gone: Vec<String> =
                            tasks.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                        for uid in gone {
                            forget(&shared, &mut tasks, &uid);
                        }
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => {
                    on_pod(&shared, &pods, &mut tasks, &mut refused, pod).await;
                }
                Some(Ok(watcher::Event::Delete(pod))) => {
                    let uid = pod.uid().unwrap_or_default();
                    refused.remove(&uid);
                    forget(&shared, &mut tasks, &uid);
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => break,
            },
            event = svc_events.next() => match event {
                Some(Ok(_)) => shared.bump(),
                Some(Err(e)) => tracing::warn!(error = %e, "service watch failed; retrying"),
                None => break,
            },
        }
    }
    // Pod tasks see the stop signal, kill their processes and end.
    for (_, task) in tasks {
        let _ = task.handle.await;
    }
    let nodes: Api<Node> = Api::all(shared.client.clone());
    let _ = nodes
        .delete(&shared.config.node_name, &DeleteParams::default())
        .await;
    Ok(())
}

fn forget(shared: &Shared, tasks: &mut HashMap<String, PodTask>, uid: &str) {
    // Dropping the sender tells the pod task that the pod is gone.
    tasks.remove(uid);
    shared.net.lock().expect("net lock").forget(uid);
    shared.bump();
}

async fn on_pod(
    shared: &Arc<Shared>,
    pods: &Api<Pod>,
    tasks: &mut HashMap<String, PodTask>,
    refused: &mut HashMap<String, String>,
    pod: Pod,
) {
    let uid = pod.uid().unwrap_or_default();
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    match node {
        None => bind(shared, pod, refused).await,
        Some(n) if n == shared.config.node_name => {
            shared.net.lock().expect("net lock").observe(&pod);
            shared.bump();
            match tasks.get(&uid) {
                Some(task) => {
                    task.tx.send_replace(pod);
                }
                None => {
                    let (tx, rx) = watch::channel(pod);
                    let handle = tokio::spawn(pod::run(shared.clone(), pods.clone(), rx));
                    tasks.insert(uid, PodTask { tx, handle });
                }
            }
        }
        Some(_) => {}
    }
}

/// Binds a pending pod to this node, as the scheduler would; a pod that does not fit gets
/// `PodScheduled=False`.
async fn bind(shared: &Shared, pod: Pod, refused: &mut HashMap<String, String>) {
    let scheduler = pod.spec.as_ref().and_then(|s| s.scheduler_name.clone());
    if scheduler.is_some_and(|s| s != "default-scheduler")
        || pod.metadata.deletion_timestamp.is_some()
    {
        return;
    }
    let (name, ns, uid) = (
        pod.name_any(),
        pod.namespace().unwrap_or_default(),
        pod.uid(),
    );
    let api: Api<Pod> = Api::namespaced(shared.client.clone(), &ns);
    if let Some(why) = unschedulable(&pod, &shared.node_labels()) {
        let key = uid.clone().unwrap_or_default();
        if refused.get(&key) == Some(&why) {
            return;
        }
        let status = serde_json::json!({"status": {"conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": why.clone(),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
        }]}});
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            tracing::debug!(pod = %name, error = %e, "could not mark the pod unschedulable");
        }
        refused.insert(key, why);
        return;
    }
    let binding = Binding {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid,
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(shared.config.node_name.clone()),
            ..ObjectReference::default()
        },
    };
    let bound: kube::Result<serde_json::Value> = api
        .create_subresource("binding", &name, &PostParams::default(), &binding)
        .await;
    if let Err(e) = bound {
        // A pod bound or deleted meanwhile answers 409 or 404; its next event tells.
        tracing::debug!(pod = %name, error = %e, "binding failed");
    }
}
