//! The pod status the node agent reports, composed from what it saw of the pod's processes.
//! Pure: the clock is passed in.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// How one run of a container ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Termination {
    /// Exit code; 128 + the signal number when a signal ended it.
    pub exit_code: i32,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    /// `Completed` (exit code 0) or `Error`.
    pub reason: String,
    /// When that run started.
    pub started_at: Timestamp,
    /// When it ended.
    pub finished_at: Timestamp,
    /// The run's container ID.
    pub container_id: String,
}

impl Termination {
    /// The termination of a process that exited with `code` or was ended by `signal`.
    pub fn new(
        code: Option<i32>,
        signal: Option<i32>,
        started_at: Timestamp,
        finished_at: Timestamp,
        container_id: String,
    ) -> Self {
        let exit_code = code.unwrap_or_else(|| 128 + signal.unwrap_or(0));
        Self {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.into(),
            started_at,
            finished_at,
            container_id,
        }
    }
}

/// The state of a container now.
#[derive(Clone, Debug, PartialEq)]
pub enum RunState {
    /// Not running: not started yet, or waiting to be restarted.
    Waiting {
        /// Machine-readable reason (`ContainerCreating`, `CrashLoopBackOff`, ...).
        reason: String,
        /// Why, for people.
        message: Option<String>,
    },
    /// The process runs.
    Running {
        /// When it started.
        started_at: Timestamp,
        /// Its container ID.
        container_id: String,
    },
    /// The process ended and will not be restarted.
    Terminated(Termination),
}

/// What the agent knows of one container.
#[derive(Clone, Debug, PartialEq)]
pub struct ContainerView {
    /// Container name.
    pub name: String,
    /// Container image.
    pub image: String,
    /// State now.
    pub state: RunState,
    /// How the previous run ended.
    pub last: Option<Termination>,
    /// Times the container was restarted.
    pub restart_count: i32,
    /// Its readiness probe passes (or it has none and runs).
    pub ready: bool,
    /// Its startup probe passed (or it has none and runs).
    pub started: bool,
}

/// What the agent knows of one pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// The pod's IP, once its sandbox exists.
    pub ip: Option<Ipv4Addr>,
    /// The node's IP.
    pub host_ip: Ipv4Addr,
    /// When the agent accepted the pod.
    pub start_time: Timestamp,
    /// Init containers.
    pub init: Vec<ContainerView>,
    /// Every init container completed.
    pub initialized: bool,
    /// Main containers.
    pub containers: Vec<ContainerView>,
    /// No container will run again (restart policy `Never`, or `OnFailure` after success).
    pub finished: bool,
}

fn container_status(c: &ContainerView) -> ContainerStatus {
    let terminated = |t: &Termination| ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            started_at: Some(Time(t.started_at)),
            finished_at: Some(Time(t.finished_at)),
            container_id: Some(t.container_id.clone()),
            message: None,
        }),
        ..ContainerState::default()
    };
    let (state, container_id) = match &c.state {
        RunState::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..ContainerState::default()
            },
            c.last.as_ref().map(|t| t.container_id.clone()),
        ),
        RunState::Running {
            started_at,
            container_id,
        } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*started_at)),
                }),
                ..ContainerState::default()
            },
            Some(container_id.clone()),
        ),
        RunState::Terminated(t) => (terminated(t), Some(t.container_id.clone())),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: String::new(),
        container_id,
        ready: c.ready,
        started: Some(c.started),
        restart_count: c.restart_count,
        state: Some(state),
        last_state: Some(c.last.as_ref().map(terminated).unwrap_or_default()),
        ..ContainerStatus::default()
    }
}

/// The pod phase: `Pending` until a main container ran, `Succeeded`/`Failed` once none will
/// run again, `Running` otherwise.
pub fn phase(view: &PodView) -> &'static str {
    let ran = |c: &ContainerView| {
        !matches!(c.state, RunState::Waiting { .. }) || c.restart_count > 0 || c.last.is_some()
    };
    if view.finished {
        let ok = view
            .containers
            .iter()
            .chain(&view.init)
            .all(|c| match &c.state {
                RunState::Terminated(t) => t.exit_code == 0,
                _ => c.last.as_ref().is_none_or(|t| t.exit_code == 0),
            });
        return if ok { "Succeeded" } else { "Failed" };
    }
    if view.initialized && view.containers.iter().any(ran) {
        "Running"
    } else {
        "Pending"
    }
}

/// The whole `status` of the pod. Conditions keep their transition time from `previous` while
/// their status does not change.
pub fn pod_status(view: &PodView, previous: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let ready = !view.containers.is_empty() && view.containers.iter().all(|c| c.ready);
    let running = phase(view) == "Running";
    let cond = |type_: &str, status: bool| {
        let status = if status { "True" } else { "False" };
        let since = previous
            .and_then(|p| p.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            last_transition_time: Some(since),
            ..PodCondition::default()
        }
    };
    let ip = view.ip.map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase(view).into()),
        conditions: Some(vec![
            cond("PodScheduled", true),
            cond("PodReadyToStartContainers", view.ip.is_some()),
            cond("Initialized", view.initialized),
            cond("ContainersReady", ready && running),
            cond("Ready", ready && running),
        ]),
        host_ip: Some(view.host_ip.to_string()),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: Some(Time(view.start_time)),
        init_container_statuses: (!view.init.is_empty())
            .then(|| view.init.iter().map(container_status).collect()),
        container_statuses: Some(view.containers.iter().map(container_status).collect()),
        qos_class: None,
        ..PodStatus::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn container(state: RunState) -> ContainerView {
        ContainerView {
            name: "engine".into(),
            image: "img".into(),
            state,
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
        }
    }

    fn view(containers: Vec<ContainerView>) -> PodView {
        PodView {
            ip: Some(Ipv4Addr::new(127, 9, 0, 2)),
            host_ip: Ipv4Addr::LOCALHOST,
            start_time: t(0),
            init: vec![],
            initialized: true,
            containers,
            finished: false,
        }
    }

    fn waiting() -> RunState {
        RunState::Waiting {
            reason: "ContainerCreating".into(),
            message: None,
        }
    }

    fn running() -> RunState {
        RunState::Running {
            started_at: t(1),
            container_id: "process://7".into(),
        }
    }

    fn condition(s: &PodStatus, type_: &str) -> (String, Timestamp) {
        let c = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == type_)
            .unwrap();
        (c.status.clone(), c.last_transition_time.clone().unwrap().0)
    }

    #[test]
    fn a_pod_is_pending_until_a_container_runs_and_ready_once_all_are() {
        let mut v = view(vec![container(waiting())]);
        assert_eq!(phase(&v), "Pending");
        v.containers[0].state = running();
        assert_eq!(phase(&v), "Running");
        let s = pod_status(&v, None, t(2));
        assert_eq!(condition(&s, "Ready").0, "False");
        v.containers[0].ready = true;
        let s2 = pod_status(&v, Some(&s), t(3));
        assert_eq!(condition(&s2, "Ready"), ("True".into(), t(3)));
        // An unchanged condition keeps its transition time.
        assert_eq!(condition(&s2, "PodScheduled"), ("True".into(), t(2)));
        let cs = &s2.container_statuses.unwrap()[0];
        assert_eq!(cs.container_id.as_deref(), Some("process://7"));
        assert!(cs.state.as_ref().unwrap().running.is_some());
    }

    #[test]
    fn a_restarted_container_reports_its_count_and_last_termination_and_stays_running() {
        let mut c = container(RunState::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: Some("back-off 1s".into()),
        });
        c.last = Some(Termination::new(
            None,
            Some(9),
            t(1),
            t(5),
            "process://7".into(),
        ));
        // Waiting for its first restart, it has run: the pod stays Running.
        assert_eq!(phase(&view(vec![c.clone()])), "Running");
        c.restart_count = 1;
        let v = view(vec![c]);
        assert_eq!(phase(&v), "Running");
        let s = pod_status(&v, None, t(6));
        let cs = &s.container_statuses.unwrap()[0];
        assert_eq!(cs.restart_count, 1);
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!((last.exit_code, last.signal), (137, Some(9)));
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
    }

    #[test]
    fn a_finished_pod_succeeds_only_when_every_container_exited_zero() {
        let done = |code| {
            RunState::Terminated(Termination::new(
                Some(code),
                None,
                t(1),
                t(2),
                "process://1".into(),
            ))
        };
        let mut v = view(vec![container(done(0)), container(done(0))]);
        v.finished = true;
        assert_eq!(phase(&v), "Succeeded");
        v.containers[1].state = done(3);
        assert_eq!(phase(&v), "Failed");
        assert_eq!(condition(&pod_status(&v, None, t(3)), "Ready").0, "False");
    }

    #[test]
    fn a_pod_with_pending_init_containers_is_pending() {
        let mut v = view(vec![container(waiting())]);
        v.initialized = false;
        v.init = vec![container(running())];
        assert_eq!(phase(&v), "Pending");
        let s = pod_status(&v, None, t(1));
        assert_eq!(condition(&s, "Initialized").0, "False");
        assert_eq!(s.init_container_statuses.unwrap().len(), 1);
    }
}
