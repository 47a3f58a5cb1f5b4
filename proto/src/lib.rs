//! Everything that crosses the wire between an edge agent and the edgeplane servers.
//!
//! * [`token`]: the join token (`EDGE_KEY`) format.
//! * [`clock`]: the wall clock in the form every record carries (ms since the Unix epoch).
//! * [`wire`]: the messages, as plain serde types.
//! * [`codec`]: the only place that knows how messages become bytes (bincode 2, serde mode),
//!   with a protocol version byte and a decode size limit.
//! * [`pin`] (feature `pin`): the certificate fingerprint of join keys and the rustls
//!   verifier that accepts exactly that certificate.
//! * [`proof`]: how an agent proves it holds the join secret without sending it.
//! * [`refusal`]: the codes of refused requests, with their retry class.
//! * [`seal`]: the AEAD that protects one-time tunnel credentials for one agent.
//! * [`snapshot`]: snapshots of an agent's engine and their compressed upload.
//! * [`async_mode`]: async mode's request, answer and commands (no tunnel; metered links).
//! * [`stacks`]: edge stacks on the device: the desired state and status reports.
//! * [`tunnel`]: the reverse tunnel's handshake, stream status and control messages.
//! * [`mux`] (feature `mux`): yamux sessions driven by one task, tunnel frame I/O and the
//!   control stream's liveness check.
//!
//! Nothing outside this crate may depend on the byte layout of a message.

pub mod async_mode;
pub mod clock;
pub mod codec;
#[cfg(feature = "mux")]
pub mod mux;
#[cfg(feature = "pin")]
pub mod pin;
pub mod proof;
pub mod refusal;
pub mod seal;
pub mod snapshot;
pub mod stacks;
pub mod token;
pub mod tunnel;
pub mod wire;

pub use codec::{CodecError, PROTOCOL_VERSION};
pub use refusal::RefusalCode;
pub use token::{JoinToken, TokenError, JOIN_SECRET_LEN};
