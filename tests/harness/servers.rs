//! Real third-party servers inside pods: nginx, sshd, `openssl s_server`.
//! Each runs in the sandbox (killed with it) and is waited for without
//! reaching into the pod from the host (the host has no route there).

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result};

use crate::{wait_for, Pod, Sandbox};

/// nginx in `pod` on `port` (HTTP/1.1), and on `h2c_port` if given (HTTP/2
/// over cleartext with prior knowledge), answering `ok` and logging only
/// `$remote_addr`; returns its access log.
pub fn nginx(sb: &Sandbox, pod: &Pod, port: u16, h2c_port: Option<u16>) -> Result<PathBuf> {
    let dir = sb.dir.join(format!("nginx-{}-{port}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("access.log");
    let conf = dir.join("nginx.conf");
    let h2c = h2c_port.map(|p| format!("listen {}:{p} http2;", pod.ip4)).unwrap_or_default();
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; pid {dir}/nginx.pid; error_log {dir}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ log_format ra '$remote_addr'; access_log {log} ra;\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
               server {{ listen {ip}:{port}; {h2c} location / {{ return 200 'ok'; }} }} }}\n",
            dir = dir.display(),
            log = log.display(),
            ip = pod.ip4,
        ),
    )?;
    let mut cmd = sb.in_pod(pod, "nginx");
    cmd.arg("-c").arg(&conf);
    let spawned = sb.spawn(&format!("nginx-{}", pod.name), cmd)?;
    // The host cannot reach the sandbox: wait on nginx's own pid file.
    wait_for(Duration::from_secs(10), || dir.join("nginx.pid").exists().then_some(()))
        .with_context(|| format!("nginx did not start: {}", spawned.stderr()))?;
    Ok(log)
}

/// sshd in `pod` on `port` with a fresh host key (no logins configured: it
/// is there to speak first, for `ssh-keyscan`).
pub fn sshd(sb: &Sandbox, pod: &Pod, port: u16) -> Result<()> {
    let dir = sb.dir.join(format!("sshd-{}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("host_ed25519");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .context("ssh-keygen")?;
    anyhow::ensure!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    let pid = dir.join("sshd.pid");
    // sshd refuses to start without its privilege-separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let mut cmd = sb.in_pod(pod, "/usr/sbin/sshd");
    cmd.args(["-D", "-e", "-f", "/dev/null", "-o"])
        .arg(format!("ListenAddress={}:{port}", pod.ip4))
        .arg("-o")
        .arg(format!("HostKey={}", key.display()))
        .arg("-o")
        .arg(format!("PidFile={}", pid.display()));
    let spawned = sb.spawn(&format!("sshd-{}", pod.name), cmd)?;
    wait_for(Duration::from_secs(10), || pid.exists().then_some(()))
        .with_context(|| format!("sshd did not start: {}", spawned.stderr()))?;
    Ok(())
}

/// `openssl s_server` in `pod` on `port` with a self-signed certificate.
pub fn tls_server(sb: &Sandbox, pod: &Pod, port: u16) -> Result<()> {
    let dir = sb.dir.join(format!("tls-{}", pod.name));
    std::fs::create_dir_all(&dir)?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=tls-server", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("openssl req")?;
    anyhow::ensure!(out.status.success(), "openssl req: {}", String::from_utf8_lossy(&out.stderr));
    let mut cmd = sb.in_pod(pod, "openssl");
    cmd.args(["s_server", "-quiet", "-accept"])
        .arg(format!("{}:{port}", pod.ip4))
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key);
    let spawned = sb.spawn(&format!("tls-{}", pod.name), cmd)?;
    // s_server prints nothing with -quiet until a client comes.
    wait_listening(pod, port).with_context(|| format!("openssl s_server did not start: {}", spawned.stderr()))
}

/// Waits for a listening socket on `port` in the pod's namespace (looked at
/// with `ss` from outside: the host has no route into the pod).
pub fn wait_listening(pod: &Pod, port: u16) -> Result<()> {
    let listening = wait_for(Duration::from_secs(20), || {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "ss", "-Hltn", &format!("sport = :{port}")])
            .output()
            .ok()?;
        (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
    });
    listening.with_context(|| format!("nothing listens on {}:{port}", pod.name))
}

/// One of the Python peers of tests/harness/py (Debian's python3, whose
/// websockets and grpcio come from Debian packages), run in `pod`.
pub fn python(sb: &Sandbox, pod: &Pod, script: &str, args: &[&str]) -> std::process::Command {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("harness/py").join(script);
    let mut cmd = sb.in_pod(pod, "/usr/bin/python3");
    cmd.arg(path).args(args);
    cmd
}

/// The HTTP/1.1 origin (py/origin.py) in `pod` on `port`: answers with
/// `name` after `delay_ms`, logging "METHOD PATH" per request to the
/// returned file.
pub fn origin(sb: &Sandbox, pod: &Pod, port: u16, name: &str, delay_ms: u64) -> Result<PathBuf> {
    origin_answering(sb, pod, port, name, delay_ms, 200)
}

/// [`origin`] answering every request with `status` (a broken endpoint).
pub fn origin_answering(sb: &Sandbox, pod: &Pod, port: u16, name: &str, delay_ms: u64, status: u16) -> Result<PathBuf> {
    let log = sb.dir.join(format!("origin-{name}-{port}.log"));
    let (addr, port_s, log_s) = (pod.ip4.to_string(), port.to_string(), log.display().to_string());
    let cmd = python(sb, pod, "origin.py", &[name, &addr, &port_s, &log_s, &delay_ms.to_string(), &status.to_string()]);
    let spawned = sb.spawn(&format!("origin-{name}"), cmd)?;
    wait_listening(pod, port).with_context(|| format!("origin {name}: {}", spawned.stderr()))?;
    Ok(log)
}

/// A Python peer serving on `port` (ws.py / grpc_peer.py `serve`).
pub fn python_server(sb: &Sandbox, pod: &Pod, script: &str, port: u16) -> Result<crate::sandbox::Spawned> {
    let cmd = python(sb, pod, script, &["serve", &pod.ip4.to_string(), &port.to_string()]);
    let spawned = sb.spawn(&format!("{script}-{}", pod.name), cmd)?;
    wait_listening(pod, port).with_context(|| format!("{script}: {}", spawned.stderr()))?;
    Ok(spawned)
}
