//! The autoscaler's place in a reconcile: read the leaders' signals once per poll interval,
//! run the pure [`decide`] and [`plan_groups`], and turn the results into the group set, the
//! status block and Events. The recommendation window lives in memory: after an operator
//! restart a scale-down waits one full window again, which only errs on the safe side.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Context;
use super::observed::Observed;
use crate::api::{AutoscalingStatus, DeepSeekDeployment, DrainingGroup, ScaleEvent};
use crate::autoscale::decide::{Decision, GroupSignals, Phase, Policy, Window, decide};
use crate::autoscale::drain::{Draining, GroupSet, plan_groups};
use crate::autoscale::scrape::{Request, Target};
use crate::render;

/// Scale events kept in `status.autoscaling.history`.
const HISTORY: usize = 10;

/// Per-deployment autoscaler memory.
#[derive(Clone, Debug, Default)]
pub struct AutoscalerState {
    window: Window,
    last_poll: Option<Timestamp>,
    signals: Vec<GroupSignals>,
    decision: Option<Decision>,
}

/// What the autoscaler decided for this reconcile.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Groups that should exist.
    pub indices: BTreeSet<i32>,
    /// Groups asked for.
    pub desired: i32,
    /// The group out of the Service.
    pub draining: Option<i32>,
    /// `status.autoscaling`.
    pub status: AutoscalingStatus,
    /// Why the count is not what the autoscaler wanted.
    pub limited: Option<String>,
    /// Leader load progress by group.
    pub load: BTreeMap<i32, f64>,
    /// (reason, note) of the Events to publish.
    pub events: Vec<(&'static str, String)>,
    /// The change of the group count decided in this step, if any.
    pub scaled: Option<ScaleEvent>,
    /// When to look again.
    pub requeue: Duration,
}

fn round3(v: Option<f64>) -> Option<f64> {
    v.map(|x| (x * 1000.0).round() / 1000.0)
}

/// One autoscaler step for `dsd`.
pub async fn step(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    ns: &str,
    name: &str,
    observed: &Observed,
    pods_per_group: i32,
    now: Timestamp,
) -> Outcome {
    let a = &dsd.spec.autoscaling;
    let policy = Policy::from(a);
    let previous = dsd.status.as_ref().and_then(|s| s.autoscaling.clone());
    let current = match &previous {
        Some(_) => dsd.status.as_ref().map_or(0, |s| s.desired_replicas),
        None => policy.clamp(dsd.spec.replicas),
    };
    let draining = previous_drain(dsd);
    let live = observed.live_indices();
    let key = format!("{ns}/{name}");
    let mut state = ctx
        .autoscalers
        .lock()
        .expect("autoscaler lock")
        .get(&key)
        .cloned()
        .unwrap_or_default();
    let poll = poll_interval(dsd);
    let due = state
        .last_poll
        .is_none_or(|t| now.duration_since(t) >= SignedDuration::from_secs(poll.as_secs() as i64));

    let mut status = previous.clone().unwrap_or_default();
    let mut events = Vec::new();
    let mut desired = current;
    let mut scaled = None;
    if due {
        let signals = read_signals(
            ctx,
            dsd,
            ns,
            name,
            observed,
            &live,
            draining.as_ref(),
            pods_per_group,
        )
        .await;
        let d = decide(&policy, current, &signals, &mut state.window, now);
        desired = d.desired;
        if desired != current {
            let ev = ScaleEvent {
                from: current,
                to: desired,
                reason: d.reason.clone(),
                time: Time(now),
            };
            events.push((
                "Scaled",
                format!("{current} -> {desired} groups: {}", d.reason),
            ));
            status.history.push(ev.clone());
            let over = status.history.len().saturating_sub(HISTORY);
            status.history.drain(..over);
            status.last_scale = Some(ev.clone());
            scaled = Some(ev);
        }
        status.last_poll_time = Some(Time(now));
        status.kv_cache_usage = round3(d.averages.kv_cache_usage);
        status.projected_kv_cache_usage = round3(d.averages.projected_kv_cache_usage);
        status.requests_waiting_per_group = round3(d.averages.requests_waiting);
        status.requests_running = round3(d.averages.requests_running);
        status.ready_groups = d.averages.ready;
        status.reporting_groups = d.averages.reporting;
        status.reason = Some(d.reason.clone());
        state.last_poll = Some(now);
        state.signals = signals;
        state.decision = Some(d);
    }

    let set = plan_groups(
        desired,
        &live,
        draining.as_ref(),
        &state.signals,
        i64::from(a.drain_timeout_seconds.max(0)),
        now,
    );
    events.extend(drain_events(&set));
    status.draining = draining_status(&set);
    let load = state
        .signals
        .iter()
        .filter_map(|s| Some((s.index, s.load_progress?)))
        .collect();
    let limited = state.decision.as_ref().and_then(|d| d.limited.clone());
    ctx.autoscalers
        .lock()
        .expect("autoscaler lock")
        .insert(key, state);
    Outcome {
        requeue: requeue_after(poll, &set),
        draining: set.draining.as_ref().map(|d| d.group),
        indices: set.indices,
        desired,
        status,
        limited,
        load,
        events,
        scaled,
    }
}

/// The drain in progress recorded in the status, if any.
fn previous_drain(dsd: &DeepSeekDeployment) -> Option<Draining> {
    dsd.status
        .as_ref()
        .and_then(|s| s.autoscaling.as_ref())
        .and_then(|a| a.draining.as_ref())
        .map(|d| Draining {
            group: d.index,
            since: d.since.0,
        })
}

fn poll_interval(dsd: &DeepSeekDeployment) -> Duration {
    Duration::from_secs(dsd.spec.autoscaling.poll_interval_seconds.max(1) as u64)
}

/// `status.autoscaling.draining` for a drain step.
fn draining_status(set: &GroupSet) -> Option<DrainingGroup> {
    set.draining.as_ref().map(|d| DrainingGroup {
        index: d.group,
        since: Time(d.since),
    })
}

/// A drain is checked again soon; otherwise at the next poll.
fn requeue_after(poll: Duration, set: &GroupSet) -> Duration {
    if set.draining.is_some() {
        poll.min(Duration::from_secs(5))
    } else {
        poll
    }
}

/// The Events of a drain step.
fn drain_events(set: &GroupSet) -> Vec<(&'static str, String)> {
    let mut events = Vec::new();
    if let Some(g) = set.started {
        events.push((
            "GroupDraining",
            format!("group {g} left the serving Service; deleting it once its requests finish"),
        ));
    }
    if let Some((g, why)) = &set.removed {
        events.push(("GroupDrained", format!("deleting group {g}: {why}")));
    }
    if let Some(g) = set.cancelled {
        events.push((
            "GroupDrainCancelled",
            format!("group {g} is wanted again and is back in the serving Service"),
        ));
    }
    events
}

/// The group set of a deployment whose count is set from outside (`spec.replicas`, by a user,
/// an HPA or KEDA through the scale subresource), or `None` when it is simply
/// `0..spec.replicas` with nothing to drain. A scale-in drains like the built-in autoscaler's:
/// the group with the least in-flight work leaves the serving Service and is deleted once idle
/// or after `spec.autoscaling.drainTimeoutSeconds`, one group at a time; the leaders are read
/// only while a group has to go.
pub async fn external_scale(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    ns: &str,
    name: &str,
    observed: &Observed,
    pods_per_group: i32,
    now: Timestamp,
) -> Option<Outcome> {
    let want = dsd.spec.replicas.max(0);
    let live = observed.live_indices();
    let draining = previous_drain(dsd);
    let plain: BTreeSet<i32> = (0..want).collect();
    if draining.is_none() && live.is_subset(&plain) {
        return None;
    }
    let shrinking = live.len() > want as usize || draining.is_some();
    let signals = if shrinking {
        read_signals(
            ctx,
            dsd,
            ns,
            name,
            observed,
            &live,
            draining.as_ref(),
            pods_per_group,
        )
        .await
    } else {
        Vec::new()
    };
    let a = &dsd.spec.autoscaling;
    let set = plan_groups(
        want,
        &live,
        draining.as_ref(),
        &signals,
        i64::from(a.drain_timeout_seconds.max(0)),
        now,
    );
    let status = AutoscalingStatus {
        draining: draining_status(&set),
        ..AutoscalingStatus::default()
    };
    Some(Outcome {
        events: drain_events(&set),
        desired: want,
        draining: set.draining.as_ref().map(|d| d.group),
        requeue: requeue_after(poll_interval(dsd), &set),
        indices: set.indices,
        status,
        limited: None,
        load: BTreeMap::new(),
        scaled: None,
    })
}

/// Reads the group leaders' signals (one request per poll) for the groups in `live`.
#[allow(clippy::too_many_arguments)]
async fn read_signals(
    ctx: &Context,
    dsd: &DeepSeekDeployment,
    ns: &str,
    name: &str,
    observed: &Observed,
    live: &BTreeSet<i32>,
    draining: Option<&Draining>,
    pods_per_group: i32,
) -> Vec<GroupSignals> {
    let a = &dsd.spec.autoscaling;
    let targets: Vec<Target> = live
        .iter()
        .filter_map(|i| observed.group(*i))
        .filter_map(|g| {
            let leader = g.leader()?;
            Some(Target {
                group: g.index,
                pod: leader.name.clone(),
                ip: leader.ip.clone(),
            })
        })
        .collect();
    let req = Request {
        namespace: ns.to_string(),
        name: name.to_string(),
        prometheus: a.prometheus.clone(),
        timeout: Duration::from_secs(a.metrics_timeout_seconds.max(1) as u64),
        targets,
    };
    let readings = ctx.reader.read(&req).await;
    live.iter()
        .map(|&i| {
            let g = observed.group(i);
            let r = readings.get(&i).cloned().unwrap_or_default();
            let phase = if draining.as_ref().is_some_and(|d| d.group == i) {
                Phase::Draining
            } else if g.is_some_and(|g| g.is_ready(pods_per_group) && !g.terminating()) {
                Phase::Ready
            } else if g.is_none_or(|g| g.live_count() == 0 || g.any_pending()) {
                Phase::Pending
            } else {
                Phase::Loading
            };
            GroupSignals {
                index: i,
                phase,
                kv_cache_usage: r.kv_cache_usage,
                projected_kv_cache_usage: r.projected_kv_cache_usage,
                requests_waiting: r.requests_waiting,
                requests_running: r.requests_running,
                load_progress: r.load_progress,
            }
        })
        .collect()
}

/// Leader pods whose serving label must change: (pod, value).
pub fn serving_label_changes(observed: &Observed, draining: Option<i32>) -> Vec<(String, String)> {
    observed
        .groups
        .values()
        .filter_map(|g| {
            let leader = g.leader()?;
            let want = if draining == Some(g.index) {
                "false"
            } else {
                "true"
            };
            (leader.serving.as_deref() != Some(want))
                .then(|| (leader.name.clone(), want.to_string()))
        })
        .collect()
}

/// Label key written by [`serving_label_changes`].
pub const LABEL: &str = render::SERVING_LABEL;
