//! What the node agent runs for one container, decided from the pod and what the agent knows,
//! with no I/O: the executable, its arguments and its environment.
//!
//! Containers share the host's network and file system here, so three things a container
//! runtime provides are done by rewriting values instead:
//! - the wildcard address `0.0.0.0` (all of the pod's own interfaces) becomes the pod's IP;
//! - pod DNS names `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` become the named
//!   pod's IP, as the cluster DNS answers for a headless Service. A port after such a name
//!   becomes a host port the agent keeps for that pod and port: a process that listens on the
//!   wildcard address (the engine's rank 0 does, on the port of `LEADER_ADDR`) would otherwise
//!   collide with the same process of another pod;
//! - volume mount paths become the pod's sandbox directories.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};

/// A binary of this workspace standing for a container image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageBinary {
    /// Image repository, without tag or digest (`ghcr.io/deepseek-serving/deepseek-engine`).
    pub repository: String,
    /// The executable.
    pub binary: PathBuf,
    /// The image's default arguments (its `CMD`), used when the container sets neither
    /// `command` nor `args`.
    pub default_args: Vec<String>,
}

/// Why a container cannot be started (yet).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LaunchError {
    /// No binary stands for the image; the pod stays waiting, as with an image that cannot be
    /// pulled.
    #[error("no binary stands for image {0:?} on this node")]
    UnknownImage(String),
    /// The container's command is not the image's binary.
    #[error("command {command:?} is not the binary of image {image:?}")]
    UnknownCommand {
        /// The container's `command[0]`.
        command: String,
        /// The container's image.
        image: String,
    },
    /// A pod DNS name does not resolve yet (its pod has no address or no Service selects it).
    #[error("{0} does not resolve yet")]
    Unresolved(String),
    /// An environment source the agent does not provide, or one that is missing.
    #[error("{0}")]
    Config(String),
}

/// The image's repository: the reference without `:tag` or `@digest`.
pub fn image_repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        // A colon after the last slash starts the tag; before it, it is a registry port.
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

/// The executable and the arguments (before `$(VAR)` expansion) of a container.
pub fn command_line(
    container: &Container,
    images: &[ImageBinary],
) -> Result<(PathBuf, Vec<String>), LaunchError> {
    let image = container.image.clone().unwrap_or_default();
    let bin = images
        .iter()
        .find(|b| b.repository == image_repository(&image))
        .ok_or_else(|| LaunchError::UnknownImage(image.clone()))?;
    let args = container.args.clone().unwrap_or_default();
    match container.command.as_deref() {
        Some([first, rest @ ..]) => {
            let name = Path::new(first).file_name();
            if name.is_none() || name != bin.binary.file_name() {
                return Err(LaunchError::UnknownCommand {
                    command: first.clone(),
                    image,
                });
            }
            Ok((
                bin.binary.clone(),
                rest.iter().cloned().chain(args).collect(),
            ))
        }
        _ if container.args.is_some() => Ok((bin.binary.clone(), args)),
        _ => Ok((bin.binary.clone(), bin.default_args.clone())),
    }
}

/// A pod DNS name, as the cluster DNS serves it for pods selected by a headless Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodDnsName {
    /// The pod's `spec.hostname` (a StatefulSet pod's name).
    pub hostname: String,
    /// The pod's `spec.subdomain`, the name of the headless Service.
    pub subdomain: String,
    /// The namespace.
    pub namespace: String,
}

impl std::fmt::Display for PodDnsName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}.{}.{}.svc",
            self.hostname, self.subdomain, self.namespace
        )
    }
}

/// What the agent's network answers for a pod DNS name.
pub trait Network {
    /// The address of the pod `name` names, with the host port for `port` when one is given;
    /// `None` while it does not resolve.
    fn resolve(&mut self, name: &PodDnsName, port: Option<u16>) -> Option<(Ipv4Addr, Option<u16>)>;
}

/// What the rewrite of one pod's values needs.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// The pod's IP.
    pub ip: Ipv4Addr,
    /// Volume mount paths of the container and the host directories standing for them.
    pub mounts: Vec<(String, PathBuf)>,
}

fn is_dns_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '.'
}

/// Splits `token` (a run of DNS characters) into a pod DNS name, when it is one.
fn pod_dns_name(token: &str) -> Option<PodDnsName> {
    let token = token.trim_end_matches('.');
    let labels: Vec<&str> = token.split('.').collect();
    let head = match labels.as_slice() {
        [head @ .., "svc", "cluster", "local"] | [head @ .., "svc"] => head,
        _ => return None,
    };
    match head {
        [hostname, subdomain, namespace] if head.iter().all(|l| !l.is_empty()) => {
            Some(PodDnsName {
                hostname: (*hostname).into(),
                subdomain: (*subdomain).into(),
                namespace: (*namespace).into(),
            })
        }
        _ => None,
    }
}

/// Rewrites one argument or environment value for the sandbox (see the module header).
pub fn rewrite(
    value: &str,
    sandbox: &Sandbox,
    net: &mut dyn Network,
) -> Result<String, LaunchError> {
    let value = rewrite_path(value, sandbox);
    let value = if value == "0.0.0.0" {
        sandbox.ip.to_string()
    } else if let Some(port) = value.strip_prefix("0.0.0.0:") {
        format!("{}:{port}", sandbox.ip)
    } else {
        value
    };
    rewrite_names(&value, net)
}

/// A value that is a mount path or below one, alone or after `--flag=`, points into the
/// sandbox.
fn rewrite_path(value: &str, sandbox: &Sandbox) -> String {
    let (prefix, path) = match value.split_once('=') {
        Some((flag, path)) if path.starts_with('/') => (format!("{flag}="), path),
        _ => (String::new(), value),
    };
    // The longest mount path wins, as a nested mount hides its parent.
    let best = sandbox
        .mounts
        .iter()
        .filter(|(mount, _)| {
            let mount = mount.trim_end_matches('/');
            path == mount || path.strip_prefix(mount).is_some_and(|r| r.starts_with('/'))
        })
        .max_by_key(|(mount, _)| mount.len());
    match best {
        Some((mount, host)) => {
            let rest = &path[mount.trim_end_matches('/').len()..];
            format!("{prefix}{}{rest}", host.display())
        }
        None => value.to_string(),
    }
}

fn rewrite_names(value: &str, net: &mut dyn Network) -> Result<String, LaunchError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find(is_dns_char) {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        let len = after.find(|c| !is_dns_char(c)).unwrap_or(after.len());
        let token = &after[..len];
        let tail = &after[len..];
        let Some(name) = pod_dns_name(token) else {
            out.push_str(token);
            rest = tail;
            continue;
        };
        let digits = tail
            .strip_prefix(':')
            .map(|t| t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()))
            .filter(|&n| n > 0);
        let port = digits.and_then(|n| tail[1..=n].parse::<u16>().ok());
        let (ip, host_port) = net
            .resolve(&name, port)
            .ok_or_else(|| LaunchError::Unresolved(name.to_string()))?;
        out.push_str(&ip.to_string());
        match (port, host_port) {
            (Some(_), Some(p)) => {
                out.push_str(&format!(":{p}"));
                rest = &tail[1 + digits.unwrap_or(0)..];
            }
            _ => rest = tail,
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands `$(VAR)` references to variables in `env`, as the kubelet does: `$$` is a literal
/// `$`, and a reference to an undefined variable stays as written.
pub fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The pod fields an environment variable can refer to, as the kubelet fills them.
#[derive(Clone, Debug)]
pub struct PodFields {
    /// `status.podIP`.
    pub pod_ip: Ipv4Addr,
    /// `status.hostIP`.
    pub host_ip: Ipv4Addr,
    /// `spec.nodeName`.
    pub node_name: String,
}

pub(crate) fn field_value(
    pod: &Pod,
    fields: &PodFields,
    path: &str,
) -> Result<String, LaunchError> {
    let meta = &pod.metadata;
    let keyed = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        Some(map.as_ref()?.get(key).cloned().unwrap_or_default())
    };
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => fields.node_name.clone(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => fields.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => fields.host_ip.to_string(),
        _ => keyed("metadata.labels", &meta.labels)
            .or_else(|| keyed("metadata.annotations", &meta.annotations))
            .ok_or_else(|| LaunchError::Config(format!("field {path:?} is not supported")))?,
    })
}

/// Data of the ConfigMaps and Secrets a container's environment refers to, by name (Secret
/// values decoded).
#[derive(Clone, Debug, Default)]
pub struct EnvSources {
    /// ConfigMap data by ConfigMap name.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
    /// Secret data by Secret name.
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
}

/// Names of the ConfigMaps and Secrets a container's environment refers to.
pub fn env_references(container: &Container) -> (Vec<String>, Vec<String>) {
    let (mut cms, mut secrets) = (Vec::new(), Vec::new());
    for from in container.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.push(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.push(r.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(src) = &var.value_from {
            if let Some(r) = &src.config_map_key_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &src.secret_key_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// The container's environment before rewriting: `base` (the image's and the node's
/// variables), then `envFrom`, then `env` in order, each value expanded against the variables
/// before it.
pub fn environment(
    pod: &Pod,
    container: &Container,
    fields: &PodFields,
    sources: &EnvSources,
    base: &[(String, String)],
) -> Result<BTreeMap<String, String>, LaunchError> {
    let mut env: BTreeMap<String, String> = base.iter().cloned().collect();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (name, optional, data) = if let Some(r) = &from.config_map_ref {
            (&r.name, r.optional, sources.config_maps.get(&r.name))
        } else if let Some(r) = &from.secret_ref {
            (&r.name, r.optional, sources.secrets.get(&r.name))
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    env.insert(format!("{prefix}{k}"), v.clone());
                }
            }
            None if optional == Some(true) => {}
            None => return Err(LaunchError::Config(format!("envFrom {name:?} is missing"))),
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (_, Some(src)) => {
                let keyed = |name: &str,
                             key: &str,
                             optional: Option<bool>,
                             data: Option<&BTreeMap<String, String>>|
                 -> Result<Option<String>, LaunchError> {
                    match data.and_then(|d| d.get(key)) {
                        Some(v) => Ok(Some(v.clone())),
                        None if optional == Some(true) => Ok(None),
                        None => Err(LaunchError::Config(format!(
                            "{}: key {key:?} of {name:?} is missing",
                            var.name
                        ))),
                    }
                };
                if let Some(f) = &src.field_ref {
                    Some(field_value(pod, fields, &f.field_path)?)
                } else if let Some(r) = &src.config_map_key_ref {
                    keyed(
                        &r.name,
                        &r.key,
                        r.optional,
                        sources.config_maps.get(&r.name),
                    )?
                } else if let Some(r) = &src.secret_key_ref {
                    keyed(&r.name, &r.key, r.optional, sources.secrets.get(&r.name))?
                } else {
                    return Err(LaunchError::Config(format!(
                        "{}: this valueFrom source is not supported",
                        var.name
                    )));
                }
            }
            (Some(v), None) => Some(expand(v, &env)),
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            env.insert(var.name.clone(), v);
        }
    }
    Ok(env)
}

/// Everything needed to start one container's process.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment.
    pub env: BTreeMap<String, String>,
}

/// Decides what to run for `container` of `pod`.
pub fn launch(
    pod: &Pod,
    container: &Container,
    images: &[ImageBinary],
    fields: &PodFields,
    sources: &EnvSources,
    base_env: &[(String, String)],
    sandbox: &Sandbox,
    net: &mut dyn Network,
) -> Result<Launch, LaunchError> {
    let (program, args) = command_line(container, images)?;
    let env = environment(pod, container, fields, sources, base_env)?;
    let args = args
        .iter()
        .map(|a| rewrite(&expand(a, &env), sandbox, net))
        .collect::<Result<Vec<_>, _>>()?;
    let env = env
        .into_iter()
        .map(|(k, v)| Ok((k, rewrite(&v, sandbox, net)?)))
        .collect::<Result<BTreeMap<_, _>, LaunchError>>()?;
    Ok(Launch { program, args, env })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};

    struct FakeNet(BTreeMap<String, Ipv4Addr>);

    impl Network for FakeNet {
        fn resolve(
            &mut self,
            name: &PodDnsName,
            port: Option<u16>,
        ) -> Option<(Ipv4Addr, Option<u16>)> {
            let ip = *self.0.get(&name.to_string())?;
            Some((ip, port.map(|p| p + 10_000)))
        }
    }

    fn net() -> FakeNet {
        FakeNet(BTreeMap::from([(
            "tiny-g0-0.tiny-g0.ns.svc".to_string(),
            Ipv4Addr::new(127, 9, 0, 2),
        )]))
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            ip: Ipv4Addr::new(127, 9, 0, 3),
            mounts: vec![
                (
                    "/etc/deepseek-engine".into(),
                    PathBuf::from("/sb/volumes/config"),
                ),
                ("/models".into(), PathBuf::from("/sb/volumes/model")),
                ("/models/cache/".into(), PathBuf::from("/sb/volumes/cache")),
            ],
        }
    }

    #[test]
    fn image_repositories_drop_tags_and_digests_but_keep_registry_ports() {
        assert_eq!(image_repository("ghcr.io/a/b:0.1.0"), "ghcr.io/a/b");
        assert_eq!(image_repository("ghcr.io/a/b@sha256:abc"), "ghcr.io/a/b");
        assert_eq!(image_repository("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(
            image_repository("localhost:5000/a/b:1"),
            "localhost:5000/a/b"
        );
        assert_eq!(image_repository("b"), "b");
    }

    fn engine_image() -> Vec<ImageBinary> {
        vec![ImageBinary {
            repository: "ghcr.io/x/deepseek-engine".into(),
            binary: PathBuf::from("/target/debug/deepseek-engine"),
            default_args: vec!["serve".into()],
        }]
    }

    #[test]
    fn the_command_must_be_the_images_binary_and_args_follow_it() {
        let images = engine_image();
        let mut c = Container {
            image: Some("ghcr.io/x/deepseek-engine:1".into()),
            command: Some(vec!["deepseek-engine".into(), "serve".into()]),
            args: Some(vec!["--port".into(), "1".into()]),
            ..Container::default()
        };
        let (bin, args) = command_line(&c, &images).unwrap();
        assert_eq!(bin, PathBuf::from("/target/debug/deepseek-engine"));
        assert_eq!(args, ["serve", "--port", "1"]);
        c.command = Some(vec!["/bin/sh".into()]);
        assert!(matches!(
            command_line(&c, &images),
            Err(LaunchError::UnknownCommand { .. })
        ));
        c.command = None;
        c.args = None;
        assert_eq!(command_line(&c, &images).unwrap().1, ["serve"]);
        c.image = Some("busybox".into());
        assert_eq!(
            command_line(&c, &images),
            Err(LaunchError::UnknownImage("busybox".into()))
        );
    }

    #[test]
    fn the_wildcard_address_becomes_the_pod_ip() {
        let sb = sandbox();
        assert_eq!(rewrite("0.0.0.0", &sb, &mut net()).unwrap(), "127.9.0.3");
        assert_eq!(
            rewrite("0.0.0.0:8080", &sb, &mut net()).unwrap(),
            "127.9.0.3:8080"
        );
        assert_eq!(rewrite("10.0.0.0", &sb, &mut net()).unwrap(), "10.0.0.0");
    }

    #[test]
    fn pod_dns_names_become_the_pod_ip_and_their_ports_host_ports() {
        let sb = sandbox();
        let mut n = net();
        assert_eq!(
            rewrite("tiny-g0-0.tiny-g0.ns.svc:29500", &sb, &mut n).unwrap(),
            "127.9.0.2:39500"
        );
        assert_eq!(
            rewrite(
                "http://tiny-g0-0.tiny-g0.ns.svc.cluster.local:8000/x",
                &sb,
                &mut n
            )
            .unwrap(),
            "http://127.9.0.2:18000/x"
        );
        assert_eq!(
            rewrite("tiny-g0-0.tiny-g0.ns.svc", &sb, &mut n).unwrap(),
            "127.9.0.2"
        );
        assert_eq!(
            rewrite("a=tiny-g0-0.tiny-g0.ns.svc:1,b", &sb, &mut n).unwrap(),
            "a=127.9.0.2:10001,b"
        );
        // Service names, other hosts and plain words are left alone.
        for v in ["tiny.ns.svc:8000", "example.com:80", "serve", "x.y.z.w.svc"] {
            assert_eq!(rewrite(v, &sb, &mut n).unwrap(), v);
        }
        assert_eq!(
            rewrite("tiny-g1-0.tiny-g1.ns.svc:29500", &sb, &mut n),
            Err(LaunchError::Unresolved("tiny-g1-0.tiny-g1.ns.svc".into()))
        );
    }

    #[test]
    fn mount_paths_point_into_the_sandbox_with_the_deepest_mount_winning() {
        let sb = sandbox();
        let mut n = net();
        assert_eq!(
            rewrite("/etc/deepseek-engine/engine.json", &sb, &mut n).unwrap(),
            "/sb/volumes/config/engine.json"
        );
        assert_eq!(
            rewrite("--model=/models", &sb, &mut n).unwrap(),
            "--model=/sb/volumes/model"
        );
        assert_eq!(
            rewrite("/models/cache/x", &sb, &mut n).unwrap(),
            "/sb/volumes/cache/x"
        );
        assert_eq!(rewrite("/modelsx", &sb, &mut n).unwrap(), "/modelsx");
    }

    #[test]
    fn expansion_follows_the_kubelet_rules() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$A $(A", &env), "$A $(A");
    }

    #[test]
    fn the_environment_takes_field_refs_and_expands_earlier_variables() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "tiny-g0-1", "namespace": "ns",
                         "labels": {"apps.kubernetes.io/pod-index": "1"}},
        }))
        .unwrap();
        let field = |name: &str, path: &str| EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
        };
        let c = Container {
            env: Some(vec![
                field("RANK", "metadata.labels['apps.kubernetes.io/pod-index']"),
                field("POD", "metadata.name"),
                field("IP", "status.podIP"),
                EnvVar {
                    name: "WHO".into(),
                    value: Some("$(POD)@$(IP)".into()),
                    value_from: None,
                },
            ]),
            ..Container::default()
        };
        let fields = PodFields {
            pod_ip: Ipv4Addr::new(127, 9, 0, 3),
            host_ip: Ipv4Addr::LOCALHOST,
            node_name: "n".into(),
        };
        let env = environment(&pod, &c, &fields, &EnvSources::default(), &[]).unwrap();
        assert_eq!(env["RANK"], "1");
        assert_eq!(env["WHO"], "tiny-g0-1@127.9.0.3");
        let bad = Container {
            env: Some(vec![field("X", "spec.nothing")]),
            ..Container::default()
        };
        assert!(environment(&pod, &bad, &fields, &EnvSources::default(), &[]).is_err());
    }
}
