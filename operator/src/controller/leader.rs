//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run and exactly one reconciles.
//!
//! The holder renews the lease every `renew_every`; a candidate takes it over once it has not
//! been renewed for `lease_duration`. Updates use the Lease's resourceVersion, so two candidates
//! racing for an expired lease cannot both win. The decision itself ([`decide`]) is pure.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

use crate::{Error, Result};

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Namespace of the Lease.
    pub namespace: String,
    /// This replica's identity, usually the pod name.
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews.
    pub renew_every: Duration,
}

/// What a candidate should do with the lease as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder let it expire: take it.
    Acquire,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds a valid lease.
    Wait {
        /// The current holder.
        holder: String,
    },
}

/// Decides from the lease's spec (or its absence) at time `now`.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == identity {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::Acquire;
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(t) if now.as_second() < t.as_second() + duration => Decision::Wait {
            holder: holder.to_string(),
        },
        _ => Decision::Acquire,
    }
}

fn spec_for(cfg: &LeaseConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let renew = previous.is_some_and(|p| p.holder_identity.as_deref() == Some(&cfg.identity));
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
        acquire_time: if renew {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if renew || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// One election round: takes or renews the lease if allowed. Returns whether we hold it.
pub async fn try_acquire_or_renew(
    api: &Api<Lease>,
    cfg: &LeaseConfig,
    now: Timestamp,
) -> Result<bool> {
    let current = match api.get(&cfg.name).await {
        Ok(l) => Some(l),
        Err(e) if is_not_found(&e) => None,
        Err(e) => return Err(e.into()),
    };
    match decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &cfg.identity,
        now,
    ) {
        Decision::Wait { .. } => Ok(false),
        Decision::Acquire | Decision::Renew => {
            let result = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(cfg.name.clone()),
                            namespace: Some(cfg.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(spec_for(cfg, None, now)),
                    };
                    api.create(&PostParams::default(), &lease).await
                }
                Some(mut lease) => {
                    lease.spec = Some(spec_for(cfg, lease.spec.as_ref(), now));
                    api.replace(&cfg.name, &PostParams::default(), &lease).await
                }
            };
            match result {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e.into()),
            }
        }
    }
}

/// Gives the lease up (on graceful shutdown) so a standby replica takes over at once.
pub async fn release(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<()> {
    let mut lease = api.get(&cfg.name).await?;
    if let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(&cfg.identity)
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        api.replace(&cfg.name, &PostParams::default(), &lease)
            .await?;
    }
    Ok(())
}

/// Blocks until this replica holds the lease.
pub async fn acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<()> {
    loop {
        match try_acquire_or_renew(api, cfg, Timestamp::now()).await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, lease = %cfg.name, "leader election round failed"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
}

/// Renews the lease until a renewal is refused or renewals keep failing for longer than the
/// lease duration; then returns the reason leadership was lost.
pub async fn hold(api: &Api<Lease>, cfg: &LeaseConfig) -> Error {
    let mut last_ok = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(cfg.renew_every).await;
        match try_acquire_or_renew(api, cfg, Timestamp::now()).await {
            Ok(true) => last_ok = tokio::time::Instant::now(),
            Ok(false) => return Error::LeaderElection("another replica took the lease".into()),
            Err(e) => {
                tracing::warn!(error = %e, lease = %cfg.name, "lease renewal failed");
                if last_ok.elapsed() >= cfg.lease_duration {
                    return Error::LeaderElection(format!("could not renew the lease: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(who: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    #[test]
    fn a_missing_lease_is_acquired() {
        assert_eq!(decide(None, "a", t(0)), Decision::Acquire);
    }

    #[test]
    fn our_own_lease_is_renewed() {
        assert_eq!(
            decide(Some(&held_by("a", t(0))), "a", t(100)),
            Decision::Renew
        );
    }

    #[test]
    fn a_fresh_lease_of_another_replica_is_respected() {
        assert_eq!(
            decide(Some(&held_by("b", t(0))), "a", t(14)),
            Decision::Wait { holder: "b".into() }
        );
    }

    #[test]
    fn an_expired_lease_of_another_replica_is_taken_over() {
        assert_eq!(
            decide(Some(&held_by("b", t(0))), "a", t(15)),
            Decision::Acquire
        );
    }

    #[test]
    fn a_released_lease_is_acquired() {
        let mut spec = held_by("b", t(0));
        spec.holder_identity = None;
        assert_eq!(decide(Some(&spec), "a", t(1)), Decision::Acquire);
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let cfg = LeaseConfig {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        };
        let mut theirs = held_by("b", t(0));
        theirs.lease_transitions = Some(3);
        let taken = spec_for(&cfg, Some(&theirs), t(20));
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.acquire_time, Some(MicroTime(t(20))));
        let renewed = spec_for(&cfg, Some(&taken), t(25));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, Some(MicroTime(t(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(t(25))));
    }
}
