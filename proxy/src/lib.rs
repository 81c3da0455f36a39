//! Outrigger: a per-node service-mesh proxy.
//!
//! The modules follow the path of a connection: `capture` (kernel programs
//! that steer a pod's connects to us), `netns` (acting inside a pod's network
//! namespace), `pods` (the mesh state file), `node` (the pods registered on
//! this node and their listeners), `outbound` (accepting captured connections
//! and forwarding them), `metrics` and `admin` (what operators see).
#![deny(unsafe_code)]

pub mod admin;
pub mod capture;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod pods;
pub mod proxy;
pub mod relay;
pub mod sys;
pub mod telemetry;
