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

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

const CLIENT: &str = "127.0.0.1:40000";
const LISTENER: &str = "127.0.0.1:15001";
const VIP: &str = "10.96.0.1:80";

struct Harness {
    core: Core<TestConnector>,
    registry: Registry,
    pod: Arc<PodContext>,
}

fn harness(dest: &str, behaviour: &[(&str, Behaviour)], endpoints: &[&str]) -> Harness {
    let mut store =
        Store::new(StoreSettings { trust_domain: "cluster.local".into(), balance: BalanceSettings::default() });
    store
        .upsert(Object::Service(Service {
            key: ObjectKey::new("default", "web"),
            vips: vec![addr(VIP).ip()],
            hostnames: vec![],
            ports: vec![ServicePort {
                name: None,
                port: 80,
                app_protocol: None,
                target_port: TargetPort::Number(8080),
            }],
        }))
        .expect("service");
    store
        .upsert(Object::Endpoints(EndpointSlice {
            key: ObjectKey::new("default", "web-1"),
            service: "web".into(),
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
        }))
        .expect("slice");
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
            http: false,
        },
        drain_cut: tokio_util::sync::CancellationToken::new(),
    };
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
        let mut io = Stream::new(proxy_side);
        forward::run(&mut io, conn, &self.core).await;
        let aborted = io.aborted();
        drop(io);
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
    let h = harness(VIP, &[], &[]);
    let mut h = h;
    h.core.orig_dst = Arc::new(Table(HashMap::new()));
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
