//! Everything that crosses the wire between an edge agent and the edgeplane servers.
//!
//! * [`token`]: the join token (`EDGE_KEY`) format.
//! * [`wire`]: the messages, as plain serde types.
//! * [`codec`]: the only place that knows how messages become bytes (bincode 2, serde mode),
//!   with a protocol version byte and a decode size limit.
//! * [`proof`]: how an agent proves it holds the join secret without sending it.
//! * [`seal`]: the AEAD that protects one-time tunnel credentials for one agent.
//!
//! Nothing outside this crate may depend on the byte layout of a message.

pub mod codec;
pub mod proof;
pub mod seal;
pub mod token;
pub mod wire;

pub use codec::{CodecError, PROTOCOL_VERSION};
pub use token::{JoinToken, TokenError, JOIN_SECRET_LEN};
