//! Arbitrary bytes as a client's first flight to an inbound tunnel port:
//! rustls with Outrigger's server configuration (TLS 1.3 only, mandatory
//! client certificate, SPIFFE verifier). Must never panic.
#![no_main]

use std::{io::Cursor, sync::{Arc, OnceLock}};

use libfuzzer_sys::fuzz_target;
use outrigger_fuzz::test_identities;

fn config() -> &'static Arc<rustls::ServerConfig> {
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let (identities, id) = test_identities();
        let configs = outrigger::tls::TlsConfigs::new(identities);
        configs.server(&id).expect("server config")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut conn) = rustls::ServerConnection::new(config().clone()) else { return };
    let mut input = Cursor::new(data);
    while (input.position() as usize) < data.len() {
        match conn.read_tls(&mut input) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if conn.process_new_packets().is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = conn.write_tls(&mut out);
});
