//! The measuring tools: sockperf (latency), iperf3 (bulk) and the in-pod
//! podtool (connection rate, echo throughput through a balancer).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use outrigger_e2e::{Pod, Sandbox};
use serde_json::Value;

use crate::util::output;

/// sockperf ping-pong with 1 KiB messages: full round-trip (p50, p99) in µs.
pub fn latency(sb: &Sandbox, from: &Pod, target: SocketAddr, seconds: u64) -> Result<(f64, f64)> {
    let mut cmd = sb.in_pod(from, "sockperf");
    cmd.args(["ping-pong", "--tcp", "-i", &target.ip().to_string(), "-p", &target.port().to_string()]).args([
        "-m",
        "1024",
        "-t",
        &seconds.to_string(),
        "--full-rtt",
    ]);
    let text = output(&mut cmd).with_context(|| format!("sockperf to {target}"))?;
    let pct = |p: &str| -> Result<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no {p} percentile in sockperf output:\n{text}"))
    };
    Ok((pct("50.000")?, pct("99.000")?))
}

/// iperf3 bulk throughput in Gbit/s (receiver side).
pub fn iperf(sb: &Sandbox, from: &Pod, target: SocketAddr, streams: usize, seconds: u64) -> Result<f64> {
    let mut cmd = sb.in_pod(from, "iperf3");
    cmd.args(["-c", &target.ip().to_string(), "-p", &target.port().to_string()]).args([
        "-t",
        &seconds.to_string(),
        "-P",
        &streams.to_string(),
        "-J",
    ]);
    let text = output(&mut cmd).with_context(|| format!("iperf3 to {target}"))?;
    let v: Value = serde_json::from_str(&text)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3 output: {}", v["error"]))?;
    Ok(bps / 1e9)
}

fn podtool(sb: &Sandbox, from: &Pod, target: SocketAddr, args: &[&str]) -> Result<Value> {
    let summary = sb.client(from, target, args)?;
    if summary["failed"].as_u64().unwrap_or(0) > 0 {
        anyhow::bail!("connections to {target} failed: {}", summary["errors"]);
    }
    Ok(summary)
}

/// New connections per second: 8 clients each opening a connection,
/// echoing 1 KiB and closing, for `seconds`.
pub fn connection_rate(sb: &Sandbox, from: &Pod, target: SocketAddr, seconds: u64) -> Result<f64> {
    let ms = (seconds * 1000).to_string();
    let s = podtool(sb, from, target, &["--duration-ms", &ms, "--parallel", "8", "--bytes", "1024"])?;
    Ok(s["ok"].as_f64().unwrap_or(0.0) / (s["elapsed_ms"].as_f64().unwrap_or(1.0) / 1e3))
}

/// Echo throughput over 8 connections, Gbit/s of payload each way.
pub fn echo_throughput(sb: &Sandbox, from: &Pod, target: SocketAddr, seconds: u64) -> Result<f64> {
    // Sized to last about `seconds` at a few Gbit/s; the rate is what counts.
    let bytes = (seconds * 256 * 1024 * 1024).to_string();
    let s = podtool(sb, from, target, &["--conns", "8", "--parallel", "8", "--bytes", &bytes, "--no-verify"])?;
    let received = s["bytes_received"].as_f64().unwrap_or(0.0);
    Ok(received * 8.0 / (s["elapsed_ms"].as_f64().unwrap_or(1.0) / 1e3) / 1e9)
}
