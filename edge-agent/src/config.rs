//! Agent configuration: raw flags / environment variables in, a validated [`Config`] out.
//!
//! `clap` reads the process environment only in `main`; everything here works on the
//! [`Args`] struct, so tests build it by hand and never touch the real environment.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use proto::{JoinToken, TokenError};
use uuid::Uuid;

/// Default of `EDGE_DATA_DIR`.
pub const DEFAULT_DATA_DIR: &str = "/data";
/// Default of `DOCKER_HOST`.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Default of `EDGE_INACTIVITY_TIMEOUT`.
pub const DEFAULT_INACTIVITY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long a stack's containers must stay up before it counts as `running`.
pub const DEFAULT_STACK_SETTLE: Duration = Duration::from_secs(10);

/// The edgeplane edge agent: checks in with the control plane, never opens a port.
///
/// Every option can also be given as the environment variable shown, which is how the install
/// commands pass them.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "edge-agent", version, about)]
pub struct Args {
    /// Join token from the control plane (required).
    // hide_env_values: `--help` must never print the token or the secret.
    #[arg(long, env = "EDGE_KEY", hide_env_values = true)]
    pub edge_key: Option<String>,

    /// This environment's Edge ID (a UUID); when absent, one is generated once and persisted
    /// in the data directory.
    #[arg(long, env = "EDGE_ID")]
    pub edge_id: Option<String>,

    /// Where the agent persists its Edge ID and state [default: /data].
    #[arg(long, env = "EDGE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// `1`: async mode (no tunnel). Not available in this build yet [default: 0].
    #[arg(long = "async", env = "EDGE_ASYNC")]
    pub async_mode: Option<String>,

    /// `1`: accept any API certificate when polling (a self-signed one whose fingerprint is in
    /// the join token is accepted without this) [default: 0].
    #[arg(long, env = "EDGE_INSECURE_POLL")]
    pub insecure_poll: Option<String>,

    /// Shared secret that must match the control plane's.
    #[arg(long, env = "AGENT_SECRET", hide_env_values = true)]
    pub agent_secret: Option<String>,

    /// The local environment API the agent serves and snapshots
    /// [default: unix:///var/run/docker.sock].
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,

    /// An idle tunnel closes after this long, e.g. `5m` or `90s` [default: 5m].
    #[arg(long, env = "EDGE_INACTIVITY_TIMEOUT")]
    pub inactivity_timeout: Option<String>,

    /// An edge stack counts as `running` once its containers have been up (and healthy,
    /// where they have a healthcheck) this long, e.g. `10s` [default: 10s].
    #[arg(long, env = "EDGE_STACK_SETTLE")]
    pub stack_settle: Option<String>,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub token: JoinToken,
    /// `None`: read from (or generate into) `data_dir`.
    pub edge_id: Option<Uuid>,
    pub data_dir: PathBuf,
    pub insecure_poll: bool,
    pub agent_secret: Option<String>,
    pub docker_host: String,
    pub inactivity_timeout: Duration,
    /// `EDGE_ASYNC=1`: no tunnel; pings, snapshots and commands on their own intervals.
    pub async_mode: bool,
    /// How long a stack's containers must stay up before it counts as `running`.
    pub stack_settle: Duration,
}

/// Why the configuration was refused. Each message is one line naming the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("EDGE_KEY is required: set it to the join token shown by the control plane")]
    MissingEdgeKey,
    #[error("invalid EDGE_KEY: {0}")]
    EdgeKey(#[from] TokenError),
    #[error("invalid EDGE_ID: {0:?} is not a UUID")]
    EdgeId(String),
    #[error("invalid {var}: {value:?} is not 0 or 1")]
    Flag { var: &'static str, value: String },
    #[error(
        "invalid EDGE_INACTIVITY_TIMEOUT: {value:?} is not a duration such as \"5m\" or \"90s\""
    )]
    InactivityTimeout { value: String },
    #[error("invalid EDGE_STACK_SETTLE: {value:?} is not a duration such as \"10s\"")]
    StackSettle { value: String },
    #[error("invalid DOCKER_HOST: {0}")]
    DockerHost(#[from] crate::docker::DockerHostError),
}

impl Config {
    /// Validates raw arguments. Empty values count as unset: compose files and install
    /// scripts often pass `VAR=` for options they do not use.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let async_mode = parse_flag("EDGE_ASYNC", args.async_mode)?;
        let key = non_empty(args.edge_key).ok_or(ConfigError::MissingEdgeKey)?;
        let token = JoinToken::parse(&key)?;
        let edge_id = non_empty(args.edge_id)
            .map(|raw| Uuid::parse_str(raw.trim()).map_err(|_| ConfigError::EdgeId(raw)))
            .transpose()?;
        let insecure_poll = parse_flag("EDGE_INSECURE_POLL", args.insecure_poll)?;
        let inactivity_timeout = match non_empty(args.inactivity_timeout) {
            None => DEFAULT_INACTIVITY_TIMEOUT,
            Some(value) => humantime::parse_duration(value.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or(ConfigError::InactivityTimeout { value })?,
        };
        let stack_settle = match non_empty(args.stack_settle) {
            None => DEFAULT_STACK_SETTLE,
            Some(value) => humantime::parse_duration(value.trim())
                .ok()
                .filter(|d| *d <= Duration::from_secs(3600))
                .ok_or(ConfigError::StackSettle { value })?,
        };
        let docker_host =
            non_empty(args.docker_host).unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
        crate::docker::DockerHost::parse(&docker_host)?;
        Ok(Self {
            token,
            edge_id,
            data_dir: args
                .data_dir
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            insecure_poll,
            agent_secret: non_empty(args.agent_secret),
            docker_host: docker_host.trim().to_owned(),
            inactivity_timeout,
            async_mode,
            stack_settle,
        })
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// Portainer's agent takes `1`/`0`; `true`/`false` are accepted too because people write them.
fn parse_flag(var: &'static str, value: Option<String>) -> Result<bool, ConfigError> {
    let Some(value) = non_empty(value) else {
        return Ok(false);
    };
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        _ => Err(ConfigError::Flag { var, value }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use proto::token::JoinSecret;

    fn token() -> String {
        JoinToken {
            api_url: "https://cp.example.com:9443".into(),
            tunnel_addr: "cp.example.com:8000".into(),
            tunnel_fingerprint: [7; 32],
            endpoint_id: 42,
            secret: JoinSecret::from_bytes([9; 32]),
        }
        .encode()
    }

    fn args() -> Args {
        Args {
            edge_key: Some(token()),
            ..Args::default()
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn defaults() {
        let c = Config::from_args(args()).unwrap();
        assert_eq!(c.token.endpoint_id, 42);
        assert_eq!(c.edge_id, None);
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert!(!c.insecure_poll);
        assert_eq!(c.agent_secret, None);
        assert_eq!(c.docker_host, DEFAULT_DOCKER_HOST);
        assert_eq!(c.inactivity_timeout, Duration::from_secs(300));
        assert_eq!(c.stack_settle, DEFAULT_STACK_SETTLE);
    }

    #[test]
    fn every_option_set() {
        let id = Uuid::new_v4();
        let c = Config::from_args(Args {
            edge_key: Some(format!("  {}\n", token())),
            edge_id: Some(id.to_string()),
            data_dir: Some("/var/lib/agent".into()),
            async_mode: Some("0".into()),
            insecure_poll: Some("1".into()),
            agent_secret: Some("s3cret".into()),
            docker_host: Some("tcp://127.0.0.1:2375".into()),
            inactivity_timeout: Some("90s".into()),
            stack_settle: Some("2s".into()),
        })
        .unwrap();
        assert_eq!(c.edge_id, Some(id));
        assert_eq!(c.stack_settle, Duration::from_secs(2));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/agent"));
        assert!(c.insecure_poll);
        assert_eq!(c.agent_secret.as_deref(), Some("s3cret"));
        assert_eq!(c.docker_host, "tcp://127.0.0.1:2375");
        assert_eq!(c.inactivity_timeout, Duration::from_secs(90));
    }

    #[test]
    fn empty_values_mean_unset() {
        let c = Config::from_args(Args {
            edge_id: Some(String::new()),
            data_dir: Some(PathBuf::new()),
            async_mode: Some(String::new()),
            insecure_poll: Some(" ".into()),
            agent_secret: Some(String::new()),
            docker_host: Some(String::new()),
            inactivity_timeout: Some(String::new()),
            ..args()
        })
        .unwrap();
        assert_eq!(c.edge_id, None);
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.agent_secret, None);
        assert_eq!(c.docker_host, DEFAULT_DOCKER_HOST);
    }

    #[test]
    fn missing_key() {
        let err = Config::from_args(Args::default()).unwrap_err();
        assert_eq!(err, ConfigError::MissingEdgeKey);
        let err = Config::from_args(Args {
            edge_key: Some("  ".into()),
            ..Args::default()
        })
        .unwrap_err();
        assert_eq!(err, ConfigError::MissingEdgeKey);
    }

    #[test]
    fn malformed_key_names_the_proto_error() {
        let err = Config::from_args(Args {
            edge_key: Some("not base64!".into()),
            ..Args::default()
        })
        .unwrap_err();
        assert_eq!(err, ConfigError::EdgeKey(TokenError::Base64));
        let line = err.to_string();
        assert!(line.starts_with("invalid EDGE_KEY: join token is not valid base64"));
        assert!(!line.contains('\n'));
    }

    #[test]
    fn malformed_edge_id() {
        let err = Config::from_args(Args {
            edge_id: Some("host-1".into()),
            ..args()
        })
        .unwrap_err();
        assert_eq!(err, ConfigError::EdgeId("host-1".into()));
        assert_eq!(err.to_string(), "invalid EDGE_ID: \"host-1\" is not a UUID");
    }

    #[test]
    fn async_mode_is_a_flag() {
        let on = Config::from_args(Args {
            async_mode: Some("1".into()),
            ..args()
        })
        .unwrap();
        assert!(on.async_mode);
        assert!(!Config::from_args(args()).unwrap().async_mode);
    }

    #[test]
    fn bad_flags() {
        let err = Config::from_args(Args {
            insecure_poll: Some("maybe".into()),
            ..args()
        })
        .unwrap_err();
        assert_eq!(
            err,
            ConfigError::Flag {
                var: "EDGE_INSECURE_POLL",
                value: "maybe".into()
            }
        );
        let err = Config::from_args(Args {
            async_mode: Some("2".into()),
            ..args()
        })
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Flag {
                var: "EDGE_ASYNC",
                ..
            }
        ));
        assert!(
            Config::from_args(Args {
                insecure_poll: Some("TRUE".into()),
                ..args()
            })
            .unwrap()
            .insecure_poll
        );
    }

    #[test]
    fn bad_docker_host() {
        let err = Config::from_args(Args {
            docker_host: Some("/var/run/docker.sock".into()),
            ..args()
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::DockerHost(_)));
        let line = err.to_string();
        assert!(line.starts_with("invalid DOCKER_HOST: "), "{line}");
        assert!(line.contains("unix:///path/to/docker.sock"), "{line}");
    }

    #[test]
    fn bad_inactivity_timeout() {
        for bad in ["5 minutes please", "0s", "-5m", "5"] {
            let err = Config::from_args(Args {
                inactivity_timeout: Some(bad.into()),
                ..args()
            })
            .unwrap_err();
            assert_eq!(
                err,
                ConfigError::InactivityTimeout { value: bad.into() },
                "{bad}"
            );
        }
    }

    #[test]
    fn help_documents_every_variable() {
        let help = Args::command().render_long_help().to_string();
        for var in [
            "EDGE_KEY",
            "EDGE_ID",
            "EDGE_DATA_DIR",
            "EDGE_ASYNC",
            "EDGE_INSECURE_POLL",
            "AGENT_SECRET",
            "DOCKER_HOST",
            "EDGE_INACTIVITY_TIMEOUT",
        ] {
            assert!(help.contains(var), "--help does not document {var}");
        }
    }
}
