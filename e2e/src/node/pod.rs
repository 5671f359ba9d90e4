//! One pod on the node agent: its address and volumes, its containers' processes (init
//! containers first, in order), their probes and restarts, the status it reports, and its end.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod, PodStatus, Probe};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::launch::{self, EnvSources, LaunchError, PodFields, Sandbox};
use super::status::{self, ContainerView, PodView, RunState, Termination};
use super::{Resolver, Shared, probe, stopped, volumes};

/// Where in-cluster clients look for the service-account token.
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// First and longest wait before restarting a container that exited.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A container that ran this long restarts with the first back-off again.
const BACKOFF_RESET: Duration = Duration::from_secs(60);
/// How soon setup that failed (a volume, an environment source) is tried again.
const SETUP_RETRY: Duration = Duration::from_secs(1);

/// Runs the pod until it is deleted, disappears, or the agent stops.
pub(super) async fn run(shared: Arc<Shared>, all_pods: Api<Pod>, rx: watch::Receiver<Pod>) {
    let pod = rx.borrow().clone();
    let ns = pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(all_pods.into_client(), &ns);
    let mut run = PodRun::new(shared, pods, rx, pod);
    let end = run.serve().await;
    match end {
        End::Deleted => {
            let grace = run.grace();
            run.terminate(grace).await;
            run.report().await;
            run.finalize().await;
            run.remove_sandbox();
        }
        End::Gone => {
            run.terminate(Duration::ZERO).await;
            run.remove_sandbox();
        }
        // The sandbox (logs) stays for whoever looks into a failed run.
        End::Stop => run.terminate(Duration::ZERO).await,
    }
}

enum End {
    /// The pod was marked for deletion.
    Deleted,
    /// The pod no longer exists.
    Gone,
    /// The agent stops.
    Stop,
}

/// A running process of a container.
struct Proc {
    signal: mpsc::UnboundedSender<i32>,
    started_at: Timestamp,
    started: Instant,
    container_id: String,
    pid_file: PathBuf,
}

/// One container of the pod.
struct Ctr {
    spec: Container,
    view: ContainerView,
    proc: Option<Proc>,
    /// When it may be started (again); `None`: now.
    due: Option<Instant>,
    backoff: Duration,
    /// Ended and will not run again.
    done: bool,
    ever_started: bool,
    /// Results of the startup probe until it passes, then of the readiness probe.
    streak: probe::Streak,
    /// When the next probe runs.
    next_probe: Option<Instant>,
}

impl Ctr {
    fn new(spec: Container) -> Self {
        let view = ContainerView {
            name: spec.name.clone(),
            image: spec.image.clone().unwrap_or_default(),
            state: RunState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            },
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
        };
        Ctr {
            spec,
            view,
            proc: None,
            due: None,
            backoff: BACKOFF_FIRST,
            done: false,
            ever_started: false,
            streak: probe::Streak::default(),
            next_probe: None,
        }
    }

    fn wait(&mut self, reason: &str, message: String) {
        self.view.state = RunState::Waiting {
            reason: reason.into(),
            message: Some(message),
        };
    }
}

/// A process ended.
struct Exit {
    init: bool,
    index: usize,
    code: Option<i32>,
    signal: Option<i32>,
    at: Timestamp,
}

struct PodRun {
    shared: Arc<Shared>,
    pods: Api<Pod>,
    rx: watch::Receiver<Pod>,
    pod: Pod,
    uid: String,
    name: String,
    dir: PathBuf,
    ip: Option<Ipv4Addr>,
    volumes: Option<BTreeMap<String, PathBuf>>,
    init: Vec<Ctr>,
    main: Vec<Ctr>,
    /// Index of the init container to run; `init.len()` once all completed.
    next_init: usize,
    exit_tx: mpsc::UnboundedSender<Exit>,
    exit_rx: mpsc::UnboundedReceiver<Exit>,
    start_time: Timestamp,
    reported: Option<PodStatus>,
    terminating: bool,
    finished: bool,
    /// Setup failed; try again then.
    retry: Option<Instant>,
}

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Sends `signal` to the process `pid`.
fn kill(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions; the caller holds the process's
    // `Child` unreaped, so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, signal);
    }
}

impl PodRun {
    fn new(shared: Arc<Shared>, pods: Api<Pod>, rx: watch::Receiver<Pod>, pod: Pod) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let (exit_tx, exit_rx) = mpsc::unbounded_channel();
        PodRun {
            dir: shared.config.state_dir.join("pods").join(&uid),
            shared,
            pods,
            rx,
            name: pod.name_any(),
            uid,
            pod,
            ip: None,
            volumes: None,
            init: spec
                .init_containers
                .unwrap_or_default()
                .into_iter()
                .map(Ctr::new)
                .collect(),
            main: spec.containers.into_iter().map(Ctr::new).collect(),
            next_init: 0,
            exit_tx,
            exit_rx,
            start_time: Timestamp::now(),
            reported: None,
            terminating: false,
            finished: false,
            retry: None,
        }
    }

    fn restart_policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn grace(&self) -> Duration {
        let secs = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }

    async fn serve(&mut self) -> End {
        if deleting(&self.pod) {
            return End::Deleted;
        }
        let mut changed = self.shared.changed.subscribe();
        let mut stop = self.shared.stop.clone();
        let mut tick = tokio::time::interval(self.shared.config.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.advance().await;
            self.report().await;
            let due = self.next_due();
            tokio::select! {
                _ = stopped(&mut stop) => return End::Stop,
                r = self.rx.changed() => match r {
                    Err(_) => return End::Gone,
                    Ok(()) => {
                        self.pod = self.rx.borrow_and_update().clone();
                        if deleting(&self.pod) {
                            return End::Deleted;
                        }
                    }
                },
                Some(exit) = self.exit_rx.recv() => self.on_exit(exit),
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {}
                _ = changed.changed() => {}
                _ = tick.tick() => self.probe().await,
            }
        }
    }

    /// The next time something is due: a restart after back-off, or a setup retry.
    fn next_due(&self) -> Option<Instant> {
        let ctrs = self.init.iter().chain(&self.main);
        ctrs.filter(|c| c.proc.is_none() && !c.done)
            .filter_map(|c| c.due)
            .chain(self.retry)
            .min()
    }

    fn all_waiting(&mut self, reason: &str, message: &str) {
        for c in self.init.iter_mut().chain(self.main.iter_mut()) {
            if c.proc.is_none() && !c.done && !c.ever_started {
                c.wait(reason, message.to_string());
            }
        }
    }

    fn fields(&self) -> PodFields {
        PodFields {
            pod_ip: self.ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            host_ip: Ipv4Addr::LOCALHOST,
            node_name: self.shared.config.node_name.clone(),
        }
    }

    /// Sets up what is missing and starts the containers that are due.
    async fn advance(&mut self) {
        if self.terminating || self.finished {
            return;
        }
        let now = Instant::now();
        if self.retry.is_some_and(|r| r > now) {
            return;
        }
        self.retry = None;
        if self.ip.is_none() {
            let ports: Vec<u16> = self
                .init
                .iter()
                .chain(&self.main)
                .flat_map(|c| c.spec.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .collect();
            let ip = self
                .shared
                .net
                .lock()
                .expect("net lock")
                .allocate(&self.uid, &ports);
            let Some(ip) = ip else {
                self.all_waiting("ContainerCreating", "no free loopback address for the pod");
                self.retry = Some(now + SETUP_RETRY);
                return;
            };
            self.ip = Some(ip);
            self.shared.bump();
            for sub in ["logs", "home"] {
                let _ = std::fs::create_dir_all(self.dir.join(sub));
            }
        }
        if self.volumes.is_none() {
            match volumes::prepare(&self.shared.client, &self.pod, &self.fields(), &self.dir).await
            {
                Ok(v) => self.volumes = Some(v),
                Err(e) => {
                    self.all_waiting("ContainerCreating", &format!("MountVolume: {e}"));
                    self.retry = Some(now + SETUP_RETRY);
                    return;
                }
            }
        }
        if self.next_init < self.init.len() {
            self.start_if_due(true, self.next_init).await;
        } else {
            for i in 0..self.main.len() {
                self.start_if_due(false, i).await;
            }
        }
    }

    fn ctr(&mut self, init: bool, index: usize) -> &mut Ctr {
        if init {
            &mut self.init[index]
        } else {
            &mut self.main[index]
        }
    }

    fn mounts(&self, spec: &Container) -> Vec<(String, PathBuf)> {
        let volumes = self.volumes.clone().unwrap_or_default();
        spec.volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| {
                let host = volumes.get(&m.name)?;
                let host = match m.sub_path.as_deref() {
                    Some(sub) if !sub.is_empty() => host.join(sub),
                    _ => host.clone(),
                };
                Some((m.mount_path.clone(), host))
            })
            .collect()
    }

    fn base_env(&self, mounts: &[(String, PathBuf)]) -> Vec<(String, String)> {
        let (api_host, api_port) = &self.shared.config.api_server;
        let hostname = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| self.name.clone());
        let mut env = vec![
            (
                "PATH".to_string(),
                "/usr/local/bin:/usr/bin:/bin".to_string(),
            ),
            (
                "HOME".to_string(),
                self.dir.join("home").display().to_string(),
            ),
            ("HOSTNAME".to_string(), hostname),
            ("KUBERNETES_SERVICE_HOST".to_string(), api_host.clone()),
            ("KUBERNETES_SERVICE_PORT".to_string(), api_port.to_string()),
        ];
        // In-cluster clients read the token from a fixed path; a kubeconfig beside the
        // mounted token leads them to it.
        if let Some((_, sa)) = mounts
            .iter()
            .find(|(m, _)| m.trim_end_matches('/') == SERVICE_ACCOUNT_DIR)
        {
            let kubeconfig = self.dir.join("kubeconfig");
            let text = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{api_host}:{api_port}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    tokenFile: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
                ca = sa.join("ca.crt").display(),
                token = sa.join("token").display(),
            );
            if std::fs::write(&kubeconfig, text).is_ok() {
                env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
            }
        }
        env
    }

    async fn env_sources(&self, spec: &Container) -> Result<EnvSources, String> {
        let ns = self.pod.namespace().unwrap_or_default();
        let (cms, secrets) = launch::env_references(spec);
        let mut sources = EnvSources::default();
        let cm_api: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(self.shared.client.clone(), &ns);
        for name in cms {
            if let Some(cm) = cm_api.get_opt(&name).await.map_err(|e| e.to_string())? {
                sources
                    .config_maps
                    .insert(name, cm.data.unwrap_or_default());
            }
        }
        let secret_api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.shared.client.clone(), &ns);
        for name in secrets {
            if let Some(s) = secret_api.get_opt(&name).await.map_err(|e| e.to_string())? {
                let data = s
                    .data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                    .collect();
                sources.secrets.insert(name, data);
            }
        }
        Ok(sources)
    }

    async fn start_if_due(&mut self, init: bool, index: usize) {
        let now = Instant::now();
        let c = self.ctr(init, index);
        if c.proc.is_some() || c.done || c.due.is_some_and(|d| d > now) {
            return;
        }
        let spec = c.spec.clone();
        let sources = match self.env_sources(&spec).await {
            Ok(s) => s,
            Err(e) => {
                self.ctr(init, index).wait("CreateContainerConfigError", e);
                self.retry = Some(now + SETUP_RETRY);
                return;
            }
        };
        let mounts = self.mounts(&spec);
        let base = self.base_env(&mounts);
        let sandbox = Sandbox {
            ip: self.ip.unwrap_or(Ipv4Addr::LOCALHOST),
            mounts,
        };
        let decided = {
            let mut net = self.shared.net.lock().expect("net lock");
            let mut resolver = Resolver {
                net: &mut net,
                services: &self.shared.services,
            };
            launch::launch(
                &self.pod,
                &spec,
                &self.shared.config.images,
                &self.fields(),
                &sources,
                &base,
                &sandbox,
                &mut resolver,
            )
        };
        let plan = match decided {
            Ok(plan) => plan,
            Err(e) => {
                let reason = match e {
                    LaunchError::UnknownImage(_) => "ErrImagePull",
                    LaunchError::Unresolved(_) => "ContainerCreating",
                    _ => "CreateContainerConfigError",
                };
                // An unresolved name is retried on the next pod or Service event.
                if !matches!(e, LaunchError::Unresolved(_)) {
                    self.retry = Some(now + SETUP_RETRY);
                }
                self.ctr(init, index).wait(reason, e.to_string());
                return;
            }
        };
        match self.spawn(init, index, &plan) {
            Ok(proc) => {
                let has_startup = spec.startup_probe.is_some();
                let has_readiness = spec.readiness_probe.is_some();
                let c = self.ctr(init, index);
                if c.ever_started {
                    c.view.restart_count = c.view.restart_count.saturating_add(1);
                }
                c.ever_started = true;
                c.due = None;
                c.view.state = RunState::Running {
                    started_at: proc.started_at,
                    container_id: proc.container_id.clone(),
                };
                c.view.started = !has_startup;
                c.view.ready = !init && !has_startup && !has_readiness;
                c.streak = probe::Streak::default();
                c.next_probe = None;
                c.proc = Some(proc);
            }
            Err(e) => {
                let c = self.ctr(init, index);
                c.due = Some(now + c.backoff);
                c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
                c.wait("RunContainerError", e);
            }
        }
    }

    fn spawn(&self, init: bool, index: usize, plan: &launch::Launch) -> Result<Proc, String> {
        let spec = if init {
            &self.init[index].spec
        } else {
            &self.main[index].spec
        };
        let log_path = self.dir.join("logs").join(format!("{}.log", spec.name));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(&plan.program);
        cmd.args(&plan.args)
            .env_clear()
            .envs(&plan.env)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", plan.program.display()))?;
        let pid = child.id().ok_or("the process ended at once")?;
        let exe = std::fs::canonicalize(&plan.program).unwrap_or_else(|_| plan.program.clone());
        let pid_file = self
            .shared
            .config
            .state_dir
            .join("pids")
            .join(format!("90-pod-{}-{}.pid", self.uid, spec.name));
        let _ = std::fs::write(&pid_file, format!("{pid} {}\n", exe.display()));
        tracing::info!(pod = %self.name, container = %spec.name, pid, "started");

        let (signal, mut signals) = mpsc::unbounded_channel::<i32>();
        let exits = self.exit_tx.clone();
        tokio::spawn(async move {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    sig = signals.recv() => match sig {
                        // The child is not reaped until `wait` returns, so its pid is ours.
                        Some(sig) => if let Some(pid) = child.id() { kill(pid, sig) },
                        None => break child.wait().await,
                    },
                }
            };
            use std::os::unix::process::ExitStatusExt;
            let (code, sig) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (Some(128), None),
            };
            let _ = exits.send(Exit {
                init,
                index,
                code,
                signal: sig,
                at: Timestamp::now(),
            });
        });
        Ok(Proc {
            signal,
            started_at: Timestamp::now(),
            started: Instant::now(),
            container_id: format!("process://{pid}"),
            pid_file,
        })
    }

    fn on_exit(&mut self, exit: Exit) {
        let policy = self.restart_policy();
        let terminating = self.terminating;
        let name = self.name.clone();
        let c = self.ctr(exit.init, exit.index);
        let Some(proc) = c.proc.take() else { return };
        let _ = std::fs::remove_file(&proc.pid_file);
        let t = Termination::new(
            exit.code,
            exit.signal,
            proc.started_at,
            exit.at,
            proc.container_id,
        );
        tracing::info!(pod = %name, container = %c.spec.name, code = t.exit_code, "exited");
        c.view.ready = false;
        let restart = !terminating
            && match (exit.init, policy.as_str()) {
                (_, "Never") => false,
                (true, _) | (false, "OnFailure") => t.exit_code != 0,
                _ => true,
            };
        if restart {
            if proc.started.elapsed() >= BACKOFF_RESET {
                c.backoff = BACKOFF_FIRST;
            }
            c.due = Some(Instant::now() + c.backoff);
            c.wait(
                "CrashLoopBackOff",
                format!(
                    "back-off {}s restarting failed container",
                    c.backoff.as_secs()
                ),
            );
            c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
            c.view.last = Some(t);
            return;
        }
        let ok = t.exit_code == 0;
        c.view.state = RunState::Terminated(t);
        c.done = true;
        if terminating {
            return;
        }
        if exit.init {
            if ok {
                self.next_init += 1;
            } else {
                self.finished = true;
            }
        } else if self.main.iter().all(|c| c.done) {
            self.finished = true;
        }
    }

    /// Runs the probes that are due: the startup probe until it passes, then the readiness
    /// probe.
    async fn probe(&mut self) {
        let Some(ip) = self.ip else { return };
        let now = Instant::now();
        let checks: Vec<(usize, bool, Probe, probe::Check)> = self
            .main
            .iter()
            .enumerate()
            .filter(|(_, c)| c.proc.is_some() && c.next_probe.is_none_or(|t| t <= now))
            .filter_map(|(i, c)| {
                let (startup, p) = if c.view.started {
                    (false, c.spec.readiness_probe.clone()?)
                } else {
                    (true, c.spec.startup_probe.clone()?)
                };
                let check = probe::check(&p, &c.spec, ip);
                Some((i, startup, p, check))
            })
            .collect();
        let results =
            futures::future::join_all(checks.iter().map(|(_, _, _, c)| probe::run(c))).await;
        let fast = self.shared.config.probe_interval;
        for ((i, startup, p, _), pass) in checks.into_iter().zip(results) {
            let c = &mut self.main[i];
            if c.proc.is_none() {
                continue;
            }
            if startup {
                if c.streak.record(pass, false, &p) {
                    // Readiness starts over from its own first result.
                    c.view.started = true;
                    c.view.ready = c.spec.readiness_probe.is_none();
                    c.streak = probe::Streak::default();
                }
                c.next_probe = Some(Instant::now() + probe::next_in(&p, false, fast));
            } else {
                c.view.ready = c.streak.record(pass, c.view.ready, &p);
                c.next_probe = Some(Instant::now() + probe::next_in(&p, c.view.ready, fast));
            }
        }
    }

    fn view(&self) -> PodView {
        PodView {
            ip: self.ip,
            host_ip: Ipv4Addr::LOCALHOST,
            start_time: self.start_time,
            init: self.init.iter().map(|c| c.view.clone()).collect(),
            initialized: self.next_init >= self.init.len(),
            containers: self.main.iter().map(|c| c.view.clone()).collect(),
            finished: self.finished,
        }
    }

    /// Writes the pod status when it changed.
    async fn report(&mut self) {
        let status = status::pod_status(&self.view(), self.reported.as_ref(), Timestamp::now());
        if self.reported.as_ref() == Some(&status) {
            return;
        }
        let patch = serde_json::json!({ "status": status });
        match self
            .pods
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.reported = Some(status),
            Err(e) => tracing::debug!(pod = %self.name, error = %e, "status not written"),
        }
    }

    /// Stops every process: SIGTERM, then SIGKILL once `grace` has passed.
    async fn terminate(&mut self, grace: Duration) {
        self.terminating = true;
        let first = if grace.is_zero() {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        let send = |ctrs: &[Ctr], sig: i32| {
            for c in ctrs.iter() {
                if let Some(p) = &c.proc {
                    let _ = p.signal.send(sig);
                }
            }
        };
        send(&self.init, first);
        send(&self.main, first);
        let deadline = Instant::now() + grace;
        let mut killed = grace.is_zero();
        while self.init.iter().chain(&self.main).any(|c| c.proc.is_some()) {
            tokio::select! {
                Some(exit) = self.exit_rx.recv() => self.on_exit(exit),
                _ = tokio::time::sleep_until(deadline), if !killed => {
                    killed = true;
                    send(&self.init, libc::SIGKILL);
                    send(&self.main, libc::SIGKILL);
                }
            }
        }
        for c in self.init.iter_mut().chain(self.main.iter_mut()) {
            c.done = true;
        }
    }

    /// Removes the pod's directory once the pod is gone, as the kubelet removes its volumes.
    fn remove_sandbox(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Deletes the pod for good, now that its processes are gone.
    async fn finalize(&self) {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(self.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        if let Err(e) = self.pods.delete(&self.name, &dp).await {
            tracing::debug!(pod = %self.name, error = %e, "final delete failed");
        }
    }
}

/// The log file of a container of a pod, in a state directory.
pub fn log_path(state_dir: &Path, uid: &str, container: &str) -> PathBuf {
    state_dir
        .join("pods")
        .join(uid)
        .join("logs")
        .join(format!("{container}.log"))
}
