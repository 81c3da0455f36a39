//! Outrigger: a per-node service-mesh proxy.
//!
//! The modules follow the path of a connection: `capture` (kernel programs
//! that steer a pod's connects to us), `netns` (acting inside a pod's network
//! namespace), `mesh` (the mesh state: pods and services), `node` (the pods
//! registered on this node and their listeners), `outbound` (accepting
//! captured connections and forwarding them), `services` and `balance`
//! (virtual IPs, endpoint choice and health), `metrics` and `admin` (what
//! operators see).
#![deny(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod config;
pub mod identity;
pub mod inbound;
pub mod listen;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod relay;
pub mod services;
pub mod stats;
pub mod sys;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod view;
