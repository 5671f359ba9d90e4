//! The loopback control plane of `e2e/controlplane/` (etcd, kube-apiserver and
//! kube-controller-manager, built from Go modules) as a test binary uses it: started once with
//! up.sh, stopped with down.sh. up.sh is told this process's pid, so the control plane is
//! stopped even if the test binary is killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::repo_root;

/// The directory of the control-plane scripts.
pub fn scripts_dir() -> PathBuf {
    repo_root().join("e2e").join("controlplane")
}

/// Why the control plane cannot be started here, if it cannot: Go is missing and no built
/// binaries are cached.
pub fn unavailable() -> Option<String> {
    let go = Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if go {
        return None;
    }
    let cached = Command::new(scripts_dir().join("build.sh"))
        .arg("--check")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!cached).then(|| {
        "Go is not installed, and no control-plane binaries are cached; install Go 1.26 to \
         build kube-apiserver, kube-controller-manager and etcd (e2e/controlplane/build.sh)"
            .to_string()
    })
}

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    stopped: bool,
}

impl ControlPlane {
    /// Builds the binaries if needed and starts the control plane (up.sh). Its output (build
    /// progress) goes to this process's stderr.
    pub fn up() -> Result<Self, String> {
        let out = Command::new(scripts_dir().join("up.sh"))
            .env(
                "DEEPSEEK_CONTROLPLANE_OWNER_PID",
                std::process::id().to_string(),
            )
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("running up.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!("up.sh failed ({}): {stdout}", out.status));
        }
        let kubeconfig = stdout
            .lines()
            .find_map(|l| l.strip_prefix("KUBECONFIG="))
            .map(PathBuf::from)
            .ok_or_else(|| format!("up.sh printed no KUBECONFIG line: {stdout}"))?;
        let state_dir = kubeconfig
            .parent()
            .ok_or("the kubeconfig has no directory")?
            .to_path_buf();
        Ok(ControlPlane {
            state_dir,
            kubeconfig,
            stopped: false,
        })
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The state directory (certificates, logs, pid files).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// A client with the admin identity.
    pub async fn admin(&self) -> Result<Client, String> {
        client_for(&self.kubeconfig).await
    }

    /// Stops everything up.sh started and the processes recorded since (down.sh). With
    /// `keep`, the state directory (logs) stays.
    pub fn down(mut self, keep: bool) -> Result<(), String> {
        self.stopped = true;
        run_down(&self.state_dir, keep)
    }
}

fn run_down(state_dir: &Path, keep: bool) -> Result<(), String> {
    let status = Command::new(scripts_dir().join("down.sh"))
        .arg(state_dir)
        .env("DEEPSEEK_CONTROLPLANE_KEEP", if keep { "1" } else { "0" })
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running down.sh: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("down.sh failed: {status}"))
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = run_down(&self.state_dir, true);
        }
    }
}

/// A client for the kubeconfig file at `path`.
pub async fn client_for(path: &Path) -> Result<Client, String> {
    let kc = Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Client::try_from(config).map_err(|e| format!("{}: {e}", path.display()))
}

/// The API server's host and port, from a kubeconfig file.
pub fn api_server(path: &Path) -> Result<(String, u16), String> {
    let kc = Kubeconfig::read_from(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let server = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .ok_or("the kubeconfig names no server")?;
    let hostport = server
        .strip_prefix("https://")
        .ok_or("the server is not https://")?
        .trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').ok_or("the server has no port")?;
    Ok((
        host.to_string(),
        port.parse().map_err(|e| format!("server port: {e}"))?,
    ))
}

/// Writes a kubeconfig that authenticates with a bearer token to the same API server and CA as
/// the kubeconfig at `like`.
pub fn write_token_kubeconfig(like: &Path, token: &str, out: &Path) -> Result<(), String> {
    let kc = Kubeconfig::read_from(like).map_err(|e| format!("{}: {e}", like.display()))?;
    let cluster = kc
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .ok_or("the kubeconfig has no cluster")?;
    let server = cluster.server.clone().ok_or("no server")?;
    let ca = cluster
        .certificate_authority
        .clone()
        .ok_or("no certificate-authority file")?;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
    );
    std::fs::write(out, text).map_err(|e| format!("{}: {e}", out.display()))
}
