//! Per-connection metrics: who talked to whom, how much, how fast, how it
//! ended — labelled like Istio's standard metrics so dashboards carry over.
//!
//! A connection resolves its label set once (after its upstream is chosen)
//! and keeps an `Arc<Series>` of ready handles; updates are atomic adds on
//! those handles, never a label lookup. Series of pods that left the node
//! are dropped once idle for `--metrics-idle-timeout`, so churn does not
//! grow the registry without bound.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::{Family, MetricConstructor},
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use super::labels::AddressBudget;
use crate::clock::now_nanos;

/// The label set of a connection, Istio's names where Istio has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    /// `outbound` (captured leaving a pod of this node) or `inbound`
    /// (a tunnel arriving at a pod of this node).
    pub reporter: &'static str,
    pub source_pod: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    /// `name.namespace` of the service, `unknown` (a meshed pod outside any
    /// service) or `external`.
    pub destination_service: String,
    pub destination_pod: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// `mutual_tls` or `plaintext`.
    pub security: &'static str,
}

impl ConnLabels {
    /// The pod of this node the series belongs to: the source of an
    /// outbound connection, the destination of an inbound one.
    fn local_pod(&self) -> (&str, &str) {
        if self.reporter == "inbound" {
            (&self.destination_workload_namespace, &self.destination_pod)
        } else {
            (&self.source_workload_namespace, &self.source_pod)
        }
    }

    /// The other side: the meshed pod reached or calling (empty if none).
    fn peer_pod(&self) -> (&str, &str) {
        if self.reporter == "inbound" {
            (&self.source_workload_namespace, &self.source_pod)
        } else {
            (&self.destination_workload_namespace, &self.destination_pod)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FailLabels {
    /// connect_refused, connect_timeout, tls_failure, denied, no_route,
    /// no_endpoints, no_healthy_endpoints, connect_error, tunnel_error.
    pub reason: &'static str,
    // Flattened fields must come last (prometheus-client's derive).
    #[prometheus(flatten)]
    pub conn: ConnLabels,
}

#[derive(Debug, Clone, Copy)]
pub struct Buckets(pub(super) &'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// Connect time, TLS handshake included: 50 µs to 10 s.
pub const CONNECT_BUCKETS: Buckets = Buckets(&[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
]);
/// Connection lifetime: 1 ms to an hour.
pub const DURATION_BUCKETS: Buckets =
    Buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]);
/// Kernel smoothed RTT: 10 µs to 1 s.
pub const RTT_BUCKETS: Buckets = Buckets(&[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
]);

type HistFamily = Family<ConnLabels, Histogram, Buckets>;

/// Ready handles for one label set.
#[derive(Debug)]
pub struct Series {
    labels: ConnLabels,
    pub opened: Counter,
    pub closed: Counter,
    pub open: Gauge,
    pub sent: Counter,
    pub received: Counter,
    pub connect: Histogram,
    pub duration: Histogram,
    pub rtt: Histogram,
    in_use: AtomicI64,
    last_used: AtomicU64,
    failure_reasons: Mutex<Vec<&'static str>>,
}

/// One connection's hold on its series: counts it open until dropped.
#[derive(Debug)]
pub struct ConnRecord {
    pub series: Arc<Series>,
}

impl ConnRecord {
    fn new(series: Arc<Series>) -> Self {
        series.in_use.fetch_add(1, Ordering::Relaxed);
        series.opened.inc();
        series.open.inc();
        Self { series }
    }

    /// A connection that ended: bytes each way, lifetime, and the kernel's
    /// RTT estimate of its upstream socket when known.
    pub fn finish(&self, sent: u64, received: u64, duration: Duration, rtt: Option<Duration>) {
        let s = &self.series;
        s.sent.inc_by(sent);
        s.received.inc_by(received);
        s.duration.observe(duration.as_secs_f64());
        if let Some(rtt) = rtt {
            s.rtt.observe(rtt.as_secs_f64());
        }
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        let s = &self.series;
        s.open.dec();
        s.closed.inc();
        s.last_used.store(now_nanos(), Ordering::Relaxed);
        s.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct ConnectionMetrics {
    enabled: bool,
    opened: Family<ConnLabels, Counter>,
    closed: Family<ConnLabels, Counter>,
    failed: Family<FailLabels, Counter>,
    open: Family<ConnLabels, Gauge>,
    sent: Family<ConnLabels, Counter>,
    received: Family<ConnLabels, Counter>,
    connect: HistFamily,
    duration: HistFamily,
    rtt: HistFamily,
    series: Mutex<HashMap<ConnLabels, Arc<Series>>>,
    pub(super) addresses: AddressBudget,
}

/// The metric names of the per-pod families (what the node-exporter
/// textfile carries), as they appear in the exposition.
pub const POD_FAMILIES: &[&str] = &[
    "outrigger_connections_opened",
    "outrigger_connections_closed",
    "outrigger_connections_failed",
    "outrigger_connections_open",
    "outrigger_sent_bytes",
    "outrigger_received_bytes",
    "outrigger_connect_duration_seconds",
    "outrigger_connection_duration_seconds",
    "outrigger_tcp_rtt_seconds",
];

impl ConnectionMetrics {
    pub fn new(enabled: bool, addresses_per_pod: usize) -> Self {
        Self {
            addresses: AddressBudget::new(addresses_per_pod),
            enabled,
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            open: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            connect: Family::new_with_constructor(CONNECT_BUCKETS),
            duration: Family::new_with_constructor(DURATION_BUCKETS),
            rtt: Family::new_with_constructor(RTT_BUCKETS),
            series: Mutex::default(),
        }
    }

    pub fn register(&self, r: &mut Registry) {
        r.register("connections_opened", "TCP connections proxied", self.opened.clone());
        r.register("connections_closed", "Proxied TCP connections that ended", self.closed.clone());
        r.register("connections_failed", "Connections that could not be proxied, by reason", self.failed.clone());
        r.register("connections_open", "Proxied TCP connections open now", self.open.clone());
        r.register("sent_bytes", "Bytes from the source towards the destination", self.sent.clone());
        r.register("received_bytes", "Bytes from the destination back to the source", self.received.clone());
        r.register(
            "connect_duration_seconds",
            "Time to connect upstream (TCP connect; TLS handshake and tunnel setup included where there is one)",
            self.connect.clone(),
        );
        r.register("connection_duration_seconds", "Lifetime of proxied connections", self.duration.clone());
        r.register(
            "tcp_rtt_seconds",
            "The kernel's smoothed round-trip time of the upstream TCP connection, read at close",
            self.rtt.clone(),
        );
    }

    fn series(&self, labels: &ConnLabels) -> Option<Arc<Series>> {
        if !self.enabled {
            return None;
        }
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(labels) {
            return Some(s.clone());
        }
        let s = Arc::new(Series {
            labels: labels.clone(),
            opened: self.opened.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
            open: self.open.get_or_create(labels).clone(),
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
            connect: self.connect.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            rtt: self.rtt.get_or_create(labels).clone(),
            in_use: AtomicI64::new(0),
            last_used: AtomicU64::new(now_nanos()),
            failure_reasons: Mutex::default(),
        });
        map.insert(labels.clone(), s.clone());
        Some(s)
    }

    /// Counts a connection open under `labels`, with its connect time.
    pub fn opened(&self, labels: &ConnLabels, connect: Duration) -> Option<ConnRecord> {
        let series = self.series(labels)?;
        series.connect.observe(connect.as_secs_f64());
        Some(ConnRecord::new(series))
    }

    /// Counts a connection that could not be proxied.
    pub fn failed(&self, labels: &ConnLabels, reason: &'static str) {
        let Some(series) = self.series(labels) else { return };
        series.last_used.store(now_nanos(), Ordering::Relaxed);
        self.failed.get_or_create(&FailLabels { conn: labels.clone(), reason }).inc();
        let mut reasons = series.failure_reasons.lock().unwrap_or_else(|e| e.into_inner());
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }

    /// Drops the series of pods no longer on this node, and of peers no
    /// longer in the mesh, once they have been idle for `idle`. Returns how
    /// many label sets were dropped.
    pub fn sweep(&self, pods: &super::LivePods, idle: Duration) -> usize {
        let now = now_nanos();
        let idle = idle.as_nanos() as u64;
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<ConnLabels> = map
            .values()
            .filter(|s| {
                !pods.keep(s.labels.local_pod(), s.labels.peer_pod())
                    && s.in_use.load(Ordering::Relaxed) == 0
                    && now.saturating_sub(s.last_used.load(Ordering::Relaxed)) >= idle
            })
            .map(|s| s.labels.clone())
            .collect();
        for labels in &stale {
            if let Some(s) = map.remove(labels) {
                self.opened.remove(labels);
                self.closed.remove(labels);
                self.open.remove(labels);
                self.sent.remove(labels);
                self.received.remove(labels);
                self.connect.remove(labels);
                self.duration.remove(labels);
                self.rtt.remove(labels);
                for reason in s.failure_reasons.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    self.failed.remove(&FailLabels { conn: labels.clone(), reason });
                }
            }
        }
        self.addresses.forget(&pods.local);
        stale.len()
    }

    pub fn series_count(&self) -> usize {
        self.series.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
