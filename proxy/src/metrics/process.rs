//! Process metrics, read from /proc/self at scrape time (prometheus-client
//! has no process collector): CPU, memory, file descriptors, threads.

use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
};

#[derive(Debug)]
pub struct ProcessMetrics {
    start_time: f64,
}

impl Default for ProcessMetrics {
    fn default() -> Self {
        let start_time = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        Self { start_time }
    }
}

struct Snapshot {
    cpu_seconds: f64,
    resident_bytes: f64,
    virtual_bytes: f64,
    threads: f64,
    open_fds: f64,
    max_fds: f64,
}

fn read() -> Option<Snapshot> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // USER_HZ on Linux
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Indexes are the stat field numbers minus 3 (pid and comm are gone).
    let cpu_seconds = (num(11) + num(12)) / ticks;
    let threads = num(17);
    let virtual_bytes = num(20);
    let page = 4096.0;
    let resident_bytes = num(21) * page;
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as f64).unwrap_or(0.0);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0.0);
    Some(Snapshot { cpu_seconds, resident_bytes, virtual_bytes, threads, open_fds, max_fds })
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = read() else { return Ok(()) };
        ConstCounter::new(s.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent",
            None,
            MetricType::Counter,
        )?)?;
        for (name, help, value) in [
            ("process_resident_memory_bytes", "Resident memory size", s.resident_bytes),
            ("process_virtual_memory_bytes", "Virtual memory size", s.virtual_bytes),
            ("process_threads", "OS threads", s.threads),
            ("process_open_fds", "Open file descriptors", s.open_fds),
            ("process_max_fds", "Limit of open file descriptors", s.max_fds),
            ("process_start_time_seconds", "Start time, seconds since the Unix epoch", self.start_time),
        ] {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}
