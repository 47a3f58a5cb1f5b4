//! The edgeplane edge agent: calls home to the control plane, never opens a port.
//!
//! * [`config`]: flags and environment variables in, a validated [`Config`] out.
//! * [`edge_id`]: the agent's identity, given or generated once and persisted.
//! * [`client`]: one check-in over a kept-alive TLS connection ([`PollClient`]), shared with
//!   the load test.
//! * [`tls`]: which API certificates are accepted (pinned by the join token, publicly trusted,
//!   or anything with `EDGE_INSECURE_POLL=1`).
//! * [`clock`], [`retry`]: timestamps (shared by all clients of the process), backoff and log
//!   throttling, as pure logic.
//! * [`docker`]: `DOCKER_HOST`, connections to the engine, and its snapshots.
//! * [`home`]: requests home that must not wait behind a held check-in (tunnel requests,
//!   snapshot uploads), on short-lived sibling clients.
//! * [`tunnel`]: the reverse tunnel (handshake, streams to the engine, inactivity, recovery).
//! * [`async_agent`]: async mode (`EDGE_ASYNC=1`): merged ticks, snapshot deltas, commands;
//!   [`journal`]: what it must not forget across restarts (commands run, results unsent).
//! * [`stacks`]: edge stacks on this device: the desired state fetched and journaled,
//!   deployed through the engine, statuses reported ([`stacks::Reconciler`]).
//! * [`agent`]: the loop that ties them together ([`run`]).

pub mod agent;
pub mod async_agent;
pub mod client;
pub mod clock;
pub mod config;
pub mod docker;
pub mod edge_id;
pub mod home;
pub mod journal;
pub mod retry;
pub mod stacks;
pub mod tls;
pub mod tunnel;

pub use agent::{init_tracing, run, shutdown_signal, AgentError};
pub use client::{
    ByteCount, ByteCounters, CheckinError, CheckinOutcome, CheckinRoute, PollClient, PollOptions,
    RefusalCode, RetryClass, SetupError,
};
pub use config::{Args, Config, ConfigError};
