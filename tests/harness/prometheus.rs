//! A real Prometheus scraping a proxy, and the Grafana dashboards' queries.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::{http, wait_for, Sandbox};

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn encode_query(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct Prometheus {
    pub addr: SocketAddr,
}

impl Prometheus {
    pub fn start(sb: &Sandbox, target: SocketAddr) -> Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let config = sb.dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: outrigger\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", sb.dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"));
        sb.spawn("prometheus", cmd)?;
        let prom = Self { addr };
        let started = std::time::Instant::now();
        let up = wait_for(Duration::from_secs(60), || {
            let v = prom.query("up{job=\"outrigger\"}").ok()?;
            (v.first()?["value"][1] == "1").then_some(())
        })
        .context("Prometheus never scraped the proxy");
        eprintln!("Prometheus up and scraping after {:?}", started.elapsed());
        up?;
        Ok(prom)
    }

    /// An instant query's result vector.
    pub fn query(&self, q: &str) -> Result<Vec<Value>> {
        let (status, body) = http::get(self.addr, &format!("/api/v1/query?query={}", encode_query(q)))?;
        ensure!(status == 200, "query {q} -> {status}: {body}");
        let v: Value = serde_json::from_str(&body)?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// `sum by (a, b) (...)` as a map from the two label values to the value.
    pub fn by_two(&self, q: &str, a: &str, b: &str) -> Result<BTreeMap<(String, String), f64>> {
        Ok(self
            .query(q)?
            .iter()
            .filter_map(|r| {
                let key = (r["metric"][a].as_str()?.to_string(), r["metric"][b].as_str()?.to_string());
                Some((key, r["value"][1].as_str()?.parse().ok()?))
            })
            .collect())
    }
}

/// Every panel query of a dashboard in deploy/grafana.
pub fn dashboard_queries(file: &str) -> Result<Vec<String>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana").join(file);
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().context("targets")? {
            out.push(target["expr"].as_str().context("expr")?.to_string());
        }
    }
    Ok(out)
}
