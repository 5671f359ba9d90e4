//! `deepseek-node-agent`: the e2e suite's kubelet double as a process of its own, for running
//! pods by hand against the control plane of e2e/controlplane/up.sh:
//!
//! ```sh
//! eval "$(e2e/controlplane/up.sh)"; export KUBECONFIG
//! cargo run -p deepseek-e2e --bin deepseek-node-agent -- \
//!   --image ghcr.io/deepseek-serving/deepseek-engine=target/debug/deepseek-engine
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use deepseek_e2e::controlplane::{api_server, client_for};
use deepseek_e2e::node::launch::ImageBinary;
use deepseek_e2e::node::{Config, NodeAgent};

#[derive(Parser)]
#[command(
    name = "deepseek-node-agent",
    about = "Runs the pods bound to one Node as local processes"
)]
struct Cli {
    /// The kubeconfig to use.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Name of the Node to register.
    #[arg(long, default_value = "node-agent")]
    node_name: String,
    /// `REPOSITORY=BINARY`: the binary that stands for an image (any tag). Repeatable.
    #[arg(long = "image", value_name = "REPOSITORY=BINARY", required = true)]
    images: Vec<String>,
    /// Where pod sandboxes and pid files go (default: the kubeconfig's directory, which is
    /// up.sh's state directory, so down.sh also stops the pods' processes).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Milliseconds between startup and readiness probes.
    #[arg(long, default_value_t = 500)]
    probe_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let mut images = Vec::new();
    for spec in &cli.images {
        let Some((repository, binary)) = spec.split_once('=') else {
            bail!("--image {spec:?}: expected REPOSITORY=BINARY");
        };
        let binary = std::fs::canonicalize(binary).with_context(|| format!("--image {spec:?}"))?;
        images.push(ImageBinary {
            repository: repository.into(),
            binary,
            default_args: Vec::new(),
        });
    }
    let state_dir = match cli.state_dir {
        Some(d) => d,
        None => cli
            .kubeconfig
            .parent()
            .context("the kubeconfig has no directory")?
            .to_path_buf(),
    };
    let client = client_for(&cli.kubeconfig)
        .await
        .map_err(anyhow::Error::msg)?;
    let config = Config {
        node_name: cli.node_name,
        images,
        state_dir,
        api_server: api_server(&cli.kubeconfig).map_err(anyhow::Error::msg)?,
        probe_interval: Duration::from_millis(cli.probe_interval_ms),
    };
    let agent = NodeAgent::start(client, config).await?;
    tokio::signal::ctrl_c().await?;
    agent.stop().await?;
    Ok(())
}
