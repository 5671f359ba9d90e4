//! `deepseek-operator run | crd`: the operator process and the CRD printer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use deepseek_operator::controller::{self, Context, leader};
use deepseek_operator::metrics::{self, Health, Metrics};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "deepseek-operator",
    version,
    about = "Runs DeepSeek models on Kubernetes as expert-parallel engine groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run(RunArgs),
    /// Print the DeepSeekDeployment CustomResourceDefinition as YAML.
    Crd,
    /// Replay a metrics trace through the autoscaler's decision and print one JSON line per
    /// trace line: {"t": seconds, "desired": groups, "reason": text}.
    AutoscaleSim(SimArgs),
}

#[derive(clap::Args)]
struct SimArgs {
    /// A DeepSeekDeployment manifest (YAML or JSON); its spec.autoscaling is the policy and
    /// spec.replicas the starting group count. The file may hold other documents too (an HPA
    /// or a KEDA ScaledObject); exactly one of them must be a DeepSeekDeployment.
    #[arg(long)]
    deployment: std::path::PathBuf,
    /// The trace: JSON lines {"t": seconds, "groups": [{"ready": bool, "kv_cache_usage":
    /// float|null, "requests_waiting": int|null, "requests_running": int|null}, ...]}.
    #[arg(long)]
    trace: std::path::PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Elect one active replica through a Lease, so several can run.
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, else `default`).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, default_value = "deepseek-operator-leader")]
    lease_name: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", deepseek_operator::crd::crd_yaml()?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::AutoscaleSim(args) => autoscale_sim(&args),
    }
}

fn autoscale_sim(args: &SimArgs) -> anyhow::Result<()> {
    use deepseek_operator::api::validate;
    use deepseek_operator::autoscale::sim;
    use std::io::Write;

    let text = std::fs::read_to_string(&args.deployment)
        .with_context(|| format!("reading {}", args.deployment.display()))?;
    let dsd = sim::deployment_from_manifest(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.deployment.display()))?;
    if let Err(v) = validate::validate(&dsd.metadata.name.clone().unwrap_or_default(), &dsd.spec) {
        bail!("{}: {}", args.deployment.display(), validate::summarize(&v));
    }
    let trace = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    let lines =
        sim::parse_trace(&trace).map_err(|e| anyhow::anyhow!("{}: {e}", args.trace.display()))?;
    let mut out = std::io::stdout().lock();
    for line in sim::simulate(&dsd.spec, &lines) {
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    }
    Ok(())
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration found (in-cluster or KUBECONFIG)")?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    // One shutdown signal fans out to the HTTP server, the election and the controller.
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            info!("shutdown requested");
            let _ = stop_tx.send(true);
        });
    }
    let health = Health {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(metrics::serve(
        args.metrics_addr,
        health,
        wait_stop(stop_rx.clone()),
    ));

    if let Err(hint) = controller::check_crd(&client).await {
        eprintln!("{hint}");
        bail!("startup check failed");
    }
    ready.store(true, Ordering::Relaxed);

    let identity = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| format!("deepseek-operator-{}", std::process::id()));
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Some(identity.clone()),
    ));

    let mut lost = None;
    if args.leader_election {
        let cfg = leader::LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let leases: Api<Lease> = Api::namespaced(client.clone(), &cfg.namespace);
        info!(lease = %cfg.name, namespace = %cfg.namespace, identity = %cfg.identity, "waiting for leadership");
        tokio::select! {
            r = leader::acquire(&leases, &cfg) => r?,
            _ = wait_stop(stop_rx.clone()) => { let _ = server.await; return Ok(()); }
        }
        info!("became leader");
        metrics.leader.set(1);
        let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
        let hold_api = leases.clone();
        let hold_cfg = cfg.clone();
        let stop_on_loss = stop_tx.clone();
        tokio::spawn(async move {
            let e = leader::hold(&hold_api, &hold_cfg).await;
            error!(error = %e, "leadership lost; stopping");
            let _ = lost_tx.send(e.to_string());
            let _ = stop_on_loss.send(true);
        });
        lost = Some((leases, cfg, lost_rx));
    }

    controller::run(ctx, args.namespace.as_deref(), wait_stop(stop_rx.clone())).await;
    info!("controller stopped");
    metrics.leader.set(0);
    let _ = stop_tx.send(true);
    let _ = server.await;

    if let Some((leases, cfg, mut lost_rx)) = lost {
        if let Ok(reason) = lost_rx.try_recv() {
            bail!("leadership lost: {reason}");
        }
        if let Err(e) = leader::release(&leases, &cfg).await {
            error!(error = %e, "could not release the lease");
        }
    }
    Ok(())
}
