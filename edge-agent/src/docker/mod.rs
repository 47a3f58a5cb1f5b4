//! The local engine (`DOCKER_HOST`): where tunnel streams are connected to, and a small Docker
//! Engine API client that takes snapshots of it and runs async-mode commands on it.
//!
//! The client is deliberately tolerant: engines differ (Podman's Docker API returns `null` for
//! some lists and leaves fields out), and a field it cannot read becomes empty rather than
//! failing the snapshot.
//!
//! * `host`: [`DockerHost`] (`DOCKER_HOST` parsed) and connections to the engine
//!   ([`EngineStream`]), which tunnel streams are piped to.
//! * `client`: [`DockerClient`], the engine API client: a snapshot's `GET`s, one request per
//!   command, [`DockerError`].
//! * `commands`: async-mode commands as engine API calls ([`DockerClient::execute`]).
//! * `stacks`: edge stacks deployed as compose would ([`DockerClient::deploy_stack_spec`]).
//! * `snapshot`: the tolerant mapper from the engine's answers to a
//!   [`Snapshot`](proto::snapshot::Snapshot) ([`map_snapshot`]).

use std::time::Duration;

mod client;
mod commands;
mod host;
mod snapshot;
mod stacks;

pub use client::{DockerClient, DockerError};
pub use host::{DockerHost, DockerHostError, EngineStream};
pub use snapshot::{map_snapshot, EngineAnswers};
pub use stacks::{config_hash, StackHealth, CONFIG_HASH_LABEL, VERSION_LABEL};

/// Largest engine answer read (a big engine's container list is a few MiB).
pub const MAX_ENGINE_ANSWER: usize = 32 * 1024 * 1024;
/// Connecting to the engine.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One engine API request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a command may take on the engine (a stop waits for the container's timeout).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Engine text going into logs: one line, bounded.
pub(crate) fn one_line(raw: &str, max_chars: usize) -> String {
    raw.chars()
        .take(max_chars)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}
