//! The outbound steps without a kernel: in-memory connections, original
//! destinations from a table, upstreams from a test connector, paused time
//! for timeouts.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;
use crate::{
    balance::BalanceSettings,
    model::{Endpoint, EndpointSlice, NetnsRef, Object, ObjectKey, Service, ServicePort, TargetPort, Workload},
    store::{Store, StoreSettings},
    transport::Stream,
};

struct Table(HashMap<SocketAddr, SocketAddr>);

impl OrigDst for Table {
    fn lookup(&self, _cookie: u64, client: SocketAddr, _listener: SocketAddr) -> Result<Option<SocketAddr>, String> {
        Ok(self.0.get(&client).copied())
    }
}

#[derive(Clone, Copy)]
enum Behaviour {
    Echo,
    Refuse,
    Hang,
    /// An HTTP/1.1 and h2 origin answering "<its address><path>".
    Http,
}

type Io = Stream<DuplexStream>;

impl Upstream for Io {
    fn rtt(&self) -> Option<Duration> {
        None
    }
}

#[derive(Default)]
struct TestConnector {
    behaviour: HashMap<SocketAddr, Behaviour>,
    /// Every target asked for, in order.
    asked: Mutex<Vec<Target>>,
}

impl Connect for TestConnector {
    type Io = Io;

    fn mtls(&self) -> bool {
        true
    }

    fn strict(&self) -> bool {
        false
    }

    async fn connect(&self, _pod: &PodContext, target: &Target, _client: SocketAddr) -> Result<Io, Failure> {
        self.asked.lock().expect("lock").push(target.clone());
        let dest = target.addr();
        match self.behaviour.get(&dest).copied().unwrap_or(Behaviour::Refuse) {
            Behaviour::Refuse => Err(Failure::Refused { dest }),
            Behaviour::Hang => std::future::pending().await,
            Behaviour::Http => {
                let (ours, theirs) = tokio::io::duplex(64 * 1024);
                tokio::spawn(super::http::tests::origin(theirs, dest));
                Ok(Stream::new(ours))
            }
            Behaviour::Echo => {
                let (ours, mut theirs) = tokio::io::duplex(4096);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    while let Ok(n) = theirs.read(&mut buf).await {
                        if n == 0 || theirs.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                Ok(Stream::new(ours))
            }
        }
    }
}

/// A client connection whose abort the test can see after handing it over.
struct Watched {
    inner: Io,
    aborted: Arc<std::sync::atomic::AtomicBool>,
}

impl crate::transport::Duplex for Watched {
    type Read<'a> = <Io as crate::transport::Duplex>::Read<'a>;
    type Write<'a> = <Io as crate::transport::Duplex>::Write<'a>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        self.inner.halves()
    }

    fn abort(&mut self) {
        self.aborted.store(true, std::sync::atomic::Ordering::Relaxed);
        self.inner.abort();
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

const CLIENT: &str = "127.0.0.1:40000";
const LISTENER: &str = "127.0.0.1:15001";
const VIP: &str = "10.96.0.1:80";

struct Harness {
    core: Arc<Core<TestConnector>>,
    registry: Registry,
    pod: Arc<PodContext>,
}

fn harness(dest: &str, behaviour: &[(&str, Behaviour)], endpoints: &[&str]) -> Harness {
    harness_with(dest, behaviour, endpoints, vec![])
}

fn harness_with(dest: &str, behaviour: &[(&str, Behaviour)], endpoints: &[&str], extra: Vec<Object>) -> Harness {
    let mut store = Store::new(StoreSettings {
        trust_domain: "cluster.local".into(),
        balance: BalanceSettings::default(),
        breaker: Default::default(),
    });
    for object in service("web", "10.96.0.1", endpoints) {
        store.upsert(object).expect("web");
    }
    store
        .upsert(Object::Workload(Workload {
            uid: "db".into(),
            key: ObjectKey::new("default", "db"),
            service_account: "db".into(),
            node: None,
            ips: vec!["10.0.0.99".parse().expect("ip")],
            labels: Default::default(),
            netns: Some(NetnsRef::Path("/var/run/netns/db".into())),
        }))
        .expect("db");
    store
        .upsert(Object::Policy(crate::model::AuthorizationPolicy {
            key: ObjectKey::new("default", "nobody"),
            selector: None,
            action: crate::model::Action::Deny,
            rules: vec![crate::model::Rule { ports: vec![5432], ..Default::default() }],
        }))
        .expect("policy");
    for object in extra {
        store.upsert(object).expect("extra object");
    }
    store.publish();
    let labels: Vec<&'static str> = super::detect::Outcome::ALL.iter().map(|o| o.label()).collect();
    let metrics = Arc::new(Metrics::new(true, 0).with_detection_results(&labels));
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let connector =
        TestConnector { behaviour: behaviour.iter().map(|(a, b)| (addr(a), *b)).collect(), asked: Mutex::default() };
    let core = Core {
        mesh: store.reader(),
        orig_dst: Arc::new(Table([(addr(CLIENT), addr(dest))].into())),
        connector,
        metrics,
        settings: OutboundSettings {
            connect_timeout: Duration::from_secs(5),
            connect_attempts: 3,
            relay: crate::transport::RelayOptions::default(),
            detect_timeout: Duration::from_secs(1),
            opaque_ports: Arc::from(&[5432u16][..]),
            http: true,
            http_layer: HttpSettings::default(),
        },
        drain_cut: tokio_util::sync::CancellationToken::new(),
        pools: Default::default(),
    };
    let core = Arc::new(core);
    let pod = Arc::new(PodContext::for_test("client", &["10.0.0.1".parse().expect("ip")]));
    Harness { core, registry, pod }
}

impl Harness {
    /// Runs one connection; returns what the client read back and whether
    /// the proxy aborted the client side.
    async fn drive(&self, payload: &[u8]) -> (Vec<u8>, bool) {
        let (mut client, proxy_side) = tokio::io::duplex(4096);
        client.write_all(payload).await.expect("write");
        client.shutdown().await.expect("half-close");
        let conn = Accepted { pod: self.pod.clone(), peer: addr(CLIENT), local: addr(LISTENER) };
        let aborted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let io = Watched { inner: Stream::new(proxy_side), aborted: aborted.clone() };
        forward::run(io, conn, &self.core).await;
        let aborted = aborted.load(std::sync::atomic::Ordering::Relaxed);
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        (got, aborted)
    }

    fn metrics(&self) -> String {
        crate::metrics::encode(&self.registry).expect("encode")
    }

    fn asked(&self) -> Vec<SocketAddr> {
        self.core.connector.asked.lock().expect("lock").iter().map(Target::addr).collect()
    }
}

#[tokio::test]
async fn a_passthrough_connection_is_relayed_and_counted() {
    let h = harness("10.0.0.50:9000", &[("10.0.0.50:9000", Behaviour::Echo)], &[]);
    let (got, aborted) = h.drive(b"hello").await;
    assert_eq!(got, b"hello");
    assert!(!aborted);
    let m = h.metrics();
    assert!(m.contains("outrigger_connections_opened_total{reporter=\"outbound\",source_pod=\"client\""), "{m}");
    assert!(m.contains("destination_service=\"external\""), "not a service, not meshed: {m}");
}

#[tokio::test]
async fn a_service_connection_retries_a_refusing_endpoint() {
    let h = harness(VIP, &[("10.0.0.2:8080", Behaviour::Echo)], &["10.0.0.3", "10.0.0.2"]);
    for _ in 0..10 {
        let (got, aborted) = h.drive(b"ping").await;
        assert_eq!(got, b"ping", "every connection succeeds through the healthy endpoint");
        assert!(!aborted);
    }
    assert!(h.asked().contains(&addr("10.0.0.2:8080")));
    let m = h.metrics();
    assert!(m.contains("destination_service=\"web.default\""), "{m}");
    assert!(!m.contains("outrigger_connections_failed_total{"), "no client saw a failure: {m}");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_endpoint_times_out_and_the_next_one_serves() {
    let h = harness(
        VIP,
        &[("10.0.0.2:8080", Behaviour::Hang), ("10.0.0.3:8080", Behaviour::Echo)],
        &["10.0.0.2", "10.0.0.3"],
    );
    let started = tokio::time::Instant::now();
    for _ in 0..4 {
        let (got, _) = h.drive(b"x").await;
        assert_eq!(got, b"x");
    }
    let hung = h.asked().iter().filter(|a| **a == addr("10.0.0.2:8080")).count();
    // Each attempt on the hanging endpoint costs exactly the connect timeout (paused clock).
    assert_eq!(started.elapsed(), Duration::from_secs(5) * hung as u32);
}

#[tokio::test]
async fn failures_reset_the_client_with_a_typed_reason() {
    // No endpoints at all.
    let h = harness(VIP, &[], &[]);
    let (got, aborted) = h.drive(b"x").await;
    assert!(got.is_empty() && aborted, "the client is reset, not given a clean EOF");
    assert!(h.metrics().contains("reason=\"no_endpoints\""), "{}", h.metrics());

    // Every endpoint refuses: the last failure is reported.
    let h = harness(VIP, &[], &["10.0.0.2", "10.0.0.3"]);
    let (_, aborted) = h.drive(b"x").await;
    assert!(aborted);
    assert!(h.metrics().contains("reason=\"connect_refused\""));

    // A same-node meshed pod behind a deny policy: refused at the source.
    let h = harness("10.0.0.99:5432", &[("10.0.0.99:5432", Behaviour::Echo)], &[]);
    let (_, aborted) = h.drive(b"x").await;
    assert!(aborted);
    assert!(h.asked().is_empty(), "a denied connection never reaches the connector");
    let m = h.metrics();
    assert!(m.contains("reason=\"denied\"") && m.contains("destination_pod=\"db\""), "{m}");

    // No original destination: reset without guessing.
    let mut h = harness(VIP, &[], &[]);
    Arc::get_mut(&mut h.core).expect("not shared yet").orig_dst = Arc::new(Table(HashMap::new()));
    let (_, aborted) = h.drive(b"x").await;
    assert!(aborted);
    assert!(h.asked().is_empty());
    assert!(h.metrics().contains("outrigger_orig_dst_lookup_misses_total 1"));
}

#[tokio::test]
async fn meshed_pods_elsewhere_are_reached_through_a_tunnel() {
    let h = harness("10.0.0.99:8080", &[("10.0.0.99:8080", Behaviour::Echo)], &[]);
    // db is local in the harness: direct. A pod of another node goes by tunnel.
    let snapshot = h.core.mesh.load_full();
    let target = endpoint::target_for(&snapshot, &h.pod, addr("10.0.0.99:8080"), false).expect("allowed");
    assert_eq!(target, Target::Direct(addr("10.0.0.99:8080")));
    let strict = endpoint::target_for(&snapshot, &h.pod, addr("10.0.0.99:8080"), true).expect("allowed");
    assert!(
        matches!(strict, Target::Hbone { ref identity, .. } if identity.to_string() == "spiffe://cluster.local/ns/default/sa/db")
    );
    assert_eq!(
        endpoint::target_for(&snapshot, &h.pod, addr("10.9.9.9:1"), true).expect("ok"),
        Target::Direct(addr("10.9.9.9:1"))
    );
}

impl Harness {
    /// Sends `requests` (path, extra header) over one HTTP/1.1 connection
    /// through the proxy; returns (status, body, x-echoed) for each.
    async fn http1(&self, requests: &[(&str, &[(&str, &str)])]) -> Vec<(u16, String, Option<String>)> {
        use http_body_util::BodyExt;
        let (client, proxy_side) = tokio::io::duplex(64 * 1024);
        let conn = Accepted { pod: self.pod.clone(), peer: addr(CLIENT), local: addr(LISTENER) };
        let core = self.core.clone();
        let proxy = tokio::spawn(async move { forward::run(Stream::new(proxy_side), conn, &core).await });
        let io = crate::transport::HyperIo::new(Stream::new(client), 4096, 4096);
        let (mut sender, driver) = hyper::client::conn::http1::handshake(io).await.expect("handshake");
        let driver = tokio::spawn(driver);
        let mut out = Vec::new();
        for (path, headers) in requests {
            let mut req = ::http::Request::get(*path).header("host", "web.default");
            for (k, v) in headers.iter() {
                req = req.header(*k, *v);
            }
            let req = req.body(http_body_util::Empty::<bytes::Bytes>::new()).expect("request");
            let resp = sender.send_request(req).await.expect("response");
            let status = resp.status().as_u16();
            let echoed = resp.headers().get("x-echoed").map(|v| v.to_str().expect("ascii").to_string());
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            out.push((status, String::from_utf8_lossy(&body).into_owned(), echoed));
        }
        drop(sender);
        let _ = driver.await;
        let _ = proxy.await;
        out
    }
}

fn http_route(yaml_rules: Vec<crate::model::RouteRule>) -> Object {
    Object::Route(crate::model::HttpRoute {
        key: ObjectKey::new("default", "web-route"),
        parents: vec![crate::model::ParentRef { service: ObjectKey::new("default", "web"), port: None }],
        rules: yaml_rules,
        created: 0,
    })
}

fn service(name: &str, vip: &str, endpoints: &[&str]) -> Vec<Object> {
    vec![
        Object::Service(Service {
            key: ObjectKey::new("default", name),
            vips: vec![vip.parse().expect("vip")],
            hostnames: vec![],
            ports: vec![ServicePort {
                name: None,
                port: 80,
                app_protocol: None,
                target_port: TargetPort::Number(8080),
            }],
            circuit_breaker: Default::default(),
            inbound_rate_limit: None,
        }),
        Object::Endpoints(EndpointSlice {
            key: ObjectKey::new("default", &format!("{name}-1")),
            service: name.into(),
            ports: vec![],
            endpoints: endpoints
                .iter()
                .map(|ip| Endpoint {
                    address: ip.parse().expect("ip"),
                    pod: None,
                    ready: true,
                    terminating: false,
                    weight: 1,
                })
                .collect(),
        }),
    ]
}

#[tokio::test]
async fn http_requests_over_one_connection_are_balanced_one_by_one() {
    let eps = ["10.0.0.2", "10.0.0.3", "10.0.0.4"];
    let behaviour: Vec<(String, Behaviour)> = eps.iter().map(|e| (format!("{e}:8080"), Behaviour::Http)).collect();
    let behaviour: Vec<(&str, Behaviour)> = behaviour.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let h = harness(VIP, &behaviour, &eps);
    let requests: Vec<(&str, &[(&str, &str)])> = (0..300).map(|_| ("/x", &[][..])).collect();
    let got = h.http1(&requests).await;
    let mut per = HashMap::new();
    for (status, body, _) in &got {
        assert_eq!(*status, 200, "{body}");
        *per.entry(body.clone()).or_insert(0) += 1;
    }
    // Each endpoint is tried (an unmeasured one costs nothing); how the
    // rest spreads follows latencies, which are noise in memory — the e2e
    // test (tests/http.rs) checks the shares against real servers.
    assert_eq!(per.len(), 3, "every endpoint served some of one connection's requests: {per:?}");
    let m = h.metrics();
    assert!(m.contains("outrigger_requests_total{reporter=\"outbound\",source_pod=\"client\""), "{m}");
    assert!(m.contains("route=\"default\",request_protocol=\"http\",response_code=\"200\""), "{m}");
}

#[tokio::test]
async fn http_routes_match_split_modify_and_inject_faults() {
    use crate::model::{
        BackendRef, Fault, Filter, HeaderModifier, RouteMatch, RouteRule, Share, StringMatch, ValueMatch,
    };
    let backend = |name: &str, weight| BackendRef { service: ObjectKey::new("default", name), port: 80, weight };
    let rules = vec![
        RouteRule {
            name: Some("canary".into()),
            matches: vec![RouteMatch {
                headers: vec![ValueMatch { name: "x-version".into(), value: StringMatch::Exact("v2".into()) }],
                ..RouteMatch::default()
            }],
            filters: vec![Filter::RequestHeaderModifier(HeaderModifier {
                set: vec![("x-added".into(), "yes".into())],
                ..HeaderModifier::default()
            })],
            backends: vec![backend("web-v2", 1)],
            ..RouteRule::default()
        },
        RouteRule {
            name: Some("broken".into()),
            matches: vec![RouteMatch {
                path: Some(crate::model::PathMatch::Prefix("/broken".into())),
                ..RouteMatch::default()
            }],
            filters: vec![Filter::Fault(Fault { abort: Some((503, Share::ALL)), ..Fault::default() })],
            backends: vec![],
            ..RouteRule::default()
        },
        RouteRule {
            name: Some("split".into()),
            matches: vec![],
            filters: vec![],
            backends: vec![backend("web", 90), backend("web-v2", 10)],
            ..RouteRule::default()
        },
    ];
    let mut extra = service("web-v2", "10.96.0.2", &["10.0.1.2"]);
    extra.push(http_route(rules));
    let h = harness_with(
        VIP,
        &[("10.0.0.2:8080", Behaviour::Http), ("10.0.1.2:8080", Behaviour::Http)],
        &["10.0.0.2"],
        extra,
    );
    let got = h.http1(&[("/a", &[("x-version", "v2")]), ("/broken/x", &[])]).await;
    assert_eq!(got[0].0, 200);
    assert!(got[0].1.starts_with("10.0.1.2:8080"), "the header sends it to v2: {got:?}");
    assert_eq!(got[1].0, 503, "{got:?}");
    let got = h.http1(&[("/a", &[("x-echo", "x-added")]), ("/a", &[("x-version", "v2"), ("x-echo", "x-added")])]).await;
    assert_eq!(got[0].2.as_deref(), Some("(none)"), "no header change outside the canary rule: {got:?}");
    assert_eq!(got[1].2.as_deref(), Some("yes"), "the canary rule sets x-added: {got:?}");
    let requests: Vec<(&str, &[(&str, &str)])> = (0..1000).map(|_| ("/s", &[][..])).collect();
    let got = h.http1(&requests).await;
    let v2 = got.iter().filter(|(_, b, _)| b.starts_with("10.0.1.2")).count();
    assert!((50..=150).contains(&v2), "10 % of 1000 to v2: {v2}");
    let m = h.metrics();
    assert!(m.contains("route=\"web-route/split\""), "{m}");
    assert!(m.contains("route=\"web-route/broken\",request_protocol=\"http\",response_code=\"503\""), "{m}");
}

#[tokio::test]
async fn a_port_declared_http_still_takes_h2_with_prior_knowledge() {
    use http_body_util::BodyExt;
    let mut extra = service("declared", "10.96.0.3", &["10.0.0.2"]);
    if let Object::Service(svc) = &mut extra[0] {
        svc.ports[0].app_protocol = Some(crate::model::AppProtocol::Http);
    }
    let h = harness_with("10.96.0.3:80", &[("10.0.0.2:8080", Behaviour::Http)], &[], extra);
    let (client, proxy_side) = tokio::io::duplex(64 * 1024);
    let conn = Accepted { pod: h.pod.clone(), peer: addr(CLIENT), local: addr(LISTENER) };
    let core = h.core.clone();
    let proxy = tokio::spawn(async move { forward::run(Stream::new(proxy_side), conn, &core).await });
    let io = crate::transport::HyperIo::new(Stream::new(client), 4096, 4096);
    let (mut sender, driver) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(io)
        .await
        .expect("h2 handshake");
    let driver = tokio::spawn(driver);
    let req = ::http::Request::get("http://declared.default/h2")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("an h2 response through a port declared http");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(body, "10.0.0.2:8080/h2");
    drop(sender);
    let _ = driver.await;
    let _ = proxy.await;
    assert!(h.metrics().contains("request_protocol=\"http2\""), "{}", h.metrics());
}
