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
            // Only services refused now: one map read each, never one per
            // service of the cluster.
            let mut ids: Vec<u32> = snapshot.refused().values().copied().collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                let Some(key) = snapshot.service_key_of_id(id) else { continue };
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
        // Sockets the kernel programs track now, from their counters —
        // not by walking the maps, whose size a pod controls.
        let tracked = counts[counter::CAPTURED as usize].saturating_sub(counts[counter::CLOSED as usize]);
        let family = encoder.encode_descriptor(
            "outrigger_ebpf_tracked_sockets",
            "Captured sockets not yet closed (captured minus closed events; the maps are walked only by /config_dump)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(tracked as i64).encode(family)?;
        Ok(())
    }
}
