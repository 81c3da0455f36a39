//! The Kubernetes API as the source of the mesh state (`--kubernetes`),
//! end to end: the real proxy, its real kube-rs watchers and the real
//! kernel, fed by the test double of the API server
//! (`outrigger_e2e::kubeapi`: no kube-apiserver can run here).
//!
//! A pod is what the kubelet would leave on a node: a network namespace
//! with the pod's addresses and a "sandbox" process in a cgroup named after
//! the pod's UID (the cgroupfs or the systemd driver's shape), under the
//! node's cgroup. The proxy finds the namespace through that process in
//! /proc, as it does on a real node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use outrigger_e2e::{
    http,
    kubeapi::{self, EndpointDef, Kind, KubeApi, ServicePortDef},
    kubelet::{self, Driver},
    proxy::ca_init,
    sandbox::Spawned,
    wait_for, Pod, ProxyProcess, Sandbox,
};
use serde_json::{json, Value};

const NS: &str = "shop";
const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd96::10";
const PORT: u16 = 80;
const TARGET: u16 = 8080;
const ENABLED: (&str, &str) = ("outrigger.dev/mesh", "enabled");

struct Cluster {
    sb: Sandbox,
    api: KubeApi,
    kubeconfig: PathBuf,
    ca: PathBuf,
}

/// A pod of the cluster: its sandbox half and its UID.
struct KubePod {
    pod: Pod,
    uid: String,
}

impl Cluster {
    fn new(nodes: usize) -> Result<Self> {
        let mut sb = Sandbox::new()?;
        for _ in 1..nodes {
            sb.add_node()?;
        }
        let api = KubeApi::start()?;
        let kubeconfig = sb.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        let ca = sb.dir.join("ca");
        ca_init(&ca)?;
        api.apply(&kubeapi::namespace(NS, &[ENABLED]))?;
        Ok(Self { sb, api, kubeconfig, ca })
    }

    /// A pod object for `pod` (both its addresses), not yet applied.
    fn object(pod: &Pod, ns: &str, labels: &[(&str, &str)], sa: &str) -> k8s_openapi::api::core::v1::Pod {
        let ips = [pod.ip4.to_string(), pod.ip6.to_string()];
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        kubeapi::pod(ns, &pod.name, &format!("n{}", pod.node), &ips, labels, sa, None)
    }

    /// Applies `object` and starts its sandbox process in `netns_of`'s
    /// namespace (normally the pod's own), in a kubelet-shaped cgroup.
    fn run_pod(&self, object: &k8s_openapi::api::core::v1::Pod, netns_of: &Pod, driver: Driver) -> Result<String> {
        let stored = self.api.apply(object)?;
        let uid = stored["metadata"]["uid"].as_str().context("the double gave no uid")?.to_string();
        self.sandbox_process(&uid, netns_of, driver)?;
        Ok(uid)
    }

    /// The pod's sandbox process, in `netns_of`'s namespace.
    fn sandbox_process(&self, uid: &str, netns_of: &Pod, driver: Driver) -> Result<Spawned> {
        kubelet::pod_sandbox(&self.sb, netns_of.node, uid, &netns_of.netns, driver)
    }

    /// A pod on `node` with its sandbox process, applied to the API.
    fn add_pod(&mut self, node: usize, name: &str, labels: &[(&str, &str)], sa: &str) -> Result<KubePod> {
        let pod = self.sb.add_pod(node, name)?;
        let uid = self.run_pod(&Self::object(&pod, NS, labels, sa), &pod, Driver::Cgroupfs)?;
        Ok(KubePod { pod, uid })
    }

    fn proxy(&self, node: usize, extra: &[&str]) -> Result<ProxyProcess> {
        let ca = self.ca.display().to_string();
        let mut args = vec!["--ca-dir", ca.as_str(), "--host-proc", "/proc"];
        args.extend_from_slice(extra);
        ProxyProcess::spawn_kubernetes(&self.sb, node, &self.kubeconfig, &args)
    }

    fn ready_proxy(&self, node: usize) -> Result<ProxyProcess> {
        let p = self.proxy(node, &[])?;
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    /// `conns` connections from `pod` to `target`, each reading the
    /// server's greeting.
    fn dial(&self, pod: &Pod, target: SocketAddr, conns: usize) -> Result<Value> {
        let n = conns.to_string();
        self.sb.client(pod, target, &["--conns", &n, "--greeting", "--timeout-ms", "3000"])
    }

    /// `cart` with a named target port, dual-stack.
    fn cart_service(&self) -> Result<()> {
        self.api.apply(&kubeapi::service(NS, "cart", &[VIP4, VIP6], &[ServicePortDef::named("http", 80, "web")]))?;
        Ok(())
    }

    /// The slices of `cart`: one per family.
    fn cart_slices(&self, endpoints: &[(&KubePod, bool)]) -> Result<()> {
        for (family, name) in [("IPv4", "cart-v4"), ("IPv6", "cart-v6")] {
            let defs: Vec<EndpointDef> = endpoints
                .iter()
                .map(|(p, terminating)| {
                    let ip = if family == "IPv4" { p.pod.ip4.to_string() } else { p.pod.ip6.to_string() };
                    let node = format!("n{}", p.pod.node);
                    let e = EndpointDef::ready(&ip, Some(&p.pod.name), Some(&node));
                    if *terminating {
                        e.terminating()
                    } else {
                        e
                    }
                })
                .collect();
            // The slice port carries the service port's name and the
            // container port the name resolved to in these pods.
            self.api.apply(&kubeapi::endpoint_slice(NS, name, "cart", family, &defs, &[("http", TARGET as i32)]))?;
        }
        Ok(())
    }
}

fn meshed_pods(dump: &Value) -> Vec<String> {
    dump["node"]["pods"]
        .as_array()
        .map(|pods| {
            pods.iter()
                .filter(|p| p["error"].is_null() && p["listeners"].as_array().is_some_and(|l| !l.is_empty()))
                .map(|p| {
                    format!(
                        "{}/{}",
                        p["key"]["namespace"].as_str().unwrap_or(""),
                        p["key"]["name"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn not_meshed(dump: &Value) -> BTreeMap<String, String> {
    dump["node"]["source"]["local_pods_not_meshed"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

fn reports(dump: &Value) -> BTreeMap<String, String> {
    dump["node"]["source"]["reports"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
        .unwrap_or_default()
}

/// Waits until `check` holds for the proxy's `/config_dump`.
fn dump_until(proxy: &ProxyProcess, what: &str, mut check: impl FnMut(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    let found = wait_for(Duration::from_secs(20), || {
        last = proxy.config_dump().ok()?;
        check(&last).then(|| last.clone())
    });
    match found {
        Some(v) => Ok(v),
        None => bail!("{what}: not reached; /config_dump: {last:#}\nlog:\n{}", proxy.log_text()),
    }
}

fn greetings(summary: &Value) -> BTreeMap<String, u64> {
    summary["greetings"]
        .as_object()
        .map(|g| g.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

fn vip(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("vip"), PORT)
}

/// Pods of an enrolled namespace are captured; services route to their
/// EndpointSlices through a named target port, over both families;
/// terminating endpoints take no new connection; a deleted pod is no
/// longer captured; opted-out, hostNetwork, unenrolled pods and a process
/// of one pod placed in another's namespace never are.
#[test]
fn pods_of_enrolled_namespaces_are_captured_and_services_follow_endpointslices() -> Result<()> {
    let mut c = Cluster::new(1)?;
    let client = c.add_pod(0, "client", &[("app", "client")], "client")?;
    let e1 = c.add_pod(0, "e1", &[("app", "cart")], "cart")?;
    let e2 = c.add_pod(0, "e2", &[("app", "cart")], "cart")?;
    let mut servers = Vec::new();
    for e in [&e1, &e2] {
        servers.push(c.sb.echo_server(&e.pod, &[TARGET], &["--greet", &e.pod.name])?);
    }
    // The systemd driver's cgroup shape, for one pod.
    let sysd = c.sb.add_pod(0, "sysd")?;
    c.run_pod(&Cluster::object(&sysd, NS, &[], "sysd"), &sysd, Driver::Systemd)?;
    // Never meshed: opted out, unenrolled namespace, hostNetwork.
    let optout = c.add_pod(0, "optout", &[("outrigger.dev/mesh", "disabled")], "optout")?;
    c.api.apply(&kubeapi::namespace("plain", &[]))?;
    let plain = c.sb.add_pod(0, "plain")?;
    c.run_pod(&Cluster::object(&plain, "plain", &[], "plain"), &plain, Driver::Cgroupfs)?;
    let mut hostnet = kubeapi::pod(NS, "hostnet", "n0", &["10.77.0.254"], &[], "hostnet", None);
    hostnet.spec.as_mut().context("spec")?.host_network = Some(true);
    c.api.apply(&hostnet)?;
    // A process of `intruder` placed in e1's namespace: the intruder's own
    // address is in no namespace, so it must not mesh as e1's.
    let mut intruder = kubeapi::pod(NS, "intruder", "n0", &["10.77.0.200"], &[], "intruder", None);
    intruder.metadata.labels = None;
    let intruder_uid = c.api.apply(&intruder)?["metadata"]["uid"].as_str().context("uid")?.to_string();
    c.sandbox_process(&intruder_uid, &e1.pod, Driver::Cgroupfs)?;
    c.cart_service()?;
    c.cart_slices(&[(&e1, false), (&e2, false)])?;

    let proxy = c.ready_proxy(0)?;
    let dump = dump_until(&proxy, "five pods meshed", |d| meshed_pods(d).len() == 4)?;
    let meshed = meshed_pods(&dump);
    for name in ["client", "e1", "e2", "sysd"] {
        ensure!(meshed.contains(&format!("{NS}/{name}")), "{name} not meshed: {meshed:?}");
    }
    let uid_of = |name: &str| {
        dump["node"]["pods"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["key"]["name"] == name))
            .map(|p| p["uid"].clone())
    };
    ensure!(uid_of("client") == Some(json!(client.uid)), "the pod's UID from the API: {:?}", uid_of("client"));
    let why = not_meshed(&dump);
    eprintln!("not meshed: {why:#?}");
    for (pod, reason) in [
        ("shop/optout", "outrigger.dev/mesh=disabled"),
        ("plain/plain", "namespace not labelled"),
        ("shop/hostnet", "hostNetwork"),
        ("shop/intruder", "holds its address"),
    ] {
        ensure!(why.get(pod).is_some_and(|w| w.contains(reason)), "{pod}: expected {reason:?}, got {why:?}");
    }

    // VIP:80 → endpoints' 8080 (the name `web` resolved by the slice), both
    // families. (Which endpoint serves is P2C's choice: sequential
    // connections go to the faster one, so only membership is asserted.)
    let routes = proxy.config_dump()?["services"].clone();
    for (v, e1_addr, e2_addr) in [
        (VIP4, SocketAddr::new(e1.pod.ip4.into(), TARGET), SocketAddr::new(e2.pod.ip4.into(), TARGET)),
        (VIP6, SocketAddr::new(e1.pod.ip6.into(), TARGET), SocketAddr::new(e2.pod.ip6.into(), TARGET)),
    ] {
        let route = routes
            .as_array()
            .and_then(|r| r.iter().find(|r| r["vip"] == vip(v).to_string()))
            .with_context(|| format!("no route for {v}: {routes:#}"))?;
        let endpoints: Vec<(String, String)> = route["endpoints"]
            .as_array()
            .map(|e| {
                e.iter()
                    .map(|e| (e["address"].as_str().unwrap_or("").into(), e["target"].as_str().unwrap_or("").into()))
                    .collect()
            })
            .unwrap_or_default();
        let want = vec![(e1_addr.to_string(), "pod e1".to_string()), (e2_addr.to_string(), "pod e2".to_string())];
        ensure!(endpoints == want, "{v}: {endpoints:?}");
        ensure!(route["service"] == "shop/cart", "{route}");
        let s = c.dial(&client.pod, vip(v), 10)?;
        ensure!(s["ok"] == 10, "client → {v}: {s}");
        ensure!(greetings(&s).keys().all(|g| g == "e1" || g == "e2"), "{v}: {s}");
    }
    let s = c.dial(&sysd, vip(VIP4), 2)?;
    ensure!(s["ok"] == 2, "the systemd-shaped pod is captured: {s}");
    // Not captured: the VIP is not routable without the proxy.
    for p in [&optout.pod, &plain] {
        let s = c.dial(p, vip(VIP4), 1)?;
        ensure!(s["ok"] == 0, "{} reached the VIP: {s}", p.name);
    }
    // The intruder's process (in e1's namespace, in the node's cgroup) is e1
    // to the proxy, not the intruder: e1's identity serves it, as any e1
    // process; nothing was minted for the intruder.
    let dump = proxy.config_dump()?;
    let identities = dump["mtls"]["identities"].to_string();
    ensure!(!identities.contains("sa/intruder"), "an identity was minted for the intruder: {identities}");

    // Terminating endpoints take no new connections: the one P2C prefers
    // now is marked terminating, and every new connection goes to the other.
    let s = c.dial(&client.pod, vip(VIP4), 10)?;
    let favoured = greetings(&s).into_iter().max_by_key(|(_, n)| *n).map(|(g, _)| g).context("no greeting")?;
    let (leaving, staying) = if favoured == "e1" { (&e1, &e2) } else { (&e2, &e1) };
    c.cart_slices(&[(leaving, true), (staying, false)])?;
    dump_until(&proxy, "the terminating endpoint leaves the route", |d| {
        let routes = d["services"].to_string();
        !routes.contains(&format!("pod {}\"", leaving.pod.name))
            && routes.contains(&format!("pod {}\"", staying.pod.name))
    })?;
    let s = c.dial(&client.pod, vip(VIP4), 20)?;
    ensure!(
        s["ok"] == 20 && greetings(&s).keys().collect::<Vec<_>>() == [staying.pod.name.as_str()],
        "after {} turned terminating: {s}",
        leaving.pod.name
    );

    // A pod created now, its sandbox already running (the kubelet starts
    // it as the pod is bound; the API event may come before or after):
    // from the API event to its capture.
    let late = c.sb.add_pod(0, "late")?;
    let uid = "5d0c2a4e-8f1b-4c3d-9e2f-a1b2c3d4e5f6";
    let ips = [late.ip4.to_string(), late.ip6.to_string()];
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    let object = kubeapi::pod(NS, "late", "n0", &ips, &[], "late", Some(uid));
    let late_pause = c.sandbox_process(uid, &late, Driver::Cgroupfs)?;
    let started = Instant::now();
    c.api.apply(&object)?;
    let mut captured = None;
    while started.elapsed() < Duration::from_secs(20) {
        if proxy.config_dump().is_ok_and(|d| meshed_pods(&d).contains(&format!("{NS}/late"))) {
            captured = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let captured = captured.context("the late pod was never captured")?;
    eprintln!("FIGURE pod event → captured (listeners bound): {:.1} ms", captured.as_secs_f64() * 1e3);
    let s = c.dial(&late, vip(VIP4), 2)?;
    ensure!(s["ok"] == 2, "the late pod reaches the VIP: {s}");

    // Its sandbox recreated with the same address (the runtime restarting a
    // dead pause container): the proxy lets the old namespace go and meshes
    // the new one.
    let netns_of = |d: &Value| {
        d["node"]["pods"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["key"]["name"] == "late"))
            .map(|p| p["netns"].clone())
    };
    let before = netns_of(&proxy.config_dump()?).context("late is meshed")?;
    c.sb.kill(late_pause.pid);
    c.sb.remove_pod_netns(&late)?;
    c.sb.recreate_pod_netns(&late)?;
    c.sandbox_process(uid, &late, Driver::Cgroupfs)?;
    dump_until(&proxy, "the recreated sandbox meshed", |d| {
        netns_of(d).is_some_and(|n| n != before) && meshed_pods(d).contains(&format!("{NS}/late"))
    })?;
    let s = c.dial(&late, vip(VIP4), 2)?;
    ensure!(s["ok"] == 2, "the recreated pod reaches the VIP: {s}");

    // Deleting the client's pod object stops its capture.
    ensure!(c.api.delete(Kind::Pod, NS, "client"));
    dump_until(&proxy, "client unmeshed", |d| !meshed_pods(d).contains(&format!("{NS}/client")))?;
    let s = c.dial(&client.pod, vip(VIP4), 1)?;
    ensure!(s["ok"] == 0, "a deleted pod is still captured: {s}");
    drop(servers);
    Ok(())
}

/// Two nodes, two proxies, one API: pods get SPIFFE identities from their
/// service accounts, cross-node traffic is mutual TLS under them, and Istio
/// AuthorizationPolicies admit and refuse by principal. A policy with fields
/// an L4 proxy cannot check is applied as Istio's L4 proxy applies it, and
/// reported.
#[test]
fn cross_node_identity_from_service_accounts_and_istio_policies() -> Result<()> {
    let mut c = Cluster::new(2)?;
    let front = c.add_pod(0, "front", &[("app", "front")], "frontend")?;
    let other = c.add_pod(0, "other", &[("app", "other")], "other")?;
    let back = c.add_pod(1, "back", &[("app", "back")], "backend")?;
    let _server = c.sb.echo_server(&back.pod, &[TARGET], &["--greet", "back"])?;
    let principal = "cluster.local/ns/shop/sa/frontend";
    c.api.apply_json(kubeapi::authorization_policy(
        NS,
        "back-from-front",
        json!({
            "selector": {"matchLabels": {"app": "back"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [principal]}}], "to": [{"operation": {"ports": ["8080"]}}]}],
        }),
    ))?;
    let n0 = c.ready_proxy(0)?;
    let n1 = c.ready_proxy(1)?;
    dump_until(&n0, "node 0 meshed", |d| meshed_pods(d).len() == 2)?;
    dump_until(&n1, "node 1 meshed", |d| meshed_pods(d).len() == 1)?;
    let target = SocketAddr::new(IpAddr::V4(back.pod.ip4), TARGET);

    let s = c.dial(&front.pod, target, 3)?;
    ensure!(s["ok"] == 3, "front → back (allowed principal): {s}\n{}", n1.log_text());
    let identity = format!("peer_identity=spiffe://{principal}");
    let logged = wait_for(Duration::from_secs(5), || n1.log_text().contains(&identity).then_some(()));
    ensure!(logged.is_some(), "node 1 did not see {identity}:\n{}", n1.log_text());
    let s = c.dial(&other.pod, target, 3)?;
    ensure!(s["ok"] == 0, "other → back must be refused: {s}");
    let certs = n0.config_dump()?["mtls"]["identities"].to_string();
    ensure!(certs.contains("spiffe://cluster.local/ns/shop/sa/frontend"), "{certs}");
    ensure!(certs.contains("spiffe://cluster.local/ns/shop/sa/other"), "{certs}");
    // The server side holds the identity of back's service account (the
    // client verified it in the handshake: it expects what the API says).
    let certs = n1.config_dump()?["mtls"]["identities"].to_string();
    ensure!(certs.contains("spiffe://cluster.local/ns/shop/sa/backend"), "{certs}");

    // The same ALLOW with an HTTP-only field: it matches nothing on L4
    // (as in ztunnel), so nothing is allowed; reported.
    c.api.apply_json(kubeapi::authorization_policy(
        NS,
        "back-from-front",
        json!({
            "selector": {"matchLabels": {"app": "back"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [principal]}}],
                       "to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}],
        }),
    ))?;
    let dump = dump_until(&n1, "partial policy reported", |d| {
        reports(d).get("AuthorizationPolicy shop/back-from-front").is_some_and(|r| r.contains("methods"))
    })?;
    eprintln!("report: {:?}", reports(&dump));
    let refused = wait_for(Duration::from_secs(10), || {
        let s = c.dial(&front.pod, target, 1).ok()?;
        (s["ok"] == 0).then_some(())
    });
    ensure!(refused.is_some(), "an ALLOW whose only rule needs HTTP must match nothing");
    ensure!(n1.log_text().contains("authorization policy not applied as written"), "not logged");

    // A DENY with an HTTP-only field is enforced on its L4 part.
    c.api.apply_json(kubeapi::authorization_policy(
        NS,
        "back-from-front",
        json!({"selector": {"matchLabels": {"app": "back"}}, "action": "ALLOW", "rules": [{}]}),
    ))?;
    let open = wait_for(Duration::from_secs(10), || {
        let s = c.dial(&other.pod, target, 1).ok()?;
        (s["ok"] == 1).then_some(())
    });
    ensure!(open.is_some(), "an ALLOW with an empty rule allows everyone");
    c.api.apply_json(kubeapi::authorization_policy(
        NS,
        "deny-other-posts",
        json!({
            "selector": {"matchLabels": {"app": "back"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/other"]}}],
                       "to": [{"operation": {"methods": ["POST"]}}]}],
        }),
    ))?;
    let denied = wait_for(Duration::from_secs(10), || {
        let s = c.dial(&other.pod, target, 1).ok()?;
        (s["ok"] == 0).then_some(())
    });
    ensure!(denied.is_some(), "a DENY is enforced on its L4 part");
    let s = c.dial(&front.pod, target, 2)?;
    ensure!(s["ok"] == 2, "the DENY names `other` only: {s}");
    Ok(())
}

/// The API's faults: unreachable at start (not ready, then ready), a
/// malformed object (skipped and reported, the rest applied), a dropped
/// watch (resumed without a relist), an expired resourceVersion (a relist
/// that removes what was deleted meanwhile).
#[test]
fn api_faults_keep_the_last_state_and_recover() -> Result<()> {
    let c = Cluster::new(1)?;
    c.cart_service()?;
    c.api.apply(&kubeapi::service(NS, "stock", &["10.96.0.11"], &[ServicePortDef::new("tcp", 80, 8080)]))?;
    c.api.inject_malformed(Kind::Service, NS, "broken")?;

    c.api.set_down(true)?;
    let proxy = c.proxy(0, &[])?;
    let waiting = wait_for(Duration::from_secs(20), || match http::get(proxy.admin, "/ready") {
        // Once the first attempt failed, /ready says why.
        Ok((503, body)) if body.contains("waiting for the Kubernetes API:") && body.contains("Connection refused") => {
            Some(body)
        }
        _ => None,
    });
    let waiting = waiting.with_context(|| format!("/ready while the API is down; log:\n{}", proxy.log_text()))?;
    eprintln!("/ready while the API is down: {waiting}");
    let down_at = Instant::now();
    c.api.set_down(false)?;
    proxy.wait_ready(Duration::from_secs(60))?;
    eprintln!("FIGURE ready {:.1} s after the API came back (watch backoff)", down_at.elapsed().as_secs_f64());

    let has_vip = |d: &Value, ip: &str| {
        d["services"].as_array().is_some_and(|r| r.iter().any(|s| s["vip"].as_str().is_some_and(|v| v.starts_with(ip))))
    };
    let dump = dump_until(&proxy, "services applied", |d| has_vip(d, VIP4) && has_vip(d, "10.96.0.11"))?;
    let r = reports(&dump);
    ensure!(
        r.get("Service shop/broken").is_some_and(|w| w.starts_with("skipped")),
        "malformed object not reported: {r:?}"
    );
    ensure!(proxy.log_text().contains("malformed object skipped"), "not logged");

    // A dropped watch resumes from its resourceVersion: no list.
    let lists = |api: &KubeApi| Kind::ALL.map(|k| api.lists(k));
    let before = lists(&c.api);
    let watches_before = c.api.watches(Kind::Service);
    c.api.drop_watches();
    c.api.apply(&kubeapi::service(NS, "late", &["10.96.0.12"], &[ServicePortDef::new("tcp", 80, 8080)]))?;
    dump_until(&proxy, "service added after a dropped watch", |d| has_vip(d, "10.96.0.12"))?;
    ensure!(lists(&c.api) == before, "a dropped watch relisted: {before:?} → {:?}", lists(&c.api));
    ensure!(c.api.watches(Kind::Service) > watches_before, "the watch was not reopened");

    // An expired resourceVersion relists, and what was deleted in the gap
    // goes.
    let service_lists = c.api.lists(Kind::Service);
    c.api.set_down(true)?;
    ensure!(c.api.delete(Kind::Service, NS, "stock"));
    c.api.compact();
    c.api.set_down(false)?;
    dump_until(&proxy, "service deleted while the watch was down is removed", |d| !has_vip(d, "10.96.0.11"))?;
    ensure!(c.api.lists(Kind::Service) > service_lists, "no relist after 410");
    let dump = proxy.config_dump()?;
    ensure!(has_vip(&dump, VIP4) && has_vip(&dump, "10.96.0.12"), "the rest stays: {:#}", dump["services"]);
    ensure!(
        dump["node"]["source"]["watches"]["services"]["relists"].as_u64() >= Some(1),
        "{:#}",
        dump["node"]["source"]
    );
    Ok(())
}
