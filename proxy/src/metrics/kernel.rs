//! Kernel-side counters and map sizes, read from the eBPF maps at scrape time.

use std::sync::Arc;

use outrigger_common::counter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

use crate::capture::Capture;

#[derive(Debug)]
pub struct KernelCounters(pub Arc<Capture>);

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = match self.0.counters() {
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
        let entries = self.0.map_entries();
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
