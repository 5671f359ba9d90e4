//! Spec changes and operator handovers: a rolling update within `rollout.maxUnavailable`, two
//! operators electing a leader through a Lease, and an operator restarted mid-rollout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use deepseek_e2e::FIELD_MANAGER;
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use crate::support::{
    LEASE, LONG, OPERATOR_NS, Shared, available_with, pod_ready, tiny_example, wait_dsd, wait_list,
    within,
};

const NAME: &str = "tiny";
const REVISION: &str = "serving.deepseek.dev/revision";
const GROUP: &str = "serving.deepseek.dev/group";

/// The tiny example with `replicas` groups and `max_num_seqs`, applied in `ns`.
async fn apply(
    env: &Shared,
    ns: &str,
    replicas: i32,
    max_num_seqs: i32,
) -> Api<DeepSeekDeployment> {
    let mut dsd = tiny_example(ns);
    dsd.spec.replicas = replicas;
    dsd.spec.engine.max_num_seqs = max_num_seqs;
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), ns);
    dsds.patch(
        NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&dsd),
    )
    .await
    .expect("the deployment applies");
    dsds
}

/// Per group: its live pods' uids and revisions, and whether the group serves (every pod
/// present, ready and not being deleted).
#[derive(Debug, Default, Clone)]
struct GroupView {
    pods: BTreeMap<String, Option<String>>,
    serving: bool,
}

fn groups(pods: &[Pod], per_group: usize) -> BTreeMap<String, GroupView> {
    let mut out: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in pods {
        if let Some(g) = p.labels().get(GROUP) {
            out.entry(g.clone()).or_default().push(p);
        }
    }
    out.into_iter()
        .map(|(g, ps)| {
            let live: Vec<&&Pod> = ps
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let view = GroupView {
                pods: live
                    .iter()
                    .map(|p| {
                        (
                            p.uid().unwrap_or_default(),
                            p.labels().get(REVISION).cloned(),
                        )
                    })
                    .collect(),
                serving: live.len() == per_group
                    && ps.len() == per_group
                    && live.iter().all(|p| pod_ready(p)),
            };
            (g, view)
        })
        .collect()
}

fn updated(view: &GroupView, revision: &str) -> bool {
    view.serving && view.pods.values().all(|r| r.as_deref() == Some(revision))
}

/// The revision the operator computed for the spec now, once it has seen it.
async fn revision(dsds: &Api<DeepSeekDeployment>, old: Option<&str>) -> String {
    let old = old.map(str::to_string);
    let d = wait_dsd(dsds, NAME, "the new revision is observed", move |d| {
        let s = d.status.as_ref();
        s.is_some_and(|s| s.observed_generation == d.metadata.generation)
            && s.and_then(|s| s.update_revision.clone()) != old
    })
    .await
    .expect("revision");
    d.status
        .and_then(|s| s.update_revision)
        .expect("updateRevision")
}

pub async fn a_spec_change_rolls_the_groups_one_at_a_time(env: Shared) {
    let ns = "e2e-rollout";
    env.operator().await.expect("the operator runs");
    env.namespace(ns).await.expect("namespace");
    let dsds = apply(&env, ns, 2, 8).await;
    wait_dsd(&dsds, NAME, "two groups Available", available_with(2))
        .await
        .expect("Available");
    let old = revision(&dsds, None).await;

    // Watch from before the change, so every state of the rollout is seen.
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), ns);
    let watch = tokio::spawn({
        let pods = pods.clone();
        async move {
            let mut worst = 0usize;
            let mut history: Vec<String> = Vec::new();
            let mut new_rev: Option<String> = None;
            let done = wait_list(
                pods,
                "app.kubernetes.io/instance=tiny",
                LONG * 2,
                "the rollout ends",
                |ps: &[Pod]| {
                    let gs = groups(ps, 2);
                    let down = 2 - gs.values().filter(|g| g.serving).count().min(2);
                    worst = worst.max(down);
                    history.push(format!("{down} down: {gs:?}"));
                    let revs: BTreeSet<_> = gs
                        .values()
                        .flat_map(|g| g.pods.values().cloned())
                        .flatten()
                        .collect();
                    if let Some(r) = revs.iter().find(|r| **r != old) {
                        new_rev = Some(r.clone());
                    }
                    let all_new = new_rev
                        .as_ref()
                        .is_some_and(|r| gs.len() == 2 && gs.values().all(|g| updated(g, r)));
                    all_new.then_some(())
                },
            )
            .await;
            (done, worst, history)
        }
    });
    apply(&env, ns, 2, 4).await;
    let (done, worst, history) = watch.await.expect("watch task");
    done.expect("both groups run the new template");
    assert!(
        worst <= 1,
        "{worst} groups were down at once; maxUnavailable is 1:\n{}",
        history.join("\n")
    );
    wait_dsd(&dsds, NAME, "Available after the rollout", |d| {
        available_with(2)(d) && d.status.as_ref().is_some_and(|s| s.updated_replicas == 2)
    })
    .await
    .expect("Available");
    env.drop_namespace(ns).await;
}

pub async fn an_operator_restarted_mid_rollout_keeps_the_groups_it_already_rolled(env: Shared) {
    let ns = "e2e-restart";
    env.operator().await.expect("the operator runs");
    env.namespace(ns).await.expect("namespace");
    let dsds = apply(&env, ns, 2, 8).await;
    wait_dsd(&dsds, NAME, "two groups Available", available_with(2))
        .await
        .expect("Available");
    let old = revision(&dsds, None).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), ns);
    let selector = "app.kubernetes.io/instance=tiny";
    apply(&env, ns, 2, 4).await;

    // The rollout has begun once a group is down; the other cannot roll before that one serves
    // again, so restarting the operator now restarts it mid-rollout.
    let first = wait_list(
        pods.clone(),
        selector,
        LONG,
        "the rollout begins",
        |ps: &[Pod]| {
            let gs = groups(ps, 2);
            let rolling = gs
                .iter()
                .find(|(_, g)| !g.serving)
                .map(|(i, _)| i.clone())?;
            let others_old = gs.iter().filter(|(i, _)| **i != rolling).all(|(_, g)| {
                g.serving && g.pods.values().all(|r| r.as_deref() == Some(old.as_str()))
            });
            Some((rolling, others_old))
        },
    )
    .await
    .expect("a group goes down");
    assert!(first.1, "the other group had rolled already");
    let identity = env.restart_operator().await.expect("operator restarted");
    env.operator().await.expect("the new operator leads");
    let new = revision(&dsds, Some(&old)).await;

    // The group that had rolled keeps its pods to the end.
    let mut rolled: Option<Vec<String>> = None;
    let mut replaced = false;
    wait_list(
        pods,
        selector,
        LONG * 2,
        "the rollout ends",
        |ps: &[Pod]| {
            let gs = groups(ps, 2);
            let g = gs.get(&first.0)?;
            let uids: Vec<String> = g.pods.keys().cloned().collect();
            match &rolled {
                None if updated(g, &new) => rolled = Some(uids),
                Some(seen) if *seen != uids => replaced = true,
                _ => {}
            }
            (gs.len() == 2 && gs.values().all(|g| updated(g, &new))).then_some(())
        },
    )
    .await
    .expect("both groups rolled");
    assert!(
        !replaced,
        "group {} was recreated after it had rolled, by {identity}",
        first.0
    );
    wait_dsd(
        &dsds,
        NAME,
        "Available after the rollout",
        available_with(2),
    )
    .await
    .expect("Available");
    env.drop_namespace(ns).await;
}

pub async fn a_second_operator_takes_over_within_the_lease_duration(env: Shared) {
    let ns = "e2e-election";
    env.operator().await.expect("the operator runs");
    let leader = env.leader_identity().await.expect("a leader");
    let standby = format!("{leader}-standby");
    env.start_operator(&standby)
        .await
        .expect("a second operator");
    env.namespace(ns).await.expect("namespace");
    let dsds = apply(&env, ns, 1, 8).await;
    wait_dsd(&dsds, NAME, "Available", available_with(1))
        .await
        .expect("Available");
    // Only the leader writes: every Event so far is the leader's.
    let events: Api<Event> = Api::namespaced(env.admin.clone(), ns);
    let instances = |es: &[Event]| -> BTreeSet<String> {
        es.iter()
            .filter_map(|e| e.reporting_instance.clone())
            .collect()
    };
    let before = events
        .list(&Default::default())
        .await
        .expect("events")
        .items;
    let seen = instances(&before);
    assert!(
        !seen.is_empty() && seen.iter().all(|i| *i == leader),
        "Events from {seen:?}; only {leader} leads"
    );

    // The leader dies without releasing the lease.
    let killed = Instant::now();
    env.stop_operator(&leader, libc::SIGKILL).await;
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), OPERATOR_NS);
    let want = standby.clone();
    within(
        LONG,
        "the standby takes the lease",
        await_condition(leases, LEASE, move |l: Option<&Lease>| {
            l.and_then(|l| l.spec.as_ref())
                .and_then(|s| s.holder_identity.as_deref())
                == Some(want.as_str())
        }),
    )
    .await
    .expect("takeover");
    let took = killed.elapsed();
    // The lease lasts 15 s and a candidate retries every 5 s; a loaded machine gets slack.
    assert!(took < Duration::from_secs(45), "took over after {took:?}");

    // The new leader carries on: one more group, nothing duplicated.
    dsds.patch_scale(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .expect("scale up");
    wait_dsd(&dsds, NAME, "two groups Available", available_with(2))
        .await
        .expect("two groups");
    let stss: Api<StatefulSet> = Api::namespaced(env.admin.clone(), ns);
    let names: BTreeSet<String> = stss
        .list(&Default::default())
        .await
        .expect("sts")
        .items
        .iter()
        .map(|s| s.name_any())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["tiny-g0".to_string(), "tiny-g1".to_string()])
    );
    let after: Vec<Event> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| !before.iter().any(|b| b.uid() == e.uid()))
        .collect();
    let seen = instances(&after);
    assert!(
        !seen.is_empty() && seen.iter().all(|i| *i == standby),
        "Events after the takeover from {seen:?}"
    );
    env.drop_namespace(ns).await;
}
