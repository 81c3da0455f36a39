//! Protocol detection on captured outbound connections, with real clients
//! and servers: curl (HTTP/1.1 and HTTP/2 prior knowledge) against nginx,
//! `openssl s_client` against `openssl s_server` (TLS from the application:
//! opaque), and `ssh-keyscan` against sshd (the server speaks first: its
//! banner decides "opaque" without waiting for the detection timeout). Each
//! outcome is counted in `outrigger_protocol_detections_total{result}`.

use std::{
    process::Output,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use outrigger_e2e::{
    mesh::Mesh,
    servers::{nginx, sshd, tls_server},
    wait_for, Pod, ProxyProcess,
};

const HTTP: u16 = 8080;
const H2C: u16 = 8082;
const SSH: u16 = 2222;
const TLS: u16 = 8443;

fn run(mesh: &Mesh, client: &Pod, program: &str, args: &[&str]) -> Result<Output> {
    let mut cmd = mesh.sb.in_pod(client, program);
    cmd.args(args);
    mesh.sb.run(cmd)
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// curl from `client` to `url` (with `extra` flags): "<status> <HTTP version>".
fn curl(mesh: &Mesh, client: &Pod, extra: &[&str], url: &str) -> Result<String> {
    let mut args = extra.to_vec();
    args.extend(["-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", "--max-time", "10", url]);
    Ok(text(&run(mesh, client, "curl", &args)?))
}

fn detections(proxy: &ProxyProcess, result: &str) -> f64 {
    proxy
        .metrics()
        .map(|m| m.sum("outrigger_protocol_detections_total", &[("direction", "outbound"), ("result", result)]))
        .unwrap_or(f64::NAN)
}

/// Waits until the counter reaches `want` (it is updated as connections
/// are decided, which may trail the client's exit by a little).
fn expect_detections(proxy: &ProxyProcess, result: &str, want: f64) -> Result<()> {
    let reached = wait_for(Duration::from_secs(5), || (detections(proxy, result) == want).then_some(()));
    ensure!(reached.is_some(), "detections{{result={result}}}: {} (want {want})", detections(proxy, result));
    Ok(())
}

/// ssh-keyscan from `client`: the server's host key, and how long it took.
fn keyscan(mesh: &Mesh, client: &Pod, server: &Pod) -> Result<Duration> {
    let started = Instant::now();
    let out = run(
        mesh,
        client,
        "ssh-keyscan",
        &["-T", "10", "-t", "ed25519", "-p", &SSH.to_string(), &server.ip4.to_string()],
    )?;
    let took = started.elapsed();
    ensure!(text(&out).contains("ssh-ed25519"), "ssh-keyscan got no key: {}", text(&out));
    Ok(took)
}

#[test]
fn http_h2_tls_and_server_first_protocols_are_told_apart_and_all_work() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "server"]], &[])?;
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    nginx(&mesh.sb, server, HTTP, Some(H2C))?;
    sshd(&mesh.sb, server, SSH)?;
    tls_server(&mesh.sb, server, TLS)?;
    // A long detection timeout: a server-first protocol that waited it out
    // would show (30 s, and a `timeout` count instead of `server_first`).
    let proxy = mesh.start(0, &["--protocol-detect-timeout", "30s"])?;

    let out = curl(&mesh, client, &[], &format!("http://{}:{HTTP}/", server.ip4))?;
    ensure!(out == "200 1.1", "HTTP/1.1: {out}");
    expect_detections(&proxy, "http1", 1.0)?;

    let out = curl(&mesh, client, &["--http2-prior-knowledge"], &format!("http://{}:{H2C}/", server.ip4))?;
    ensure!(out == "200 2", "h2c prior knowledge: {out}");
    expect_detections(&proxy, "h2", 1.0)?;

    let target = format!("{}:{TLS}", server.ip4);
    let mut s_client = mesh.sb.in_pod(client, "sh");
    s_client.args(["-c", &format!("echo | openssl s_client -connect {target} -brief")]);
    let out = mesh.sb.run(s_client)?;
    ensure!(text(&out).contains("CONNECTION ESTABLISHED"), "openssl s_client: {}", text(&out));
    expect_detections(&proxy, "tls", 1.0)?;

    // The server speaks first: nothing comes from the client until the
    // server's banner, and the banner itself decides (opaque).
    let took = keyscan(&mesh, client, server)?;
    expect_detections(&proxy, "server_first", 1.0)?;
    eprintln!("FIGURE ssh-keyscan on an undeclared port (detection timeout 30 s): {:.0} ms", took.as_secs_f64() * 1e3);
    for (result, want) in
        [("http1", 1.0), ("h2", 1.0), ("tls", 1.0), ("opaque", 0.0), ("timeout", 0.0), ("declared", 0.0)]
    {
        ensure!(detections(&proxy, result) == want, "{result}: {}", detections(&proxy, result));
    }
    let log = proxy.log_text();
    ensure!(log.contains("protocol=\"http1\"") || log.contains("protocol=http1"), "access log has no protocol:\n{log}");
    drop(proxy);

    // A port declared opaque is never peeked at.
    let proxy = mesh.start(0, &["--opaque-ports", &SSH.to_string()])?;
    let took = keyscan(&mesh, client, server)?;
    expect_detections(&proxy, "declared", 1.0)?;
    ensure!(detections(&proxy, "server_first") == 0.0, "a declared port was peeked at");
    eprintln!("FIGURE ssh-keyscan on a port in --opaque-ports: {:.0} ms", took.as_secs_f64() * 1e3);
    Ok(())
}
