//! The launch environment of one process of a multi-process run, as torchrun and Slurm
//! launchers set it: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`.
//!
//! The rendezvous does not listen on `MASTER_PORT`: torchrun's own store already holds that
//! port on rank 0's node. It listens on `DUALPIPE_RENDEZVOUS_PORT` when set, else on
//! `MASTER_PORT + 1` (`MASTER_PORT - 1` when `MASTER_PORT` is 65535).

use std::fmt;

/// Where this process stands in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    /// This process's rank, `0..world_size`: the schedule's rank it runs.
    pub rank: u32,
    /// Number of processes (one per GPU).
    pub world_size: u32,
    /// The GPU this process uses on its node.
    pub local_rank: u32,
    /// Host of rank 0, where the rendezvous listens.
    pub master_addr: String,
    /// `MASTER_PORT`, as the launcher set it (torchrun's store listens there).
    pub master_port: u16,
    /// The port rank 0's rendezvous listens on: see [`rendezvous_port`].
    pub rendezvous_port: u16,
}

/// The variable that overrides the rendezvous port.
pub const RENDEZVOUS_PORT_VAR: &str = "DUALPIPE_RENDEZVOUS_PORT";

/// The rendezvous port for a launch with `MASTER_PORT` = `master_port` and no
/// `DUALPIPE_RENDEZVOUS_PORT`: the next port, or the one below for 65535. Never `master_port`
/// itself, which torchrun's store holds on rank 0's node.
pub fn rendezvous_port(master_port: u16) -> u16 {
    master_port
        .checked_add(1)
        .unwrap_or(master_port.saturating_sub(1))
}

/// A missing or malformed launch variable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// A variable is not set.
    #[error(
        "{name} is not set; launch one process per GPU with torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), see docs/gpu.md"
    )]
    Missing {
        /// The variable.
        name: &'static str,
    },
    /// A variable does not hold what it must.
    #[error("{name}={value:?}: {problem}")]
    Invalid {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// The variables read, in the order they are checked.
pub const VARIABLES: [&str; 5] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
];

impl LaunchEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, LaunchError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup` (the environment, or a table in tests).
    /// `LOCAL_RANK` defaults to `RANK` when unset (one node); everything else is required.
    ///
    /// ```
    /// use dualpipe_cuda::LaunchEnv;
    /// let vars = [("RANK", "1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "node0"), ("MASTER_PORT", "29500")];
    /// let env = LaunchEnv::from_lookup(|name| {
    ///     vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    /// }).unwrap();
    /// assert_eq!((env.rank, env.world_size, env.local_rank), (1, 4, 1));
    /// ```
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, LaunchError> {
        let get = |name: &'static str| {
            lookup(name)
                .map(|v| v.trim().to_string())
                .ok_or(LaunchError::Missing { name })
        };
        let number = |name: &'static str, value: String| {
            value.parse::<u32>().map_err(|_| LaunchError::Invalid {
                name,
                problem: "not a non-negative whole number".into(),
                value,
            })
        };
        let rank = number("RANK", get("RANK")?)?;
        let world_size = number("WORLD_SIZE", get("WORLD_SIZE")?)?;
        if world_size == 0 {
            return Err(LaunchError::Invalid {
                name: "WORLD_SIZE",
                value: "0".into(),
                problem: "a run needs at least one process".into(),
            });
        }
        if rank >= world_size {
            return Err(LaunchError::Invalid {
                name: "RANK",
                value: rank.to_string(),
                problem: format!("must be below WORLD_SIZE ({world_size})"),
            });
        }
        let local_rank = match lookup("LOCAL_RANK") {
            Some(value) => number("LOCAL_RANK", value.trim().to_string())?,
            None => rank,
        };
        let master_addr = get("MASTER_ADDR")?;
        if master_addr.is_empty() {
            return Err(LaunchError::Invalid {
                name: "MASTER_ADDR",
                value: master_addr,
                problem: "empty; give the host name or address of rank 0".into(),
            });
        }
        let port = |name: &'static str, value: String| match value.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(LaunchError::Invalid {
                name,
                value,
                problem: "not a port number (1 to 65535)".into(),
            }),
        };
        let master_port = port("MASTER_PORT", get("MASTER_PORT")?)?;
        let rendezvous_port = match lookup(RENDEZVOUS_PORT_VAR) {
            Some(value) => {
                let p = port(RENDEZVOUS_PORT_VAR, value.trim().to_string())?;
                if p == master_port {
                    return Err(LaunchError::Invalid {
                        name: RENDEZVOUS_PORT_VAR,
                        value: p.to_string(),
                        problem: "must differ from MASTER_PORT, which torchrun's store holds"
                            .into(),
                    });
                }
                p
            }
            None => rendezvous_port(master_port),
        };
        Ok(LaunchEnv {
            rank,
            world_size,
            local_rank,
            master_addr,
            master_port,
            rendezvous_port,
        })
    }

    /// `MASTER_ADDR:MASTER_PORT`, bracketing an IPv6 address.
    pub fn master(&self) -> String {
        self.at(self.master_port)
    }

    /// Where the rendezvous listens: `MASTER_ADDR` at [`LaunchEnv::rendezvous_port`].
    pub fn rendezvous(&self) -> String {
        self.at(self.rendezvous_port)
    }

    fn at(&self, port: u16) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{port}", self.master_addr)
        } else {
            format!("{}:{port}", self.master_addr)
        }
    }
}

impl fmt::Display for LaunchEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of {} (GPU {} on its node), rendezvous at {}",
            self.rank,
            self.world_size,
            self.local_rank,
            self.rendezvous()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `vars` (NAME=value, space separated) and returns the result or the error text.
    fn parse(vars: &str) -> Result<LaunchEnv, String> {
        let table: Vec<(String, String)> = vars
            .split_whitespace()
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("NAME=value");
                (k.to_string(), v.to_string())
            })
            .collect();
        LaunchEnv::from_lookup(|name| {
            table
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
        .map_err(|e| e.to_string())
    }

    const GOOD: &str = "RANK=3 WORLD_SIZE=8 LOCAL_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500";

    #[test]
    fn a_complete_environment_parses() {
        let env = parse(GOOD).unwrap();
        assert_eq!(
            env,
            LaunchEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master_addr: "10.0.0.1".into(),
                master_port: 29500,
                rendezvous_port: 29501,
            }
        );
        assert_eq!(env.master(), "10.0.0.1:29500");
        assert_eq!(env.rendezvous(), "10.0.0.1:29501");
        assert_eq!(
            env.to_string(),
            "rank 3 of 8 (GPU 1 on its node), rendezvous at 10.0.0.1:29501"
        );
        let v6 = parse("RANK=0 WORLD_SIZE=1 MASTER_ADDR=::1 MASTER_PORT=1").unwrap();
        assert_eq!(v6.master(), "[::1]:1");
        assert_eq!(v6.rendezvous(), "[::1]:2");
        assert_eq!(v6.local_rank, 0, "LOCAL_RANK defaults to RANK");
    }

    #[test]
    fn every_bad_environment_says_which_variable_and_why() {
        let cases = [
            ("", "RANK is not set; launch one process per GPU"),
            ("RANK=0", "WORLD_SIZE is not set"),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_PORT=1",
                "MASTER_ADDR is not set",
            ),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h",
                "MASTER_PORT is not set",
            ),
            (
                "RANK=x WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1",
                "RANK=\"x\": not a non-negative whole number",
            ),
            (
                "RANK=-1 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1",
                "RANK=\"-1\": not a non-negative whole number",
            ),
            (
                "RANK=2 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1",
                "RANK=\"2\": must be below WORLD_SIZE (2)",
            ),
            (
                "RANK=0 WORLD_SIZE=0 MASTER_ADDR=h MASTER_PORT=1",
                "WORLD_SIZE=\"0\": a run needs at least one process",
            ),
            (
                "RANK=0 WORLD_SIZE=2 LOCAL_RANK=a MASTER_ADDR=h MASTER_PORT=1",
                "LOCAL_RANK=\"a\": not a non-negative whole number",
            ),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=0",
                "MASTER_PORT=\"0\": not a port number (1 to 65535)",
            ),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=70000",
                "MASTER_PORT=\"70000\": not a port number (1 to 65535)",
            ),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=1 DUALPIPE_RENDEZVOUS_PORT=x",
                "DUALPIPE_RENDEZVOUS_PORT=\"x\": not a port number (1 to 65535)",
            ),
            (
                "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=7 DUALPIPE_RENDEZVOUS_PORT=7",
                "DUALPIPE_RENDEZVOUS_PORT=\"7\": must differ from MASTER_PORT",
            ),
        ];
        for (vars, expected) in cases {
            let error = parse(vars).expect_err(vars);
            assert!(
                error.starts_with(expected),
                "{vars}: got `{error}`, expected it to start with `{expected}`"
            );
        }
    }

    #[test]
    fn the_rendezvous_never_takes_master_port() {
        assert_eq!(rendezvous_port(29500), 29501);
        assert_eq!(rendezvous_port(65535), 65534);
        assert_eq!(rendezvous_port(1), 2);
        let chosen = parse(
            "RANK=0 WORLD_SIZE=2 MASTER_ADDR=h MASTER_PORT=29500 DUALPIPE_RENDEZVOUS_PORT=40000",
        )
        .unwrap();
        assert_eq!((chosen.master_port, chosen.rendezvous_port), (29500, 40000));
        for master in [1u16, 80, 29500, 65534, 65535] {
            assert_ne!(rendezvous_port(master), master);
        }
    }
}
