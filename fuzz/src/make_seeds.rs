//! Writes seed inputs for the fuzz targets: a real HTTP/2 client's CONNECT
//! (so the fuzzer starts past the connection preface) and a real TLS 1.3
//! ClientHello with ALPN h2.

use std::{path::PathBuf, sync::Arc};

use tokio::io::AsyncReadExt;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let h2_seed = rt.block_on(async {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let (mut sender, conn) = h2::client::handshake(ours).await.expect("h2 client");
        tokio::spawn(conn);
        let request = http::Request::builder().method(http::Method::CONNECT).uri("10.0.0.5:8080").body(()).expect("req");
        let _ = sender.send_request(request, false).expect("send");
        tokio::task::yield_now().await;
        let mut buf = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(std::time::Duration::from_millis(200), theirs.read(&mut buf))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or(0);
        buf.truncate(n);
        buf
    });
    write(&dir.join("hbone_connect"), "connect", &h2_seed);

    let (identities, id) = outrigger_fuzz::test_identities();
    let configs = outrigger::tls::TlsConfigs::new(identities);
    let client_config: Arc<rustls::ClientConfig> = configs.client(&id, &id).expect("client config");
    let mut client = rustls::ClientConnection::new(client_config, "10.0.0.5".try_into().expect("name")).expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("client hello");
    write(&dir.join("tls_handshake"), "client-hello", &hello);
}

fn write(dir: &std::path::Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
    println!("seed {} ({} bytes)", dir.join(name).display(), bytes.len());
}
