//! `deepseek-operator autoscale-sim`: replays a metrics trace through [`decide`], the same code
//! the controller runs, so a policy can be tuned offline and the documented behaviour tested.
//!
//! A trace is JSON lines, one poll each:
//! `{"t": <seconds>, "groups": [{"ready": bool, "kv_cache_usage": float|null,
//! "requests_waiting": int|null, "requests_running": int|null}, ...]}`. The list holds the
//! groups that exist at that moment; `null` means no data. Optional per group:
//! `projected_kv_cache_usage` (float|null), `pending` and `loading` (bool, for a group that is
//! not ready: still being scheduled, or loading the model; a not-ready group without either
//! counts as loading), `draining` (bool), `index` (int, default: position in the list).
//! The count before the first line is the number of groups in it.
//! Output: one line per trace line, `{"t": <seconds>, "desired": <groups>, "reason": "<text>"}`.
//!
//! The deployment file may hold several YAML documents, as the HPA and KEDA examples do (a
//! `DeepSeekDeployment` beside the autoscaler object): [`deployment_from_manifest`] picks the
//! one `DeepSeekDeployment` out of them.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::decide::{GroupSignals, Phase, Policy, Window, decide};
use crate::api::{DeepSeekDeployment, DeepSeekDeploymentSpec, GROUP, VERSION};

/// Why a manifest file does not yield the one `DeepSeekDeployment` to simulate.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The text is not YAML (JSON is YAML too).
    #[error("is not valid YAML: {0}")]
    Yaml(String),
    /// No document of the file is a `DeepSeekDeployment`.
    #[error("holds no DeepSeekDeployment ({found})")]
    NoDeployment {
        /// What the file holds instead, document by document.
        found: String,
    },
    /// More than one document is a `DeepSeekDeployment`.
    #[error(
        "holds {count} DeepSeekDeployments ({found}); autoscale-sim replays one, so put it in a file of its own"
    )]
    SeveralDeployments {
        /// How many there are.
        count: usize,
        /// Which, by document.
        found: String,
    },
    /// The `DeepSeekDeployment` document does not match the API.
    #[error("document {document} ({what}): {message}")]
    Invalid {
        /// 1-based position of the document in the file.
        document: usize,
        /// Kind and name of the document.
        what: String,
        /// What is wrong with it.
        message: String,
    },
}

/// The one `DeepSeekDeployment` among the YAML documents of `text`. Other kinds (an HPA, a KEDA
/// ScaledObject, a Namespace) are skipped; none or several is an error that lists what the file
/// holds.
pub fn deployment_from_manifest(text: &str) -> Result<DeepSeekDeployment, ManifestError> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    // Empty documents (a leading or trailing `---`) are not documents a user wrote.
    let docs: Vec<(usize, serde_json::Value)> = docs
        .into_iter()
        .filter(|d| !d.is_null())
        .enumerate()
        .map(|(i, d)| (i + 1, d))
        .collect();
    let found = |docs: &[&(usize, serde_json::Value)]| {
        if docs.is_empty() {
            return "no documents".to_string();
        }
        docs.iter()
            .map(|(n, d)| format!("document {n}: {}", describe(d)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let deployments: Vec<&(usize, serde_json::Value)> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "DeepSeekDeployment")
        .collect();
    match deployments.as_slice() {
        [] => Err(ManifestError::NoDeployment {
            found: found(&docs.iter().collect::<Vec<_>>()),
        }),
        [(n, doc)] => {
            let invalid = |message: String| ManifestError::Invalid {
                document: *n,
                what: describe(doc),
                message,
            };
            let api_version = format!("{GROUP}/{VERSION}");
            if doc["apiVersion"] != api_version.as_str() {
                return Err(invalid(format!(
                    "apiVersion is {}, expected {api_version}",
                    doc["apiVersion"]
                )));
            }
            serde_json::from_value(doc.clone()).map_err(|e| invalid(e.to_string()))
        }
        several => Err(ManifestError::SeveralDeployments {
            count: several.len(),
            found: found(several),
        }),
    }
}

/// `Kind name` of a document, for error messages.
fn describe(doc: &serde_json::Value) -> String {
    let kind = doc["kind"].as_str().unwrap_or("an object without kind");
    match doc["metadata"]["name"].as_str() {
        Some(name) => format!("{kind} {name}"),
        None => kind.to_string(),
    }
}

/// One group in one trace line.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceGroup {
    /// Every pod of the group is ready.
    pub ready: bool,
    /// `vllm:kv_cache_usage_perc`.
    pub kv_cache_usage: Option<f64>,
    /// `vllm:num_requests_waiting`.
    pub requests_waiting: Option<i64>,
    /// `vllm:num_requests_running`.
    pub requests_running: Option<i64>,
    /// `deepseek_engine_kv_cache_projected_usage_perc`.
    #[serde(default)]
    pub projected_kv_cache_usage: Option<f64>,
    /// Not ready because pods are not scheduled or started yet.
    #[serde(default)]
    pub pending: bool,
    /// Not ready because the model is loading.
    #[serde(default)]
    pub loading: bool,
    /// Out of the Service, finishing its requests.
    #[serde(default)]
    pub draining: bool,
    /// Group index; default: position in the list.
    #[serde(default)]
    pub index: Option<i32>,
}

/// One trace line.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceLine {
    /// Seconds since the start of the trace.
    pub t: f64,
    /// The groups that exist at that moment.
    pub groups: Vec<TraceGroup>,
}

/// One output line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimLine {
    /// Seconds, as in the trace line.
    pub t: f64,
    /// Groups the autoscaler asks for after this poll.
    pub desired: i32,
    /// Why.
    pub reason: String,
}

impl TraceGroup {
    fn signals(&self, position: usize) -> GroupSignals {
        let phase = if self.draining {
            Phase::Draining
        } else if self.ready {
            Phase::Ready
        } else if self.pending {
            Phase::Pending
        } else {
            Phase::Loading
        };
        GroupSignals {
            index: self.index.unwrap_or(position as i32),
            phase,
            kv_cache_usage: self.kv_cache_usage,
            projected_kv_cache_usage: self.projected_kv_cache_usage,
            requests_waiting: self.requests_waiting.map(|v| v as f64),
            requests_running: self.requests_running.map(|v| v as f64),
            load_progress: None,
        }
    }
}

/// Fields every group of a trace line must carry (possibly as null).
const REQUIRED: [&str; 4] = [
    "ready",
    "kv_cache_usage",
    "requests_waiting",
    "requests_running",
];

/// Parses a trace; errors name the line.
pub fn parse_trace(text: &str) -> Result<Vec<TraceLine>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            let at = |e: String| format!("trace line {}: {e}", n + 1);
            let value: serde_json::Value =
                serde_json::from_str(l).map_err(|e| at(e.to_string()))?;
            // The four fields are required even when null: a missing one is a broken trace,
            // not "no data".
            for (i, g) in value["groups"].as_array().into_iter().flatten().enumerate() {
                for key in REQUIRED {
                    if g.get(key).is_none() {
                        return Err(at(format!("groups[{i}] lacks \"{key}\"")));
                    }
                }
            }
            let line: TraceLine = serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
            if !line.t.is_finite() || line.t < 0.0 {
                return Err(format!("trace line {}: t must be >= 0", n + 1));
            }
            Ok(line)
        })
        .collect()
}

/// Replays `trace` under the policy of `spec.autoscaling`. The count before the first line is
/// the number of groups (not draining) in it, or `spec.replicas` for an empty first line, as
/// found; the first decision applies the min and max clamps.
pub fn simulate(spec: &DeepSeekDeploymentSpec, trace: &[TraceLine]) -> Vec<SimLine> {
    let policy = Policy::from(&spec.autoscaling);
    let start = Timestamp::UNIX_EPOCH;
    let mut current = match trace.first() {
        Some(l) if !l.groups.is_empty() => l.groups.iter().filter(|g| !g.draining).count() as i32,
        _ => spec.replicas.max(0),
    };
    let mut window = Window::default();
    trace
        .iter()
        .map(|line| {
            let now = start + SignedDuration::from_secs_f64(line.t);
            let groups: Vec<GroupSignals> = line
                .groups
                .iter()
                .enumerate()
                .map(|(i, g)| g.signals(i))
                .collect();
            let d = decide(&policy, current, &groups, &mut window, now);
            current = d.desired;
            let reason = match &d.limited {
                Some(l) if !d.reason.contains(l.as_str()) => format!("{}; {l}", d.reason),
                _ => d.reason,
            };
            SimLine {
                t: line.t,
                desired: d.desired,
                reason,
            }
        })
        .collect()
}
