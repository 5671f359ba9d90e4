//! Scale-in with drain, and scale-out onto free indices. Pure; `now` is passed in.
//!
//! A group leaving is first taken out of the serving Service (its leader pod's
//! [`crate::render::SERVING_LABEL`] becomes `false`), then waits until it runs no request or the
//! drain timeout passes, and only then is deleted. The group with the least in-flight work goes
//! first: a group that is not ready has none, then the ready group with the fewest running plus
//! waiting requests; unknown load sorts last, the highest index breaks ties. New groups take the
//! lowest free indices.

use std::collections::BTreeSet;

use jiff::{SignedDuration, Timestamp};

use super::decide::{GroupSignals, Phase};

/// A drain in progress, as kept in the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draining {
    /// Group index.
    pub group: i32,
    /// When it left the Service.
    pub since: Timestamp,
}

/// What to do with the groups this reconcile.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct GroupSet {
    /// Groups that should exist (rendered and kept), including a draining one.
    pub indices: BTreeSet<i32>,
    /// The group now out of the Service, if any.
    pub draining: Option<Draining>,
    /// A group whose drain ended now and which is deleted, with why.
    pub removed: Option<(i32, String)>,
    /// A group that started draining now.
    pub started: Option<i32>,
    /// A drain that was called off because the group is wanted again.
    pub cancelled: Option<i32>,
}

fn in_flight(g: &GroupSignals) -> Option<f64> {
    if g.phase != Phase::Ready && g.phase != Phase::Draining {
        return Some(0.0);
    }
    Some(g.requests_running? + g.requests_waiting.unwrap_or(0.0))
}

/// The group to drain first among `live`.
pub fn pick_victim(live: &BTreeSet<i32>, signals: &[GroupSignals]) -> Option<i32> {
    let load = |i: i32| {
        signals
            .iter()
            .find(|g| g.index == i)
            .map_or(Some(0.0), in_flight)
    };
    live.iter().copied().min_by(|&a, &b| {
        let (la, lb) = (load(a), load(b));
        let key = |l: Option<f64>| l.unwrap_or(f64::INFINITY);
        key(la).total_cmp(&key(lb)).then(b.cmp(&a))
    })
}

/// Decides which groups exist given the desired count. `live` are the groups that exist now
/// (a StatefulSet is there); `signals` their latest readings (by index).
pub fn plan_groups(
    desired: i32,
    live: &BTreeSet<i32>,
    draining: Option<&Draining>,
    signals: &[GroupSignals],
    drain_timeout_s: i64,
    now: Timestamp,
) -> GroupSet {
    let desired = desired.max(0) as usize;
    let mut out = GroupSet {
        indices: live.clone(),
        ..GroupSet::default()
    };
    let draining = draining.filter(|d| live.contains(&d.group));
    if live.len() > desired {
        let d = match draining {
            Some(d) => d.clone(),
            None => {
                let Some(victim) = pick_victim(live, signals) else {
                    return out;
                };
                out.started = Some(victim);
                Draining {
                    group: victim,
                    since: now,
                }
            }
        };
        let sig = signals.iter().find(|g| g.index == d.group);
        let idle = sig.is_none_or(|g| {
            g.phase == Phase::Pending
                || g.phase == Phase::Loading
                || g.requests_running == Some(0.0) && g.requests_waiting.unwrap_or(0.0) == 0.0
        });
        let timed_out = now.duration_since(d.since) >= SignedDuration::from_secs(drain_timeout_s);
        if idle && out.started.is_some() && sig.is_some_and(|g| g.phase == Phase::Ready) {
            // Just left the Service: give the endpoints a poll to drop it before deleting,
            // even if it looks idle, since requests may still be on their way to it.
            out.draining = Some(d);
        } else if idle || timed_out {
            let why = if idle {
                "no requests in flight".to_string()
            } else {
                format!("drain timeout of {drain_timeout_s}s passed")
            };
            out.indices.remove(&d.group);
            out.removed = Some((d.group, why));
            out.started = None;
        } else {
            out.draining = Some(d);
        }
        return out;
    }
    if let Some(d) = draining {
        out.cancelled = Some(d.group);
    }
    let mut next = 0;
    while out.indices.len() < desired {
        while out.indices.contains(&next) {
            next += 1;
        }
        out.indices.insert(next);
    }
    out
}
