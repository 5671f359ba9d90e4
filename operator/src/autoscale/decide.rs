//! The scaling decision: a function of the policy, the groups' latest signals and the window of
//! earlier recommendations. No clock and no I/O; `now` is passed in.
//!
//! The shape is Kubernetes' HPA (ratio of the per-group average to its target, a tolerance band,
//! a stabilization window per direction) with the LLM-serving changes the other autoscalers
//! arrived at: several signals where the largest ratio wins, a group that is still starting
//! counts as capacity on its way (llm-d's "no cascading scale-up"), missing data never lowers the
//! count, and scale-in removes one group at a time because each one drains before it goes.

use std::collections::VecDeque;

use jiff::{SignedDuration, Timestamp};

use crate::api::AutoscalingSpec;

/// The autoscaling policy, read from `spec.autoscaling`.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Fewest groups.
    pub min_replicas: i32,
    /// Most groups.
    pub max_replicas: i32,
    /// Target of the mean `vllm:kv_cache_usage_perc` of the ready groups.
    pub target_kv: f64,
    /// Target of the mean `deepseek_engine_kv_cache_projected_usage_perc`.
    pub target_projected_kv: f64,
    /// Target of the mean `vllm:num_requests_waiting` per ready group.
    pub target_queue: f64,
    /// Ratios within `1 ± tolerance` change nothing.
    pub tolerance: f64,
    /// Most groups added in one step; 0 means "at most double, at least one".
    pub max_scale_up_step: i32,
    /// Seconds over which the lowest recommendation bounds a scale-up.
    pub scale_up_window_s: i64,
    /// Seconds during which every recommendation must be below the current count before a
    /// group is removed.
    pub scale_down_window_s: i64,
}

impl From<&AutoscalingSpec> for Policy {
    fn from(a: &AutoscalingSpec) -> Self {
        Self {
            min_replicas: a.min_replicas.max(0),
            max_replicas: a.max_replicas.max(a.min_replicas.max(0)),
            target_kv: a.target_kv_cache_utilization,
            target_projected_kv: a.target_projected_kv_cache_utilization,
            target_queue: f64::from(a.target_queue_depth.max(1)),
            tolerance: a.tolerance.max(0.0),
            max_scale_up_step: a.max_scale_up_step.max(0),
            scale_up_window_s: i64::from(a.scale_up_stabilization_seconds.max(0)),
            scale_down_window_s: i64::from(a.scale_down_stabilization_seconds.max(0)),
        }
    }
}

impl Policy {
    /// `n` clamped to `[minReplicas, maxReplicas]`.
    pub fn clamp(&self, n: i32) -> i32 {
        n.clamp(self.min_replicas, self.max_replicas)
    }
}

/// Where one group is in its life, as far as scaling is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Phase {
    /// Every pod is ready and the group is in the serving Service.
    #[default]
    Ready,
    /// Pods not scheduled or not started yet.
    Pending,
    /// Pods running, model still loading.
    Loading,
    /// Out of the serving Service, finishing its requests before it is deleted.
    Draining,
}

/// The latest readings of one group's leader. `None` means no data (scrape failed, timed out,
/// the metric is missing, or the sample is stale).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GroupSignals {
    /// Group index (for messages and drain choice).
    pub index: i32,
    /// Where the group is.
    pub phase: Phase,
    /// `vllm:kv_cache_usage_perc`, 0..1.
    pub kv_cache_usage: Option<f64>,
    /// `deepseek_engine_kv_cache_projected_usage_perc`, may exceed 1.
    pub projected_kv_cache_usage: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub requests_waiting: Option<f64>,
    /// `vllm:num_requests_running`.
    pub requests_running: Option<f64>,
    /// `deepseek_engine_model_load_progress`, 0..1.
    pub load_progress: Option<f64>,
}

impl GroupSignals {
    fn has_load_data(&self) -> bool {
        self.kv_cache_usage.is_some()
            || self.projected_kv_cache_usage.is_some()
            || self.requests_waiting.is_some()
    }
}

/// Means over the ready groups that reported each signal.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Averages {
    /// Mean KV-cache use.
    pub kv_cache_usage: Option<f64>,
    /// Mean projected KV-cache use.
    pub projected_kv_cache_usage: Option<f64>,
    /// Mean waiting requests per group.
    pub requests_waiting: Option<f64>,
    /// Running requests summed over the ready groups that reported it.
    pub requests_running: Option<f64>,
    /// Ready groups (in the Service).
    pub ready: i32,
    /// Ready groups that reported at least one load signal.
    pub reporting: i32,
}

/// Computes the means of the ready groups' signals.
pub fn averages(groups: &[GroupSignals]) -> Averages {
    let ready: Vec<&GroupSignals> = groups.iter().filter(|g| g.phase == Phase::Ready).collect();
    let mean = |f: fn(&GroupSignals) -> Option<f64>| {
        let v: Vec<f64> = ready
            .iter()
            .filter_map(|g| f(g))
            .filter(|x| x.is_finite())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let running: Vec<f64> = ready.iter().filter_map(|g| g.requests_running).collect();
    Averages {
        kv_cache_usage: mean(|g| g.kv_cache_usage),
        projected_kv_cache_usage: mean(|g| g.projected_kv_cache_usage),
        requests_waiting: mean(|g| g.requests_waiting),
        requests_running: (!running.is_empty()).then(|| running.iter().sum()),
        ready: ready.len() as i32,
        reporting: ready.iter().filter(|g| g.has_load_data()).count() as i32,
    }
}

/// The outcome of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Number of groups to run from now on.
    pub desired: i32,
    /// Why, in one line.
    pub reason: String,
    /// Set when the autoscaler wanted a different count than it chose (bound by a clamp, the
    /// step limit, groups still starting, a drain or missing data), saying why.
    pub limited: Option<String>,
    /// The means the decision was made on.
    pub averages: Averages,
}

/// Recommendations of the last stabilization window. Kept by the caller between steps.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Window {
    /// (time, recommended groups), oldest first.
    pub entries: VecDeque<(Timestamp, i32)>,
}

impl Window {
    fn push(&mut self, now: Timestamp, rec: i32, keep_s: i64) {
        self.entries.push_back((now, rec));
        let horizon = now - SignedDuration::from_secs(keep_s);
        // Keep one entry at or before the horizon: it proves the window has been covered.
        while self.entries.len() > 1 && self.entries[1].0 <= horizon {
            self.entries.pop_front();
        }
    }

    fn since(&self, now: Timestamp, secs: i64) -> impl Iterator<Item = i32> + '_ {
        let horizon = now - SignedDuration::from_secs(secs);
        self.entries
            .iter()
            .filter(move |(t, _)| *t >= horizon)
            .map(|(_, r)| *r)
    }

    fn covers(&self, now: Timestamp, secs: i64) -> bool {
        self.entries
            .front()
            .is_some_and(|(t, _)| *t <= now - SignedDuration::from_secs(secs))
    }

    /// Seconds since the first recommendation of the current run of recommendations below
    /// `current`, if the newest one is below it.
    fn below_for(&self, now: Timestamp, current: i32) -> i64 {
        let mut start = None;
        for (t, r) in self.entries.iter().rev() {
            if *r < current {
                start = Some(*t);
            } else {
                break;
            }
        }
        start.map_or(0, |t| now.duration_since(t).as_secs())
    }
}

fn fmt_ratio(name: &str, value: f64, target: f64) -> (f64, String) {
    let ratio = value / target;
    (
        ratio,
        format!("{name} {value:.2} vs target {target:.2} (ratio {ratio:.2})"),
    )
}

/// Groups needed for `ratio` over `base` groups, HPA-style: ⌈base × ratio⌉.
fn needed(base: i32, ratio: f64) -> i32 {
    // A small slack keeps 2 × 1.5 from becoming 4 through rounding.
    (f64::from(base) * ratio - 1e-9).ceil().max(0.0) as i32
}

/// One autoscaling step. `current` is the count decided last time (groups asked for, whether
/// they exist yet or not); `groups` are the groups that exist now with their signals; `window`
/// holds earlier recommendations and is updated.
pub fn decide(
    policy: &Policy,
    current: i32,
    groups: &[GroupSignals],
    window: &mut Window,
    now: Timestamp,
) -> Decision {
    let avg = averages(groups);
    // An edited min or max applies before anything else.
    if current < policy.min_replicas {
        let desired = policy.min_replicas;
        return Decision {
            desired,
            reason: format!("below minReplicas: scale up {current} -> {desired} groups"),
            limited: None,
            averages: avg,
        };
    }
    if current > policy.max_replicas {
        // The drain still removes the surplus groups one at a time.
        let desired = policy.max_replicas;
        return Decision {
            desired,
            reason: format!("above maxReplicas: scale down {current} -> {desired} groups"),
            limited: None,
            averages: avg,
        };
    }
    let keep = policy.scale_down_window_s.max(policy.scale_up_window_s);
    let draining: Vec<i32> = groups
        .iter()
        .filter(|g| g.phase == Phase::Draining)
        .map(|g| g.index)
        .collect();
    let serving_or_coming = groups.len() as i32 - draining.len() as i32;
    // Capacity on its way: groups starting, plus groups asked for that do not exist yet.
    let starting = groups
        .iter()
        .filter(|g| matches!(g.phase, Phase::Pending | Phase::Loading))
        .count() as i32;
    let incoming = starting + (current - serving_or_coming).max(0);
    let missing = avg.ready - avg.reporting;

    // 1. The raw recommendation: the largest ratio wins.
    let mut ratios = Vec::new();
    if let Some(v) = avg.kv_cache_usage {
        ratios.push(fmt_ratio("kv-cache usage", v, policy.target_kv));
    }
    if let Some(v) = avg.projected_kv_cache_usage {
        ratios.push(fmt_ratio(
            "projected kv-cache usage",
            v,
            policy.target_projected_kv,
        ));
    }
    if let Some(v) = avg.requests_waiting {
        ratios.push(fmt_ratio("queue depth", v, policy.target_queue));
    }
    let top = ratios
        .into_iter()
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .filter(|_| avg.reporting > 0);

    let clamped = |n: i32| policy.clamp(n);
    let Some((ratio, signal)) = top else {
        // No data: record "keep what we have" so a later scale-down still needs a full window.
        let hold = clamped(current);
        window.push(now, hold, keep);
        let why = if avg.ready == 0 && current > 0 {
            "no ready group to read metrics from"
        } else if current == 0 {
            "no groups running"
        } else {
            "no metrics from the ready groups"
        };
        return Decision {
            desired: hold,
            reason: format!("{why}: holding {hold} groups"),
            limited: (current > 0).then(|| format!("{why}; holding")),
            averages: avg,
        };
    };

    let within = (ratio - 1.0).abs() <= policy.tolerance;
    let raw = if within {
        current
    } else {
        needed(avg.ready, ratio)
    };
    // A ready group without data could be the busy one: it never lets the count go down.
    let raw = if missing > 0 { raw.max(current) } else { raw };
    let rec = clamped(raw);
    window.push(now, rec, keep);

    // 2. Scale up at once, bounded by the up window, the step limit and incoming capacity.
    if rec > current {
        let up = window
            .since(now, policy.scale_up_window_s)
            .min()
            .unwrap_or(rec);
        if up <= current {
            return Decision {
                desired: clamped(current),
                reason: format!(
                    "{signal}: wants {rec} groups, holding {current} until the scale-up window of {}s agrees",
                    policy.scale_up_window_s
                ),
                limited: Some(format!(
                    "scale-up stabilization: the lowest recommendation in the last {}s is {up}",
                    policy.scale_up_window_s
                )),
                averages: avg,
            };
        }
        if incoming > 0 {
            return Decision {
                desired: current,
                reason: format!(
                    "{signal}: wants {up} groups, holding {current} while {incoming} group(s) start"
                ),
                limited: Some(format!(
                    "waiting for {incoming} starting group(s) to become ready before adding more (wanted {up})"
                )),
                averages: avg,
            };
        }
        let limit = if policy.max_scale_up_step > 0 {
            current + policy.max_scale_up_step
        } else {
            (current * 2).max(current + 1)
        };
        let desired = up.min(limit);
        let limited = if desired < up {
            Some(format!(
                "scale-up step limited to {desired} groups (wanted {up})"
            ))
        } else if raw > policy.max_replicas {
            Some(format!(
                "at maxReplicas {} (wanted {raw})",
                policy.max_replicas
            ))
        } else {
            None
        };
        return Decision {
            desired,
            reason: format!("{signal}: scale up {current} -> {desired} groups"),
            limited,
            averages: avg,
        };
    }

    // 3. Scale down one group at a time, only when the whole window agrees.
    if rec < current {
        if !draining.is_empty() {
            return Decision {
                desired: current,
                reason: format!(
                    "{signal}: wants {rec} groups, holding {current} while group(s) {draining:?} drain"
                ),
                limited: Some(format!(
                    "waiting for group(s) {draining:?} to drain before removing another"
                )),
                averages: avg,
            };
        }
        let all_below = window
            .since(now, policy.scale_down_window_s)
            .all(|r| r < current);
        if !(all_below && window.covers(now, policy.scale_down_window_s)) {
            let below = window.below_for(now, current);
            return Decision {
                desired: current,
                reason: format!(
                    "{signal}: wants {rec} groups, holding {current} ({below}s of the {}s scale-down window agree)",
                    policy.scale_down_window_s
                ),
                limited: None,
                averages: avg,
            };
        }
        let down = window
            .since(now, policy.scale_down_window_s)
            .max()
            .unwrap_or(rec);
        let desired = down.max(current - 1);
        // The next group may only go after another full window: the one just removed is
        // still draining, and the load it carried moves onto the others.
        window.entries.clear();
        window.entries.push_back((now, rec));
        return Decision {
            desired,
            reason: format!("{signal}: scale down {current} -> {desired} groups"),
            limited: None,
            averages: avg,
        };
    }

    // 4. Hold.
    let reason = if within {
        format!("{signal}: within tolerance, holding {current} groups")
    } else if missing > 0 && raw == current {
        format!(
            "{signal}: holding {current} groups, {missing} ready group(s) without metrics never allow a scale-down"
        )
    } else {
        format!("{signal}: holding {current} groups")
    };
    let limited = if raw > policy.max_replicas && current == policy.max_replicas {
        Some(format!(
            "at maxReplicas {} (wanted {raw})",
            policy.max_replicas
        ))
    } else if raw < policy.min_replicas && current == policy.min_replicas {
        Some(format!(
            "at minReplicas {} (wanted {raw})",
            policy.min_replicas
        ))
    } else if missing > 0 && !within {
        Some(format!(
            "{missing} ready group(s) report no metrics; not scaling down"
        ))
    } else {
        None
    };
    Decision {
        desired: current,
        reason,
        limited,
        averages: avg,
    }
}
