//! Sources of the mesh state. Each translates its own objects into the
//! model and applies them to the store one by one: the mesh file today,
//! the Kubernetes API next.
#![forbid(unsafe_code)]

pub mod file;

use serde::Serialize;

/// What a source reports for `/ready` and `/config_dump`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStatus {
    /// e.g. `mesh file /etc/outrigger/mesh.yaml`.
    pub source: String,
    /// The source's state has been applied at least once.
    pub synced: bool,
    /// Objects in the last applied state.
    pub objects: usize,
    /// Objects of it the store refused.
    pub rejected_objects: usize,
    /// Why the newest state was refused (the last good one is in force).
    pub last_error: Option<String>,
}

impl SourceStatus {
    pub fn new(source: String) -> Self {
        Self { source, ..Self::default() }
    }

    pub fn applied(&mut self, objects: usize, rejected: usize) {
        self.synced = true;
        self.objects = objects;
        self.rejected_objects = rejected;
        self.last_error = None;
    }

    /// Records a failure; true when it differs from the last one (log it).
    pub fn failed(&mut self, error: String) -> bool {
        let changed = self.last_error.as_ref() != Some(&error);
        self.last_error = Some(error);
        changed
    }

    /// `Ok` once synced; otherwise what it is waiting for.
    pub fn readiness(&self) -> Result<(), String> {
        if self.synced {
            return Ok(());
        }
        Err(match &self.last_error {
            Some(e) => format!("no {} applied yet: {e}", self.source),
            None => format!("waiting for the {}", self.source),
        })
    }
}
