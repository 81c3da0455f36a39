//! Simulated nodes and pods in network namespaces, with their own cgroup.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, Once,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{podtool_bin, wait_for};

/// Every name this harness creates starts with this, followed by the
/// owning process id: `ort<pid>x<n>`. That is how a later run recognises
/// leftovers of a dead one.
const PREFIX: &str = "ort";
const NETNS_DIR: &str = "/var/run/netns";
const CGROUP_PARENT: &str = "outrigger-tests";
const TMP_PARENT: &str = "/tmp/outrigger-tests";

static CLEAN_STALE: Once = Once::new();
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A pod: a network namespace on a node's bridge.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub node: usize,
    /// `ip netns` name.
    pub netns: String,
    pub netns_path: PathBuf,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

impl Pod {
    pub fn ip(&self, v6: bool) -> IpAddr {
        if v6 {
            IpAddr::V6(self.ip6)
        } else {
            IpAddr::V4(self.ip4)
        }
    }
}

/// A process started in the sandbox, with its output in files.
#[derive(Debug, Clone)]
pub struct Spawned {
    pub pid: u32,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Spawned {
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The first JSON line of its output with `"event": event`, waiting up
    /// to `timeout` (failing early if the tool reported an error).
    pub fn event(&self, event: &str, timeout: Duration) -> Result<serde_json::Value> {
        let found = wait_for(timeout, || {
            // The test tools print `outrigger-<tool>: <error>` when they fail.
            if self.stderr().contains("outrigger-") {
                return Some(None);
            }
            let stdout = self.stdout();
            let mut reports = stdout.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
            reports.find(|v| v["event"] == event).map(Some)
        });
        found.flatten().with_context(|| format!("no {event:?} report within {timeout:?}: {}", self.stderr()))
    }
}

pub struct Sandbox {
    pub id: String,
    /// Scratch directory for files (pods file, logs).
    pub dir: PathBuf,
    /// The sandbox's cgroup; node `k` is the child `n<k>`.
    pub cgroup: PathBuf,
    nodes: Vec<String>,
    pods: Vec<Pod>,
    children: Mutex<Vec<Child>>,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let mut all = vec!["ip"];
    all.extend_from_slice(args);
    sh(&all)
}

/// Where cgroup2 is mounted, found the way the proxy finds it.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    outrigger::capture::cgroup::cgroup2_mount_in(&mounts).context("no cgroup2 mount in /proc/self/mounts")
}

fn pid_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The owner pid encoded in a harness name, if it is one.
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split('x').next()?.parse().ok()
}

/// Removes namespaces, cgroups and scratch files left by runs that died.
pub fn clean_stale() {
    CLEAN_STALE.call_once(|| {
        let stale = |name: &str| owner_pid(name).map(|pid| !pid_alive(pid)).unwrap_or(false);
        if let Ok(root) = cgroup2_root() {
            let parent = root.join(CGROUP_PARENT);
            if let Ok(entries) = fs::read_dir(&parent) {
                for e in entries.flatten() {
                    if stale(&e.file_name().to_string_lossy()) {
                        remove_cgroup_tree(&e.path());
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(NETNS_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if stale(&name) {
                    let _ = ip(&["netns", "delete", &name]);
                }
            }
        }
        let keep_logs = std::env::var_os("OUTRIGGER_KEEP_LOGS").is_some();
        if let Ok(entries) = fs::read_dir(TMP_PARENT).map(|e| e.filter(|_| !keep_logs)) {
            for e in entries.flatten() {
                if stale(&e.file_name().to_string_lossy()) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    });
}

/// Kills every process in a cgroup subtree and removes it.
fn remove_cgroup_tree(path: &Path) {
    if !path.exists() {
        return;
    }
    let _ = fs::write(path.join("cgroup.kill"), "1");
    let _ = wait_for(Duration::from_secs(5), || {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        let children_busy = fs::read_dir(path)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .any(|e| !fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default().trim().is_empty())
            })
            .unwrap_or(false);
        (procs.trim().is_empty() && !children_busy).then_some(())
    });
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = wait_for(Duration::from_secs(5), || fs::remove_dir(path).ok());
}

impl Sandbox {
    /// A sandbox with one node (node 0) and no pods yet.
    pub fn new() -> Result<Self> {
        crate::require_root();
        clean_stale();
        let id = format!("{PREFIX}{}x{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let dir = PathBuf::from(TMP_PARENT).join(&id);
        fs::create_dir_all(&dir)?;
        let cgroup = cgroup2_root()?.join(CGROUP_PARENT).join(&id);
        fs::create_dir_all(&cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let mut sandbox =
            Self { id, dir, cgroup, nodes: Vec::new(), pods: Vec::new(), children: Mutex::new(Vec::new()) };
        sandbox.add_node()?;
        Ok(sandbox)
    }

    /// The cgroup a node's proxy attaches to and its pods run in.
    pub fn node_cgroup(&self, node: usize) -> PathBuf {
        self.cgroup.join(format!("n{node}"))
    }

    pub fn node_netns(&self, node: usize) -> &str {
        &self.nodes[node]
    }

    /// Adds a node: a namespace with a bridge (10.77.K.254/24,
    /// fd77:0:K::fe/64) routing for its pods. Nodes after the first are
    /// wired to node 0 by a veth pair (`wire<K>` on both ends).
    pub fn add_node(&mut self) -> Result<usize> {
        let k = self.nodes.len();
        let ns = format!("{}-n{k}", self.id);
        ip(&["netns", "add", &ns])?;
        self.nodes.push(ns.clone());
        fs::create_dir_all(self.node_cgroup(k))?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "addr", "add", &format!("10.77.{k}.254/24"), "dev", "br0"])?;
        ip(&["-n", &ns, "addr", "add", &format!("fd77:0:{k}::fe/64"), "dev", "br0", "nodad"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        if k > 0 {
            let hub = self.nodes[0].clone();
            let wire = format!("wire{k}");
            ip(&["-n", &hub, "link", "add", &wire, "type", "veth", "peer", "name", &wire, "netns", &ns])?;
            ip(&["-n", &hub, "addr", "add", &format!("10.78.{k}.1/30"), "dev", &wire])?;
            ip(&["-n", &ns, "addr", "add", &format!("10.78.{k}.2/30"), "dev", &wire])?;
            ip(&["-n", &hub, "addr", "add", &format!("fd78:0:{k}::1/64"), "dev", &wire, "nodad"])?;
            ip(&["-n", &ns, "addr", "add", &format!("fd78:0:{k}::2/64"), "dev", &wire, "nodad"])?;
            ip(&["-n", &hub, "link", "set", &wire, "up"])?;
            ip(&["-n", &ns, "link", "set", &wire, "up"])?;
            ip(&["-n", &hub, "route", "add", &format!("10.77.{k}.0/24"), "via", &format!("10.78.{k}.2")])?;
            ip(&["-n", &hub, "-6", "route", "add", &format!("fd77:0:{k}::/64"), "via", &format!("fd78:0:{k}::2")])?;
            ip(&["-n", &ns, "route", "add", "10.77.0.0/16", "via", &format!("10.78.{k}.1")])?;
            ip(&["-n", &ns, "-6", "route", "add", "fd77::/16", "via", &format!("fd78:0:{k}::1")])?;
        }
        Ok(k)
    }

    /// Adds a pod on `node`: 10.77.NODE.I/24 and fd77:0:NODE::I/64, with a
    /// default route via its node and loopback up.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod> {
        let index = self.pods.iter().filter(|p| p.node == node).count() + 1;
        let ns = format!("{}-{name}", self.id);
        let pod = Pod {
            name: name.to_string(),
            node,
            netns: ns.clone(),
            netns_path: PathBuf::from(NETNS_DIR).join(&ns),
            ip4: format!("10.77.{node}.{index}").parse()?,
            ip6: format!("fd77:0:{node}::{index}").parse()?,
        };
        ip(&["netns", "add", &ns])?;
        self.pods.push(pod.clone());
        self.wire_pod(&pod)?;
        Ok(pod)
    }

    /// The pod's veth end on its node's bridge (`p<I>`, I from its address).
    fn host_end(pod: &Pod) -> String {
        format!("p{}", pod.ip4.octets()[3])
    }

    /// Joins a pod's (empty) netns to its node's bridge with its addresses.
    fn wire_pod(&self, pod: &Pod) -> Result<()> {
        let (ns, node_ns, node) = (&pod.netns, &self.nodes[pod.node], pod.node);
        let host_end = Self::host_end(pod);
        ip(&["-n", node_ns, "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
        ip(&["-n", node_ns, "link", "set", &host_end, "master", "br0", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", pod.ip4), "dev", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &format!("10.77.{node}.254")])?;
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &format!("fd77:0:{node}::fe")])
    }

    /// Deletes a pod's netns as a container runtime tearing down a pod
    /// sandbox does: its link goes (even while a process still holds the
    /// namespace) and its path disappears.
    pub fn remove_pod_netns(&self, pod: &Pod) -> Result<()> {
        ip(&["-n", &self.nodes[pod.node], "link", "del", &Self::host_end(pod)])?;
        ip(&["netns", "delete", &pod.netns])
    }

    /// A new netns at the pod's path with the pod's addresses (after
    /// [`Sandbox::remove_pod_netns`]): the same pod, recreated.
    pub fn recreate_pod_netns(&self, pod: &Pod) -> Result<()> {
        ip(&["netns", "add", &pod.netns])?;
        self.wire_pod(pod)
    }

    /// Lets a client pod open connections at benchmark rates: reuse ports in
    /// TIME_WAIT for new outgoing connections and widen the ephemeral range
    /// (the defaults run out after ~28k connections a minute to one peer).
    pub fn tune_for_load(&self, pod: &Pod) -> Result<()> {
        sh(&["ip", "netns", "exec", &pod.netns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
        sh(&["ip", "netns", "exec", &pod.netns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000"])
    }

    /// How many eBPF programs are attached to `node`'s cgroup (bpftool).
    pub fn attached_programs(&self, node: usize) -> Result<usize> {
        let out = Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(self.node_cgroup(node)).output()?;
        if !out.status.success() {
            bail!("bpftool: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Array(vec![]));
        Ok(v.as_array().map(Vec::len).unwrap_or(0))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// `outrigger-podtool` inside `pod`, in its node's cgroup.
    pub fn podtool(&self, pod: &Pod) -> Command {
        self.tool_in_pod(podtool_bin(), pod)
    }

    /// Runs `outrigger-hostile MODE ...` in `pod` to completion: its
    /// report (the last JSON line it printed).
    pub fn hostile_report(&self, pod: &Pod, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = self.hostile(pod);
        cmd.args(args);
        let out = self.run(cmd)?;
        if !out.status.success() {
            bail!("outrigger-hostile {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(serde_json::from_str(text.lines().last().unwrap_or_default())?)
    }

    /// `outrigger-hostile` (the hardening tests' clients) inside `pod`.
    pub fn hostile(&self, pod: &Pod) -> Command {
        self.tool_in_pod(crate::hostile_bin(), pod)
    }

    /// A tool of this workspace that joins a cgroup and netns itself
    /// (`--cgroup DIR --netns FILE`), for `pod`.
    fn tool_in_pod(&self, bin: PathBuf, pod: &Pod) -> Command {
        let mut cmd = Command::new(bin);
        cmd.arg("--cgroup").arg(self.node_cgroup(pod.node)).arg("--netns").arg(&pod.netns_path);
        cmd
    }

    /// Any program inside `pod`, in its node's cgroup.
    pub fn in_pod(&self, pod: &Pod, program: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0/cgroup.procs\" && exec ip netns exec \"$@\"")
            .arg(self.node_cgroup(pod.node))
            .arg(&pod.netns)
            .arg(program);
        // In the script $0 is the cgroup and "$@" is `NETNS PROGRAM ARGS...`.
        cmd
    }

    /// Starts a long-running process, its output going to files in the
    /// sandbox directory. It is killed when the sandbox is dropped.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<Spawned> {
        let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let stdout = self.dir.join(format!("{name}.{n}.out"));
        let stderr = self.dir.join(format!("{name}.{n}.err"));
        cmd.stdin(Stdio::null()).stdout(fs::File::create(&stdout)?).stderr(fs::File::create(&stderr)?);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.lock().unwrap_or_else(|e| e.into_inner()).push(child);
        Ok(Spawned { pid, stdout, stderr })
    }

    /// Starts an echo server in `pod` on `ports` (both families) and waits
    /// until it listens.
    pub fn echo_server(&self, pod: &Pod, ports: &[u16], extra: &[&str]) -> Result<Spawned> {
        let mut cmd = self.podtool(pod);
        cmd.arg("serve");
        let mut count = 0;
        for port in ports {
            for ip in [IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)] {
                cmd.arg("--listen").arg(std::net::SocketAddr::new(ip, *port).to_string());
                count += 1;
            }
        }
        cmd.args(extra);
        let spawned = self.spawn(&format!("server-{}", pod.name), cmd)?;
        let ok = wait_for(Duration::from_secs(10), || {
            (spawned.stdout().matches("\"listening\"").count() >= count).then_some(())
        });
        if ok.is_none() {
            bail!("echo server in {} did not start: {}", pod.name, spawned.stderr());
        }
        Ok(spawned)
    }

    /// Runs the podtool client in `pod` against `target` and returns its
    /// JSON summary (`ok`, `failed`, `peers`, `greetings`, `errors`, ...).
    pub fn client(&self, pod: &Pod, target: std::net::SocketAddr, args: &[&str]) -> Result<serde_json::Value> {
        let mut cmd = self.podtool(pod);
        cmd.arg("client").arg("--connect").arg(target.to_string()).args(args);
        let out = self.run(cmd)?;
        if !out.status.success() {
            bail!("client in {} failed: {}", pod.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs a command to completion.
    pub fn run(&self, mut cmd: Command) -> Result<Output> {
        cmd.stdin(Stdio::null());
        cmd.output().context("running a pod command")
    }

    /// Kills one process started with [`Sandbox::spawn`].
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = children.iter().position(|c| c.id() == pid) {
            let mut child = children.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for mut child in self.children.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_cgroup_tree(&self.cgroup);
        for pod in &self.pods {
            let _ = ip(&["netns", "delete", &pod.netns]);
        }
        for node in &self.nodes {
            let _ = ip(&["netns", "delete", node]);
        }
        if std::env::var_os("OUTRIGGER_KEEP_LOGS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
