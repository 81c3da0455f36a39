//! Metrics text as the proxy's own `outrigger stats` reads it.

pub use outrigger::stats::Exposition as MetricsText;
