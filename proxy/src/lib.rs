//! Outrigger: a per-node service-mesh proxy.
//!
//! Modules, from the bottom of the dependency order up (a module only uses
//! modules listed before it; `cargo xtask test` checks there are no cycles):
//!
//! - leaves: `sys`, `clock`, `throttle`, `model` (the mesh model), `transport`
//!   (sockets, relay, h2 streams), `balance`, `identity`, `capture`,
//!   `telemetry`, `stats`;
//! - `netns`, `tls`, `policy`, `store` (indexed snapshots of the model),
//!   `pod` (one pod's network handle), `metrics`, `tunnel`;
//! - `sources` (the mesh file today, the Kubernetes API next);
//! - the data path: `outbound`, `inbound`; the reconciler: `node`;
//! - `admin`, `config`, and `cli` at the top.
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod httpcore;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod pod;
pub mod policy;
pub mod resilience;
pub mod routing;
pub mod sources;
pub mod stats;
pub mod store;
pub mod sys;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod tunnel;
