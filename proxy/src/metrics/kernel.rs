//! Kernel-side counters and map sizes, read from the eBPF maps at scrape time.

use std::sync::Arc;

use outrigger_common::counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use super::ServiceLabels;
use crate::{capture::Capture, store::MeshReader};

/// Reads the kernel's counters at scrape time: per-CPU counter arrays are
/// read with one syscall each, never by walking a map key by key.
#[derive(Debug)]
pub struct KernelCounters {
    pub capture: Arc<Capture>,
    pub mesh: MeshReader,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let capture: &Capture = &self.capture;
        {
            let snapshot = self.mesh.load();
            let mut family = encoder.encode_descriptor(
                "outrigger_service_refused_connections",
                "Connects to a service VIP refused by the kernel because the service had no endpoints",
                None,
                MetricType::Counter,
            )?;
            for (key, id) in snapshot.service_ids() {
                let labels = ServiceLabels::of(key);
                ConstCounter::new(capture.service_refused(id)).encode(family.encode_family(&labels)?)?;
            }
        }
        let counts = match capture.counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading kernel counters failed");
                return Ok(());
            }
        };
        {
            let mut family = encoder.encode_descriptor(
                "outrigger_ebpf_events",
                "Decisions of the kernel capture programs (captured, bypass_*, rekeyed, ...)",
                None,
                MetricType::Counter,
            )?;
            for (name, value) in counter::NAMES.iter().zip(counts) {
                let labels = [("event", *name)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let entries = capture.map_entries();
        let mut family = encoder.encode_descriptor(
            "outrigger_ebpf_map_entries",
            "Entries in the kernel capture maps",
            None,
            MetricType::Gauge,
        )?;
        for (name, value) in [
            ("orig_dst", entries.orig_dst),
            ("orig_dst_by_cookie", entries.orig_dst_by_cookie),
            ("meshed_netns", entries.meshed_netns),
        ] {
            let labels = [("map", name)];
            ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
