//! Sources of the mesh state. Each translates its own objects into the
//! model and applies them to the store one by one: the mesh file and the
//! Kubernetes API.
#![forbid(unsafe_code)]

pub mod file;
pub mod kubernetes;

use std::{collections::BTreeMap, sync::Mutex};

use serde::Serialize;

use crate::store::{Change, Store};

/// Applies a batch of changes, the last one per object winning, deletes
/// first (an address or VIP moving between objects is free before its new
/// owner claims it); publishes a snapshot if `publish`. Returns how many
/// objects the store refused (each is logged with its reason).
pub fn apply(store: &Mutex<Store>, changes: Vec<Change>, publish: bool) -> usize {
    let mut last: BTreeMap<crate::model::ObjectRef, Change> = BTreeMap::new();
    for change in changes {
        let r = match &change {
            Change::Upsert(o) => o.object_ref(),
            Change::Delete(r) => r.clone(),
        };
        last.insert(r, change);
    }
    let (deletes, upserts): (Vec<_>, Vec<_>) = last.into_values().partition(|c| matches!(c, Change::Delete(_)));
    let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
    let mut rejected = 0;
    for change in deletes.into_iter().chain(upserts) {
        if let Err(r) = store.apply(change) {
            rejected += 1;
            tracing::error!(object = %r.object, reason = %r.reason, "object rejected; the rest of the mesh state applies");
        }
    }
    if publish {
        store.publish();
    }
    if rejected > 0 {
        tracing::debug!(rejected, "objects of this batch rejected");
    }
    // Everything the store refuses now, not just this batch: a status
    // must not forget an earlier refusal because a later batch was clean.
    store.rejected().count()
}

/// Problems with single objects a source reports, at most this many (the
/// rest are counted): a hostile or broken cluster must not grow the status
/// without bound.
pub const MAX_REPORTS: usize = 200;

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
    /// Why the newest state was refused (the last good one is in force),
    /// or why the source cannot be reached now.
    pub last_error: Option<String>,
    /// Per watched kind (the Kubernetes source).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub watches: BTreeMap<&'static str, WatchStatus>,
    /// Objects skipped or applied in part, with why (`Pod ns/name` → why).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reports: BTreeMap<String, String>,
    /// Pods of this node the source does not mesh, with why (the
    /// Kubernetes source: not enrolled, hostNetwork, no netns found, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub local_pods_not_meshed: BTreeMap<String, String>,
    /// Reports not kept because [`MAX_REPORTS`] were already held.
    #[serde(skip_serializing_if = "is_zero")]
    pub reports_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One watch of the Kubernetes source.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WatchStatus {
    /// The initial list has completed at least once.
    pub synced: bool,
    /// Objects of this kind the source holds.
    pub objects: usize,
    /// Lists after the first (an expired resourceVersion, or a restart).
    pub relists: u64,
    /// Errors seen (dropped watches, refused lists, malformed objects).
    pub errors: u64,
    /// The last error, cleared once the watch works again.
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

    /// Records a problem with one object; true when it is new (log it).
    pub fn report(&mut self, object: String, why: String) -> bool {
        if self.reports.get(&object) == Some(&why) {
            return false;
        }
        if self.reports.len() >= MAX_REPORTS && !self.reports.contains_key(&object) {
            self.reports_dropped += 1;
            return self.reports_dropped == 1;
        }
        self.reports.insert(object, why);
        true
    }

    /// The object is fine again (or gone).
    pub fn clear_report(&mut self, object: &str) {
        self.reports.remove(object);
    }

    /// `Ok` once synced, with warnings worth showing (the source is
    /// unreachable but its last state serves); otherwise what it waits for.
    pub fn readiness(&self) -> Result<Option<String>, String> {
        if self.synced {
            return Ok(self.last_error.as_ref().map(|e| format!("{}: {e} (serving the last good state)", self.source)));
        }
        Err(match &self.last_error {
            Some(e) => format!("waiting for the {}: {e}", self.source),
            None => format!("waiting for the {}", self.source),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        balance::BalanceSettings,
        model::{Object, ObjectKey, Workload},
        store::StoreSettings,
    };

    fn pod(name: &str, ip: &str) -> Change {
        Change::Upsert(Object::Workload(Workload {
            uid: format!("uid-{name}").into(),
            key: ObjectKey::new("default", name),
            service_account: name.into(),
            node: Some("elsewhere".into()),
            ips: vec![ip.parse().expect("ip")],
            labels: Default::default(),
            netns: None,
        }))
    }

    #[test]
    fn the_rejected_count_is_what_the_store_refuses_now_not_the_last_batch() {
        let store = Mutex::new(Store::new(StoreSettings {
            trust_domain: "cluster.local".into(),
            balance: BalanceSettings::default(),
            breaker: Default::default(),
        }));
        assert_eq!(apply(&store, vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.1")], true), 1);
        // A clean later batch does not make the earlier refusal disappear.
        assert_eq!(apply(&store, vec![pod("c", "10.0.0.3")], true), 1);
        assert_eq!(
            apply(
                &store,
                vec![Change::Delete(crate::model::ObjectRef::Workload(ObjectKey::new("default", "a")))],
                true
            ),
            0
        );
    }
}
