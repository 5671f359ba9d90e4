//! How this process takes part in its model replica, from `--expert-parallel` and the group
//! variables the operator sets (`RANK`, `WORLD_SIZE`, `LEADER_ADDR`, `LOCAL_WORLD_SIZE`).

use super::{Error, Result};
use crate::dist::GroupEnv;

/// How this process takes part in its model replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The whole replica in this process (with `ep` ranks as threads when ep > 1).
    Single { ep: usize },
    /// One process of a multi-process group: `env` says which process (pod) of how many, and
    /// the process holds `local` consecutive ranks, one per GPU (global ranks
    /// `env.rank × local ..`).
    Group { env: GroupEnv, local: usize },
}

impl Role {
    /// Whether this process is a worker rank of a group (it serves no API).
    pub fn is_worker(&self) -> bool {
        matches!(self, Role::Group { env, .. } if env.rank != 0)
    }

    /// Expert-parallel ranks of the whole replica.
    pub fn ranks(&self) -> usize {
        match self {
            Role::Single { ep } => *ep,
            Role::Group { env, local } => env.world_size * local,
        }
    }
}

/// The role of this process: `--expert-parallel` (`None` when not given) with the group
/// variables. With the group variables set, the replica has WORLD_SIZE × LOCAL_WORLD_SIZE
/// ranks, which is also the default of `--expert-parallel`; a different value is refused.
pub fn resolve(
    group: Option<GroupEnv>,
    local_world_size: Option<&str>,
    expert_parallel: Option<usize>,
) -> Result<Role> {
    let Some(env) = group else {
        return match expert_parallel.unwrap_or(1) {
            0 => Err(Error::Options(
                "--expert-parallel must be at least 1".into(),
            )),
            ep => Ok(Role::Single { ep }),
        };
    };
    let local = match local_world_size.map(str::trim).filter(|v| !v.is_empty()) {
        None => 1,
        Some(v) => v.parse::<usize>().ok().filter(|n| *n > 0).ok_or_else(|| {
            Error::Options(format!(
                "LOCAL_WORLD_SIZE must be a positive integer, got {v:?}"
            ))
        })?,
    };
    let ranks = env.world_size.checked_mul(local).ok_or_else(|| {
        Error::Options(format!(
            "WORLD_SIZE {} x LOCAL_WORLD_SIZE {local} is too large",
            env.world_size
        ))
    })?;
    let ep = expert_parallel.unwrap_or(ranks);
    if ep != ranks {
        return Err(Error::Options(format!(
            "--expert-parallel {ep} does not match WORLD_SIZE {} x LOCAL_WORLD_SIZE {local} = {ranks}; \
             leave --expert-parallel out to take it from the group",
            env.world_size
        )));
    }
    if env.world_size == 1 {
        // One process holds the whole replica, its ranks as threads.
        return Ok(Role::Single { ep });
    }
    Ok(Role::Group { env, local })
}

/// The role of this process, from `--expert-parallel` and its environment.
pub fn from_env(expert_parallel: Option<usize>) -> Result<Role> {
    let local = std::env::var("LOCAL_WORLD_SIZE").ok();
    resolve(GroupEnv::from_env()?, local.as_deref(), expert_parallel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(rank: usize, world_size: usize, local: usize) -> Role {
        Role::Group {
            env: env(rank, world_size).unwrap(),
            local,
        }
    }

    fn env(rank: usize, world_size: usize) -> Option<GroupEnv> {
        Some(GroupEnv {
            rank,
            world_size,
            leader_addr: "leader:29500".into(),
        })
    }

    #[test]
    fn without_the_group_variables_the_replica_is_this_process() {
        assert_eq!(resolve(None, None, None).unwrap(), Role::Single { ep: 1 });
        assert_eq!(
            resolve(None, None, Some(4)).unwrap(),
            Role::Single { ep: 4 }
        );
        // LOCAL_WORLD_SIZE alone belongs to no group.
        assert_eq!(
            resolve(None, Some("8"), None).unwrap(),
            Role::Single { ep: 1 }
        );
        let e = resolve(None, None, Some(0)).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn expert_parallel_defaults_to_world_size_times_local_world_size() {
        assert_eq!(resolve(env(1, 2), None, None).unwrap(), group(1, 2, 1));
        assert_eq!(resolve(env(0, 4), Some("1"), None).unwrap(), group(0, 4, 1));
        assert_eq!(
            resolve(env(0, 1), Some("4"), None).unwrap(),
            Role::Single { ep: 4 }
        );
        assert_eq!(resolve(env(0, 4), None, None).unwrap().ranks(), 4);
        assert!(resolve(env(1, 2), None, None).unwrap().is_worker());
        assert!(!resolve(env(0, 2), None, None).unwrap().is_worker());
    }

    #[test]
    fn an_explicit_expert_parallel_must_match_the_group() {
        assert_eq!(
            resolve(env(0, 2), Some("1"), Some(2)).unwrap(),
            group(0, 2, 1)
        );
        let e = resolve(env(0, 2), None, Some(4)).unwrap_err().to_string();
        assert!(
            e.contains("--expert-parallel 4")
                && e.contains("WORLD_SIZE 2 x LOCAL_WORLD_SIZE 1 = 2"),
            "{e}"
        );
    }

    #[test]
    fn bad_or_unsupported_local_world_sizes_are_refused_by_name() {
        for bad in ["0", "two", "-1"] {
            let e = resolve(env(0, 2), Some(bad), None).unwrap_err().to_string();
            assert!(
                e.contains("LOCAL_WORLD_SIZE must be a positive integer"),
                "{e}"
            );
        }
        assert_eq!(resolve(env(0, 2), Some(""), None).unwrap(), group(0, 2, 1));
    }

    #[test]
    fn a_process_of_a_group_may_hold_several_ranks() {
        let role = resolve(env(1, 2), Some("8"), None).unwrap();
        assert_eq!(role, group(1, 2, 8));
        assert_eq!(role.ranks(), 16);
        assert!(role.is_worker());
    }
}
