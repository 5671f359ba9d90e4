//! The operator against a real Kubernetes control plane: etcd, kube-apiserver and
//! kube-controller-manager built from Go modules (e2e/controlplane/), started once for this
//! test binary, with the node agent of `deepseek_e2e::node` in place of the kubelet. The
//! operator runs as its own process, authenticated as its service account and bound to the
//! ClusterRole of deploy/base/rbac.yaml.
//!
//! This binary has its own runner (the control plane is started once and stopped at the end,
//! which libtest cannot do): tests run one after another, each in its own namespace, with a
//! bound on each. Arguments that are not flags filter tests by substring, and `--skip` leaves
//! tests out, as with libtest (`--exact` makes both whole names);
//! `--list` lists them. Without Go (and no cached binaries) it prints why it skipped.

mod crd;
mod helm;
mod inference_pool;
mod rbac;
mod rollout;
mod serving;
mod support;

use std::future::Future;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::Env;

type TestFn = fn(Arc<Env>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! tests {
    ($($module:ident :: $name:ident),* $(,)?) => {
        vec![$((
            concat!(stringify!($module), "::", stringify!($name)),
            (|env| Box::pin($module::$name(env))) as TestFn,
        )),*]
    };
}

/// Bound on one test, control-plane work included; only hit when something hangs.
const TEST_TIMEOUT: Duration = Duration::from_secs(900);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let all = tests![
        crd::the_crd_installs_by_server_side_apply_and_is_established,
        crd::bad_deployments_are_refused_with_the_messages_the_docs_promise,
        rbac::the_operator_runs_as_its_service_account_and_is_denied_outside_its_role,
        serving::the_tiny_example_serves_chat_through_the_leader_pod,
        serving::the_bundled_trained_model_answers_in_english_through_the_leader_pod,
        serving::a_killed_rank_gets_its_group_recreated_whole,
        serving::the_scale_subresource_adds_groups_and_drains_before_removing,
        serving::deleting_the_deployment_garbage_collects_what_it_owned,
        rollout::a_spec_change_rolls_the_groups_one_at_a_time,
        rollout::an_operator_restarted_mid_rollout_keeps_the_groups_it_already_rolled,
        rollout::a_second_operator_takes_over_within_the_lease_duration,
        inference_pool::the_inference_pool_waits_for_its_crd_selects_the_serving_pods_and_goes_with_the_field,
        // Last: it takes the CRD over from the suite and stops the suite's operators.
        helm::the_chart_installs_serves_upgrades_and_uninstalls_keeping_the_crd,
    ];
    if args.iter().any(|a| a == "--list") {
        for (name, _) in &all {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    // `cargo test -- --ignored` asks for ignored tests; there are none here.
    if args.iter().any(|a| a == "--ignored") {
        return ExitCode::SUCCESS;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let Selection { filters, skips } = selection(&args);
    let matches = |name: &str, pattern: &str| {
        if exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    let selected: Vec<(&str, TestFn)> = all
        .into_iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| matches(name, f)))
        .filter(|(name, _)| !skips.iter().any(|s| matches(name, s)))
        .collect();
    if selected.is_empty() {
        return ExitCode::SUCCESS;
    }
    if let Some(reason) = deepseek_e2e::controlplane::unavailable() {
        println!("skipped {} control-plane tests: {reason}", selected.len());
        return ExitCode::SUCCESS;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(selected))
}

/// The name filters and `--skip` patterns among libtest's arguments.
struct Selection {
    filters: Vec<String>,
    skips: Vec<String>,
}

/// libtest's options that take a value as the next argument; the value is not a filter.
const VALUED: [&str; 5] = ["--test-threads", "--format", "--color", "--logfile", "-Z"];

fn selection(args: &[String]) -> Selection {
    let mut out = Selection {
        filters: Vec::new(),
        skips: Vec::new(),
    };
    let mut args = args.iter();
    while let Some(a) = args.next() {
        if a == "--skip" {
            out.skips.extend(args.next().cloned());
        } else if let Some(pattern) = a.strip_prefix("--skip=") {
            out.skips.push(pattern.to_string());
        } else if VALUED.contains(&a.as_str()) {
            args.next();
        } else if !a.starts_with('-') {
            out.filters.push(a.clone());
        }
    }
    out
}

async fn run(selected: Vec<(&'static str, TestFn)>) -> ExitCode {
    println!(
        "\nrunning {} tests against a local control plane",
        selected.len()
    );
    let started = Instant::now();
    let env = match Env::start().await {
        Ok(env) => Arc::new(env),
        Err(e) => {
            eprintln!("the control plane did not start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = Vec::new();
    for (name, test) in selected.iter().copied() {
        let t0 = Instant::now();
        let mut handle = tokio::spawn(test(env.clone()));
        let verdict = tokio::select! {
            outcome = &mut handle => if outcome.is_ok() { "ok" } else { "FAILED" },
            _ = tokio::time::sleep(TEST_TIMEOUT) => {
                handle.abort();
                let _ = handle.await;
                "FAILED (timed out)"
            }
        };
        println!(
            "test {name} ... {verdict} ({:.1}s)",
            t0.elapsed().as_secs_f64()
        );
        if verdict != "ok" {
            failed.push(name);
            env.dump_logs();
        }
    }
    let passed = selected.len() - failed.len();
    let env = Arc::into_inner(env).expect("no test holds the environment");
    let stopped = env.stop(!failed.is_empty()).await;
    if let Err(e) = &stopped {
        eprintln!("stopping the control plane: {e}");
    }
    println!(
        "\ntest result: {}. {passed} passed; {} failed; finished in {:.1}s",
        if failed.is_empty() { "ok" } else { "FAILED" },
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() && stopped.is_ok() {
        ExitCode::SUCCESS
    } else {
        for name in failed {
            println!("    {name}");
        }
        ExitCode::FAILURE
    }
}
