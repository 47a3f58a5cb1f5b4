//! Async mode: one signed request per tick carries a ping, a snapshot report and command
//! results, and fetches queued commands; the answer sets the intervals. No tunnel.
//!
//! A tick that only pings sends an [`AsyncRequest`] with nothing but its
//! [`CheckinRequest`] header. Snapshots travel as deltas against the last one the server
//! acknowledged ([`SnapshotReport::Delta`]), or as [`SnapshotReport::Unchanged`] when nothing
//! changed; the server asks for a full one (`need_full_snapshot`) when it cannot apply a delta.
//!
//! Commands have per-environment ids that grow by one. The agent runs them in id order and
//! tells the server the highest id it has finished (`done_through`); results travel until the
//! server has acknowledged them (an answer to a request that carried them). Delivery is
//! at-least-once, execution exactly-once: the agent remembers what it ran.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::wire::CheckinRequest;

/// Route of async requests.
pub const ASYNC_PATH: &str = "/edge/a";
/// Largest signed async request (a full snapshot is compressed, see
/// [`crate::snapshot::MAX_UPLOAD_FRAME`]).
pub const MAX_ASYNC_FRAME: usize = crate::snapshot::MAX_UPLOAD_FRAME;
/// Largest answer (intervals and at most [`MAX_COMMANDS_PER_ANSWER`] commands).
pub const MAX_ASYNC_ANSWER: usize = 64 * 1024;
/// Commands handed out in one answer at most.
pub const MAX_COMMANDS_PER_ANSWER: usize = 32;
/// Longest error text in a command result; longer ones are cut.
pub const MAX_RESULT_ERROR: usize = 1024;

/// Sent by an async agent at every tick, inside a signed frame (see [`crate::proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncRequest {
    /// Identity, timestamp and agent information, as in standard mode (`interval_secs` is the
    /// agent's smallest interval).
    pub checkin: CheckinRequest,
    pub snapshot: Option<SnapshotReport>,
    /// Results not yet acknowledged by the server, oldest first.
    pub results: Vec<CommandResult>,
    /// On a command tick: the highest command id the agent has finished (0: none); the
    /// server answers with the commands after it.
    pub done_through: Option<u64>,
}

/// The engine's state, as cheaply as it can be said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotReport {
    /// Same content as the snapshot with this digest, seen again now.
    Unchanged { digest: u64 },
    /// `snapshot::compress_delta` bytes against the last acknowledged snapshot.
    Delta(Vec<u8>),
    /// `snapshot::compress` bytes of the whole snapshot.
    Full(Vec<u8>),
}

/// The server's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncAnswer {
    pub intervals: AsyncIntervals,
    /// The server's clock, when the agent's is off by more than a second.
    pub server_time_ms: Option<u64>,
    /// Digest of the snapshot the server now holds, when the request carried one it took.
    pub snapshot_ack: Option<u64>,
    /// The server could not apply the report (unknown base, or nothing held): send the whole
    /// snapshot next time.
    pub need_full_snapshot: bool,
    /// Commands after the request's `done_through`, oldest first.
    pub commands: Vec<Command>,
}

/// Seconds; 0 turns that tick off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncIntervals {
    pub ping: u32,
    pub snapshot: u32,
    pub command: u32,
}

impl AsyncIntervals {
    /// The smallest interval that is on (the environment's liveness is judged by it).
    pub fn smallest(&self) -> Option<u32> {
        [self.ping, self.snapshot, self.command]
            .into_iter()
            .filter(|&s| s > 0)
            .min()
    }
}

/// One queued command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: u64,
    pub action: Action,
}

/// What a command does on the engine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    ContainerStart {
        container: String,
    },
    ContainerStop {
        container: String,
        timeout_secs: Option<u32>,
    },
    ContainerRestart {
        container: String,
        timeout_secs: Option<u32>,
    },
    ContainerKill {
        container: String,
        signal: Option<String>,
    },
    ContainerRemove {
        container: String,
        force: bool,
    },
    ImageRemove {
        image: String,
        force: bool,
    },
    VolumeRemove {
        volume: String,
        force: bool,
    },
    /// Removes every container of a compose project (recognised by its label), then its
    /// networks.
    StackRemove {
        stack: String,
    },
    /// Creates (or replaces) one container per service, labelled as compose labels its own,
    /// and starts it. The control plane turns a compose file into `services`.
    StackDeploy {
        stack: String,
        services: Vec<ServiceSpec>,
    },
}

/// One service of a stack, as the engine API wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    pub command: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE`.
    pub environment: Vec<String>,
    pub ports: Vec<PortSpec>,
    pub labels: BTreeMap<String, String>,
    /// `no`, `always`, `on-failure`, `unless-stopped`.
    pub restart: Option<String>,
    /// `volume:/path[:ro]` or `/host/path:/path[:ro]`.
    pub volumes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub host_ip: Option<String>,
    pub host_port: Option<u16>,
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// Most services in one stack.
pub const MAX_SERVICES: usize = 64;
/// Largest encoded command (a stack deploy): several fit in one answer.
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// Why an action is refused at queue time.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActionError {
    #[error("{field} must not be empty")]
    Empty { field: &'static str },
    #[error("{field} {value:?} is not a valid name or id (letters, digits, and . _ - : / @ only, at most 256)")]
    BadName { field: &'static str, value: String },
    #[error("signal {0:?} is not a valid signal name or number")]
    BadSignal(String),
    #[error("timeout of {0} s is more than an hour")]
    BadTimeout(u32),
    #[error("{0}")]
    BadStack(String),
}

fn check_name(field: &'static str, value: &str) -> Result<(), ActionError> {
    if value.is_empty() {
        return Err(ActionError::Empty { field });
    }
    let ok = value.len() <= 256
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@'));
    // Names go into engine URL paths: no "..", no leading slash.
    if !ok || value.starts_with('/') || value.split('/').any(|p| p == ".." || p == ".") {
        return Err(ActionError::BadName {
            field,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Compose project names: lowercase letters, digits, `-` and `_`, starting with a letter or
/// digit (what compose itself accepts).
fn check_stack_name(name: &str) -> Result<(), ActionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ActionError::BadStack(format!(
            "stack name {name:?} must be 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit"
        )))
    }
}

fn check_services(services: &[ServiceSpec]) -> Result<(), ActionError> {
    let bad = |m: String| Err(ActionError::BadStack(m));
    if services.is_empty() {
        return bad("a stack needs at least one service".into());
    }
    if services.len() > MAX_SERVICES {
        return bad(format!("a stack has at most {MAX_SERVICES} services"));
    }
    for s in services {
        check_stack_name(&s.name).map_err(|_| {
            ActionError::BadStack(format!(
                "service name {:?} must be lowercase letters, digits, '-' or '_'",
                s.name
            ))
        })?;
        check_name("image", &s.image)?;
        if let Some(r) = &s.restart {
            if !["no", "always", "on-failure", "unless-stopped"].contains(&r.as_str()) {
                return bad(format!(
                    "service {}: restart {r:?} is not one of no, always, on-failure, unless-stopped",
                    s.name
                ));
            }
        }
        for p in &s.ports {
            if p.container_port == 0 || !["tcp", "udp"].contains(&p.protocol.as_str()) {
                return bad(format!(
                    "service {}: a port needs a container port and tcp or udp",
                    s.name
                ));
            }
        }
        if s.environment.iter().any(|e| !e.contains('=')) {
            return bad(format!(
                "service {}: environment entries are KEY=VALUE",
                s.name
            ));
        }
    }
    Ok(())
}

fn check_timeout(t: Option<u32>) -> Result<(), ActionError> {
    match t {
        Some(t) if t > 3600 => Err(ActionError::BadTimeout(t)),
        _ => Ok(()),
    }
}

impl Action {
    /// The action's name in the admin API (`containerStop`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Action::ContainerStart { .. } => "containerStart",
            Action::ContainerStop { .. } => "containerStop",
            Action::ContainerRestart { .. } => "containerRestart",
            Action::ContainerKill { .. } => "containerKill",
            Action::ContainerRemove { .. } => "containerRemove",
            Action::ImageRemove { .. } => "imageRemove",
            Action::VolumeRemove { .. } => "volumeRemove",
            Action::StackRemove { .. } => "stackRemove",
            Action::StackDeploy { .. } => "stackDeploy",
        }
    }

    /// The container, image, volume or stack it acts on.
    pub fn target(&self) -> &str {
        match self {
            Action::ContainerStart { container }
            | Action::ContainerStop { container, .. }
            | Action::ContainerRestart { container, .. }
            | Action::ContainerKill { container, .. }
            | Action::ContainerRemove { container, .. } => container,
            Action::ImageRemove { image, .. } => image,
            Action::VolumeRemove { volume, .. } => volume,
            Action::StackRemove { stack } | Action::StackDeploy { stack, .. } => stack,
        }
    }

    /// Refuses what could never run: empty or malformed targets, bad signals.
    pub fn validate(&self) -> Result<(), ActionError> {
        match self {
            Action::ContainerStart { container } | Action::ContainerRemove { container, .. } => {
                check_name("container", container)
            }
            Action::ContainerStop {
                container,
                timeout_secs,
            }
            | Action::ContainerRestart {
                container,
                timeout_secs,
            } => {
                check_name("container", container)?;
                check_timeout(*timeout_secs)
            }
            Action::ContainerKill { container, signal } => {
                check_name("container", container)?;
                match signal {
                    Some(s)
                        if s.is_empty()
                            || s.len() > 16
                            || !s.chars().all(|c| c.is_ascii_alphanumeric()) =>
                    {
                        Err(ActionError::BadSignal(s.clone()))
                    }
                    _ => Ok(()),
                }
            }
            Action::ImageRemove { image, .. } => check_name("image", image),
            Action::VolumeRemove { volume, .. } => check_name("volume", volume),
            Action::StackRemove { stack } => check_stack_name(stack),
            Action::StackDeploy { stack, services } => {
                check_stack_name(stack)?;
                check_services(services)?;
                let size = crate::codec::encode(self)
                    .map(|f| f.len())
                    .map_err(|e| ActionError::BadStack(e.to_string()))?;
                if size > MAX_COMMAND_BYTES {
                    return Err(ActionError::BadStack(format!(
                        "the stack takes {size} bytes once encoded, more than {MAX_COMMAND_BYTES}"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// How a command ended on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: u64,
    /// `None`: succeeded; otherwise the engine's (or the agent's) error, at most
    /// [`MAX_RESULT_ERROR`] bytes.
    pub error: Option<String>,
}

/// Cuts an error text to [`MAX_RESULT_ERROR`] bytes on a character boundary.
pub fn clip_error(mut text: String) -> String {
    if text.len() > MAX_RESULT_ERROR {
        let mut end = MAX_RESULT_ERROR;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec;

    #[test]
    fn actions_are_checked_before_they_are_queued() {
        let ok = Action::ContainerStop {
            container: "web-1".into(),
            timeout_secs: Some(10),
        };
        assert_eq!(ok.validate(), Ok(()));
        for bad in ["", "../../containers", "a b", "/etc", "x/../y"] {
            let a = Action::ContainerStart {
                container: bad.into(),
            };
            assert!(a.validate().is_err(), "{bad:?} accepted");
        }
        assert!(Action::ContainerKill {
            container: "c".into(),
            signal: Some("SIG KILL".into())
        }
        .validate()
        .is_err());
        assert!(Action::ContainerRestart {
            container: "c".into(),
            timeout_secs: Some(7200)
        }
        .validate()
        .is_err());
        assert_eq!(
            Action::ImageRemove {
                image: "docker.io/library/busybox:latest".into(),
                force: false
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn stacks_are_checked_before_they_are_queued() {
        let web = ServiceSpec {
            name: "web".into(),
            image: "busybox:latest".into(),
            ..ServiceSpec::default()
        };
        let deploy = |stack: &str, services: Vec<ServiceSpec>| Action::StackDeploy {
            stack: stack.into(),
            services,
        };
        assert_eq!(deploy("shop", vec![web.clone()]).validate(), Ok(()));
        for stack in ["", "Shop", "-shop", "shop/x", &"s".repeat(65)] {
            assert!(
                deploy(stack, vec![web.clone()]).validate().is_err(),
                "{stack:?}"
            );
        }
        assert!(deploy("shop", vec![]).validate().is_err());
        let bad_restart = ServiceSpec {
            restart: Some("sometimes".into()),
            ..web.clone()
        };
        assert!(deploy("shop", vec![bad_restart]).validate().is_err());
        let bad_env = ServiceSpec {
            environment: vec!["NOVALUE".into()],
            ..web.clone()
        };
        assert!(deploy("shop", vec![bad_env]).validate().is_err());
        let huge = ServiceSpec {
            environment: vec![format!("K={}", "v".repeat(MAX_COMMAND_BYTES))],
            ..web
        };
        let e = deploy("shop", vec![huge])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes once encoded"), "{e}");
    }

    #[test]
    fn actions_travel_in_the_codec() {
        let a = Action::ContainerKill {
            container: "web".into(),
            signal: Some("HUP".into()),
        };
        let frame = codec::encode(&a).unwrap();
        assert_eq!(codec::decode::<Action>(&frame, 64).unwrap(), a);
        assert_eq!((a.kind(), a.target()), ("containerKill", "web"));
    }

    #[test]
    fn an_idle_tick_is_small() {
        let req = AsyncRequest {
            checkin: CheckinRequest {
                endpoint_id: 1234,
                edge_id: None,
                timestamp_lo: u32::MAX,
                timestamp_hi: None,
                interval_secs: 60,
                agent: None,
            },
            snapshot: Some(SnapshotReport::Unchanged { digest: u64::MAX }),
            results: Vec::new(),
            done_through: Some(100_000),
        };
        let frame = codec::encode(&req).unwrap();
        assert!(frame.len() <= 40, "{} bytes", frame.len());
        assert_eq!(codec::decode::<AsyncRequest>(&frame, 64).unwrap(), req);
    }

    #[test]
    fn errors_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(MAX_RESULT_ERROR);
        let clipped = clip_error(long);
        assert!(clipped.len() <= MAX_RESULT_ERROR);
        assert!(clipped.chars().all(|c| c == 'é'));
    }
}
