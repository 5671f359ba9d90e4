//! Unit tests of the decision and the drain choice. Whole-trace behaviour is tested through
//! `autoscale-sim` in `tests/autoscale_sim.rs`.

use std::collections::BTreeSet;

use jiff::{SignedDuration, Timestamp};

use super::decide::{GroupSignals, Phase, Policy, Window, averages, decide};
use super::drain::{Draining, pick_victim, plan_groups};
use super::sim;
use crate::api::AutoscalingSpec;

fn t(s: i64) -> Timestamp {
    Timestamp::UNIX_EPOCH + SignedDuration::from_secs(s)
}

fn policy() -> Policy {
    let a = AutoscalingSpec {
        enabled: true,
        max_replicas: 10,
        ..AutoscalingSpec::default()
    };
    Policy::from(&a)
}

fn ready(index: i32, kv: f64, waiting: f64, running: f64) -> GroupSignals {
    GroupSignals {
        index,
        phase: Phase::Ready,
        kv_cache_usage: Some(kv),
        projected_kv_cache_usage: None,
        requests_waiting: Some(waiting),
        requests_running: Some(running),
        load_progress: None,
    }
}

fn silent(index: i32) -> GroupSignals {
    GroupSignals {
        index,
        ..GroupSignals::default()
    }
}

#[test]
fn the_largest_ratio_wins_and_sets_the_count_hpa_style() {
    let mut w = Window::default();
    // KV 0.6/0.8 = 0.75, queue 9/4 = 2.25: ceil(2 x 2.25) = 5, capped at doubling.
    let d = decide(
        &policy(),
        2,
        &[ready(0, 0.6, 8.0, 10.0), ready(1, 0.6, 10.0, 10.0)],
        &mut w,
        t(0),
    );
    assert_eq!(d.desired, 4);
    assert!(d.reason.starts_with("queue depth 9.00"), "{}", d.reason);
    assert_eq!(
        d.limited.as_deref(),
        Some("scale-up step limited to 4 groups (wanted 5)")
    );
    let mut p = policy();
    p.max_scale_up_step = 1;
    let d = decide(
        &p,
        2,
        &[ready(0, 0.6, 8.0, 10.0), ready(1, 0.6, 10.0, 10.0)],
        &mut Window::default(),
        t(0),
    );
    assert_eq!(d.desired, 3, "maxScaleUpStep replaces doubling");
}

#[test]
fn ratios_within_the_tolerance_band_hold() {
    for kv in [0.73, 0.8, 0.87] {
        let d = decide(
            &policy(),
            3,
            &[ready(0, kv, 0.0, 1.0); 3],
            &mut Window::default(),
            t(0),
        );
        assert_eq!(d.desired, 3, "kv {kv}");
        assert!(d.reason.contains("within tolerance"), "{}", d.reason);
    }
}

#[test]
fn scale_down_waits_for_a_full_window_and_removes_one_group() {
    let p = policy();
    let mut w = Window::default();
    let idle = [ready(0, 0.05, 0.0, 0.0); 4];
    for s in (0..300).step_by(15) {
        assert_eq!(decide(&p, 4, &idle, &mut w, t(s)).desired, 4, "at {s}");
    }
    let d = decide(&p, 4, &idle, &mut w, t(300));
    assert_eq!(d.desired, 3, "{}", d.reason);
    // The next removal needs another full window.
    assert_eq!(decide(&p, 3, &idle[..3], &mut w, t(315)).desired, 3);
    assert_eq!(decide(&p, 3, &idle[..3], &mut w, t(600)).desired, 2);
}

#[test]
fn one_busy_sample_in_the_window_blocks_the_scale_down() {
    let p = policy();
    let mut w = Window::default();
    let idle = [ready(0, 0.05, 0.0, 0.0); 2];
    for s in (0..=540).step_by(15) {
        let groups = if s == 240 {
            [ready(0, 0.8, 0.0, 9.0); 2]
        } else {
            idle
        };
        let d = decide(&p, 2, &groups, &mut w, t(s));
        assert_eq!(d.desired, 2, "at {s}: {}", d.reason);
    }
    assert_eq!(decide(&p, 2, &idle, &mut w, t(555)).desired, 1);
}

#[test]
fn a_ready_group_without_metrics_never_allows_a_scale_down() {
    let p = policy();
    let mut w = Window::default();
    let groups = [
        ready(0, 0.05, 0.0, 0.0),
        ready(1, 0.05, 0.0, 0.0),
        silent(2),
    ];
    for s in (0..=900).step_by(15) {
        let d = decide(&p, 3, &groups, &mut w, t(s));
        assert_eq!(d.desired, 3);
    }
    // But the groups that do report can still ask for more.
    let hot = [
        ready(0, 0.99, 12.0, 9.0),
        ready(1, 0.99, 12.0, 9.0),
        silent(2),
    ];
    assert_eq!(decide(&p, 3, &hot, &mut w, t(915)).desired, 6);
}

#[test]
fn starting_or_missing_groups_count_as_incoming_capacity() {
    let p = policy();
    let mut loading = ready(1, 0.0, 0.0, 0.0);
    loading.phase = Phase::Loading;
    let d = decide(
        &p,
        2,
        &[ready(0, 0.99, 30.0, 9.0), loading],
        &mut Window::default(),
        t(0),
    );
    assert_eq!(d.desired, 2);
    assert!(
        d.limited
            .unwrap()
            .contains("waiting for 1 starting group(s)")
    );
    // Asked for 3, only 2 exist yet: the third is on its way.
    let d = decide(
        &p,
        3,
        &[ready(0, 0.99, 30.0, 9.0), ready(1, 0.99, 30.0, 9.0)],
        &mut Window::default(),
        t(0),
    );
    assert_eq!(d.desired, 3);
}

#[test]
fn no_scale_down_starts_while_a_group_drains() {
    let p = Policy {
        scale_down_window_s: 0,
        ..policy()
    };
    let mut draining = ready(2, 0.0, 0.0, 3.0);
    draining.phase = Phase::Draining;
    let d = decide(
        &p,
        2,
        &[ready(0, 0.05, 0.0, 0.0), ready(1, 0.05, 0.0, 0.0), draining],
        &mut Window::default(),
        t(0),
    );
    assert_eq!(d.desired, 2);
    assert!(d.limited.unwrap().contains("to drain"));
}

#[test]
fn edited_bounds_apply_at_once() {
    let p = Policy {
        min_replicas: 2,
        max_replicas: 3,
        ..policy()
    };
    let idle = [ready(0, 0.0, 0.0, 0.0)];
    assert_eq!(
        decide(&p, 1, &idle, &mut Window::default(), t(0)).desired,
        2
    );
    assert_eq!(
        decide(&p, 6, &idle, &mut Window::default(), t(0)).desired,
        3
    );
}

#[test]
fn averages_use_ready_groups_only() {
    let mut loading = ready(2, 1.0, 100.0, 0.0);
    loading.phase = Phase::Loading;
    let a = averages(&[ready(0, 0.2, 2.0, 5.0), ready(1, 0.4, 4.0, 7.0), loading]);
    assert_eq!(a.ready, 2);
    assert!((a.kv_cache_usage.unwrap() - 0.3).abs() < 1e-9);
    assert_eq!(a.requests_waiting, Some(3.0));
    assert_eq!(a.requests_running, Some(12.0));
}

#[test]
fn the_group_with_the_least_in_flight_work_drains_first() {
    let live = BTreeSet::from([0, 1, 2, 3]);
    let mut pending = silent(3);
    pending.phase = Phase::Pending;
    let signals = [
        ready(0, 0.5, 0.0, 4.0),
        ready(1, 0.5, 1.0, 1.0),
        silent(2),
        pending,
    ];
    assert_eq!(
        pick_victim(&live, &signals),
        Some(3),
        "a starting group has nothing to drain"
    );
    assert_eq!(
        pick_victim(&BTreeSet::from([0, 1, 2]), &signals),
        Some(1),
        "fewest running plus waiting"
    );
    assert_eq!(
        pick_victim(&BTreeSet::from([0, 2]), &signals),
        Some(0),
        "unknown load goes last"
    );
    let tie = [ready(0, 0.5, 0.0, 2.0), ready(1, 0.5, 0.0, 2.0)];
    assert_eq!(
        pick_victim(&BTreeSet::from([0, 1]), &tie),
        Some(1),
        "highest index breaks ties"
    );
}

#[test]
fn a_drain_leaves_the_service_first_and_ends_when_idle_or_timed_out() {
    let live = BTreeSet::from([0, 1]);
    let busy = [ready(0, 0.5, 0.0, 6.0), ready(1, 0.5, 0.0, 2.0)];
    let g = plan_groups(1, &live, None, &busy, 600, t(0));
    assert_eq!(g.started, Some(1));
    assert_eq!(
        g.draining,
        Some(Draining {
            group: 1,
            since: t(0)
        })
    );
    assert_eq!(g.indices, live, "kept while draining");

    let mut draining = ready(1, 0.5, 0.0, 2.0);
    draining.phase = Phase::Draining;
    let d = g.draining.clone();
    let g = plan_groups(1, &live, d.as_ref(), &[busy[0], draining], 600, t(60));
    assert_eq!((g.removed.clone(), g.started), (None, None));

    draining.requests_running = Some(0.0);
    let g2 = plan_groups(1, &live, d.as_ref(), &[busy[0], draining], 600, t(75));
    assert_eq!(g2.removed, Some((1, "no requests in flight".into())));
    assert_eq!(g2.indices, BTreeSet::from([0]));

    draining.requests_running = Some(5.0);
    let g3 = plan_groups(1, &live, d.as_ref(), &[busy[0], draining], 600, t(600));
    assert_eq!(g3.removed, Some((1, "drain timeout of 600s passed".into())));
}

#[test]
fn a_drain_is_called_off_when_the_group_is_wanted_again_and_new_groups_fill_free_indices() {
    let live = BTreeSet::from([0, 2]);
    let d = Draining {
        group: 2,
        since: t(0),
    };
    let g = plan_groups(2, &live, Some(&d), &[], 600, t(30));
    assert_eq!(g.cancelled, Some(2));
    assert_eq!(g.draining, None);
    let g = plan_groups(4, &live, None, &[], 600, t(30));
    assert_eq!(g.indices, BTreeSet::from([0, 1, 2, 3]));
}

#[test]
fn trace_groups_must_carry_the_four_fields_even_as_null() {
    let ok = r#"{"t": 0, "groups": [{"ready": true, "kv_cache_usage": null, "requests_waiting": null, "requests_running": null, "pending": false}]}"#;
    assert_eq!(sim::parse_trace(ok).unwrap().len(), 1);
    let missing =
        r#"{"t": 0, "groups": [{"ready": true, "kv_cache_usage": 0.1, "requests_waiting": 0}]}"#;
    let err = sim::parse_trace(missing).unwrap_err();
    assert!(err.contains("requests_running"), "{err}");
    let unknown = r#"{"t": 0, "groups": [{"ready": true, "kv_cache_usage": 0.1, "requests_waiting": 0, "requests_running": 0, "kv": 1}]}"#;
    assert!(sim::parse_trace(unknown).is_err());
}

const DSD: &str = "apiVersion: serving.deepseek.dev/v1alpha1
kind: DeepSeekDeployment
metadata:
  name: sim
spec:
  model:
    source: builtin://tiny
  replicas: 3
";

const HPA: &str = "apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: sim
spec:
  minReplicas: 1
  maxReplicas: 4
";

#[test]
fn the_deployment_is_picked_out_of_a_multi_document_manifest() {
    for text in [
        format!("{DSD}---\n{HPA}"),
        format!("# comment\n---\n{HPA}---\n{DSD}---\n"),
        DSD.to_string(),
    ] {
        let dsd = sim::deployment_from_manifest(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(dsd.metadata.name.as_deref(), Some("sim"));
        assert_eq!(dsd.spec.replicas, 3);
    }
    let json = r#"{"apiVersion": "serving.deepseek.dev/v1alpha1", "kind": "DeepSeekDeployment",
        "metadata": {"name": "j"}, "spec": {"model": {"source": "builtin://tiny"}}}"#;
    let dsd = sim::deployment_from_manifest(json).unwrap();
    assert_eq!(dsd.metadata.name.as_deref(), Some("j"));
}

#[test]
fn a_manifest_without_a_deployment_says_what_it_holds() {
    let keda = "apiVersion: keda.sh/v1alpha1\nkind: ScaledObject\nmetadata:\n  name: k\n";
    let err = sim::deployment_from_manifest(&format!("{HPA}---\n{keda}"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "holds no DeepSeekDeployment (document 1: HorizontalPodAutoscaler sim, document 2: ScaledObject k)"
    );
    let err = sim::deployment_from_manifest("# nothing here\n")
        .unwrap_err()
        .to_string();
    assert_eq!(err, "holds no DeepSeekDeployment (no documents)");
}

#[test]
fn a_manifest_with_several_deployments_is_refused_naming_them() {
    let other = DSD.replace("name: sim", "name: other");
    let err = sim::deployment_from_manifest(&format!("{DSD}---\n{HPA}---\n{other}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "holds 2 DeepSeekDeployments (document 1: DeepSeekDeployment sim, document 3: DeepSeekDeployment other)"
        ),
        "{err}"
    );
}

#[test]
fn a_broken_deployment_document_is_named_by_position() {
    let wrong_version = DSD.replace("v1alpha1", "v1beta1");
    let err = sim::deployment_from_manifest(&format!("{HPA}---\n{wrong_version}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("document 2 (DeepSeekDeployment sim): apiVersion is"),
        "{err}"
    );
    let no_model = "apiVersion: serving.deepseek.dev/v1alpha1\nkind: DeepSeekDeployment\nmetadata:\n  name: m\nspec:\n  replicas: 1\n";
    let err = sim::deployment_from_manifest(no_model)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("document 1 (DeepSeekDeployment m): missing field `model`"),
        "{err}"
    );
    let err = sim::deployment_from_manifest("a: [\n")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("is not valid YAML"), "{err}");
}
