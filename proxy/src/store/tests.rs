//! Store behaviour: per-object upsert and delete, index consistency,
//! rejection of one object alone.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use super::*;
use crate::model::{
    Action, Endpoint, EndpointPort, EndpointSlice, NetnsRef, ObjectKey, Service, ServicePort, TargetPort, Workload,
};

fn store() -> Store {
    Store::new(StoreSettings {
        trust_domain: "cluster.local".into(),
        balance: BalanceSettings::default(),
        breaker: Default::default(),
    })
}

fn pod(name: &str, ips: &[&str], local: bool) -> Object {
    Object::Workload(Workload {
        uid: format!("uid-{name}").into(),
        key: ObjectKey::new("default", name),
        service_account: name.into(),
        node: None,
        ips: ips.iter().map(|i| i.parse().expect("ip")).collect(),
        labels: Default::default(),
        netns: local.then(|| NetnsRef::Path(PathBuf::from(format!("/var/run/netns/{name}")))),
    })
}

fn service(name: &str, vips: &[&str], ports: &[(u16, TargetPort, Option<&str>)]) -> Object {
    Object::Service(Service {
        key: ObjectKey::new("default", name),
        vips: vips.iter().map(|i| i.parse().expect("ip")).collect(),
        hostnames: vec![format!("{name}.default.svc.cluster.local").into()],
        ports: ports
            .iter()
            .map(|(port, target, name)| ServicePort {
                name: name.map(Into::into),
                port: *port,
                app_protocol: None,
                target_port: target.clone(),
            })
            .collect(),
        circuit_breaker: Default::default(),
        inbound_rate_limit: None,
    })
}

fn endpoint(ip: &str) -> Endpoint {
    Endpoint { address: ip.parse().expect("ip"), pod: None, ready: true, terminating: false, weight: 1 }
}

fn slice(name: &str, service: &str, ports: &[(Option<&str>, u16)], endpoints: Vec<Endpoint>) -> Object {
    Object::Endpoints(EndpointSlice {
        key: ObjectKey::new("default", name),
        service: service.into(),
        ports: ports.iter().map(|(n, p)| EndpointPort { name: n.map(Into::into), port: *p }).collect(),
        endpoints,
    })
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn route_addrs(snap: &Snapshot, vip: &str) -> Vec<String> {
    let mut v: Vec<String> = snap
        .route(addr(vip))
        .map(|r| r.balancer.endpoints().iter().map(|e| e.addr.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn upsert_and_delete_keep_indices_consistent() {
    let mut s = store();
    s.upsert(pod("a", &["10.0.0.1", "fd00::1"], true)).expect("a");
    s.upsert(pod("b", &["10.0.0.2"], false)).expect("b");
    let snap = s.publish();
    assert_eq!(
        snap.workload("10.0.0.1".parse().expect("ip")).map(|w| w.workload.key.to_string()),
        Some("default/a".into())
    );
    assert!(snap.workload("::ffff:10.0.0.2".parse().expect("ip")).is_some(), "mapped addresses fold to IPv4");
    assert_eq!(snap.local_workloads().len(), 1);
    assert_eq!(
        snap.workload_by_key(&ObjectKey::new("default", "a")).map(|w| w.identity.to_string()),
        Some("spiffe://cluster.local/ns/default/sa/a".into())
    );

    // Moving a pod to a new address frees the old one.
    s.upsert(pod("a", &["10.0.0.3"], true)).expect("a moved");
    let snap = s.publish();
    assert!(snap.workload("10.0.0.1".parse().expect("ip")).is_none());
    assert!(snap.workload("fd00::1".parse().expect("ip")).is_none());
    assert!(snap.workload("10.0.0.3".parse().expect("ip")).is_some());

    s.delete(&ObjectRef::Workload(ObjectKey::new("default", "a")));
    let snap = s.publish();
    assert!(snap.workload("10.0.0.3".parse().expect("ip")).is_none());
    assert!(snap.local_workloads().is_empty());
    assert_eq!(snap.workload_count(), 1);
}

#[test]
fn a_conflicting_object_is_rejected_alone_and_retried() {
    let mut s = store();
    s.upsert(pod("a", &["10.0.0.1"], true)).expect("a");
    let err = s.upsert(pod("b", &["10.0.0.1"], true)).expect_err("b claims a's address");
    assert!(err.reason.contains("pods default/a and default/b both claim 10.0.0.1"), "{err}");
    // Everything else still applies.
    s.upsert(pod("c", &["10.0.0.3"], true)).expect("c");
    s.upsert(service("web", &["10.96.0.1"], &[(80, TargetPort::Number(8080), None)])).expect("web");
    let err = s.upsert(service("dup", &["10.96.0.1"], &[(80, TargetPort::Number(80), None)])).expect_err("dup vip");
    assert!(err.reason.contains("services default/web and default/dup both claim"), "{err}");
    let err = s.upsert(service("onpod", &["10.0.0.3"], &[(80, TargetPort::Number(80), None)])).expect_err("vip on pod");
    assert!(err.reason.contains("pod default/c's address"), "{err}");
    let snap = s.publish();
    assert_eq!(snap.workload_count(), 2);
    assert_eq!(snap.service_count(), 1);
    assert_eq!(snap.rejected().len(), 3, "{:?}", snap.rejected());
    assert!(snap.rejected().contains_key("pod default/b"));

    // Once the address is free, the rejected pod applies on the next publish.
    s.delete(&ObjectRef::Workload(ObjectKey::new("default", "a")));
    let snap = s.publish();
    assert_eq!(
        snap.workload("10.0.0.1".parse().expect("ip")).map(|w| w.workload.key.name.to_string()),
        Some("b".into())
    );
    assert!(!snap.rejected().contains_key("pod default/b"));
}

#[test]
fn an_object_invalid_on_its_own_is_never_applied_by_a_retry() {
    let mut s = store();
    let mut bad = endpoint("10.0.0.9");
    bad.weight = 0;
    s.upsert(service("web", &["10.96.0.1"], &[(80, TargetPort::Number(8080), None)])).expect("web");
    s.upsert(slice("web-1", "web", &[(None, 8080)], vec![bad])).expect_err("weight 0 is invalid");
    // Publishes retry rejected objects; this one must stay out, and listed.
    for _ in 0..2 {
        let snap = s.publish();
        assert_eq!(snap.endpoint_slice_count(), 0);
        assert!(snap.rejected().contains_key("endpoint slice default/web-1"), "{:?}", snap.rejected());
    }
}

#[test]
fn a_rejected_update_keeps_the_previous_version() {
    let mut s = store();
    s.upsert(pod("a", &["10.0.0.1"], true)).expect("a");
    s.upsert(pod("b", &["10.0.0.2"], true)).expect("b");
    s.upsert(pod("b", &["10.0.0.1"], true)).expect_err("b takes a's address");
    let snap = s.publish();
    assert_eq!(
        snap.workload("10.0.0.2".parse().expect("ip")).map(|w| w.workload.key.name.to_string()),
        Some("b".into())
    );
    // Deleting the rejected object also forgets its rejection.
    s.delete(&ObjectRef::Workload(ObjectKey::new("default", "b")));
    assert!(s.publish().rejected().is_empty());
}

#[test]
fn invalid_objects_are_rejected_with_a_reason() {
    let mut s = store();
    let err = s.upsert(pod("A_b", &["10.0.0.1"], true)).expect_err("bad name");
    assert!(err.reason.contains("not a valid Kubernetes name"), "{err}");
    let err = s.upsert(pod("x", &["127.0.0.1"], true)).expect_err("loopback");
    assert!(err.reason.contains("cannot be a pod address"), "{err}");
    let err = s.upsert(service("s", &["10.96.0.1"], &[])).expect_err("no ports");
    assert!(err.reason.contains("no ports"), "{err}");
    let mut bad = endpoint("10.0.0.9");
    bad.weight = 0;
    let err = s.upsert(slice("s-1", "s", &[], vec![bad])).expect_err("weight 0");
    assert!(err.reason.contains("weight 0"), "{err}");
}

#[test]
fn routes_follow_services_and_slices() {
    let mut s = store();
    // Endpoints may arrive before their service.
    s.upsert(slice("web-1", "web", &[(Some("http"), 8080)], vec![endpoint("10.0.0.1"), endpoint("fd00::1")]))
        .expect("slice");
    s.upsert(service("web", &["10.96.0.1", "fd00:96::1"], &[(80, TargetPort::Name("web".into()), Some("http"))]))
        .expect("svc");
    let snap = s.publish();
    assert_eq!(route_addrs(&snap, "10.96.0.1:80"), ["10.0.0.1:8080"]);
    assert_eq!(route_addrs(&snap, "[fd00:96::1]:80"), ["[fd00::1]:8080"]);
    assert!(snap.route(addr("[::ffff:10.96.0.1]:80")).is_some(), "mapped VIP");
    assert!(snap.route(addr("10.96.0.1:81")).is_none());
    assert_eq!(snap.service_of_endpoint(addr("10.0.0.1:8080")).map(ToString::to_string), Some("default/web".into()));
    assert_eq!(
        snap.service_by_hostname("web.default.svc.cluster.local").map(ToString::to_string),
        Some("default/web".into())
    );
    assert!(snap.refused().is_empty());

    // A second slice adds endpoints; a terminating endpoint takes no new connections.
    let mut leaving = endpoint("10.0.0.3");
    leaving.terminating = true;
    s.upsert(slice("web-2", "web", &[(Some("http"), 9090)], vec![endpoint("10.0.0.2"), leaving])).expect("slice 2");
    let snap = s.publish();
    assert_eq!(route_addrs(&snap, "10.96.0.1:80"), ["10.0.0.1:8080", "10.0.0.2:9090"]);

    // All endpoints gone: refused at the kernel.
    s.delete(&ObjectRef::Endpoints(ObjectKey::new("default", "web-1")));
    s.delete(&ObjectRef::Endpoints(ObjectKey::new("default", "web-2")));
    let snap = s.publish();
    assert!(route_addrs(&snap, "10.96.0.1:80").is_empty());
    assert_eq!(snap.refused().len(), 2);
    assert!(snap.service_of_endpoint(addr("10.0.0.1:8080")).is_none());

    // Service gone: its routes and VIPs go too.
    s.delete(&ObjectRef::Service(ObjectKey::new("default", "web")));
    let snap = s.publish();
    assert!(snap.route(addr("10.96.0.1:80")).is_none());
    assert!(snap.refused().is_empty());
    assert!(snap.service_by_hostname("web.default.svc.cluster.local").is_none());
}

#[test]
fn numeric_targets_apply_to_slices_without_ports() {
    let mut s = store();
    s.upsert(service("db", &["10.96.0.2"], &[(5432, TargetPort::Number(15432), None)])).expect("svc");
    s.upsert(slice("db-1", "db", &[], vec![endpoint("10.0.0.5")])).expect("slice");
    assert_eq!(route_addrs(&s.publish(), "10.96.0.2:5432"), ["10.0.0.5:15432"]);
}

#[test]
fn headless_services_have_no_routes_but_label_their_endpoints() {
    let mut s = store();
    s.upsert(service("hl", &[], &[(80, TargetPort::Number(80), None)])).expect("svc");
    s.upsert(slice("hl-1", "hl", &[], vec![endpoint("10.0.0.7")])).expect("slice");
    let snap = s.publish();
    assert!(snap.refused().is_empty());
    assert_eq!(snap.service_of_endpoint(addr("10.0.0.7:80")).map(ToString::to_string), Some("default/hl".into()));
}

#[test]
fn an_endpoint_change_touches_only_its_service_and_keeps_health() {
    let mut s = store();
    for i in 0..50u8 {
        s.upsert(service(&format!("s{i}"), &[&format!("10.96.1.{i}")], &[(80, TargetPort::Number(80), None)]))
            .expect("svc");
        s.upsert(slice(&format!("s{i}-1"), &format!("s{i}"), &[], vec![endpoint(&format!("10.1.{i}.1"))]))
            .expect("slice");
    }
    let before = s.publish();
    let r0 = before.route(addr("10.96.1.0:80")).expect("route").clone();
    r0.balancer.observe(0, std::time::Duration::from_millis(70));
    s.upsert(slice("s0-1", "s0", &[], vec![endpoint("10.1.0.1"), endpoint("10.1.0.2")])).expect("grow");
    let after = s.publish();
    let r0b = after.route(addr("10.96.1.0:80")).expect("route");
    assert_eq!(r0b.balancer.endpoints().len(), 2);
    let health = |r: &ServiceRoute| r.balancer.endpoints()[0].health_if_used().cloned().expect("used");
    assert!(Arc::ptr_eq(&health(&r0), &health(r0b)), "health carried over");
    for i in 1..50u8 {
        let vip = addr(&format!("10.96.1.{i}:80"));
        assert!(Arc::ptr_eq(before.route(vip).expect("r"), after.route(vip).expect("r")), "service s{i} untouched");
    }
    assert_eq!(r0.id, r0b.id, "service ids are stable");
}

#[test]
fn service_ids_are_reused_smallest_first() {
    let mut s = store();
    for name in ["a", "b", "c"] {
        s.upsert(service(name, &[], &[(80, TargetPort::Number(80), None)])).expect("svc");
    }
    s.delete(&ObjectRef::Service(ObjectKey::new("default", "b")));
    s.upsert(service("d", &[], &[(80, TargetPort::Number(80), None)])).expect("svc");
    let snap = s.publish();
    let ids: std::collections::BTreeMap<String, u32> =
        snap.service_ids().map(|(k, id)| (k.name.to_string(), id)).collect();
    assert_eq!(ids.get("d"), Some(&2));
    assert_eq!(ids.get("c"), Some(&3));
}

#[test]
fn policies_are_indexed_by_namespace() {
    let mut s = store();
    let policy = |ns: &str, name: &str| {
        Object::Policy(crate::model::AuthorizationPolicy {
            key: ObjectKey::new(ns, name),
            selector: None,
            action: Action::Deny,
            rules: vec![],
        })
    };
    s.upsert(policy("shop", "b")).expect("p");
    s.upsert(policy("shop", "a")).expect("p");
    s.upsert(policy("other", "x")).expect("p");
    let snap = s.publish();
    let names: Vec<String> = snap.policies_for("shop").iter().map(|p| p.key.name.to_string()).collect();
    assert_eq!(names, ["a", "b"]);
    s.delete(&ObjectRef::Policy(ObjectKey::new("shop", "a")));
    s.delete(&ObjectRef::Policy(ObjectKey::new("shop", "b")));
    let snap = s.publish();
    assert!(snap.policies_for("shop").is_empty());
    assert_eq!(snap.policies_for("other").len(), 1);
}

#[test]
fn publishing_notifies_subscribers() {
    let mut s = store();
    let mut rx = s.subscribe();
    let reader = s.reader();
    s.upsert(pod("a", &["10.0.0.1"], true)).expect("a");
    assert_eq!(reader.load().workload_count(), 0, "not visible before publish");
    s.publish();
    assert!(rx.has_changed().expect("open"));
    assert_eq!(rx.borrow_and_update().workload_count(), 1);
    assert_eq!(reader.load().workload_count(), 1);
}
