//! The environment the control-plane tests share, and their waiting and HTTP helpers.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use deepseek_e2e::controlplane::{self, ControlPlane};
use deepseek_e2e::node::launch::ImageBinary;
use deepseek_e2e::node::{self, NodeAgent};
use deepseek_e2e::{apply_manifest, read_repo_file, workspace_binary};
use deepseek_operator::api::DeepSeekDeployment;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, OnceCell};

/// The engine image's repository, as the CRD defaults it.
pub const ENGINE_IMAGE: &str = "ghcr.io/deepseek-serving/deepseek-engine";
/// The operator image's repository, as the manifests name it.
pub const OPERATOR_IMAGE: &str = "ghcr.io/deepseek-serving/deepseek-operator";
/// Where deploy/ installs the operator.
pub const OPERATOR_NS: &str = "deepseek-system";
/// The operator's service account (deploy/base/rbac.yaml).
pub const OPERATOR_SA: &str = "deepseek-operator";
/// The leader Lease (deploy/base/deployment.yaml's `--lease-name`).
pub const LEASE: &str = "deepseek-operator-leader";
/// The CRD file the tests install.
pub const CRD_FILE: &str = "crds/serving.deepseek.dev_deepseekdeployments.yaml";
/// Generous bound on anything the cluster does (pods start on two shared cores).
pub const LONG: Duration = Duration::from_secs(300);

/// An operator process.
pub struct Operator {
    /// Its leader-election identity (`POD_NAME`).
    pub identity: String,
    child: tokio::process::Child,
    pid_file: PathBuf,
}

impl Operator {
    /// Stops it with `signal` and waits for it to exit.
    pub async fn stop(mut self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet,
            // so the pid is still this process.
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
        let _ = self.child.wait().await;
        let _ = std::fs::remove_file(&self.pid_file);
    }
}

/// What every test gets: the control plane, an admin client, the node agent, the binaries.
pub struct Env {
    control_plane: ControlPlane,
    /// A client with the admin identity.
    pub admin: Client,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The control plane's state directory.
    pub state_dir: PathBuf,
    /// The operator binary.
    pub operator_bin: PathBuf,
    agent: Mutex<Option<NodeAgent>>,
    crd: OnceCell<()>,
    operator_kubeconfig: OnceCell<PathBuf>,
    /// The operator processes running now.
    pub operators: Mutex<Vec<Operator>>,
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Env {
    /// Builds what is missing, starts the control plane and the node agent.
    pub async fn start() -> Result<Self, String> {
        // DEEPSEEK_E2E_ENGINE_BIN and DEEPSEEK_E2E_OPERATOR_BIN name other builds (a release
        // build, say) than the workspace's.
        let binary = |var: &str, package: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_binary(package, package))
        };
        let (engine_bin, operator_bin) = tokio::task::spawn_blocking(move || {
            (
                binary("DEEPSEEK_E2E_ENGINE_BIN", "deepseek-engine"),
                binary("DEEPSEEK_E2E_OPERATOR_BIN", "deepseek-operator"),
            )
        })
        .await
        .map_err(|e| format!("building the workspace binaries: {e}"))?;
        let control_plane = tokio::task::spawn_blocking(ControlPlane::up)
            .await
            .map_err(|e| e.to_string())??;
        let admin = control_plane.admin().await?;
        let kubeconfig = control_plane.kubeconfig().to_path_buf();
        let state_dir = control_plane.state_dir().to_path_buf();
        let images = vec![
            ImageBinary {
                repository: ENGINE_IMAGE.into(),
                binary: engine_bin.clone(),
                default_args: vec!["serve".into()],
            },
            ImageBinary {
                repository: OPERATOR_IMAGE.into(),
                binary: operator_bin.clone(),
                default_args: vec!["run".into()],
            },
        ];
        let agent = NodeAgent::start(
            admin.clone(),
            node::Config {
                node_name: "e2e-node".into(),
                images,
                state_dir: state_dir.clone(),
                api_server: controlplane::api_server(&kubeconfig)?,
                probe_interval: Duration::from_millis(500),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(Env {
            control_plane,
            admin,
            kubeconfig,
            state_dir,
            operator_bin,
            agent: Mutex::new(Some(agent)),
            crd: OnceCell::new(),
            operator_kubeconfig: OnceCell::new(),
            operators: Mutex::new(Vec::new()),
        })
    }

    /// Stops the operators, the node agent and the control plane; with `keep`, the state
    /// directory (logs) stays.
    pub async fn stop(self, keep: bool) -> Result<(), String> {
        for op in self.operators.lock().await.drain(..) {
            op.stop(libc::SIGTERM).await;
        }
        if let Some(agent) = self.agent.lock().await.take() {
            agent.stop().await.map_err(|e| e.to_string())?;
        }
        let state = self.state_dir.clone();
        let down = tokio::task::spawn_blocking(move || self.control_plane.down(keep))
            .await
            .map_err(|e| e.to_string())?;
        if keep {
            eprintln!("logs kept in {}", state.display());
        }
        down
    }

    /// Installs the CRD from crds/ by server-side apply (once) and waits until it is served.
    pub async fn crd(&self) -> Result<(), String> {
        self.crd
            .get_or_try_init(|| async {
                apply_manifest(&self.admin, &read_repo_file(CRD_FILE), "default", |_| {}).await?;
                let crds: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
                let name = "deepseekdeployments.serving.deepseek.dev";
                within(
                    LONG,
                    "the CRD is established",
                    await_condition(crds, name, established()),
                )
                .await?;
                Ok(())
            })
            .await
            .copied()
    }

    /// The operator's namespace and RBAC from deploy/base (once), and a kubeconfig holding a
    /// token for its service account, as a pod of the operator Deployment would get.
    pub async fn operator_kubeconfig(&self) -> Result<PathBuf, String> {
        self.operator_kubeconfig
            .get_or_try_init(|| async {
                for file in ["deploy/base/namespace.yaml", "deploy/base/rbac.yaml"] {
                    apply_manifest(&self.admin, &read_repo_file(file), OPERATOR_NS, |_| {}).await?;
                }
                let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), OPERATOR_NS);
                let request = TokenRequest {
                    spec: Some(TokenRequestSpec {
                        expiration_seconds: Some(24 * 3600),
                        ..TokenRequestSpec::default()
                    }),
                    ..TokenRequest::default()
                };
                let answer: TokenRequest = sas
                    .create_subresource("token", OPERATOR_SA, &PostParams::default(), &request)
                    .await
                    .map_err(|e| format!("token for {OPERATOR_SA}: {e}"))?;
                let token = answer
                    .status
                    .and_then(|s| s.token)
                    .ok_or("no token in the answer")?;
                let path = self.state_dir.join("operator.kubeconfig");
                controlplane::write_token_kubeconfig(&self.kubeconfig, &token, &path)?;
                Ok(path)
            })
            .await
            .cloned()
    }

    /// A client with the operator's identity.
    pub async fn operator_client(&self) -> Result<Client, String> {
        controlplane::client_for(&self.operator_kubeconfig().await?).await
    }

    /// Starts an operator process with leader election as `identity`.
    pub async fn start_operator(&self, identity: &str) -> Result<(), String> {
        self.crd().await?;
        let kubeconfig = self.operator_kubeconfig().await?;
        let log = self
            .state_dir
            .join("logs")
            .join(format!("operator-{identity}.log"));
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let child = tokio::process::Command::new(&self.operator_bin)
            .args(["run", "--metrics-addr", &metrics.to_string()])
            .args(["--leader-election", "true", "--lease-name", LEASE])
            .args(["--lease-namespace", OPERATOR_NS])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", identity)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.operator_bin.display()))?;
        let pid = child.id().ok_or("the operator exited at once")?;
        let pid_file = self
            .state_dir
            .join("pids")
            .join(format!("80-operator-{identity}.pid"));
        let exe = std::fs::canonicalize(&self.operator_bin).map_err(|e| e.to_string())?;
        std::fs::write(&pid_file, format!("{pid} {}\n", exe.display()))
            .map_err(|e| e.to_string())?;
        self.operators.lock().await.push(Operator {
            identity: identity.into(),
            child,
            pid_file,
        });
        Ok(())
    }

    /// An operator is running and holds the lease; starts `operator-a` when none runs.
    pub async fn operator(&self) -> Result<(), String> {
        if self.operators.lock().await.is_empty() {
            self.start_operator("operator-a").await?;
        }
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), OPERATOR_NS);
        let running: Vec<String> = self
            .operators
            .lock()
            .await
            .iter()
            .map(|o| o.identity.clone())
            .collect();
        within(
            LONG,
            "an operator holds the leader lease",
            await_condition(leases, LEASE, move |l: Option<&Lease>| {
                let holder = l
                    .and_then(|l| l.spec.as_ref())
                    .and_then(|s| s.holder_identity.clone());
                holder.is_some_and(|h| running.contains(&h))
            }),
        )
        .await?;
        Ok(())
    }

    /// The identity holding the leader lease.
    pub async fn leader_identity(&self) -> Result<String, String> {
        let leases: Api<Lease> = Api::namespaced(self.admin.clone(), OPERATOR_NS);
        leases
            .get(LEASE)
            .await
            .map_err(|e| e.to_string())?
            .spec
            .and_then(|s| s.holder_identity)
            .ok_or_else(|| "nobody holds the lease".to_string())
    }

    /// Stops the operator process `identity` with `signal` and waits for it to exit.
    pub async fn stop_operator(&self, identity: &str, signal: i32) {
        let mut ops = self.operators.lock().await;
        if let Some(i) = ops.iter().position(|o| o.identity == identity) {
            ops.remove(i).stop(signal).await;
        }
    }

    /// Stops every operator process the suite started (SIGTERM) and waits for them to exit.
    pub async fn stop_operators(&self) {
        let running: Vec<Operator> = self.operators.lock().await.drain(..).collect();
        for op in running {
            op.stop(libc::SIGTERM).await;
        }
    }

    /// Stops the leading operator (SIGTERM: it releases the lease) and starts another one in
    /// its place; returns the new one's identity.
    pub async fn restart_operator(&self) -> Result<String, String> {
        let leader = self.leader_identity().await?;
        self.stop_operator(&leader, libc::SIGTERM).await;
        let identity = format!("{leader}-restarted");
        self.start_operator(&identity).await?;
        Ok(identity)
    }

    /// Creates a fresh namespace that enforces the restricted Pod Security Standard, as
    /// production namespaces for the engine should.
    pub async fn namespace(&self, name: &str) -> Result<(), String> {
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "restricted"}},
        }))
        .map_err(|e| e.to_string())?;
        namespaces
            .create(&PostParams::default(), &ns)
            .await
            .map_err(|e| format!("creating namespace {name}: {e}"))?;
        Ok(())
    }

    /// Deletes a test's namespace (the namespace controller removes what is left in it).
    pub async fn drop_namespace(&self, name: &str) {
        let namespaces: Api<Namespace> = Api::all(self.admin.clone());
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
    }

    /// Prints the tails of the logs that explain a failure: the operators', the newest pods',
    /// and the control plane's.
    pub fn dump_logs(&self) {
        let mut operators = Vec::new();
        let mut control_plane = Vec::new();
        collect_logs(&self.state_dir.join("logs"), &mut control_plane);
        control_plane.retain(|p| {
            let operator = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("operator-"));
            if operator {
                operators.push(p.clone());
            }
            !operator
        });
        let mut pods = Vec::new();
        collect_logs(&self.state_dir.join("pods"), &mut pods);
        let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        pods.sort_by_key(|p| std::cmp::Reverse(modified(p)));
        pods.truncate(4);
        let groups = [(operators, 30), (pods, 15), (control_plane, 8)];
        for (logs, lines) in groups {
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let all: Vec<&str> = text.lines().collect();
                let tail = &all[all.len().saturating_sub(lines)..];
                eprintln!("--- {} (last {} lines)", log.display(), tail.len());
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn collect_logs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_logs(&p, out);
        } else if p.extension().is_some_and(|x| x == "log") {
            out.push(p);
        }
    }
}

/// The condition that a CRD is established.
pub fn established() -> impl Condition<CustomResourceDefinition> {
    |crd: Option<&CustomResourceDefinition>| {
        crd.and_then(|c| c.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    }
}

/// Awaits `fut`, failing with `what` after `bound`.
pub async fn within<T, E: std::fmt::Display>(
    bound: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(bound, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: not within {}s", bound.as_secs())),
    }
}

/// Watches the objects of `api` matching `selector` until `check` returns `Some` for the whole
/// set, re-evaluated after every change; fails after `bound`.
pub async fn wait_list<K, T>(
    api: Api<K>,
    selector: &str,
    bound: Duration,
    what: &str,
    mut check: impl FnMut(&[K]) -> Option<T>,
) -> Result<T, String>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let config = watcher::Config::default().labels(selector);
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut objects: BTreeMap<String, K> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, K>> = None;
    let key = |o: &K| o.meta().uid.clone().unwrap_or_default();
    let watch = async {
        while let Some(event) = events.next().await {
            match event {
                // Only a complete listing is checked: the set is empty until `InitDone`.
                Ok(watcher::Event::Init) => {
                    listing = Some(BTreeMap::new());
                    continue;
                }
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(l) = listing.as_mut() {
                        l.insert(key(&o), o);
                    }
                    continue;
                }
                Ok(watcher::Event::InitDone) => objects = listing.take().unwrap_or_default(),
                Ok(watcher::Event::Apply(o)) => {
                    objects.insert(key(&o), o);
                }
                Ok(watcher::Event::Delete(o)) => {
                    objects.remove(&key(&o));
                }
                Err(_) => continue,
            }
            let now: Vec<K> = objects.values().cloned().collect();
            if let Some(v) = check(&now) {
                return Ok(v);
            }
        }
        Err("the watch ended")
    };
    within(bound, what, watch).await
}

/// Waits until the deployment satisfies `check`, re-evaluated on every change.
pub async fn wait_dsd(
    api: &Api<DeepSeekDeployment>,
    name: &str,
    what: &str,
    check: impl Fn(&DeepSeekDeployment) -> bool + Send + 'static,
) -> Result<DeepSeekDeployment, String> {
    let cond = move |d: Option<&DeepSeekDeployment>| d.is_some_and(&check);
    let found = within(LONG, what, await_condition(api.clone(), name, cond)).await?;
    found.ok_or_else(|| format!("{what}: the deployment is gone"))
}

/// Status and reason of a condition of the deployment.
pub fn condition(d: &DeepSeekDeployment, type_: &str) -> Option<(String, String)> {
    d.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The deployment is up to date and `Available`, with `ready` ready groups.
pub fn available_with(ready: i32) -> impl Fn(&DeepSeekDeployment) -> bool + Send + 'static {
    move |d| {
        let Some(s) = &d.status else { return false };
        s.observed_generation == d.metadata.generation
            && s.ready_replicas == ready
            && condition(d, "Available").is_some_and(|(st, _)| st == "True")
    }
}

/// The tiny CPU example in namespace `ns`.
pub fn tiny_example(ns: &str) -> DeepSeekDeployment {
    let mut dsd: DeepSeekDeployment =
        serde_saphyr::from_str(&read_repo_file("examples/tiny-cpu.yaml")).expect("example parses");
    dsd.metadata.namespace = Some(ns.into());
    dsd
}

/// The ready, serving rank-0 pod of group `group` of deployment `name`.
pub async fn leader(client: &Client, ns: &str, name: &str, group: i32) -> Result<Pod, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!(
        "app.kubernetes.io/instance={name},serving.deepseek.dev/group={group},apps.kubernetes.io/pod-index=0"
    );
    wait_list(
        pods,
        &selector,
        LONG,
        "the group's leader pod is ready",
        |ps: &[Pod]| {
            ps.iter()
                .find(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
                .cloned()
        },
    )
    .await
}

/// The pod's Ready condition is true.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pid of the pod's engine process, from the container ID the node agent reports.
pub fn engine_pid(p: &Pod) -> Option<u32> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "engine")?
        .container_id
        .as_deref()?
        .strip_prefix("process://")?
        .parse()
        .ok()
}

/// One chat completion from the engine at `ip`:8000, through its OpenAI API: the reply's
/// JSON.
pub async fn chat(ip: &str) -> Result<serde_json::Value, String> {
    chat_with(ip, "Hello!", 4).await
}

/// A greedy chat completion of `content` from the engine at `ip`:8000, for the model it
/// serves.
pub async fn chat_with(
    ip: &str,
    content: &str,
    max_tokens: u32,
) -> Result<serde_json::Value, String> {
    let addr = format!("{ip}:8000");
    let content = content.to_string();
    tokio::task::spawn_blocking(move || {
        let timeout = Duration::from_secs(120);
        let models = deepseek_e2e::http::request(&addr, "GET", "/v1/models", None, timeout)
            .map_err(|e| format!("GET /v1/models: {e}"))?;
        let models: serde_json::Value =
            serde_json::from_str(&models.body).map_err(|e| format!("/v1/models: {e}"))?;
        let model = models["data"][0]["id"]
            .as_str()
            .ok_or("no model served")?
            .to_string();
        let body = serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        let r = deepseek_e2e::http::request(
            &addr,
            "POST",
            "/v1/chat/completions",
            Some(&body.to_string()),
            timeout,
        )
        .map_err(|e| format!("POST /v1/chat/completions: {e}"))?;
        if r.status != 200 {
            return Err(format!("chat answered {}: {}", r.status, r.body));
        }
        serde_json::from_str(&r.body).map_err(|e| format!("chat reply: {e}"))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Uids of the pods, sorted.
pub fn uids(pods: &[Pod]) -> Vec<String> {
    let mut u: Vec<String> = pods.iter().filter_map(|p| p.uid()).collect();
    u.sort();
    u
}

/// Shorthand: an `Arc`'d environment.
pub type Shared = Arc<Env>;
