//! The sweep drops series that name a departed peer, not only those of a
//! departed local pod: a pod that lives for weeks sees its callers and the
//! pods it calls replaced at every rollout.

use std::{sync::Arc, time::Duration};

use prometheus_client::registry::Registry;

use super::{encode, ConnLabels, Label, LivePods, Metrics, RequestLabels};

fn pods(local: &[&str], meshed: &[&str]) -> LivePods {
    let set = |names: &[&str]| names.iter().map(|n| ("ns".to_string(), n.to_string())).collect();
    LivePods { local: set(local), meshed: set(meshed) }
}

fn conn(reporter: &'static str, source: &str, destination: &str) -> ConnLabels {
    ConnLabels {
        reporter,
        source_pod: source.into(),
        source_workload_namespace: if source.is_empty() { String::new() } else { "ns".into() },
        source_principal: String::new(),
        destination_service: "web.ns".into(),
        destination_pod: destination.into(),
        destination_workload_namespace: if destination.is_empty() { String::new() } else { "ns".into() },
        destination_principal: String::new(),
        security: "mutual_tls",
    }
}

fn request(reporter: &'static str, source: &str, destination: &str) -> RequestLabels {
    let label = |s: &str| Label(Arc::from(s));
    RequestLabels {
        reporter,
        source_pod: label(source),
        source_workload_namespace: label("ns"),
        destination_service: label("web.ns"),
        destination_pod: label(destination),
        destination_workload_namespace: label("ns"),
        route: label("default"),
        request_protocol: "http",
        response_code: 200,
        grpc_response_status: "",
    }
}

/// The exposition's lines of `family` naming `pod`.
fn lines(metrics: &Arc<Metrics>, family: &str, pod: &str) -> usize {
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let text = encode(&registry).expect("encode");
    let needle = format!("pod=\"{pod}\"");
    text.lines().filter(|l| l.starts_with(family) && l.contains(&needle)).count()
}

#[test]
fn series_of_peers_that_left_the_mesh_are_dropped() {
    let metrics = Arc::new(Metrics::new(true, 8));
    // `server` lives on this node; `old` and `new` call it (inbound), and
    // it calls `db` (outbound); `outside` is a client outside the mesh.
    for labels in [
        conn("inbound", "old", "server"),
        conn("inbound", "new", "server"),
        conn("inbound", "", "server"),
        conn("outbound", "server", "db"),
    ] {
        let record = metrics.conns.opened(&labels, Duration::ZERO).expect("a series");
        record.finish(1, 1, Duration::from_millis(1), None);
    }
    for (reporter, source, destination) in [("inbound", "old", "server"), ("inbound", "new", "server")] {
        metrics.requests.series(&request(reporter, source, destination)).requests.inc();
    }
    let (route, ns) = (Label(Arc::from("default")), Label(Arc::from("ns")));
    metrics.resilience.rate_limited_labels(route.clone(), Label(Arc::from("old")), ns.clone());
    metrics.resilience.rate_limited_labels(route, Label(Arc::from("new")), ns);
    assert_eq!(lines(&metrics, "outrigger_connections_opened_total", "old"), 1);
    assert_eq!(lines(&metrics, "outrigger_requests_total", "old"), 1);
    assert_eq!(lines(&metrics, "outrigger_rate_limited_total", "old"), 1);

    // `old` was replaced (a rollout); `db` too. Everything else stays.
    let live = pods(&["server"], &["server", "new"]);
    let dropped =
        metrics.conns.sweep(&live, Duration::ZERO) + metrics.requests.sweep(&live) + metrics.resilience.sweep(&live);
    assert_eq!(dropped, 4, "old's connection, request and 429 series, and the series to db");
    for family in ["outrigger_connections_opened_total", "outrigger_requests_total", "outrigger_rate_limited_total"] {
        assert_eq!(lines(&metrics, family, "old"), 0, "{family} still names the departed caller");
        assert_eq!(lines(&metrics, family, "new"), 1, "{family} lost a live caller");
    }
    assert_eq!(lines(&metrics, "outrigger_connections_opened_total", "db"), 0);
    assert_eq!(metrics.conns.series_count(), 2, "new's and the un-meshed client's series stay");
}

#[test]
fn a_departed_peer_in_use_or_recent_is_kept_until_idle() {
    let metrics = Arc::new(Metrics::new(true, 8));
    let labels = conn("inbound", "old", "server");
    let open = metrics.conns.opened(&labels, Duration::ZERO).expect("a series");
    let live = pods(&["server"], &["server"]);
    assert_eq!(metrics.conns.sweep(&live, Duration::ZERO), 0, "a connection is still open on it");
    open.finish(1, 1, Duration::from_millis(1), None);
    drop(open);
    assert_eq!(metrics.conns.sweep(&live, Duration::from_secs(3600)), 0, "not idle long enough");
    assert_eq!(metrics.conns.sweep(&live, Duration::ZERO), 1);
}
