//! Arbitrary bytes as the HTTP/2 side of an inbound tunnel connection (what
//! arrives after TLS): h2 framing and HPACK, then Outrigger's own CONNECT
//! validation for every request that decodes. Must never panic or hang.
#![no_main]

use std::{net::IpAddr, sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let pod_ips: [IpAddr; 2] = [[10, 0, 0, 5].into(), "fd00::5".parse().expect("ip")];
    runtime().block_on(async {
        let (mut peer, ours) = tokio::io::duplex(256 * 1024);
        let _ = peer.write_all(data).await;
        let _ = peer.shutdown().await;
        let serve = async {
            let Ok(mut conn) = outrigger::tunnel::server_builder(100).handshake::<_, bytes::Bytes>(ours).await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let status = match outrigger::inbound::validate_connect(&request, &pod_ips) {
                    Ok(_) => http::StatusCode::OK,
                    Err(_) => http::StatusCode::FORBIDDEN,
                };
                if let Ok(response) = http::Response::builder().status(status).body(()) {
                    let _ = respond.send_response(response, true);
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), serve).await;
    });
});
