//! edgeplane control plane. See `docs/ARCHITECTURE.md` for the code map.

pub mod store;
