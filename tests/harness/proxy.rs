//! Running `outrigger run` for a sandbox node and talking to its admin server.

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::{http, outrigger_bin, wait_for, MetricsText, Sandbox};

pub struct ProxyProcess {
    child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
    pub pods_file: PathBuf,
    pub node: usize,
}

/// The admin address the proxy logged (text or JSON log format).
fn admin_addr_in(log: &str) -> Option<SocketAddr> {
    let line = log.lines().find(|l| l.contains("admin server listening"))?;
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ProxyProcess {
    /// Starts the proxy for `node`, inside the node's cgroup (so its own
    /// sockets meet its programs: the loop guard is exercised), and waits
    /// until it is ready.
    pub fn start(sandbox: &Sandbox, node: usize, pods_file: PathBuf, extra: &[&str]) -> Result<Self> {
        let proxy = Self::spawn(sandbox, node, pods_file, extra)?;
        proxy.wait_ready(Duration::from_secs(30))?;
        Ok(proxy)
    }

    /// `outrigger run` for `node` as [`ProxyProcess::spawn`] runs it: in
    /// the node's cgroup, attaching there, its output going to `log`.
    pub fn command(sandbox: &Sandbox, node: usize, pods_file: &Path, extra: &[&str], log: &Path) -> Result<Command> {
        let cgroup = sandbox.node_cgroup(node);
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"").arg(&cgroup).arg(outrigger_bin()).arg("run");
        // An empty path: the state comes from elsewhere (`--kubernetes`).
        if !pods_file.as_os_str().is_empty() {
            cmd.arg("--pods-file").arg(pods_file);
        }
        cmd.arg("--cgroup2-path").arg(&cgroup);
        // Port 0: the proxy binds a free port and logs it; picking one
        // here would race with parallel tests. `extra` overrides these.
        for (flag, value) in
            [("--admin-addr", "127.0.0.1:0"), ("--reload-interval", "100ms"), ("--drain-timeout", "5s")]
        {
            if !extra.contains(&flag) {
                cmd.arg(flag).arg(value);
            }
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(fs::File::create(log)?)
            .stderr(fs::OpenOptions::new().append(true).open(log)?)
            .env("NO_COLOR", "1");
        Ok(cmd)
    }

    /// Starts the proxy without waiting for readiness.
    pub fn spawn(sandbox: &Sandbox, node: usize, pods_file: PathBuf, extra: &[&str]) -> Result<Self> {
        Self::spawn_with_env(sandbox, node, pods_file, extra, &[])
    }

    /// The proxy of `node` with the Kubernetes API as its source
    /// (`--kubernetes`, `KUBECONFIG=kubeconfig`, `--node-name n<node>`),
    /// without waiting for readiness.
    pub fn spawn_kubernetes(sandbox: &Sandbox, node: usize, kubeconfig: &Path, extra: &[&str]) -> Result<Self> {
        let node_name = format!("n{node}");
        let mut args = vec!["--kubernetes", "--node-name", node_name.as_str()];
        args.extend_from_slice(extra);
        let env = [("KUBECONFIG", kubeconfig.as_os_str())];
        Self::spawn_with_env(sandbox, node, PathBuf::new(), &args, &env)
    }

    fn spawn_with_env(
        sandbox: &Sandbox,
        node: usize,
        pods_file: PathBuf,
        extra: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let log = sandbox.dir.join(format!("outrigger-n{node}-{}.log", free_port()?));
        let mut cmd = Self::command(sandbox, node, &pods_file, extra, &log)?;
        cmd.envs(env.iter().copied());
        let mut child = cmd.spawn().context("starting outrigger")?;
        let admin = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(None);
            }
            admin_addr_in(&fs::read_to_string(&log).unwrap_or_default()).map(Some)
        })
        .flatten();
        let Some(admin) = admin else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "outrigger did not start its admin server; its log:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Ok(Self { child, admin, log, pods_file, node })
    }

    /// Runs the proxy for `node` expecting it to stop by itself (a refused
    /// flag or file): its exit code (`None`: killed by a signal), its log,
    /// and how long it ran. Killed after `timeout` (the error says so).
    pub fn run_to_exit(
        sandbox: &Sandbox,
        pods_file: &Path,
        extra: &[&str],
        timeout: Duration,
    ) -> Result<(Option<i32>, String, Duration)> {
        let log = sandbox.dir.join(format!("outrigger-exit-{}.log", free_port()?));
        let started = std::time::Instant::now();
        let mut child = Self::command(sandbox, 0, pods_file, extra, &log)?.spawn().context("starting outrigger")?;
        let status = wait_for(timeout, || child.try_wait().ok().flatten());
        let elapsed = started.elapsed();
        let text = fs::read_to_string(&log).unwrap_or_default();
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("outrigger {extra:?} still ran after {timeout:?}; its log:\n{text}");
        };
        Ok((status.code(), text, elapsed))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where the log ends now: [`ProxyProcess::log_since`] reads what
    /// comes after.
    pub fn log_mark(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The log written after `mark`.
    pub fn log_since(&self, mark: u64) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(text.get(mark as usize..).unwrap_or_default()).into_owned()
    }

    /// Open file descriptors of the process (`/proc/PID/fd`).
    pub fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// Resident memory of the process, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or_default();
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let ready = wait_for(timeout, || match http::get(self.admin, "/ready") {
            Ok((200, _)) => Some(()),
            _ => None,
        });
        if ready.is_none() {
            bail!("outrigger did not become ready within {timeout:?}; its log:\n{}", self.log_text());
        }
        Ok(())
    }

    pub fn metrics(&self) -> Result<MetricsText> {
        let (status, body) = http::get(self.admin, "/metrics")?;
        if status != 200 {
            bail!("/metrics returned {status}: {body}");
        }
        Ok(MetricsText::parse(&body))
    }

    pub fn config_dump(&self) -> Result<serde_json::Value> {
        let (status, body) = http::get(self.admin, "/config_dump")?;
        if status != 200 {
            bail!("/config_dump returned {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// A kernel event counter (`outrigger_ebpf_events_total{event}`).
    pub fn kernel_events(&self, event: &str) -> f64 {
        self.metrics().map(|m| m.sum("outrigger_ebpf_events_total", &[("event", event)])).unwrap_or(f64::NAN)
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal)?;
        Ok(())
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.child.try_wait().ok().flatten())
    }

    /// Writes the pods file atomically (temp file + rename), as a
    /// ConfigMap update or an editor would.
    pub fn write_pods_file(path: &std::path::Path, text: &str) -> Result<()> {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)?;
        Ok(())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// YAML for a pods file listing `pods`.
pub fn pods_yaml(pods: &[&crate::Pod]) -> String {
    let mut out = String::from("pods:\n");
    for pod in pods {
        out.push_str(&format!(
            "  - name: {}\n    namespace: default\n    serviceAccount: {}\n    netns: {}\n    ips: [\"{}\", \"{}\"]\n",
            pod.name,
            pod.name,
            pod.netns_path.display(),
            pod.ip4,
            pod.ip6
        ));
    }
    out
}

/// A service for [`mesh_yaml`]: VIPs, one port, and endpoints given as
/// (pod name, weight).
pub struct ServiceDef<'a> {
    pub name: &'a str,
    pub vips: Vec<std::net::IpAddr>,
    pub port: u16,
    pub target_port: u16,
    pub endpoints: Vec<(&'a str, u32)>,
}

/// YAML for a mesh file with `pods` and `services`.
pub fn mesh_yaml(pods: &[&crate::Pod], services: &[ServiceDef<'_>]) -> String {
    let mut out = pods_yaml(pods);
    if services.is_empty() {
        return out;
    }
    out.push_str("services:\n");
    for svc in services {
        let vips: Vec<String> = svc.vips.iter().map(|v| format!("\"{v}\"")).collect();
        out.push_str(&format!(
            "  - name: {}\n    namespace: default\n    vips: [{}]\n    ports: [{{port: {}, targetPort: {}}}]\n    endpoints:\n",
            svc.name,
            vips.join(", "),
            svc.port,
            svc.target_port
        ));
        if svc.endpoints.is_empty() {
            out.truncate(out.len() - "    endpoints:\n".len());
            out.push_str("    endpoints: []\n");
        }
        for (pod, weight) in &svc.endpoints {
            out.push_str(&format!("      - {{pod: {pod}, weight: {weight}}}\n"));
        }
    }
    out
}

/// YAML for node `node`'s mesh file: its own pods with their netns, pods of
/// other nodes with their addresses only (reached over mutual TLS).
pub fn node_pods_yaml(node: usize, pods: &[&crate::Pod]) -> String {
    let mut out = String::from("pods:\n");
    for pod in pods {
        out.push_str(&format!("  - name: {}\n    namespace: default\n    serviceAccount: {}\n", pod.name, pod.name));
        if pod.node == node {
            out.push_str(&format!("    netns: {}\n", pod.netns_path.display()));
        } else {
            out.push_str(&format!("    node: n{}\n", pod.node));
        }
        out.push_str(&format!("    ips: [\"{}\", \"{}\"]\n", pod.ip4, pod.ip6));
    }
    out
}

/// Runs `outrigger ca ...` and fails with its stderr if it fails.
pub fn outrigger_ca(args: &[&str]) -> Result<()> {
    let out = Command::new(crate::outrigger_bin()).arg("ca").args(args).output()?;
    if !out.status.success() {
        bail!("outrigger ca {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A new CA in `dir` (trust domain cluster.local).
pub fn ca_init(dir: &std::path::Path) -> Result<()> {
    outrigger_ca(&["init", "--dir", &dir.display().to_string()])
}

/// The SPIFFE ID the tests give pod `name` (its service account is its name).
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{name}")
}

/// Issues a certificate for pod `name` from `ca_dir` into `out`.
pub fn ca_issue(ca_dir: &std::path::Path, name: &str, out: &std::path::Path, extra: &[&str]) -> Result<()> {
    let mut args = vec!["issue".to_string(), "--ca-dir".into(), ca_dir.display().to_string()];
    args.extend(["--id".into(), spiffe_id(name), "--out".into(), out.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    outrigger_ca(&args)
}
