//! The double's "etcd": current objects, the history of changes since the
//! compaction point, and one global resource version.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::Arc,
};

use serde_json::{json, Value};

use super::Kind;

/// Where an object lives: kind, namespace (`""` for cluster-scoped), name.
pub type Key = (Kind, String, String);

/// A kind's objects at some version: that version, and the objects in key
/// order.
pub type Snapshot = (u64, Vec<(Key, Arc<Value>)>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One change, as etcd's history would hold it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub key: Key,
    pub ty: ChangeType,
    /// The new state; for a deletion, the last state (with the deletion's
    /// resource version, as the API server sends it).
    pub object: Arc<Value>,
    /// The state before the change (`None` for an addition).
    pub prev: Option<Arc<Value>>,
}

/// A resource version older than the compaction point was asked for.
#[derive(Debug)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

/// A resource version newer than the store's was asked for.
#[derive(Debug)]
pub struct TooLarge;

#[derive(Debug)]
pub enum AtError {
    Expired(Expired),
    TooLarge(TooLarge),
}

pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Arc<Value>>,
    history: VecDeque<Change>,
    /// Changes at or before this version are forgotten.
    compacted: u64,
}

impl Default for Store {
    fn default() -> Self {
        // Start somewhere that is not 0 or 1, like a real cluster: "0" has a
        // meaning of its own in list and watch requests.
        Self { rv: 1000, objects: BTreeMap::new(), history: VecDeque::new(), compacted: 1000 }
    }
}

/// A random version-4 UUID, as the API server gives every new object.
pub fn new_uid() -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        fastrand::u32(..),
        fastrand::u16(..),
        fastrand::u16(..0x1000),
        0x8000 | fastrand::u16(..0x4000),
        fastrand::u64(..1 << 48)
    )
}

fn now_timestamp() -> Value {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    serde_json::to_value(Time(k8s_openapi::jiff::Timestamp::now())).unwrap_or(Value::Null)
}

fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(field.to_string(), value);
    }
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

/// `obj` without `metadata.resourceVersion`, to tell a real change from a
/// no-op update.
fn without_rv(obj: &Value) -> Value {
    let mut obj = obj.clone();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    obj
}

impl Store {
    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Value>> {
        self.objects.get(key).cloned()
    }

    fn record(&mut self, key: Key, ty: ChangeType, object: Arc<Value>, prev: Option<Arc<Value>>) {
        match ty {
            ChangeType::Deleted => self.objects.remove(&key),
            ChangeType::Added | ChangeType::Modified => self.objects.insert(key.clone(), object.clone()),
        };
        self.history.push_back(Change { rv: self.rv, key, ty, object, prev });
    }

    /// Creates or updates an object (`metadata.namespace` must be set for a
    /// namespaced kind). Keeps uid and creationTimestamp of an existing
    /// object; an update carrying another uid is a delete then a create (two
    /// events), as when a pod is replaced by one of the same name. An update
    /// that changes nothing is a no-op, as in Kubernetes. Returns the stored
    /// object and whether anything changed.
    pub fn apply(&mut self, key: Key, mut obj: Value) -> (Arc<Value>, bool) {
        let given_uid = meta_str(&obj, "uid").map(str::to_string);
        let mut existing = self.objects.get(&key).cloned();
        if let (Some(old), Some(uid)) = (&existing, &given_uid) {
            if meta_str(old, "uid") != Some(uid.as_str()) {
                self.delete(&key);
                existing = None;
            }
        }
        match &existing {
            Some(old) => {
                for field in ["uid", "creationTimestamp"] {
                    if let Some(v) = old.get("metadata").and_then(|m| m.get(field)) {
                        set_meta(&mut obj, field, v.clone());
                    }
                }
                if without_rv(old) == without_rv(&obj) {
                    return (old.clone(), false);
                }
            }
            None => {
                if given_uid.is_none() {
                    set_meta(&mut obj, "uid", Value::String(new_uid()));
                }
                if meta_str(&obj, "creationTimestamp").is_none() {
                    set_meta(&mut obj, "creationTimestamp", now_timestamp());
                }
            }
        }
        self.rv += 1;
        set_meta(&mut obj, "resourceVersion", json!(self.rv.to_string()));
        let obj = Arc::new(obj);
        let ty = if existing.is_some() { ChangeType::Modified } else { ChangeType::Added };
        self.record(key, ty, obj.clone(), existing);
        (obj, true)
    }

    /// Deletes an object: a DELETED change carrying its last state with the
    /// deletion's resource version. Returns whether it existed.
    pub fn delete(&mut self, key: &Key) -> bool {
        let Some(old) = self.objects.get(key).cloned() else {
            return false;
        };
        self.rv += 1;
        let mut last = (*old).clone();
        set_meta(&mut last, "resourceVersion", json!(self.rv.to_string()));
        self.record(key.clone(), ChangeType::Deleted, Arc::new(last), Some(old));
        true
    }

    /// Forgets all history: versions before now are expired.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Changes of `kind` after `after`, or `Expired` if some of them were
    /// forgotten.
    pub fn changes_since(&self, kind: Kind, after: u64) -> Result<Vec<Change>, Expired> {
        if after < self.compacted {
            return Err(Expired { requested: after, oldest: self.compacted });
        }
        let start = self.history.partition_point(|c| c.rv <= after);
        Ok(self.history.range(start..).filter(|c| c.key.0 == kind).cloned().collect())
    }

    /// Objects of `kind` as they were at version `at` (`None`: now), in key
    /// order (namespace, then name, like etcd's keys), with that version.
    pub fn snapshot(&self, kind: Kind, at: Option<u64>) -> Result<Snapshot, AtError> {
        let at = at.unwrap_or(self.rv);
        if at > self.rv {
            return Err(AtError::TooLarge(TooLarge));
        }
        if at < self.compacted {
            return Err(AtError::Expired(Expired { requested: at, oldest: self.compacted }));
        }
        let range = (kind, String::new(), String::new())..;
        let mut objects: BTreeMap<Key, Arc<Value>> =
            self.objects.range(range).take_while(|(k, _)| k.0 == kind).map(|(k, v)| (k.clone(), v.clone())).collect();
        let start = self.history.partition_point(|c| c.rv <= at);
        for change in self.history.range(start..).rev().filter(|c| c.key.0 == kind) {
            match &change.prev {
                Some(prev) => objects.insert(change.key.clone(), prev.clone()),
                None => objects.remove(&change.key),
            };
        }
        Ok((at, objects.into_iter().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Key {
        (Kind::Pod, "ns".into(), name.into())
    }

    fn pod(name: &str, v: u32) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "ns"}, "spec": {"v": v}})
    }

    #[test]
    fn snapshots_and_history() {
        let mut s = Store::default();
        s.apply(key("a"), pod("a", 1));
        let at = s.rv();
        s.apply(key("b"), pod("b", 1));
        s.apply(key("a"), pod("a", 2));
        assert!(!s.apply(key("a"), pod("a", 2)).1, "no-op update");
        s.delete(&key("b"));
        let (rv, then) = s.snapshot(Kind::Pod, Some(at)).expect("snapshot");
        assert_eq!(rv, at);
        assert_eq!(then.len(), 1);
        assert_eq!(then[0].1["spec"]["v"], 1);
        assert_eq!(s.changes_since(Kind::Pod, at).expect("changes").len(), 3);
        assert!(s.snapshot(Kind::Service, None).expect("services").1.is_empty());
        s.compact();
        assert!(s.changes_since(Kind::Pod, at).is_err());
        assert!(s.snapshot(Kind::Pod, Some(at)).is_err());
        assert_eq!(s.snapshot(Kind::Pod, None).expect("now").1.len(), 1);
    }

    #[test]
    fn new_uid_replaces() {
        let mut s = Store::default();
        let (first, _) = s.apply(key("a"), pod("a", 1));
        let mut again = pod("a", 1);
        again["metadata"]["uid"] = json!("other");
        s.apply(key("a"), again);
        let changes = s.changes_since(Kind::Pod, 1000).expect("changes");
        let types: Vec<_> = changes.iter().map(|c| c.ty).collect();
        assert_eq!(types, [ChangeType::Added, ChangeType::Deleted, ChangeType::Added]);
        assert_ne!(first["metadata"]["uid"], "other");
    }
}
