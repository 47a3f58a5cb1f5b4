//! Edge stacks on the device: the desired state an agent fetches, and the status reports it
//! sends back.
//!
//! A check-in (or async tick) answer carries `desired: Some(digest)` only while the server
//! has not heard the agent acknowledge that digest, so an idle agent's check-ins do not grow.
//! An agent that sees a digest it does not hold fetches the desired state ([`DESIRED_PATH`],
//! a signed [`StackSync`]), keeps it, and then reports ([`STACK_REPORT_PATH`], a signed
//! [`StackReport`] carrying the digest it now holds, which acknowledges it) its stacks'
//! statuses as they change. The compose file never crosses the link as YAML: the server
//! renders it for the environment and sends the checked [`StackSpec`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::async_mode::ServiceSpec;

/// Route of the desired-state fetch.
pub const DESIRED_PATH: &str = "/edge/d";
/// Route of stack status reports.
pub const STACK_REPORT_PATH: &str = "/edge/r";
/// Largest signed fetch request.
pub const MAX_SYNC_FRAME: usize = 1024;
/// Largest signed report (64 statuses with errors of [`MAX_STACK_ERROR`] fit).
pub const MAX_REPORT_FRAME: usize = 128 * 1024;
/// Largest desired-state answer.
pub const MAX_DESIRED_ANSWER: usize = 4 * 1024 * 1024;
/// Most stacks one environment runs.
pub const MAX_STACKS_PER_ENV: usize = 64;
/// Most networks or volumes of one stack.
pub const MAX_STACK_RESOURCES: usize = 64;
/// Longest error text in a report; longer ones are cut.
pub const MAX_STACK_ERROR: usize = 1024;
/// Longest name (stack, service, network, volume).
pub const MAX_NAME: usize = 256;

/// The signed header of a fetch (and of a report): who asks, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSync {
    pub endpoint_id: u64,
    pub edge_id: Uuid,
    /// Full ms timestamp of the request (the MAC covers it; freshness is checked).
    pub timestamp_ms: u64,
}

/// What the environment should run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// The digest check-in answers announce for exactly this state.
    pub digest: u64,
    /// By stack id.
    #[serde(deserialize_with = "de::stacks")]
    pub stacks: Vec<DesiredStack>,
}

/// One stack at the version this environment should run, rendered for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredStack {
    pub id: u64,
    /// The stack's name; the compose project on the device is `edge_<name>`.
    #[serde(deserialize_with = "de::name")]
    pub name: String,
    pub version: u32,
    pub spec: StackSpec,
}

impl DesiredStack {
    /// The compose project name on the device.
    pub fn project(&self) -> String {
        project_name(&self.name)
    }
}

/// The compose project of a stack called `name`: `edge_<name>`, lowercased (compose's rule
/// for project names).
pub fn project_name(name: &str) -> String {
    format!("edge_{}", name.to_ascii_lowercase())
}

/// A stack's compose file as the engine API needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackSpec {
    #[serde(deserialize_with = "de::services")]
    pub services: Vec<StackService>,
    /// Networks declared by the file (created as `<project>_<name>`).
    #[serde(deserialize_with = "de::names")]
    pub networks: Vec<String>,
    /// Named volumes declared by the file (created as `<project>_<name>`).
    #[serde(deserialize_with = "de::names")]
    pub volumes: Vec<String>,
}

/// One service: what a container needs, and how it is ordered, checked and pulled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackService {
    pub container: ServiceSpec,
    #[serde(deserialize_with = "de::dependencies")]
    pub depends_on: Vec<Dependency>,
    /// Networks it joins (none: the stack's `default`).
    #[serde(deserialize_with = "de::names")]
    pub networks: Vec<String>,
    pub healthcheck: Option<Healthcheck>,
    pub pull: PullPolicy,
    pub extras: ContainerExtras,
}

/// What else a service may set on its container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerExtras {
    #[serde(deserialize_with = "de::opt_text")]
    pub user: Option<String>,
    #[serde(deserialize_with = "de::opt_text")]
    pub working_dir: Option<String>,
    #[serde(deserialize_with = "de::opt_text")]
    pub hostname: Option<String>,
    pub privileged: bool,
    /// `/dev/host[:/dev/container[:perms]]`.
    #[serde(deserialize_with = "de::words")]
    pub devices: Vec<String>,
    /// `host`, `none`, ... (instead of the stack's networks).
    #[serde(deserialize_with = "de::opt_text")]
    pub network_mode: Option<String>,
    pub stop_grace_secs: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    #[serde(deserialize_with = "de::name")]
    pub service: String,
    pub condition: Condition,
}

/// What a dependent service waits for (compose's `depends_on` conditions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Condition {
    Started,
    Healthy,
    CompletedSuccessfully,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthcheck {
    /// The engine's form: `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]`.
    #[serde(deserialize_with = "de::words")]
    pub test: Vec<String>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
}

/// When images are pulled (compose's `pull_policy`; `missing` is compose's default, so
/// devices whose images were loaded offline never need a registry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    #[default]
    Missing,
    Always,
    Never,
}

/// The statuses of an environment's stacks, sent when they change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackReport {
    pub sync: StackSync,
    /// The desired-state digest the agent holds (acknowledges it).
    pub digest: u64,
    #[serde(deserialize_with = "de::states")]
    pub statuses: Vec<StackState>,
}

/// Where one stack stands on the device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackState {
    pub stack_id: u64,
    /// The version this status is about.
    pub version: u32,
    pub phase: Phase,
    /// For `Error`: the engine's message (cut to [`MAX_STACK_ERROR`]).
    #[serde(deserialize_with = "de::error")]
    pub error: Option<String>,
    /// When the agent reached this phase (ms, server-corrected clock).
    pub at_ms: u64,
}

/// A stack's deployment phase on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    /// The version is known to the device.
    Acknowledged,
    /// Every image it needs is on the device.
    ImagesPulled,
    Deploying,
    /// Its containers have been up (and healthy, where they have a healthcheck) for the
    /// settle time.
    Running,
    Error,
    Removing,
    Removed,
}

mod de {
    use serde::de::{DeserializeSeed, Deserializer};

    use super::*;
    use crate::async_mode::{MAX_COMMAND_BYTES, MAX_SERVICES, MAX_SERVICE_ENTRIES};
    use crate::codec::bound::{ClipText, List, Opt, Plain, Text};

    const NAME: Text = Text {
        what: "stack name",
        max: MAX_NAME,
    };

    pub fn name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        NAME.deserialize(d)
    }

    pub fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        List {
            what: "stack networks or volumes",
            max: MAX_STACK_RESOURCES,
            elem: NAME,
        }
        .deserialize(d)
    }

    const TEXT: Text = Text {
        what: "service text",
        max: MAX_COMMAND_BYTES,
    };

    pub fn words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        List {
            what: "service words",
            max: MAX_SERVICE_ENTRIES,
            elem: TEXT,
        }
        .deserialize(d)
    }

    pub fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Opt(TEXT).deserialize(d)
    }

    pub fn stacks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DesiredStack>, D::Error> {
        List {
            what: "stacks",
            max: MAX_STACKS_PER_ENV,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn services<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StackService>, D::Error> {
        List {
            what: "stack services",
            max: MAX_SERVICES,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn dependencies<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Dependency>, D::Error> {
        List {
            what: "depends_on",
            max: MAX_SERVICES,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn states<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<StackState>, D::Error> {
        List {
            what: "stack statuses",
            max: MAX_STACKS_PER_ENV,
            elem: Plain::new(),
        }
        .deserialize(d)
    }

    pub fn error<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Opt(ClipText {
            max: MAX_STACK_ERROR,
        })
        .deserialize(d)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec;

    fn state() -> DesiredState {
        DesiredState {
            digest: 7,
            stacks: vec![DesiredStack {
                id: 3,
                name: "Kiosk".into(),
                version: 2,
                spec: StackSpec {
                    services: vec![StackService {
                        container: ServiceSpec {
                            name: "web".into(),
                            image: "busybox".into(),
                            ..Default::default()
                        },
                        depends_on: vec![Dependency {
                            service: "db".into(),
                            condition: Condition::Healthy,
                        }],
                        networks: vec!["front".into()],
                        healthcheck: Some(Healthcheck {
                            test: vec!["CMD".into(), "true".into()],
                            interval_ms: 1000,
                            timeout_ms: 500,
                            retries: 3,
                            start_period_ms: 0,
                        }),
                        pull: PullPolicy::Never,
                        extras: ContainerExtras::default(),
                    }],
                    networks: vec!["front".into()],
                    volumes: vec![],
                },
            }],
        }
    }

    #[test]
    fn desired_state_and_reports_round_trip() {
        let s = state();
        let bytes = codec::encode(&s).unwrap();
        assert_eq!(
            codec::decode::<DesiredState>(&bytes, MAX_DESIRED_ANSWER).unwrap(),
            s
        );
        assert_eq!(s.stacks[0].project(), "edge_kiosk");
        let report = StackReport {
            sync: StackSync {
                endpoint_id: 1,
                edge_id: Uuid::nil(),
                timestamp_ms: 5,
            },
            digest: 7,
            statuses: vec![StackState {
                stack_id: 3,
                version: 2,
                phase: Phase::Error,
                error: Some("x".repeat(MAX_STACK_ERROR + 10)),
                at_ms: 4,
            }],
        };
        let bytes = codec::encode(&report).unwrap();
        let back = codec::decode::<StackReport>(&bytes, MAX_REPORT_FRAME).unwrap();
        // Long errors are cut, not refused.
        assert_eq!(
            back.statuses[0].error.as_ref().unwrap().len(),
            MAX_STACK_ERROR
        );
    }

    #[test]
    fn too_many_stacks_are_refused_before_they_are_built() {
        let mut s = state();
        let one = s.stacks[0].clone();
        s.stacks = vec![one; MAX_STACKS_PER_ENV + 1];
        let bytes = codec::encode(&s).unwrap();
        let e = codec::decode::<DesiredState>(&bytes, MAX_DESIRED_ANSWER).unwrap_err();
        assert!(matches!(e, codec::CodecError::Limit(_)), "{e}");
    }
}

#[cfg(test)]
mod versions {
    #![allow(clippy::unwrap_used)]
    use crate::codec;
    use crate::wire::{CheckinAnswer, EdgeStatus};

    #[test]
    fn a_version_1_peer_gets_the_answer_version_1_wrote() {
        let mut answer = CheckinAnswer {
            status: EdgeStatus::Idle,
            interval_secs: 5,
            server_time_ms: Some(9),
            tunnel: None,
            desired: None,
        };
        let v2 = codec::encode_for_peer(&answer, 2).unwrap();
        let v1 = codec::encode_for_peer(&answer, 1).unwrap();
        assert_eq!(v2[0], 2);
        assert_eq!(v1[0], 1);
        // Frames whose layout no version changed go out as version 1, which every peer reads.
        assert_eq!(codec::encode(&answer).unwrap()[0], codec::BASE_VERSION);
        // Version 1's layout: the same fields, without the appended one.
        assert_eq!(&v1[1..], &v2[1..v2.len() - 1]);
        answer.desired = Some(3);
        assert!(codec::encode_for_peer(&answer, 1).is_err());
        let v2 = codec::encode_for_peer(&answer, 2).unwrap();
        assert_eq!(
            codec::decode::<CheckinAnswer>(&v2, codec::MAX_CONTROL_FRAME).unwrap(),
            answer
        );
    }
}
