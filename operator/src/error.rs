//! The operator's one error type.

/// Everything that can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),

    /// An object could not be converted to or from JSON.
    #[error("could not serialize an object: {0}")]
    Serialization(#[from] serde_json::Error),

    /// The CRD could not be written as YAML.
    #[error("could not write YAML: {0}")]
    Yaml(String),

    /// The spec breaks a rule the operator depends on.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    /// A watched object lacks a field the operator needs (name, namespace).
    #[error("object is missing {0}")]
    MissingField(&'static str),

    /// The lease used for leader election was lost or could not be taken.
    #[error("leader election: {0}")]
    LeaderElection(String),
}

impl Error {
    /// Short label for the `error` dimension of the error counter.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::Serialization(_) => "serialization",
            Error::Yaml(_) => "yaml",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MissingField(_) => "missing_field",
            Error::LeaderElection(_) => "leader_election",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
