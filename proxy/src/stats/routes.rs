//! `outrigger stats`' second table: HTTP requests per destination service
//! and route — total, requests per second (between two scrapes), success
//! rate (not 5xx, a response at all) and latency p50/p99.

use std::collections::BTreeMap;

use super::{exposition::quantile, Exposition};

#[derive(Debug, Default, Clone, PartialEq)]
pub struct RouteRow {
    pub service: String,
    pub route: String,
    pub requests: f64,
    pub failed: f64,
    /// Requests per second since the previous scrape, when there was one.
    pub rps: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

type Key = (String, String);

fn key(labels: &BTreeMap<String, String>) -> Key {
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    (get("destination_service"), get("route"))
}

fn totals(m: &Exposition, reporter: &str) -> BTreeMap<Key, (f64, f64)> {
    let mut out: BTreeMap<Key, (f64, f64)> = BTreeMap::new();
    for s in m.matching("outrigger_requests_total", &[("reporter", reporter)]) {
        let code = s.labels.get("response_code").map(String::as_str).unwrap_or("0");
        let e = out.entry(key(&s.labels)).or_default();
        e.0 += s.value;
        if code == "0" || code.starts_with('5') {
            e.1 += s.value;
        }
    }
    out
}

/// Rows, busiest first; `previous` (an earlier scrape, seconds before)
/// gives the request rate.
pub fn route_rows(m: &Exposition, reporter: &str, previous: Option<(&Exposition, f64)>) -> Vec<RouteRow> {
    let now = totals(m, reporter);
    let before = previous.map(|(p, secs)| (totals(p, reporter), secs));
    let mut buckets: BTreeMap<Key, BTreeMap<String, f64>> = BTreeMap::new();
    for s in m.matching("outrigger_request_duration_seconds_bucket", &[("reporter", reporter)]) {
        let le = s.labels.get("le").cloned().unwrap_or_default();
        *buckets.entry(key(&s.labels)).or_default().entry(le).or_default() += s.value;
    }
    let mut rows: Vec<RouteRow> = now
        .into_iter()
        .map(|((service, route), (requests, failed))| {
            let k = (service.clone(), route.clone());
            let rps = before.as_ref().filter(|(_, secs)| *secs > 0.0).map(|(b, secs)| {
                let earlier = b.get(&k).map(|t| t.0).unwrap_or(0.0);
                (requests - earlier).max(0.0) / secs
            });
            let points: Vec<(f64, f64)> = buckets
                .get(&k)
                .map(|b| {
                    b.iter()
                        .filter_map(|(le, c)| Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *c)))
                        .collect()
                })
                .unwrap_or_default();
            RouteRow {
                service,
                route,
                requests,
                failed,
                rps,
                p50: quantile(0.5, &points),
                p99: quantile(0.99, &points),
            }
        })
        .collect();
    rows.sort_by(|a, b| b.requests.total_cmp(&a.requests).then(a.service.cmp(&b.service)).then(a.route.cmp(&b.route)));
    rows
}

pub fn render_routes(rows: &[RouteRow]) -> String {
    let sw = rows.iter().map(|r| r.service.len()).max().unwrap_or(0).max("SERVICE".len());
    let rw = rows.iter().map(|r| r.route.len()).max().unwrap_or(0).max("ROUTE".len());
    let mut out = format!(
        "{:<sw$}  {:<rw$}  {:>9}  {:>8}  {:>8}  {:>10}  {:>10}\n",
        "SERVICE", "ROUTE", "REQUESTS", "REQ/S", "SUCCESS", "p50", "p99"
    );
    for r in rows {
        let success = if r.requests > 0.0 { (r.requests - r.failed) / r.requests * 100.0 } else { 100.0 };
        out.push_str(&format!(
            "{:<sw$}  {:<rw$}  {:>9.0}  {:>8}  {:>7.1}%  {:>10}  {:>10}\n",
            r.service,
            r.route,
            r.requests,
            r.rps.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
            success,
            super::millis(r.p50),
            super::millis(r.p99),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_with_rate_success_and_latency() {
        let at = |n: u32, fails: u32| {
            Exposition::parse(&format!(
                "outrigger_requests_total{{reporter=\"outbound\",destination_service=\"web.shop\",route=\"split\",response_code=\"200\"}} {n}\n\
                 outrigger_requests_total{{reporter=\"outbound\",destination_service=\"web.shop\",route=\"split\",response_code=\"503\"}} {fails}\n\
                 outrigger_request_duration_seconds_bucket{{reporter=\"outbound\",destination_service=\"web.shop\",route=\"split\",response_code=\"200\",le=\"0.005\"}} {n}\n\
                 outrigger_request_duration_seconds_bucket{{reporter=\"outbound\",destination_service=\"web.shop\",route=\"split\",response_code=\"200\",le=\"+Inf\"}} {n}\n"
            ))
        };
        let (before, now) = (at(90, 10), at(180, 20));
        let rows = route_rows(&now, "outbound", Some((&before, 2.0)));
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.requests, r.failed, r.rps), (200.0, 20.0, Some(50.0)));
        assert!(r.p99.expect("p99") <= 0.005);
        let table = render_routes(&rows);
        assert!(table.contains("90.0%") && table.contains("50.0"), "{table}");
    }
}
