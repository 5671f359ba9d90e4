//! `deepseek-operator autoscale-sim` on the committed traces in `tests/traces/`: each trace
//! reproduces one documented behaviour of the autoscaler.

use std::path::PathBuf;
use std::process::Command;

use deepseek_operator::api::DeepSeekDeploymentSpec;
use deepseek_operator::autoscale::sim::{self, SimLine};

fn traces() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/traces")
}

/// Runs the binary and parses its JSON lines.
fn run(deployment: &str, trace: &str) -> Vec<SimLine> {
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-operator"))
        .arg("autoscale-sim")
        .arg("--deployment")
        .arg(traces().join(deployment))
        .arg("--trace")
        .arg(traces().join(trace))
        .output()
        .expect("run the binary");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<SimLine> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let input = std::fs::read_to_string(traces().join(trace)).unwrap();
    assert_eq!(
        lines.len(),
        input.lines().count(),
        "one output line per trace line"
    );
    lines
}

fn desired(lines: &[SimLine]) -> Vec<i32> {
    lines.iter().map(|l| l.desired).collect()
}

/// (t, from, to) of every change.
fn changes(lines: &[SimLine]) -> Vec<(f64, i32, i32)> {
    lines
        .windows(2)
        .filter(|w| w[0].desired != w[1].desired)
        .map(|w| (w[1].t, w[0].desired, w[1].desired))
        .collect()
}

fn at(lines: &[SimLine], t: f64) -> &SimLine {
    lines.iter().find(|l| l.t == t).expect("line at t")
}

#[test]
fn a_burst_doubles_at_once_then_waits_for_the_new_groups_before_doubling_again() {
    let l = run("deployment.yaml", "burst.jsonl");
    assert_eq!(desired(&l), [1, 1, 1, 1, 2, 2, 2, 4, 4, 4, 4, 4, 4, 4]);
    assert!(
        at(&l, 60.0).reason.contains("queue depth 20.00"),
        "{}",
        at(&l, 60.0).reason
    );
    assert!(
        at(&l, 60.0)
            .reason
            .contains("limited to 2 groups (wanted 5)")
    );
    assert!(
        at(&l, 75.0).reason.contains("1 group(s) start"),
        "{}",
        at(&l, 75.0).reason
    );
}

#[test]
fn a_slow_ramp_adds_one_group_when_kv_use_leaves_the_tolerance_band() {
    let l = run("deployment.yaml", "slow_ramp.jsonl");
    assert_eq!(changes(&l), [(435.0, 2, 3)]);
    assert!(
        at(&l, 435.0).reason.starts_with("kv-cache usage 0.89"),
        "{}",
        at(&l, 435.0).reason
    );
}

#[test]
fn an_oscillating_load_does_not_flap() {
    let l = run("deployment.yaml", "oscillating.jsonl");
    assert!(changes(&l).is_empty(), "{:?}", changes(&l));
    assert!(
        l.iter()
            .any(|x| x.reason.contains("wants 2 groups, holding 3"))
    );
    assert!(l.iter().any(|x| x.reason.contains("within tolerance")));
}

#[test]
fn groups_stuck_pending_do_not_cascade_into_more_scale_ups() {
    let l = run("deployment.yaml", "stuck_pending.jsonl");
    assert!(changes(&l).is_empty(), "{:?}", changes(&l));
    assert!(desired(&l).iter().all(|&d| d == 4), "{:?}", desired(&l));
    let last = l.last().unwrap();
    assert!(
        last.reason.contains("waiting for 2 starting group(s)"),
        "{}",
        last.reason
    );
}

#[test]
fn a_metrics_outage_holds_and_the_scale_down_waits_a_full_window_after_it() {
    let l = run("deployment.yaml", "metrics_outage.jsonl");
    // Idle data 0..135 s, no data 150..735 s, one silent group 750..1185 s, all report from
    // 1200 s: the first removal is a full 300 s window later, the next one another window on.
    assert_eq!(changes(&l), [(1500.0, 3, 2)]);
    assert!(
        at(&l, 300.0)
            .reason
            .starts_with("no metrics from the ready groups")
    );
    assert!(
        at(&l, 900.0)
            .reason
            .contains("without metrics never allow a scale-down"),
        "{}",
        at(&l, 900.0).reason
    );
}

#[test]
fn min_and_max_clamp_the_count() {
    let l = run("clamps-deployment.yaml", "clamps.jsonl");
    assert_eq!(changes(&l), [(30.0, 2, 3), (330.0, 3, 2)]);
    assert_eq!(l[0].desired, 2, "below minReplicas goes up at once");
    assert!(
        at(&l, 45.0).reason.contains("at maxReplicas 3"),
        "{}",
        at(&l, 45.0).reason
    );
    assert!(l.last().unwrap().reason.contains("at minReplicas 2"));
}

#[test]
fn projected_kv_use_catches_long_generations_before_plain_kv_use_does() {
    let l = run("deployment.yaml", "projected_kv.jsonl");
    assert_eq!(changes(&l)[0], (120.0, 2, 3));
    assert!(at(&l, 120.0).reason.starts_with("projected kv-cache usage"));

    // The same trace without the projected signal scales much later, on plain KV use.
    let text = std::fs::read_to_string(traces().join("projected_kv.jsonl")).unwrap();
    let plain = text.replace("\"projected_kv_cache_usage\"", "\"_p\"");
    let plain: String = plain
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for g in v["groups"].as_array_mut().unwrap() {
                g.as_object_mut().unwrap().remove("_p");
            }
            v.to_string() + "\n"
        })
        .collect();
    let yaml = std::fs::read_to_string(traces().join("deployment.yaml")).unwrap();
    let v: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
    let spec: DeepSeekDeploymentSpec = serde_json::from_value(v["spec"].clone()).unwrap();
    let l = sim::simulate(&spec, &sim::parse_trace(&plain).unwrap());
    let first = l.iter().find(|x| x.desired > 2).map(|x| x.t);
    assert!(
        first.is_none_or(|t| t > 300.0),
        "plain KV scaled at {first:?}"
    );
}

#[test]
fn a_bad_trace_line_is_an_error_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("dsd-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("bad.jsonl");
    std::fs::write(
        &trace,
        "{\"t\": 0, \"groups\": []}\n{\"t\": 15, \"groups\": [{\"ready\": true}]}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-operator"))
        .args(["autoscale-sim", "--deployment"])
        .arg(traces().join("deployment.yaml"))
        .arg("--trace")
        .arg(&trace)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("trace line 2"), "{err}");
}

/// The example files with an HPA or a KEDA ScaledObject next to the deployment, as the docs
/// suggest trying them.
#[test]
fn the_multi_document_examples_replay() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for file in ["hpa-prometheus-adapter.yaml", "keda-scaledobject.yaml"] {
        let out = Command::new(env!("CARGO_BIN_EXE_deepseek-operator"))
            .args(["autoscale-sim", "--deployment"])
            .arg(examples.join(file))
            .arg("--trace")
            .arg(traces().join("burst.jsonl"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = String::from_utf8(out.stdout).unwrap();
        let input = std::fs::read_to_string(traces().join("burst.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), input.lines().count(), "{file}");
    }
}

#[test]
fn a_deployment_file_without_a_deployment_is_an_error_naming_the_file_and_its_contents() {
    let dir = std::env::temp_dir().join(format!("dsd-sim-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hpa.yaml");
    std::fs::write(
        &file,
        "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: h\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deepseek-operator"))
        .args(["autoscale-sim", "--deployment"])
        .arg(&file)
        .arg("--trace")
        .arg(traces().join("burst.jsonl"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}: holds no DeepSeekDeployment (document 1: HorizontalPodAutoscaler h)",
            file.display()
        )),
        "{err}"
    );
}
