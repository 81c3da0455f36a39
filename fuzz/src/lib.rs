//! Shared set-up for the fuzz targets.

use std::sync::Arc;

use outrigger::identity::{ca, CaSource, Identities, Identity};

/// Identities backed by a throw-away built-in CA, with a certificate for
/// `spiffe://cluster.local/ns/default/sa/fuzz`.
pub fn test_identities() -> (Arc<Identities>, Identity) {
    let dir = std::env::temp_dir().join(format!("outrigger-fuzz-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ca::init(&dir, "cluster.local", std::time::Duration::from_secs(3600)).expect("CA");
    let source = CaSource::new(&dir, std::time::Duration::from_secs(3600)).expect("CA source");
    // The CA is in memory now; leave no files behind.
    let _ = std::fs::remove_dir_all(&dir);
    let identities = Arc::new(Identities::new("cluster.local", Box::new(source)));
    let id = identities.identity("default", "fuzz");
    identities.set_wanted([id.clone()].into_iter().collect());
    identities.refresh();
    (identities, id)
}
