//! The gateway's Prometheus series (`edgeplane_gateway_*`), registered into the registry the
//! embedding process serves on `/metrics`. Few label values: results and reasons are fixed
//! sets.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handshake results (label `result` of `edgeplane_gateway_handshakes_total`).
pub(crate) mod result {
    pub const ACCEPTED: &str = "accepted";
    pub const BAD_CREDENTIALS: &str = "bad_credentials";
    pub const MISMATCH: &str = "mismatch";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const NOT_AUTHORIZED: &str = "not_authorized";
    pub const MALFORMED: &str = "malformed";
    pub const TIMEOUT: &str = "timeout";
    pub const TLS_ERROR: &str = "tls_error";
    /// Dropped at once: not admitted (`edgeplane_gateway_connections_refused_total` says why).
    pub const OVERLOADED: &str = "overloaded";
    /// Let go while pending, to make room for a newer connection.
    pub const EVICTED: &str = "evicted";
}

/// Handshake kinds (label `kind`): before the hello is read the kind is unknown.
pub(crate) mod kind {
    pub const AGENT: &str = "agent";
    pub const DIAL: &str = "dial";
    pub const UNKNOWN: &str = "unknown";
}

#[derive(Clone)]
pub struct GatewayMetrics {
    pub tunnels_open: IntGauge,
    pub handshakes: IntCounterVec,
    pub dial_sessions_open: IntGauge,
    pub streams_open: IntGauge,
    pub streams: IntCounter,
    pub tunnel_closes: IntCounterVec,
    pub renew_failures: IntCounter,
    /// Connections not admitted, by reason (`crate::admission::Refused::label`).
    pub refused: IntCounterVec,
    /// Connections held now, and those of them that proved nothing yet.
    pub connections_open: IntGauge,
    pub connections_pending: IntGauge,
}

impl GatewayMetrics {
    /// Creates the series and registers them into `registry` (fails if they already are).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            tunnels_open: IntGauge::new(
                "edgeplane_gateway_tunnels_open",
                "Agent tunnels held by this gateway",
            )?,
            handshakes: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_handshakes_total",
                    "Connections to the tunnel listener by kind (agent, dial, unknown) and result",
                ),
                &["kind", "result"],
            )?,
            dial_sessions_open: IntGauge::new(
                "edgeplane_gateway_dial_sessions_open",
                "Dial sessions of control-plane replicas open on this gateway",
            )?,
            streams_open: IntGauge::new(
                "edgeplane_gateway_streams_open",
                "Streams to agents open through this gateway",
            )?,
            streams: IntCounter::new(
                "edgeplane_gateway_streams_total",
                "Streams to agents opened through this gateway",
            )?,
            tunnel_closes: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_tunnel_closes_total",
                    "Tunnels closed, by reason",
                ),
                &["reason"],
            )?,
            renew_failures: IntCounter::new(
                "edgeplane_gateway_lease_renew_failures_total",
                "Lease renewals (tunnel locations or registration) that failed",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "edgeplane_gateway_connections_refused_total",
                    "Connections to the tunnel listener dropped at once by admission, by reason",
                ),
                &["reason"],
            )?,
            connections_open: IntGauge::new(
                "edgeplane_gateway_connections_open",
                "Connections to the tunnel listener held now",
            )?,
            connections_pending: IntGauge::new(
                "edgeplane_gateway_connections_pending",
                "Connections to the tunnel listener that proved nothing yet",
            )?,
        };
        registry.register(Box::new(m.tunnels_open.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        registry.register(Box::new(m.connections_open.clone()))?;
        registry.register(Box::new(m.connections_pending.clone()))?;
        registry.register(Box::new(m.handshakes.clone()))?;
        registry.register(Box::new(m.dial_sessions_open.clone()))?;
        registry.register(Box::new(m.streams_open.clone()))?;
        registry.register(Box::new(m.streams.clone()))?;
        registry.register(Box::new(m.tunnel_closes.clone()))?;
        registry.register(Box::new(m.renew_failures.clone()))?;
        Ok(m)
    }

    pub(crate) fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    pub(crate) fn handshake(&self, kind: &str, result: &str) {
        self.handshakes.with_label_values(&[kind, result]).inc();
    }
}

/// Increments a gauge now and decrements it when dropped.
pub(crate) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
