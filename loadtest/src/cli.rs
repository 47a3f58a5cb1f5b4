//! Command line of `loadtest`, and its validation into a [`Plan`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// One process keeps at most this many simulated agents: the open-file limit on the load
/// machines is 20,000 (hard) and every agent holds one socket, plus some slack for the runtime.
pub const MAX_AGENTS_PER_PROCESS: u64 = 18_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Standard,
    Async,
}

/// Simulates many edge agents against a running control plane and reports scale figures.
///
/// The run creates N environments through the admin API, connects one simulated agent per
/// environment (each with its own kept-alive TLS connection), spreads their first check-ins
/// over the ramp, then measures the steady window of --duration seconds, and deletes the
/// environments again (unless --keep).
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, about)]
pub struct Args {
    /// Control plane base URL, e.g. https://cp.example.com:9443 (not with --spawn-server).
    #[arg(long, required_unless_present_any = ["spawn_server", "worker_spec"], conflicts_with = "spawn_server")]
    pub target: Option<String>,

    /// Admin API key (header X-API-Key).
    #[arg(long, env = "EDGEPLANE_ADMIN_API_KEY", hide_env_values = true,
          required_unless_present_any = ["spawn_server", "worker_spec", "synthetic_pin"])]
    pub api_key: Option<String>,

    /// No admin API: agents use join keys made up here (environment ids 1..N, random
    /// secrets), pinning the server certificate of this SHA-256 (hex), for a server that
    /// answers any check-in, such as a plain TLS server answering 204 (a baseline to compare
    /// the control plane's cost with). Plain check-ins only.
    #[arg(long, value_name = "SHA256_HEX", conflicts_with_all = ["spawn_server", "held"])]
    pub synthetic_pin: Option<String>,

    /// Number of simulated agents (one environment each).
    #[arg(long, required_unless_present = "worker_spec")]
    pub agents: Option<u64>,

    /// Length of the measured steady window in seconds, after the ramp.
    #[arg(long, required_unless_present = "worker_spec")]
    pub duration: Option<u64>,

    /// Check-in interval of the created environments, seconds.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,

    /// Agent mode to simulate. `async`: environments in async mode with --interval as their
    /// ping, snapshot and command intervals; each agent sends a full snapshot (20 containers)
    /// first, then one merged tick per interval with an unchanged snapshot and a command fetch,
    /// as the real async agent does when nothing changes.
    #[arg(long, value_enum, default_value_t = Mode::Standard)]
    pub mode: Mode,

    /// Held check-ins, as real agents send them: after a first plain check-in, every check-in
    /// goes to `/edge/h` (the server holds an idle answer for up to the interval minus 250 ms)
    /// and the next one is due at *send time* + interval (at once when the answer came
    /// later). Without it agents poll `/edge/c`, answered at once.
    #[arg(long)]
    pub held: bool,

    /// Agents also keep the real agent's tunnel (`edge_agent::tunnel::supervise`): when the
    /// control plane asks for it (an operator's Docker call), an agent opens it to a gateway,
    /// comes back through another when it is lost, and carries its streams to this engine
    /// (a DOCKER_HOST: `tcp://127.0.0.1:2375`, `unix:///run/podman/podman.sock`). With --held.
    #[arg(long, value_name = "DOCKER_HOST", requires = "held")]
    pub tunnel_engine: Option<String>,

    /// The agents' EDGE_INACTIVITY_TIMEOUT with --tunnel-engine, seconds: an open tunnel
    /// without streams this long is closed by its agent.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    pub tunnel_inactivity: u64,

    /// Write the JSON report here (otherwise it goes to stdout after the summary).
    #[arg(long)]
    pub report: Option<PathBuf>,

    /// Append a JSON line here every second while agents run: time since the start, phase,
    /// agents connected, check-ins and errors so far (refusals apart). For watching a fault
    /// scenario as it happens.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,

    /// Pid of the control plane, to report its memory and CPU (/proc); several, comma
    /// separated (the processes of one node sharing its port), are summed.
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    /// Redis of the control planes under test (cluster mode): its commands per second in
    /// the steady window, by command, and its memory are reported.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,

    /// Start a control plane on free loopback ports and test it [default path: the
    /// control-plane binary next to this one].
    #[arg(long, num_args = 0..=1, value_name = "PATH")]
    pub spawn_server: Option<Option<PathBuf>>,

    /// Accept any certificate for the admin API (agents still pin the fingerprint of their keys).
    #[arg(long)]
    pub insecure: bool,

    /// Spread agents' source addresses over 127.0.0.1..127.0.0.K when the target is loopback
    /// (each source address has its own ephemeral ports).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(1..=254))]
    pub sources: u8,

    /// Spread the agents' first check-ins over this many seconds [default: min(interval, 10)].
    #[arg(long)]
    pub ramp: Option<u64>,

    /// Run the agents in W child processes (needed above 18,000 agents: one process cannot
    /// hold more sockets) [default: as few as needed].
    #[arg(long)]
    pub workers: Option<u32>,

    /// Keep the created environments at the end.
    #[arg(long)]
    pub keep: bool,

    /// Edge stacks deployed to every agent of the run before it starts (a static edge group
    /// of its environments), so the steady window measures what held stacks cost an idle
    /// agent. Agents reconcile stacks as the real agent does (fetch the desired state,
    /// report `acknowledged`, then `running` after --stack-deploy-ms), without an engine.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub stacks: u32,

    /// Create one more stack for every agent this many seconds into the steady window and
    /// report how long it takes to reach 100 % `running` (polling its counts), with the
    /// server CPU and the Redis commands (--redis-url) it cost per environment.
    #[arg(long, value_name = "SECS")]
    pub stack_at: Option<u64>,

    /// How long a simulated agent takes to deploy a stack (between `acknowledged` and
    /// `running`), milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub stack_deploy_ms: u64,

    /// Internal: run as a worker process on the slice described in this file.
    #[arg(long, hide = true)]
    pub worker_spec: Option<PathBuf>,
}

/// A validated run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub agents: u64,
    pub duration: Duration,
    pub interval: Duration,
    pub ramp: Duration,
    pub workers: u32,
    /// Held check-ins (`--held`).
    pub held: bool,
    /// `--mode async`.
    pub async_mode: bool,
    /// `--tunnel-engine`: agents keep tunnels.
    pub tunnels: Option<Tunnels>,
    /// `--stack-deploy-ms`.
    pub stack_deploy: Duration,
}

/// Agents keep tunnels to `engine` (a `DOCKER_HOST`), closed after `inactivity` without streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnels {
    pub engine: String,
    pub inactivity: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error("--held applies to standard mode only (async agents do not hold check-ins)")]
    HeldAsync,
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--agents and --duration are required")]
    Missing,
    #[error("{agents} agents over {workers} worker(s) is {per} per process, more than {MAX_AGENTS_PER_PROCESS}: one process cannot hold that many sockets (open-file limit 20,000); use --workers {need} or more")]
    TooManyPerProcess {
        agents: u64,
        workers: u32,
        per: u64,
        need: u64,
    },
    #[error("--workers {0} is more than --agents")]
    MoreWorkersThanAgents(u32),
    #[error("--tunnel-engine: {0}")]
    TunnelEngine(String),
}

impl Args {
    pub fn plan(&self) -> Result<Plan, PlanError> {
        if self.mode == Mode::Async && self.held {
            return Err(PlanError::HeldAsync);
        }
        let (Some(agents), Some(duration)) = (self.agents, self.duration) else {
            return Err(PlanError::Missing);
        };
        if agents == 0 {
            return Err(PlanError::Zero("agents"));
        }
        if duration == 0 {
            return Err(PlanError::Zero("duration"));
        }
        if self.interval == 0 {
            return Err(PlanError::Zero("interval"));
        }
        let need = agents.div_ceil(MAX_AGENTS_PER_PROCESS);
        let workers = match self.workers {
            Some(0) => return Err(PlanError::Zero("workers")),
            Some(w) => w,
            None => u32::try_from(need).unwrap_or(u32::MAX),
        };
        if u64::from(workers) > agents {
            return Err(PlanError::MoreWorkersThanAgents(workers));
        }
        let per = agents.div_ceil(u64::from(workers));
        if per > MAX_AGENTS_PER_PROCESS {
            return Err(PlanError::TooManyPerProcess {
                agents,
                workers,
                per,
                need,
            });
        }
        let ramp = self.ramp.unwrap_or_else(|| self.interval.min(10));
        let tunnels = match &self.tunnel_engine {
            Some(engine) => {
                edge_agent::docker::DockerHost::parse(engine)
                    .map_err(|e| PlanError::TunnelEngine(e.to_string()))?;
                if self.tunnel_inactivity == 0 {
                    return Err(PlanError::Zero("tunnel-inactivity"));
                }
                Some(Tunnels {
                    engine: engine.clone(),
                    inactivity: Duration::from_secs(self.tunnel_inactivity),
                })
            }
            None => None,
        };
        Ok(Plan {
            agents,
            duration: Duration::from_secs(duration),
            interval: Duration::from_secs(self.interval),
            ramp: Duration::from_secs(ramp),
            workers,
            held: self.held,
            async_mode: self.mode == Mode::Async,
            tunnels,
            stack_deploy: Duration::from_millis(self.stack_deploy_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("loadtest").chain(args.iter().copied()))
    }

    const BASE: [&str; 8] = [
        "--target",
        "https://127.0.0.1:9443",
        "--api-key",
        "k",
        "--agents",
        "100",
        "--duration",
        "30",
    ];

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn contract_flags_and_defaults() {
        let a = parse(&BASE).unwrap();
        assert_eq!(a.target.as_deref(), Some("https://127.0.0.1:9443"));
        assert_eq!(a.interval, 5);
        assert_eq!(a.mode, Mode::Standard);
        assert_eq!(a.sources, 16);
        let p = a.plan().unwrap();
        assert_eq!(
            p,
            Plan {
                agents: 100,
                duration: Duration::from_secs(30),
                interval: Duration::from_secs(5),
                ramp: Duration::from_secs(5),
                stack_deploy: Duration::from_millis(1000),
                workers: 1,
                held: false,
                async_mode: false,
                tunnels: None,
            }
        );
        let mut full = BASE.to_vec();
        full.extend([
            "--interval",
            "30",
            "--mode",
            "standard",
            "--report",
            "r.json",
            "--server-pid",
            "42",
            "--insecure",
            "--sources",
            "4",
            "--keep",
            "--held",
        ]);
        let a = parse(&full).unwrap();
        assert_eq!(a.report, Some(PathBuf::from("r.json")));
        assert_eq!(a.server_pid, vec![42]);
        let mut several = BASE.to_vec();
        several.extend(["--server-pid", "1,2,3"]);
        assert_eq!(parse(&several).unwrap().server_pid, vec![1, 2, 3]);
        assert!(a.insecure && a.keep && a.held);
        let p = a.plan().unwrap();
        assert_eq!(p.ramp, Duration::from_secs(10));
        assert!(p.held);
    }

    #[test]
    fn spawn_server_path_is_optional() {
        let a = parse(&["--spawn-server", "--agents", "10", "--duration", "5"]).unwrap();
        assert_eq!(a.spawn_server, Some(None));
        let a = parse(&[
            "--spawn-server",
            "/x/cp",
            "--agents",
            "10",
            "--duration",
            "5",
        ])
        .unwrap();
        assert_eq!(a.spawn_server, Some(Some(PathBuf::from("/x/cp"))));
        assert!(parse(&["--agents", "10", "--duration", "5"]).is_err());
        let mut both = BASE.to_vec();
        both.push("--spawn-server");
        assert!(parse(&both).is_err());
    }

    #[test]
    fn async_mode_plans_and_refuses_held() {
        let mut args = BASE.to_vec();
        args.extend(["--mode", "async"]);
        assert!(parse(&args).unwrap().plan().unwrap().async_mode);
        args.push("--held");
        assert_eq!(parse(&args).unwrap().plan(), Err(PlanError::HeldAsync));
    }

    #[test]
    fn tunnels_need_held_check_ins_and_a_valid_engine() {
        let mut args = BASE.to_vec();
        args.extend(["--tunnel-engine", "tcp://127.0.0.1:2375"]);
        assert!(parse(&args).is_err(), "--tunnel-engine without --held");
        args.push("--held");
        let p = parse(&args).unwrap().plan().unwrap();
        assert_eq!(
            p.tunnels,
            Some(Tunnels {
                engine: "tcp://127.0.0.1:2375".into(),
                inactivity: Duration::from_secs(300),
            })
        );
        args.extend(["--tunnel-inactivity", "0"]);
        assert_eq!(
            parse(&args).unwrap().plan(),
            Err(PlanError::Zero("tunnel-inactivity"))
        );
        let mut bad = BASE.to_vec();
        bad.extend(["--held", "--tunnel-engine", "ftp://engine"]);
        let err = parse(&bad).unwrap().plan().unwrap_err();
        assert!(
            matches!(&err, PlanError::TunnelEngine(m) if !m.is_empty()),
            "{err}"
        );
        assert!(parse(&BASE).unwrap().plan().unwrap().tunnels.is_none());
    }

    #[test]
    fn zeroes_are_refused() {
        for (flag, name) in [("--agents", "agents"), ("--duration", "duration")] {
            let mut a = parse(&BASE).unwrap();
            match flag {
                "--agents" => a.agents = Some(0),
                _ => a.duration = Some(0),
            }
            assert_eq!(a.plan(), Err(PlanError::Zero(name)));
        }
        let mut a = parse(&BASE).unwrap();
        a.interval = 0;
        assert_eq!(a.plan(), Err(PlanError::Zero("interval")));
    }

    #[test]
    fn workers_are_chosen_or_checked() {
        let mut a = parse(&BASE).unwrap();
        a.agents = Some(100_000);
        assert_eq!(a.plan().unwrap().workers, 6);
        a.workers = Some(2);
        let err = a.plan().unwrap_err();
        assert!(matches!(err, PlanError::TooManyPerProcess { need: 6, .. }));
        assert!(err.to_string().contains("open-file limit"));
        a.workers = Some(8);
        assert_eq!(a.plan().unwrap().workers, 8);
        a.agents = Some(4);
        assert_eq!(a.plan(), Err(PlanError::MoreWorkersThanAgents(8)));
        a.agents = Some(18_000);
        a.workers = None;
        assert_eq!(a.plan().unwrap().workers, 1);
    }

    #[test]
    fn sources_are_bounded() {
        let mut args = BASE.to_vec();
        args.extend(["--sources", "0"]);
        assert!(parse(&args).is_err());
        let mut args = BASE.to_vec();
        args.extend(["--sources", "255"]);
        assert!(parse(&args).is_err());
    }
}
