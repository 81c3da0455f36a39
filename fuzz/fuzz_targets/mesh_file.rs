//! Arbitrary bytes as the mesh file: YAML parsing under the depth and size
//! budget, translation into the model, and whole-file validation by the
//! store's rules. Must never panic, hang or blow up memory; a refused file
//! must say why.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use outrigger::{
    balance::BalanceSettings,
    sources::file::{parse_bytes, FileLimits},
    store::StoreSettings,
};

fuzz_target!(|data: &[u8]| {
    let settings = StoreSettings { trust_domain: "cluster.local".into(), balance: BalanceSettings::default() };
    let limits = FileLimits { max_bytes: 1024 * 1024, max_depth: 32 };
    match parse_bytes(Path::new("/fuzz/mesh.yaml"), data, limits, &settings) {
        Ok(objects) => {
            // Whatever validated must apply to a fresh store without a rejection.
            let mut store = outrigger::store::Store::new(settings);
            for object in objects {
                assert!(store.upsert(object).is_ok(), "a validated object was rejected");
            }
            store.publish();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
