//! Reducers on objects written as the API server sends them.

use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service as KubeService},
    discovery::v1::EndpointSlice as KubeSlice,
};
use serde_json::json;

use super::{
    cluster::{Cluster, Side},
    policy, reduce,
};
use crate::{
    model::{Action, AppProtocol, Object, ObjectKey, ObjectRef, Rule, TargetPort},
    store::Change,
};

fn pod_json(name: &str, node: &str, extra_spec: serde_json::Value, status: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({
        "nodeName": node,
        "serviceAccountName": "web",
        "containers": [{"name": "app", "image": "nginx", "ports": [{"name": "http", "containerPort": 8080}]}]
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        s.extend(extra.clone());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "resourceVersion": "7",
                     "labels": {"app": "web"}},
        "spec": spec,
        "status": status,
    })
}

fn pod(v: serde_json::Value) -> reduce::PodRecord {
    reduce::pod(&serde_json::from_value::<Pod>(v).expect("a Pod")).expect("reduces")
}

#[test]
fn pods_dual_stack_pending_finished_host_network_opted_out() {
    let running = json!({"phase": "Running", "podIP": "10.244.1.5",
        "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:244:1::5"}]});
    let r = pod(pod_json("web-0", "node-1", json!({}), running.clone()));
    assert_eq!(r.key, ObjectKey::new("shop", "web-0"));
    assert_eq!(&*r.uid, "uid-web-0");
    assert_eq!(&*r.service_account, "web");
    assert_eq!(r.node.as_deref(), Some("node-1"));
    assert_eq!(
        r.ips,
        vec!["10.244.1.5".parse::<std::net::IpAddr>().expect("test data"), "fd00:244:1::5".parse().expect("test data")]
    );
    assert_eq!(r.not_meshed(true), None);
    assert!(r.not_meshed(false).is_some(), "namespace not enrolled");

    let only_pod_ip = pod(pod_json("web-1", "node-1", json!({}), json!({"phase": "Running", "podIP": "10.244.1.6"})));
    assert_eq!(only_pod_ip.ips.len(), 1);
    let pending = pod(pod_json("web-2", "node-1", json!({}), json!({"phase": "Pending"})));
    assert_eq!(pending.not_meshed(true), Some("no IP yet"));
    let done = pod(pod_json("job-0", "node-1", json!({}), json!({"phase": "Succeeded", "podIP": "10.244.1.7"})));
    assert_eq!(done.not_meshed(true), Some("finished"));
    let host = pod(pod_json("agent", "node-1", json!({"hostNetwork": true}), running.clone()));
    assert_eq!(host.not_meshed(true), Some("hostNetwork pod"));
    let mut out = pod_json("debug", "node-1", json!({}), running);
    out["metadata"]["labels"]["outrigger.dev/mesh"] = json!("disabled");
    assert_eq!(pod(out).not_meshed(true), Some("labelled outrigger.dev/mesh=disabled"));
    let default_sa = json!({"metadata": {"name": "a", "namespace": "shop", "uid": "u"}, "spec": {"containers": []}});
    assert_eq!(&*pod(default_sa).service_account, "default");
}

#[test]
fn malformed_pods_are_errors_not_panics() {
    let bad_ip = pod_json("x", "n", json!({}), json!({"podIP": "10.0.0.300"}));
    let p = serde_json::from_value::<Pod>(bad_ip).expect("shape is valid");
    assert!(reduce::pod(&p).expect_err("malformed").contains("not an IP address"));
    let no_uid = json!({"metadata": {"name": "a", "namespace": "shop"}});
    assert_eq!(
        reduce::pod(&serde_json::from_value::<Pod>(no_uid).expect("test data")).expect_err("malformed"),
        "no metadata.uid"
    );
    // A field of the wrong type fails the typed conversion (skipped upstream).
    assert!(serde_json::from_value::<Pod>(json!({"metadata": {"name": "a"}, "spec": {"containers": "no"}})).is_err());
}

#[test]
fn namespaces_enrol_by_label() {
    let ns = |labels: serde_json::Value| {
        serde_json::from_value::<Namespace>(json!({"metadata": {"name": "shop", "labels": labels}})).expect("test data")
    };
    assert!(reduce::namespace_enrolled(&ns(json!({"outrigger.dev/mesh": "enabled"}))));
    assert!(!reduce::namespace_enrolled(&ns(json!({"outrigger.dev/mesh": "disabled"}))));
    assert!(!reduce::namespace_enrolled(&ns(json!({}))));
}

fn service(v: serde_json::Value) -> Option<crate::model::Service> {
    reduce::service(&serde_json::from_value::<KubeService>(v).expect("a Service"), "cluster.local").expect("reduces")
}

#[test]
fn services_dual_stack_named_ports_headless_external_udp() {
    let svc = service(json!({
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"], "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "appProtocol": "http"},
                           {"name": "admin", "port": 9000, "targetPort": 9001},
                           {"name": "dns", "port": 53, "protocol": "UDP"}]}
    }))
    .expect("a TCP service");
    assert_eq!(svc.vips.len(), 2);
    assert_eq!(&*svc.hostnames[0], "web.shop.svc.cluster.local");
    assert_eq!(svc.ports.len(), 2, "the UDP port is not the proxy's");
    assert_eq!(svc.ports[0].target_port, TargetPort::Name("http".into()));
    assert_eq!(svc.ports[0].app_protocol, Some(AppProtocol::Http));
    assert_eq!(svc.ports[1].target_port, TargetPort::Number(9001));
    let headless = service(json!({"metadata": {"name": "db", "namespace": "shop"},
        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}))
    .expect("headless");
    assert!(headless.vips.is_empty());
    assert_eq!(headless.ports[0].target_port, TargetPort::Number(5432), "no targetPort: the port");
    assert!(service(json!({"metadata": {"name": "ext", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}))
    .is_none());
    assert!(service(json!({"metadata": {"name": "dns", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [{"port": 53, "protocol": "UDP"}]}}))
    .is_none());
    let bad = serde_json::from_value::<KubeService>(json!({"metadata": {"name": "x", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 70000}]}}))
    .expect("test data");
    assert!(reduce::service(&bad, "cluster.local").is_err());
}

fn slice(v: serde_json::Value) -> Option<crate::model::EndpointSlice> {
    reduce::endpoint_slice(&serde_json::from_value::<KubeSlice>(v).expect("an EndpointSlice")).expect("reduces")
}

#[test]
fn endpoint_slices_conditions_ports_and_skips() {
    let s = slice(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc12", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}, {"name": "dns", "port": 53, "protocol": "UDP"}],
        "endpoints": [
            {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
             "targetRef": {"kind": "Pod", "name": "web-0", "namespace": "shop"}},
            {"addresses": ["10.244.2.7"], "conditions": {"ready": false, "serving": true, "terminating": true},
             "targetRef": {"kind": "Pod", "name": "web-1"}},
            {"addresses": ["10.244.3.9"]}
        ]
    }))
    .expect("a slice");
    assert_eq!(&*s.service, "web");
    assert_eq!(s.ports.len(), 1);
    assert_eq!((s.ports[0].name.as_deref(), s.ports[0].port), (Some("http"), 8080));
    assert!(s.endpoints[0].usable());
    assert!(!s.endpoints[1].usable(), "terminating takes no new connections");
    assert_eq!(s.endpoints[1].pod, Some(ObjectKey::new("shop", "web-1")), "namespace defaults to the slice's");
    assert!(s.endpoints[2].usable(), "unset conditions mean ready");
    assert_eq!(s.endpoints[2].pod, None);
    assert!(slice(json!({"metadata": {"name": "x", "namespace": "shop",
        "labels": {"kubernetes.io/service-name": "ext"}}, "addressType": "FQDN",
        "endpoints": [{"addresses": ["example.com"]}]}))
    .is_none());
    assert!(slice(
        json!({"metadata": {"name": "orphan", "namespace": "shop"}, "addressType": "IPv4", "endpoints": []})
    )
    .is_none());
}

fn translate(spec: serde_json::Value) -> policy::Translated {
    policy::translate(ObjectKey::new("shop", "p"), &spec).expect("translates")
}

#[test]
fn istio_policies_l4_subset() {
    let t = translate(json!({
        "selector": {"matchLabels": {"app": "db"}},
        "action": "ALLOW",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"], "namespaces": ["shop"]}},
                            {"source": {"ipBlocks": ["10.0.0.0/8", "192.168.1.1"]}}],
                   "to": [{"operation": {"ports": ["5432", 5433]}}]}]
    }));
    assert!(t.notes.is_empty(), "{:?}", t.notes);
    let p = t.policy.expect("a policy");
    assert_eq!(p.action, Action::Allow);
    assert_eq!(p.selector.as_ref().expect("test data").match_labels.get("app").map(String::as_str), Some("db"));
    assert_eq!(p.rules.len(), 2, "from × to");
    assert_eq!(p.rules[0].principals, vec!["spiffe://cluster.local/ns/shop/sa/web".to_string()]);
    assert_eq!(p.rules[0].ports, vec![5432, 5433]);
    assert_eq!(p.rules[1].ip_blocks.len(), 2);
    // No rules: Istio's allow-nothing.
    let nothing = translate(json!({})).policy.expect("policy");
    assert!(nothing.rules.is_empty() && nothing.action == Action::Allow);
    // One empty rule: allow everything.
    assert_eq!(translate(json!({"rules": [{}]})).policy.expect("test data").rules.len(), 1);
}

#[test]
fn istio_policies_with_http_fields_apply_like_ztunnel() {
    let allow = translate(json!({
        "action": "ALLOW",
        "rules": [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
                  {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/a"]}}]}]
    }));
    let p = allow.policy.expect("policy");
    assert_eq!(p.rules.len(), 1, "the HTTP rule of an ALLOW matches nothing");
    assert!(allow.notes[0].contains("operation.methods") && allow.notes[0].contains("matches nothing"));
    let deny = translate(json!({
        "action": "DENY",
        "rules": [{"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["evil"]}}],
                   "to": [{"operation": {"paths": ["/admin"], "ports": ["8080"]}}],
                   "when": [{"key": "request.headers[x]", "values": ["y"]}]}]
    }));
    let p = deny.policy.expect("policy");
    assert_eq!(p.rules.len(), 1);
    assert_eq!((p.rules[0].namespaces.clone(), p.rules[0].ports.clone()), (vec!["evil".to_string()], vec![8080]));
    assert!(deny.notes[0].contains("L4 part is enforced"), "{:?}", deny.notes);
    for (spec, note) in [
        (json!({"action": "AUDIT"}), "AUDIT"),
        (json!({"action": "CUSTOM", "provider": {"name": "ext"}}), "CUSTOM"),
        (json!({"targetRefs": [{"kind": "Gateway", "name": "gw"}]}), "targetRefs"),
    ] {
        let t = translate(spec);
        assert!(t.policy.is_none() && t.notes[0].contains(note), "{:?}", t.notes);
    }
    for bad in [
        json!({"action": "MAYBE"}),
        json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
        json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/40"]}}]}]}),
        json!({"rules": "all"}),
        json!({"selector": {"matchLabels": {"app": 3}}}),
    ] {
        assert!(policy::translate(ObjectKey::new("shop", "p"), &bad).is_err(), "{bad}");
    }
}

#[test]
fn unreadable_policies_fail_closed_and_large_ones_are_bounded() {
    let key = || ObjectKey::new("shop", "p");
    // An ALLOW with an unreadable port: not skipped (the namespace would
    // allow everything) but an ALLOW matching nothing for its selector.
    let t = policy::translate_or_fail_closed(
        key(),
        &json!({"selector": {"matchLabels": {"app": "db"}}, "rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
    );
    let p = t.policy.expect("a stand-in");
    assert!(p.action == Action::Allow && p.rules.is_empty(), "{p:?}");
    assert!(p.selector.is_some_and(|s| s.match_labels.get("app").map(String::as_str) == Some("db")));
    assert!(t.notes[0].contains("fail-closed"), "{:?}", t.notes);
    // A DENY with a bad block denies everything, namespace-wide when its
    // selector is unreadable too.
    let t = policy::translate_or_fail_closed(
        key(),
        &json!({"action": "DENY", "selector": {"matchLabels": {"app": 3}},
                "rules": [{"from": [{"source": {"ipBlocks": ["bad"]}}]}]}),
    );
    let p = t.policy.expect("a stand-in");
    assert!(p.action == Action::Deny && p.rules == vec![Rule::default()] && p.selector.is_none(), "{p:?}");
    // One rule with 30 000 principals and 1 024 operations would expand to
    // gigabytes: refused (and so failed closed), not expanded.
    let many: Vec<String> = (0..30_000).map(|i| format!("cluster.local/ns/a/sa/s{i}")).collect();
    let ops: Vec<serde_json::Value> = (0..1024).map(|_| json!({"operation": {}})).collect();
    let huge = json!({"rules": [{"from": [{"source": {"principals": many}}], "to": ops}]});
    let err = policy::translate(key(), &huge).expect_err("bounded");
    assert!(err.contains("expanded") || err.contains("combinations"), "{err}");
    // Notes are bounded per policy.
    let rules: Vec<serde_json::Value> = (0..50).map(|_| json!({"to": [{"operation": {"methods": ["GET"]}}]})).collect();
    let t = translate(json!({"rules": rules}));
    assert!(t.notes.len() <= 9 && t.notes.last().is_some_and(|n| n.contains("more")), "{:?}", t.notes);
    // The root namespace's mesh-wide meaning is not applied: said so.
    let t = policy::translate(ObjectKey::new("istio-system", "mesh"), &json!({})).expect("translates");
    assert!(t.notes.iter().any(|n| n.contains("mesh-wide")), "{:?}", t.notes);
}

fn record(name: &str, ns: &str, node: &str, host_network: bool) -> reduce::PodRecord {
    pod(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": []},
        "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", name.len(), ns.len())}
    }))
}

fn keys(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            Change::Upsert(o) => format!("+{}", o.object_ref()),
            Change::Delete(r) => format!("-{r}"),
        })
        .collect()
}

#[test]
fn enrolment_follows_namespace_labels_and_remote_pods_stay_compact() {
    let mut c = Cluster::default();
    let mut out = Vec::new();
    c.put_pod(Side::Remote, record("a", "shop", "node-2", false), &mut out);
    c.put_pod(Side::Remote, record("agent", "shop", "node-2", true), &mut out);
    c.put_pod(Side::Remote, record("b", "other", "node-2", false), &mut out);
    assert!(out.is_empty(), "no namespace is enrolled yet");
    c.put_namespace("shop", true, &mut out);
    assert_eq!(keys(&out), vec!["+pod shop/a"], "the hostNetwork pod is never meshed");
    match &out[0] {
        Change::Upsert(Object::Workload(w)) => {
            assert!(w.labels.is_empty() && w.netns.is_none(), "a remote pod keeps no labels and has no netns")
        }
        other => panic!("{other:?}"),
    }
    out.clear();
    c.put_namespace("shop", true, &mut out);
    assert!(out.is_empty(), "an unchanged label changes nothing");
    c.put_namespace("shop", false, &mut out);
    assert_eq!(keys(&out), vec!["-pod shop/a"]);
    out.clear();
    // A local pod waits for its network namespace.
    c.put_namespace("other", true, &mut out);
    c.put_pod(Side::Local, record("c", "other", "node-1", false), &mut out);
    assert_eq!(keys(&out), vec!["+pod other/b"]);
    let pending = c.pending();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].key, ObjectKey::new("other", "c"));
    assert_eq!(c.unmeshed.get(&pending[0].key).copied(), Some("network namespace not found yet"));
    out.clear();
    c.remove_pod(Side::Remote, &ObjectKey::new("other", "b"), &mut out);
    assert_eq!(keys(&out), vec!["-pod other/b"]);
    assert!(matches!(&out[0], Change::Delete(ObjectRef::Workload(_))));
}
