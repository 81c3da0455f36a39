//! Transparent to applications (issue 10): a meshed client's own address,
//! the real client address at the server (same node, across nodes over
//! mTLS, plaintext from outside the mesh), authorization of plaintext
//! arrivals, no spoofed packet leaving a pod, strict mode with an allowed
//! probe source, and fail-open inbound capture — each against the real
//! kernel, with real programs (vsftpd, curl, nginx) where they exist.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use outrigger_e2e::{mesh::Mesh, servers::nginx, wait_for, Pod, Sandbox};
use serde_json::Value;

const APP: u16 = 8080;

fn ok(summary: &Value) -> bool {
    summary["ok"] == 1 && summary["failed"] == 0
}

/// The peers the echo server saw, from its "accepted" lines.
fn accepted_peers(server: &outrigger_e2e::sandbox::Spawned) -> Vec<IpAddr> {
    server
        .stdout()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "accepted")
        .filter_map(|v| v["peer"].as_str().and_then(|p| p.parse::<SocketAddr>().ok()))
        .map(|a| outrigger::model::canonical_ip(a.ip()))
        .collect()
}

/// The last peer the server saw, waiting a moment for its log line.
fn last_peer(server: &outrigger_e2e::sandbox::Spawned, before: usize) -> Result<IpAddr> {
    wait_for(Duration::from_secs(5), || accepted_peers(server).get(before).copied())
        .context("the server never logged the connection")
}

#[test]
fn a_meshed_clients_own_address_is_its_pod_address() -> Result<()> {
    let mesh = Mesh::new(&[&["a", "b"]], &[(0, "c")])?;
    let (a, b, c) = (mesh.pod("a"), mesh.pod("b"), mesh.pod("c"));
    mesh.sb.echo_server(b, &[APP], &[])?;
    let proxy = mesh.start(0, &[])?;
    for v6 in [false, true] {
        let target = SocketAddr::new(b.ip(v6), APP);
        let meshed = mesh.sb.client(a, target, &["--bytes", "1000"])?;
        let control = mesh.sb.client(c, target, &["--bytes", "1000"])?;
        ensure!(ok(&meshed) && ok(&control), "{meshed} / {control}");
        let local = |s: &Value| -> Result<SocketAddr> {
            s["locals"][0].as_str().and_then(|l| l.parse().ok()).context("no local address reported")
        };
        let (mine, theirs) = (local(&meshed)?, local(&control)?);
        eprintln!("getsockname: meshed {mine}, unmeshed control {theirs}");
        ensure!(mine.ip() == a.ip(v6), "meshed client's getsockname is {mine}, not its pod address {}", a.ip(v6));
        ensure!(theirs.ip() == c.ip(v6), "control: {theirs}");
        ensure!(mine.port() != 0);
    }
    ensure!(proxy.kernel_events("sockname_rewritten") >= 2.0);
    Ok(())
}

/// vsftpd in `pod` serving one file, active mode only.
fn vsftpd(sb: &Sandbox, pod: &Pod, dir: &std::path::Path) -> Result<()> {
    let root = dir.join("ftp-root");
    let empty = dir.join("ftp-empty");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&empty)?;
    // Larger than the socket buffers between vsftpd and the client (4 MB
    // send, 6 MB receive at most): vsftpd cannot have written it all, and
    // sent "226 Transfer complete" on the control connection, before the
    // data connection reached curl. A small file could, through a proxy that
    // holds it while it dials curl; curl then fails (8, "Ctrl conn has data
    // while waiting for data conn") — a race of active FTP through any
    // proxy that accepts before it dials, not what this test is about.
    let data: Vec<u8> = (0..16_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(root.join("blob.bin"), &data)?;
    // vsftpd refuses a writable anonymous root.
    std::process::Command::new("chmod").arg("555").arg(&root).status()?;
    let conf = dir.join("vsftpd.conf");
    std::fs::write(
        &conf,
        format!(
            "listen=YES\nlisten_ipv6=NO\nlisten_address={}\nlisten_port=2121\nanonymous_enable=YES\n\
             anon_root={}\nno_anon_password=YES\nlocal_enable=NO\nwrite_enable=NO\npasv_enable=NO\n\
             port_enable=YES\nconnect_from_port_20=NO\nseccomp_sandbox=NO\nsecure_chroot_dir={}\n\
             ftp_username=ftp\nbackground=NO\nxferlog_enable=NO\n",
            pod.ip4,
            root.display(),
            empty.display()
        ),
    )?;
    let mut cmd = sb.in_pod(pod, "vsftpd");
    cmd.arg(&conf);
    sb.spawn(&format!("vsftpd-{}", pod.name), cmd)?;
    let addr = SocketAddr::new(pod.ip4.into(), 2121);
    wait_for(Duration::from_secs(10), || {
        let out = sb.run({
            let mut c = sb.in_pod(pod, "bash");
            c.arg("-c").arg(format!("exec 3<>/dev/tcp/{}/{} && head -c 3 <&3", addr.ip(), addr.port()));
            c
        });
        out.ok().filter(|o| String::from_utf8_lossy(&o.stdout).starts_with("220")).map(|_| ())
    })
    .context("vsftpd did not start")?;
    Ok(())
}

#[test]
fn active_mode_ftp_works_through_the_proxy() -> Result<()> {
    // The server unmeshed, then meshed too (its data connection is then
    // captured and delivered back through the proxy).
    for server_meshed in [false, true] {
        let mesh = if server_meshed {
            Mesh::new(&[&["client", "ftp"]], &[])?
        } else {
            Mesh::new(&[&["client"]], &[(0, "ftp")])?
        };
        let (client, ftp) = (mesh.pod("client"), mesh.pod("ftp"));
        vsftpd(&mesh.sb, ftp, &mesh.sb.dir)?;
        let proxy = mesh.start(0, &[])?;
        let out_file = mesh.sb.dir.join("got.bin");
        let mut curl = mesh.sb.in_pod(client, "curl");
        curl.args(["-sS", "-v", "-P", "-", "--max-time", "20", "-o"])
            .arg(&out_file)
            .arg(format!("ftp://{}:2121/blob.bin", ftp.ip4));
        let out = mesh.sb.run(curl)?;
        let log = String::from_utf8_lossy(&out.stderr);
        let port_line = log.lines().find(|l| l.starts_with("> EPRT") || l.starts_with("> PORT")).unwrap_or("");
        eprintln!("server meshed: {server_meshed}; curl announced: {port_line}");
        ensure!(out.status.success(), "curl -P - failed (server meshed: {server_meshed}):\n{log}");
        ensure!(port_line.contains(&client.ip4.to_string()), "the client announced another address: {port_line}");
        let got = std::fs::read(&out_file)?;
        let want = std::fs::read(mesh.sb.dir.join("ftp-root/blob.bin"))?;
        ensure!(got == want, "the file arrived damaged: {} of {} bytes", got.len(), want.len());
        ensure!(proxy.kernel_events("captured") >= 1.0, "the control connection was not captured");
    }
    Ok(())
}

#[test]
fn the_application_sees_the_real_client() -> Result<()> {
    // a and b on node 0, d on node 1 (meshed); c on node 0 outside the mesh.
    let mesh = Mesh::new(&[&["a", "b"], &["d"]], &[(0, "c")])?;
    let (a, b, c, d) = (mesh.pod("a"), mesh.pod("b"), mesh.pod("c"), mesh.pod("d"));
    let server_b = mesh.sb.echo_server(b, &[APP], &[])?;
    let server_d = mesh.sb.echo_server(d, &[APP], &[])?;
    let n0 = mesh.start(0, &[])?;
    let _n1 = mesh.start(1, &[])?;
    for v6 in [false, true] {
        for (what, client, server, target) in [
            ("same node", a, &server_b, b),
            ("across nodes (mTLS)", a, &server_d, d),
            ("plaintext from outside the mesh", c, &server_b, b),
        ] {
            let before = accepted_peers(server).len();
            let summary = mesh.sb.client(client, SocketAddr::new(target.ip(v6), APP), &["--bytes", "2000"])?;
            ensure!(ok(&summary), "{what}: {summary}");
            let peer = last_peer(server, before)?;
            eprintln!("{what} (v6: {v6}): the application saw {peer}");
            ensure!(peer == client.ip(v6), "{what}: the application saw {peer}, not the client {}", client.ip(v6));
        }
    }
    let m = n0.metrics()?;
    let plaintext = m.sum(
        "outrigger_connections_opened_total",
        &[("reporter", "inbound"), ("security", "plaintext"), ("destination_pod", "b")],
    );
    ensure!(plaintext == 2.0, "plaintext arrivals counted: {plaintext}");

    // nginx's $remote_addr, across nodes and from outside the mesh.
    let log = nginx(&mesh.sb, d, 8081, None)?;
    let log_b = nginx(&mesh.sb, b, 8081, None)?;
    for (client, server, access) in [(a, d, &log), (c, b, &log_b)] {
        let mut curl = mesh.sb.in_pod(client, "curl");
        curl.args(["-sS", "-o", "/dev/null", "--max-time", "10"]).arg(format!("http://{}:8081/", server.ip4));
        ensure!(mesh.sb.run(curl)?.status.success(), "curl to nginx in {} failed", server.name);
        let seen = wait_for(Duration::from_secs(5), || {
            std::fs::read_to_string(access).ok().filter(|s| !s.trim().is_empty()).map(|s| s.trim().to_string())
        })
        .context("nginx logged nothing")?;
        eprintln!("nginx in {} logged $remote_addr {seen}", server.name);
        ensure!(seen.lines().last() == Some(&*client.ip4.to_string()), "nginx saw {seen}, not {}", client.ip4);
    }
    Ok(())
}

#[test]
fn plaintext_arrivals_pass_authorization() -> Result<()> {
    let mesh = Mesh::new(&[&["a", "b"]], &[(0, "c")])?;
    let (a, b, c) = (mesh.pod("a"), mesh.pod("b"), mesh.pod("c"));
    let server = mesh.sb.echo_server(b, &[APP], &[])?;
    let policy = "authorization:\n  - {name: only-a, namespace: default, selector: {pods: [b]}, action: allow, \
                  rules: [{principals: ['spiffe://cluster.local/ns/default/sa/a']}]}\n";
    mesh.write_files(&[a, b], policy)?;
    let proxy = mesh.start(0, &[])?;
    let target = SocketAddr::new(b.ip4.into(), APP);

    ensure!(ok(&mesh.sb.client(a, target, &["--bytes", "100"])?), "the allowed principal was refused");
    let seen_before = accepted_peers(&server).len();
    let refused = mesh.sb.client(c, target, &["--bytes", "100"])?;
    ensure!(refused["failed"] == 1, "plaintext passed an allow policy naming a principal: {refused}");
    let error = refused["errors"][0].as_str().unwrap_or("");
    ensure!(error.contains("reset") || error.contains("Connection reset"), "not a reset: {error}");
    std::thread::sleep(Duration::from_millis(300));
    ensure!(accepted_peers(&server).len() == seen_before, "the application saw the refused client");
    let m = proxy.metrics()?;
    let denied = m.sum(
        "outrigger_connections_failed_total",
        &[("reason", "denied"), ("security", "plaintext"), ("reporter", "inbound")],
    );
    ensure!(denied == 1.0, "denied plaintext counted {denied} times");

    // Without the policy the same client is delivered and counted.
    mesh.write_files(&[a, b], "")?;
    let delivered = wait_for(Duration::from_secs(10), || {
        let s = mesh.sb.client(c, target, &["--bytes", "100"]).ok()?;
        ok(&s).then_some(s)
    });
    ensure!(delivered.is_some(), "plaintext not delivered once the policy was gone");
    let m = proxy.metrics()?;
    ensure!(
        m.sum("outrigger_connections_opened_total", &[("reporter", "inbound"), ("security", "plaintext")]) >= 1.0,
        "the delivered plaintext connection was not counted"
    );
    Ok(())
}

#[test]
fn no_packet_leaves_a_pod_with_a_spoofed_source() -> Result<()> {
    let mesh = Mesh::new(&[&["a"], &["d"]], &[(0, "c")])?;
    let (a, c, d) = (mesh.pod("a"), mesh.pod("c"), mesh.pod("d"));
    mesh.sb.echo_server(d, &[APP], &[])?;
    let _n0 = mesh.start(0, &[])?;
    let _n1 = mesh.start(1, &[])?;
    // Everything leaving d's interface: only d's own addresses may be its source.
    let pcap = mesh.sb.dir.join("d-egress.pcap");
    let mut tcpdump = mesh.sb.in_pod(d, "tcpdump");
    tcpdump.args(["-i", "eth0", "-Q", "out", "-U", "-n", "-w"]).arg(&pcap).arg("tcp");
    let dump = mesh.sb.spawn("tcpdump-d", tcpdump)?;
    wait_for(Duration::from_secs(10), || dump.stderr().contains("listening on").then_some(()))
        .context("tcpdump did not start")?;
    for v6 in [false, true] {
        for client in [a, c] {
            let s = mesh.sb.client(client, SocketAddr::new(d.ip(v6), APP), &["--bytes", "200000"])?;
            ensure!(ok(&s), "{s}");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    mesh.sb.kill(dump.pid);
    let out = std::process::Command::new("tcpdump").args(["-n", "-r"]).arg(&pcap).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let packets: Vec<&str> = text.lines().collect();
    let spoofed: Vec<&&str> = packets
        .iter()
        .filter(|l| {
            let src = l.split_whitespace().nth(2).unwrap_or("");
            !src.starts_with(&format!("{}.", d.ip4)) && !src.starts_with(&format!("{}.", d.ip6))
        })
        .collect();
    eprintln!("packets leaving d: {}, with another source: {}", packets.len(), spoofed.len());
    ensure!(packets.len() > 10, "the capture saw nothing leave d");
    ensure!(spoofed.is_empty(), "spoofed packets left the pod: {spoofed:?}");
    Ok(())
}

#[test]
fn strict_mode_lets_the_node_probe_and_refuses_other_plaintext() -> Result<()> {
    let mesh = Mesh::new(&[&["b"]], &[(0, "c")])?;
    let (b, c) = (mesh.pod("b"), mesh.pod("c"));
    let server = mesh.sb.echo_server(b, &[APP], &[])?;
    // The node as the pods see it: the bridge's address in the node netns.
    let node = Pod {
        name: "node".into(),
        node: 0,
        netns: mesh.sb.node_netns(0).to_string(),
        netns_path: format!("/var/run/netns/{}", mesh.sb.node_netns(0)).into(),
        ip4: "10.77.0.254".parse()?,
        ip6: "fd77::fe".parse()?,
    };
    let _proxy = mesh.start(0, &["--mtls", "strict", "--mtls-strict-allow", "10.77.0.254,fd77::fe"])?;
    let target = SocketAddr::new(b.ip4.into(), APP);
    let probe = mesh.sb.client(&node, target, &["--bytes", "10"])?;
    ensure!(ok(&probe), "the node's probe was refused: {probe}");
    ensure!(accepted_peers(&server).iter().any(|p| *p == node.ip4), "the app never saw the probe");
    let other = mesh.sb.client(c, target, &["--bytes", "10"])?;
    ensure!(other["failed"] == 1, "plaintext from another pod reached a strict pod: {other}");
    Ok(())
}

#[test]
fn inbound_capture_fails_open_when_the_proxy_dies() -> Result<()> {
    let mesh = Mesh::new(&[&["b"]], &[(0, "c")])?;
    let (b, c) = (mesh.pod("b"), mesh.pod("c"));
    let server = mesh.sb.echo_server(b, &[APP], &[])?;
    let mut proxy = mesh.start(0, &[])?;
    let target = SocketAddr::new(b.ip4.into(), APP);
    ensure!(ok(&mesh.sb.client(c, target, &["--bytes", "100"])?));
    ensure!(proxy.kernel_events("inbound_captured") >= 1.0, "the plaintext arrival was not captured");
    proxy.signal(nix::sys::signal::Signal::SIGKILL)?;
    proxy.wait_exit(Duration::from_secs(10)).context("the proxy did not die")?;
    let before = accepted_peers(&server).len();
    let direct = mesh.sb.client(c, target, &["--bytes", "100"])?;
    ensure!(ok(&direct), "with the proxy gone, plaintext did not reach the app: {direct}");
    ensure!(last_peer(&server, before)? == IpAddr::from(c.ip4), "the app did not see c directly");
    Ok(())
}
