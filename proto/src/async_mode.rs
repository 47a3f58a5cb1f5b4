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
/// Most command results in one request (an agent sends at most 64 at a time, from an outbox
/// of at most 256).
pub const MAX_RESULTS_PER_REQUEST: usize = 256;

/// Sent by an async agent at every tick, inside a signed frame (see [`crate::proof`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AsyncRequest {
    /// Identity, timestamp and agent information, as in standard mode (`interval_secs` is the
    /// agent's smallest interval).
    pub checkin: CheckinRequest,
    pub snapshot: Option<SnapshotReport>,
    /// Results not yet acknowledged by the server, oldest first; at most
    /// [`MAX_RESULTS_PER_REQUEST`].
    #[serde(deserialize_with = "de::results")]
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
    /// Commands after the request's `done_through`, oldest first; at most
    /// [`MAX_COMMANDS_PER_ANSWER`].
    #[serde(deserialize_with = "de::commands")]
    pub commands: Vec<Command>,
    /// (Version 2.) As [`crate::wire::CheckinAnswer::desired`].
    pub desired: Option<u64>,
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
        #[serde(deserialize_with = "de::text")]
        container: String,
    },
    ContainerStop {
        #[serde(deserialize_with = "de::text")]
        container: String,
        timeout_secs: Option<u32>,
    },
    ContainerRestart {
        #[serde(deserialize_with = "de::text")]
        container: String,
        timeout_secs: Option<u32>,
    },
    ContainerKill {
        #[serde(deserialize_with = "de::text")]
        container: String,
        #[serde(deserialize_with = "de::opt_text")]
        signal: Option<String>,
    },
    ContainerRemove {
        #[serde(deserialize_with = "de::text")]
        container: String,
        force: bool,
    },
    ImageRemove {
        #[serde(deserialize_with = "de::text")]
        image: String,
        force: bool,
    },
    VolumeRemove {
        #[serde(deserialize_with = "de::text")]
        volume: String,
        force: bool,
    },
    /// Removes every container of a compose project (recognised by its label), then its
    /// networks.
    StackRemove {
        #[serde(deserialize_with = "de::text")]
        stack: String,
    },
    /// Creates (or replaces) one container per service, labelled as compose labels its own,
    /// and starts it. The control plane turns a compose file into `services`.
    StackDeploy {
        #[serde(deserialize_with = "de::text")]
        stack: String,
        #[serde(deserialize_with = "de::services")]
        services: Vec<ServiceSpec>,
    },
}

/// One service of a stack, as the engine API wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    #[serde(deserialize_with = "de::text")]
    pub name: String,
    #[serde(deserialize_with = "de::text")]
    pub image: String,
    #[serde(deserialize_with = "de::opt_words")]
    pub command: Option<Vec<String>>,
    #[serde(deserialize_with = "de::opt_words")]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE`.
    #[serde(deserialize_with = "de::words")]
    pub environment: Vec<String>,
    #[serde(deserialize_with = "de::ports")]
    pub ports: Vec<PortSpec>,
    #[serde(deserialize_with = "de::labels")]
    pub labels: BTreeMap<String, String>,
    /// `no`, `always`, `on-failure`, `unless-stopped`.
    #[serde(deserialize_with = "de::opt_text")]
    pub restart: Option<String>,
    /// `volume:/path[:ro]` or `/host/path:/path[:ro]`.
    #[serde(deserialize_with = "de::words")]
    pub volumes: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    #[serde(deserialize_with = "de::opt_text")]
    pub host_ip: Option<String>,
    pub host_port: Option<u16>,
    pub container_port: u16,
    /// `tcp` or `udp`.
    #[serde(deserialize_with = "de::text")]
    pub protocol: String,
}

/// Most services in one stack.
pub const MAX_SERVICES: usize = 64;
/// Most entries of each list of a service: command and entrypoint words, environment
/// entries, ports, labels, volumes (checked at queue time, and when the agent decodes).
pub const MAX_SERVICE_ENTRIES: usize = 1_024;
/// Largest encoded command (a stack deploy): several fit in one answer. No string of a
/// command is longer (the bound its decoder applies to every string).
pub const MAX_COMMAND_BYTES: usize = 16 * 1024;

/// The `deserialize_with` helpers of the types of this module: each refuses a list, map or
/// string over its bound as soon as its length is read (see [`crate::codec::bound`]).
mod de {
    use std::collections::BTreeMap;

    use serde::de::{DeserializeSeed, Deserializer};

    use super::*;
    use crate::codec::bound::{ClipText, List, Map, Opt, Plain, Text};

    const TEXT: Text = Text {
        what: "command text",
        max: MAX_COMMAND_BYTES,
    };

    const fn entries<E>(what: &'static str, elem: E) -> List<E> {
        List {
            what,
            max: MAX_SERVICE_ENTRIES,
            elem,
        }
    }

    pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        TEXT.deserialize(d)
    }

    pub fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Opt(TEXT).deserialize(d)
    }

    pub fn words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        entries("service entries", TEXT).deserialize(d)
    }

    pub fn opt_words<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        Opt(entries("service words", TEXT)).deserialize(d)
    }

    pub fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PortSpec>, D::Error> {
        entries("service ports", Plain::new()).deserialize(d)
    }

    pub fn labels<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        Map {
            what: "service labels",
            max: MAX_SERVICE_ENTRIES,
            key: TEXT,
            value: TEXT,
        }
        .deserialize(d)
    }

    pub fn services<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServiceSpec>, D::Error> {
        List {
            what: "stack services",
            max: MAX_SERVICES,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn commands<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
        List {
            what: "commands",
            max: MAX_COMMANDS_PER_ANSWER,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn results<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CommandResult>, D::Error> {
        List {
            what: "command results",
            max: MAX_RESULTS_PER_REQUEST,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn result_error<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Opt(ClipText {
            max: MAX_RESULT_ERROR,
        })
        .deserialize(d)
    }
}

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
        for (list, len) in [
            ("command", s.command.as_ref().map_or(0, Vec::len)),
            ("entrypoint", s.entrypoint.as_ref().map_or(0, Vec::len)),
            ("environment", s.environment.len()),
            ("ports", s.ports.len()),
            ("labels", s.labels.len()),
            ("volumes", s.volumes.len()),
        ] {
            if len > MAX_SERVICE_ENTRIES {
                return bad(format!(
                    "service {}: {list} has {len} entries, more than {MAX_SERVICE_ENTRIES}",
                    s.name
                ));
            }
        }
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
    /// [`MAX_RESULT_ERROR`] bytes (a longer one is cut to that when decoded, not refused).
    #[serde(deserialize_with = "de::result_error")]
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

    fn limit(e: codec::CodecError) -> String {
        match e {
            codec::CodecError::Limit(text) => text,
            other => panic!("expected a limit error, got {other}"),
        }
    }

    fn first_request() -> AsyncRequest {
        AsyncRequest {
            checkin: CheckinRequest {
                endpoint_id: 9,
                edge_id: Some(uuid::Uuid::nil()),
                timestamp_lo: 1,
                timestamp_hi: Some(2),
                interval_secs: 60,
                agent: Some(crate::wire::AgentInfo {
                    version: "v".repeat(crate::wire::MAX_AGENT_TEXT),
                    platform: crate::wire::Platform::Docker,
                    hostname: "h".repeat(crate::wire::MAX_AGENT_TEXT),
                }),
            },
            snapshot: Some(SnapshotReport::Full(vec![7; 1000])),
            results: (0..MAX_RESULTS_PER_REQUEST as u64)
                .map(|id| CommandResult {
                    id,
                    error: Some("é".repeat(MAX_RESULT_ERROR / 2)),
                })
                .collect(),
            done_through: Some(3),
        }
    }

    #[test]
    fn a_request_at_the_bounds_round_trips_and_one_more_is_refused() {
        let req = first_request();
        let frame = codec::encode(&req).unwrap();
        assert!(frame.len() <= MAX_ASYNC_FRAME);
        assert_eq!(
            codec::decode::<AsyncRequest>(&frame, MAX_ASYNC_FRAME).unwrap(),
            req
        );
        let refused = |r: &AsyncRequest| {
            limit(
                codec::decode::<AsyncRequest>(&codec::encode(r).unwrap(), MAX_ASYNC_FRAME)
                    .unwrap_err(),
            )
        };
        let mut more = req.clone();
        more.results.push(CommandResult { id: 1, error: None });
        assert_eq!(
            refused(&more),
            "command results: 257 entries, more than the limit of 256"
        );
        // An error text over its bound is cut, not refused: the rest of the request stands.
        let mut long = req.clone();
        long.results[0].error = Some(format!("{}x", "é".repeat(MAX_RESULT_ERROR / 2)));
        long.results[1].error = Some("y".repeat(5 * MAX_RESULT_ERROR));
        let got =
            codec::decode::<AsyncRequest>(&codec::encode(&long).unwrap(), MAX_ASYNC_FRAME).unwrap();
        assert_eq!(
            got.results[0].error.as_deref(),
            req.results[0].error.as_deref()
        );
        assert_eq!(got.results[1].error, Some("y".repeat(MAX_RESULT_ERROR)));
        assert_eq!(got.results.len(), req.results.len());
        let mut more = req;
        more.checkin.agent.as_mut().unwrap().hostname.push('x');
        assert_eq!(
            refused(&more),
            "agent info: a string of 1025 bytes, more than the limit of 1024"
        );
    }

    #[test]
    fn a_request_announcing_half_a_million_results_is_refused_unbuilt() {
        let head = codec::encode(&AsyncRequest {
            results: Vec::new(),
            ..first_request()
        })
        .unwrap();
        // The results' length is the byte before `done_through` (Some(3): 1, 3).
        let at = head.len() - 3;
        assert_eq!(head[at..], [0, 1, 3]);
        let mut frame = head[..at].to_vec();
        frame.push(252);
        frame.extend_from_slice(&500_000u32.to_le_bytes());
        frame.resize(frame.len() + 2 * 500_000, 0); // id 0, no error
        frame.extend_from_slice(&head[at + 1..]);
        assert!(frame.len() <= MAX_ASYNC_FRAME);
        let started = std::time::Instant::now();
        let e = limit(codec::decode::<AsyncRequest>(&frame, MAX_ASYNC_FRAME).unwrap_err());
        assert_eq!(
            e,
            "command results: 500000 entries, more than the limit of 256"
        );
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
    }

    fn full_service(name: &str) -> ServiceSpec {
        let n = MAX_SERVICE_ENTRIES;
        ServiceSpec {
            name: name.into(),
            image: "busybox:latest".into(),
            command: Some((0..n).map(|i| format!("{i}")).collect()),
            entrypoint: Some(vec!["x".repeat(MAX_COMMAND_BYTES)]),
            environment: (0..n).map(|i| format!("K{i}=")).collect(),
            ports: (0..n)
                .map(|i| PortSpec {
                    host_ip: Some("127.0.0.1".into()),
                    host_port: None,
                    container_port: i as u16 + 1,
                    protocol: "tcp".into(),
                })
                .collect(),
            labels: (0..n).map(|i| (format!("l{i}"), String::new())).collect(),
            restart: Some("always".into()),
            volumes: (0..n).map(|i| format!("v{i}:/v")).collect(),
        }
    }

    #[test]
    fn an_answer_at_the_bounds_round_trips_and_one_more_is_refused() {
        let mut services = vec![full_service("big")];
        services.extend((1..MAX_SERVICES).map(|i| ServiceSpec {
            name: format!("s{i}"),
            image: "busybox".into(),
            ..ServiceSpec::default()
        }));
        let mut commands = vec![Command {
            id: 1,
            action: Action::StackDeploy {
                stack: "shop".into(),
                services,
            },
        }];
        commands.extend((2..=MAX_COMMANDS_PER_ANSWER as u64).map(|id| Command {
            id,
            action: Action::ContainerKill {
                container: "web".into(),
                signal: Some("HUP".into()),
            },
        }));
        let answer = AsyncAnswer {
            intervals: AsyncIntervals {
                ping: 60,
                snapshot: 60,
                command: 60,
            },
            server_time_ms: Some(1),
            snapshot_ack: Some(2),
            need_full_snapshot: false,
            commands,
            desired: None,
        };
        let frame = codec::encode(&answer).unwrap();
        assert!(frame.len() <= MAX_ASYNC_ANSWER, "{} bytes", frame.len());
        assert_eq!(
            codec::decode::<AsyncAnswer>(&frame, MAX_ASYNC_ANSWER).unwrap(),
            answer
        );
        let refused = |a: &AsyncAnswer| {
            limit(
                codec::decode::<AsyncAnswer>(&codec::encode(a).unwrap(), MAX_ASYNC_ANSWER)
                    .unwrap_err(),
            )
        };
        fn deploy(a: &mut AsyncAnswer) -> &mut Vec<ServiceSpec> {
            match &mut a.commands[0].action {
                Action::StackDeploy { services, .. } => services,
                _ => unreachable!(),
            }
        }
        let mut more = answer.clone();
        more.commands.push(more.commands[1].clone());
        assert_eq!(
            refused(&more),
            "commands: 33 entries, more than the limit of 32"
        );
        let mut more = answer.clone();
        deploy(&mut more).push(ServiceSpec::default());
        assert_eq!(
            refused(&more),
            "stack services: 65 entries, more than the limit of 64"
        );
        let mut more = answer.clone();
        deploy(&mut more)[0].environment.push("K=".into());
        assert_eq!(
            refused(&more),
            "service entries: 1025 entries, more than the limit of 1024"
        );
        let mut more = answer.clone();
        deploy(&mut more)[0]
            .labels
            .insert("one".into(), "more".into());
        assert_eq!(
            refused(&more),
            "service labels: 1025 entries, more than the limit of 1024"
        );
        let mut more = answer;
        deploy(&mut more)[0].entrypoint.as_mut().unwrap()[0].push('x');
        assert_eq!(
            refused(&more),
            "command text: a string of 16385 bytes, more than the limit of 16384"
        );
    }

    #[test]
    fn services_over_a_decode_bound_are_refused_at_queue_time() {
        let small = |name: &str| ServiceSpec {
            name: name.into(),
            image: "busybox".into(),
            ..ServiceSpec::default()
        };
        let deploy = |s: ServiceSpec| Action::StackDeploy {
            stack: "shop".into(),
            services: vec![s],
        };
        let mut ports = small("web");
        ports.ports = (0..=MAX_SERVICE_ENTRIES)
            .map(|i| PortSpec {
                container_port: i as u16 + 1,
                protocol: "udp".into(),
                ..PortSpec::default()
            })
            .collect();
        let e = deploy(ports).validate().unwrap_err().to_string();
        assert_eq!(e, "service web: ports has 1025 entries, more than 1024");
        let mut env = small("web");
        env.environment = vec!["K=".into(); MAX_SERVICE_ENTRIES];
        assert_eq!(deploy(env.clone()).validate(), Ok(()));
        env.environment.push("K=".into());
        assert!(deploy(env).validate().is_err());
    }

    #[test]
    fn errors_are_clipped_on_a_char_boundary() {
        let long = "é".repeat(MAX_RESULT_ERROR);
        let clipped = clip_error(long);
        assert!(clipped.len() <= MAX_RESULT_ERROR);
        assert!(clipped.chars().all(|c| c == 'é'));
    }
}
