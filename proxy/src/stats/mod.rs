//! `outrigger stats`: a running proxy's traffic per destination service, in
//! a terminal — connections, bytes, failures and connect latency p50/p99 —
//! read from its admin endpoint.
#![forbid(unsafe_code)]

pub mod exposition;
mod routes;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

pub use exposition::{quantile, Exposition, Sample};
pub use routes::{render_routes, route_rows, RouteRow};

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("connecting to the admin server at {addr}: {source} (is outrigger running? is --admin-addr right?)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading from the admin server at {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin server at {addr} answered {path} with: {status}")]
    Status { addr: SocketAddr, path: String, status: String },
}

/// `GET path` over HTTP/1.0 (the admin server speaks it; no client library
/// needed): the status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), StatsError> {
    http_request(addr, "GET", path)
}

/// Any method, empty body, over HTTP/1.0.
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), StatsError> {
    let io = |source| StatsError::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|source| StatsError::Connect { addr, source })?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n").map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ServiceRow {
    pub service: String,
    pub connections: f64,
    pub open: f64,
    pub failed: f64,
    pub sent_bytes: f64,
    pub received_bytes: f64,
    pub connect_p50: Option<f64>,
    pub connect_p99: Option<f64>,
}

/// Per destination service, for one reporter, busiest first.
pub fn rows(m: &Exposition, reporter: &str) -> Vec<ServiceRow> {
    let mut by_service: BTreeMap<String, ServiceRow> = BTreeMap::new();
    let mut buckets: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let by_reporter = [("reporter", reporter)];
    let mut add = |name: &str, field: fn(&mut ServiceRow) -> &mut f64| {
        for s in m.matching(name, &by_reporter) {
            let service = s.labels.get("destination_service").cloned().unwrap_or_default();
            let row = by_service.entry(service.clone()).or_insert_with(|| ServiceRow { service, ..Default::default() });
            *field(row) += s.value;
        }
    };
    add("outrigger_connections_opened_total", |r| &mut r.connections);
    add("outrigger_connections_open", |r| &mut r.open);
    add("outrigger_connections_failed_total", |r| &mut r.failed);
    add("outrigger_sent_bytes_total", |r| &mut r.sent_bytes);
    add("outrigger_received_bytes_total", |r| &mut r.received_bytes);
    for s in m.matching("outrigger_connect_duration_seconds_bucket", &by_reporter) {
        let service = s.labels.get("destination_service").cloned().unwrap_or_default();
        let le = s.labels.get("le").cloned().unwrap_or_default();
        *buckets.entry(service).or_default().entry(le).or_default() += s.value;
    }
    for (service, b) in buckets {
        let points: Vec<(f64, f64)> = b
            .iter()
            .filter_map(|(le, c)| Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *c)))
            .collect();
        if let Some(row) = by_service.get_mut(&service) {
            row.connect_p50 = quantile(0.5, &points);
            row.connect_p99 = quantile(0.99, &points);
        }
    }
    let mut rows: Vec<ServiceRow> = by_service.into_values().collect();
    rows.sort_by(|a, b| b.connections.total_cmp(&a.connections).then(a.service.cmp(&b.service)));
    rows
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn millis(v: Option<f64>) -> String {
    v.map(|s| format!("{:.2} ms", s * 1e3)).unwrap_or_else(|| "-".into())
}

/// The table, aligned for a terminal.
pub fn render(rows: &[ServiceRow]) -> String {
    let width = rows.iter().map(|r| r.service.len()).max().unwrap_or(0).max("SERVICE".len());
    let mut out = format!(
        "{:<width$}  {:>9}  {:>6}  {:>7}  {:>10}  {:>10}  {:>10}  {:>10}\n",
        "SERVICE", "CONNS", "OPEN", "FAILED", "SENT", "RECEIVED", "CONN p50", "CONN p99"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<width$}  {:>9.0}  {:>6.0}  {:>7.0}  {:>10}  {:>10}  {:>10}  {:>10}\n",
            r.service,
            r.connections,
            r.open,
            r.failed,
            bytes(r.sent_bytes),
            bytes(r.received_bytes),
            millis(r.connect_p50),
            millis(r.connect_p99)
        ));
    }
    if rows.is_empty() {
        out.push_str("(no connections yet)\n");
    }
    out
}

fn scrape(addr: SocketAddr) -> Result<Exposition, StatsError> {
    let (status, body) = http_get(addr, "/metrics")?;
    if status != 200 {
        return Err(StatsError::Status { addr, path: "/metrics".into(), status: body.trim().to_string() });
    }
    Ok(Exposition::parse(&body))
}

/// An earlier scrape and when it was taken (for request rates).
pub type Previous = Option<(Exposition, std::time::Instant)>;

/// Fetches and renders: the services table, and the HTTP routes table when
/// the proxy has served requests. Requests per second are measured against
/// `previous` (`--watch`), else over a second between two scrapes.
pub fn snapshot(addr: SocketAddr, reporter: &str, previous: Previous) -> Result<(String, Previous), StatsError> {
    let mut now = scrape(addr)?;
    let mut taken = std::time::Instant::now();
    let mut out = render(&rows(&now, reporter));
    if now.matching("outrigger_requests_total", &[("reporter", reporter)]).next().is_none() {
        return Ok((out, Some((now, taken))));
    }
    let previous = match previous {
        Some(p) => p,
        None => {
            std::thread::sleep(Duration::from_secs(1));
            let first = (now, taken);
            now = scrape(addr)?;
            taken = std::time::Instant::now();
            first
        }
    };
    let secs = taken.duration_since(previous.1).as_secs_f64();
    out.push('\n');
    out.push_str(&render_routes(&route_rows(&now, reporter, Some((&previous.0, secs)))));
    Ok((out, Some((now, taken))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_per_service_sorted_and_aligned() {
        let text = "outrigger_connections_opened_total{reporter=\"outbound\",destination_service=\"a.default\",source_pod=\"x\"} 2\n\
                    outrigger_connections_opened_total{reporter=\"outbound\",destination_service=\"a.default\",source_pod=\"y\"} 3\n\
                    outrigger_connections_opened_total{reporter=\"outbound\",destination_service=\"b.default\",source_pod=\"x\"} 9\n\
                    outrigger_connections_opened_total{reporter=\"inbound\",destination_service=\"c.default\"} 100\n\
                    outrigger_connections_failed_total{reporter=\"outbound\",destination_service=\"a.default\",reason=\"denied\"} 1\n\
                    outrigger_sent_bytes_total{reporter=\"outbound\",destination_service=\"a.default\"} 2048\n\
                    outrigger_connect_duration_seconds_bucket{reporter=\"outbound\",destination_service=\"a.default\",le=\"0.001\"} 4\n\
                    outrigger_connect_duration_seconds_bucket{reporter=\"outbound\",destination_service=\"a.default\",le=\"0.01\"} 5\n\
                    outrigger_connect_duration_seconds_bucket{reporter=\"outbound\",destination_service=\"a.default\",le=\"+Inf\"} 5\n";
        let rows = rows(&Exposition::parse(text), "outbound");
        assert_eq!(rows.iter().map(|r| r.service.as_str()).collect::<Vec<_>>(), ["b.default", "a.default"]);
        let a = &rows[1];
        assert_eq!((a.connections, a.failed, a.sent_bytes), (5.0, 1.0, 2048.0));
        assert!(a.connect_p50.expect("p50") <= 0.001);
        let table = render(&rows);
        assert!(table.lines().next().expect("header").starts_with("SERVICE"));
        assert!(table.contains("2.0 KiB"), "{table}");
        let widths: Vec<usize> = table.lines().map(str::len).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "rows are aligned:\n{table}");
    }
}
