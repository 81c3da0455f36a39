//! Resilience per route with real servers whose misbehaviour the test
//! controls (py/origin.py: a share of answers with a given status, a
//! fixed delay, a log of what it served and of requests cancelled under
//! it): retries with a budget, per-attempt and whole-request timeouts.

use std::time::Duration;

use anyhow::{ensure, Result};
use outrigger_e2e::{
    mesh::Mesh,
    servers::{origin, origin_answering, python},
    traffic::{drive, lines_starting, n, services_yaml},
    wait_for, Pod, ProxyProcess,
};

const PORT: u16 = 8080;

const ROUTES: &str = r#"routes:
  - name: web
    parentRefs: [{name: web, port: 80}]
    rules:
      - name: retried
        matches: [{path: {type: PathPrefix, value: /status}}]
        retry: {codes: [503], attempts: 3}
      - name: limited
        matches: [{path: {type: PathPrefix, value: /limited}}]
        filters:
          - type: LocalRateLimit
            localRateLimit: {maxTokens: 10, tokensPerFill: 10, fillInterval: 100ms, perSourcePod: true}
  - name: slowfast
    parentRefs: [{name: slowfast, port: 80}]
    rules:
      - timeouts: {backendRequest: 100ms}
        retry: {codes: [], attempts: 2}
  - name: allslow
    parentRefs: [{name: allslow, port: 80}]
    rules:
      - timeouts: {request: 300ms}
"#;

struct Setup {
    mesh: Mesh,
    proxy: ProxyProcess,
    /// Origin logs: the flaky pod's, the slow pod's, the fast pod's.
    flaky: std::path::PathBuf,
    slow: std::path::PathBuf,
    fast: std::path::PathBuf,
}

fn setup(flags: &[&str]) -> Result<Setup> {
    let mesh = Mesh::new(&[&["client", "client2", "flaky", "slow", "fast"]], &[])?;
    let flaky = origin(&mesh.sb, mesh.pod("flaky"), PORT, "flaky", 0)?;
    let slow = origin(&mesh.sb, mesh.pod("slow"), PORT, "slow", 1000)?;
    let fast = origin(&mesh.sb, mesh.pod("fast"), PORT, "fast", 0)?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    let services = services_yaml(
        PORT,
        &[
            ("web", "10.96.2.1", &["flaky"]),
            ("slowfast", "10.96.2.2", &["slow", "fast"]),
            ("allslow", "10.96.2.3", &["slow"]),
        ],
    );
    // A slow service that takes at most 10 requests at once.
    let breaker = format!(
        "  - name: guarded\n    vips: [\"10.96.2.4\"]\n    ports: [{{port: 80, targetPort: {PORT}, protocol: http}}]\n    endpoints: [{{pod: slow}}]\n    circuitBreaker: {{maxRequests: 10}}\n"
    );
    mesh.write_files(&meshed, &format!("{services}{breaker}{ROUTES}"))?;
    // Every request in the access log, to match its flags with the client's view.
    let mut all = vec!["--access-log", "requests"];
    all.extend_from_slice(flags);
    let proxy = mesh.start(0, &all)?;
    Ok(Setup { mesh, proxy, flaky, slow, fast })
}

fn metric(proxy: &ProxyProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    proxy.metrics().map(|m| m.sum(name, labels)).unwrap_or(f64::NAN)
}

/// Request lines of the access log for paths under `path` whose flags
/// include `flag`.
fn logged(proxy: &ProxyProcess, flag: &str, path: &str) -> usize {
    proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("kind=\"request\"") && l.contains(&format!("path={path}")))
        .filter(|l| {
            l.split("flags=")
                .nth(1)
                .and_then(|f| f.split_whitespace().next())
                .is_some_and(|f| f.trim_matches('"').split(',').any(|one| one == flag))
        })
        .count()
}

/// Upstream requests the origin served for `path`.
fn served(log: &std::path::Path, method: &str, path: &str) -> usize {
    lines_starting(log, &format!("{method} {path} "))
}

#[test]
fn retries_turn_a_flaky_endpoint_into_successes_and_never_retry_a_post() -> Result<()> {
    // A budget that does not bind here (the default's is the next test's).
    let s = setup(&["--retry-budget-ratio", "1", "--retry-backoff", "5ms", "--retry-max-backoff", "20ms"])?;
    let client = s.mesh.pod("client");
    let run = drive(&s.mesh, client, "10.96.2.1", "/status/503/30", 1000, &[])?;
    let ok = n(&run, "statuses", "200");
    let upstream = served(&s.flaky, "GET", "/status/503/30");
    let retries = metric(&s.proxy, "outrigger_retries_total", &[("route", "web/retried"), ("reason", "status")]);
    eprintln!(
        "FIGURE 30 % 503, retry attempts 3: {ok} of 1000 succeeded; {upstream} upstream requests, {retries} retries"
    );
    ensure!(ok >= 990, "retries should hide a 30 % failure rate: {run}");
    ensure!(upstream as f64 == 1000.0 + retries, "upstream requests {upstream} = 1000 + retries {retries}");
    ensure!(retries >= 300.0, "about 0.3 + 0.09 + 0.027 retries per request: {retries}");
    // A POST is not idempotent: never retried.
    let posts = drive(&s.mesh, client, "10.96.2.1", "/status/503/100", 20, &["method:POST", "body:100"])?;
    ensure!(n(&posts, "statuses", "503") == 20, "{posts}");
    ensure!(served(&s.flaky, "POST", "/status/503/100") == 20, "a POST was retried");
    // An idempotent PUT with a body is retried with its body (kept up to
    // 64 KiB): 10 requests, each tried 4 times with all 1 000 bytes; a body
    // past the limit is sent once.
    let small = drive(&s.mesh, client, "10.96.2.1", "/status/503/100/small", 10, &["method:PUT", "body:1000"])?;
    let big = drive(&s.mesh, client, "10.96.2.1", "/status/503/100/big", 5, &["method:PUT", "body:100000"])?;
    ensure!(n(&small, "statuses", "503") == 10 && n(&big, "statuses", "503") == 5, "{small} {big}");
    let whole = lines_starting(&s.flaky, "PUT /status/503/100/small 1000");
    let (small_sent, big_sent) =
        (served(&s.flaky, "PUT", "/status/503/100/small"), served(&s.flaky, "PUT", "/status/503/100/big"));
    eprintln!("FIGURE PUT always 503: 1 000-byte bodies sent {small_sent} times for 10 requests ({whole} whole), 100 000-byte bodies {big_sent} times for 5");
    ensure!(small_sent == 40 && whole == 40, "PUT bodies retried whole: {small_sent} sent, {whole} whole");
    ensure!(big_sent == 5, "a body over 64 KiB was retried: {big_sent}");
    Ok(())
}

#[test]
fn the_retry_budget_caps_retries_when_every_answer_fails() -> Result<()> {
    // Linkerd's budget defaults: 20 % of requests plus 10 per second over a
    // 10 s window. A short back-off keeps the run inside one window.
    let s = setup(&["--retry-backoff", "1ms", "--retry-max-backoff", "2ms"])?;
    let client = s.mesh.pod("client");
    let start = std::time::Instant::now();
    let run = drive(&s.mesh, client, "10.96.2.1", "/status/503/100", 500, &[])?;
    let elapsed = start.elapsed().as_secs_f64();
    let upstream = served(&s.flaky, "GET", "/status/503/100");
    let retries = metric(&s.proxy, "outrigger_retries_total", &[("route", "web/retried")]);
    let exhausted = metric(&s.proxy, "outrigger_retry_budget_exhausted_total", &[("route", "web/retried")]);
    // Each window of 10 s allows 10/s x 10 s; the run spans ceil(t / 10).
    let cap = 0.2 * 500.0 + 100.0 * (elapsed / 10.0).ceil().max(1.0);
    eprintln!("FIGURE always 503, 500 requests in {elapsed:.1} s: {upstream} upstream requests ({retries} retries; budget cap {cap}; 1 500 without a budget); budget refused {exhausted}");
    ensure!(n(&run, "statuses", "503") == 500, "the client gets the 503s: {run}");
    ensure!(upstream as f64 == 500.0 + retries, "upstream {upstream} = 500 + retries {retries}");
    ensure!(retries <= cap && retries >= 0.5 * cap, "retries within the budget: {retries} (cap {cap})");
    // /config_dump shows the rule's policy and its budget's state.
    let dump = s.proxy.config_dump()?;
    let rules = dump["services"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["service"] == "default/web"))
        .map(|w| w["http_rules"].clone())
        .unwrap_or_default();
    let retried =
        rules.as_array().and_then(|r| r.iter().find(|r| r["rule"] == "web/retried")).cloned().unwrap_or_default();
    ensure!(
        retried["retry"]["attempts"] == 3 && retried["retry_budget"]["retries"].as_f64() == Some(retries),
        "config_dump rule: {retried}"
    );
    // Each answer that could not be retried is flagged URX in the log.
    let urx = wait_for(Duration::from_secs(5), || (logged(&s.proxy, "URX", "/status/503/100") == 500).then_some(()));
    ensure!(urx.is_some(), "URX lines: {} (want 500)", logged(&s.proxy, "URX", "/status/503/100"));
    // Once spent, each request's first retry is refused (and counted).
    ensure!(exhausted >= 500.0 - retries, "retries the budget refused: {exhausted}");
    Ok(())
}

#[test]
fn an_attempt_timeout_retries_elsewhere_and_a_request_timeout_cancels_upstream() -> Result<()> {
    let s = setup(&[])?;
    let client = s.mesh.pod("client");
    // One endpoint answers in 1 s, the other at once: with backendRequest
    // 100ms and a retry, every request succeeds well before 1 s.
    let run = drive(&s.mesh, client, "10.96.2.2", "/sf", 20, &[])?;
    let worst = run["p99_ms"].as_f64().unwrap_or(f64::MAX);
    let timeouts =
        metric(&s.proxy, "outrigger_request_timeouts_total", &[("route", "slowfast"), ("kind", "backend_request")]);
    eprintln!("FIGURE backendRequest 100ms, 1 s-slow + healthy endpoint: 20 of 20 ok: {}, slowest {worst:.0} ms, attempt timeouts {timeouts}", n(&run, "statuses", "200"));
    ensure!(n(&run, "statuses", "200") == 20 && n(&run, "bodies", "fast") == 20, "{run}");
    ensure!(timeouts >= 1.0, "the slow endpoint was never tried: {timeouts}");
    ensure!(worst < 700.0, "a request waited for the slow endpoint: {worst} ms");
    ensure!(served(&s.fast, "GET", "/sf") == 20, "the fast endpoint served every request");
    // Every endpoint slow, request 300ms: 504 at about 300 ms, and the
    // slow server sees each request cancelled.
    let run = drive(&s.mesh, client, "10.96.2.3", "/all", 5, &[])?;
    let (p50, worst) = (run["p50_ms"].as_f64().unwrap_or(0.0), run["p99_ms"].as_f64().unwrap_or(f64::MAX));
    eprintln!(
        "FIGURE request 300ms, every endpoint 1 s slow: 504 x {}, p50 {p50:.0} ms, slowest {worst:.0} ms",
        n(&run, "statuses", "504")
    );
    ensure!(n(&run, "statuses", "504") == 5, "{run}");
    ensure!(p50 >= 290.0 && worst < 900.0, "504 after the request timeout: p50 {p50} ms, slowest {worst} ms");
    let cancelled = wait_for(Duration::from_secs(5), || (lines_starting(&s.slow, "CANCELLED /all") == 5).then_some(()));
    ensure!(cancelled.is_some(), "cancellations the server saw: {}", lines_starting(&s.slow, "CANCELLED /all"));
    ensure!(logged(&s.proxy, "UT", "/all") == 5, "UT lines: {}", logged(&s.proxy, "UT", "/all"));
    let request_timeouts =
        metric(&s.proxy, "outrigger_request_timeouts_total", &[("route", "allslow"), ("kind", "request")]);
    ensure!(request_timeouts == 5.0, "request timeouts counted: {request_timeouts}");
    let answered = metric(&s.proxy, "outrigger_requests_total", &[("route", "allslow"), ("response_code", "504")]);
    ensure!(answered == 5.0, "504s counted: {answered}");
    Ok(())
}

#[test]
fn an_endpoint_answering_5xx_is_ejected_for_its_time_within_the_max_percent() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "good1", "good2", "bad1", "bad2"]], &[])?;
    let logs: Vec<std::path::PathBuf> = [("good1", 200), ("good2", 200), ("bad1", 500), ("bad2", 500)]
        .into_iter()
        .map(|(name, status)| origin_answering(&mesh.sb, mesh.pod(name), PORT, name, 0, status))
        .collect::<Result<_>>()?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    let services = services_yaml(
        PORT,
        &[
            // One broken endpoint of three.
            ("one", "10.96.3.1", &["good1", "good2", "bad1"]),
            // Two of three: a 50 % cap ejects only one of them at a time.
            ("two", "10.96.3.2", &["good1", "bad1", "bad2"]),
        ],
    );
    mesh.write_files(&meshed, &services)?;
    // Round robin: every endpoint gets its turn (P2C would starve one whose
    // first answer was slow, and ejection would have little to show).
    let flags = ["--lb-algorithm", "round-robin", "--ejection-consecutive-failures", "5", "--ejection-base-time", "3s"];
    let proxy = mesh.start(0, &flags)?;
    let client = mesh.pod("client");
    let bad1 = |path: &str| served(&logs[2], "GET", path);
    // 5 answers of 500 in a row eject bad1: it gets no more requests.
    let run = drive(&mesh, client, "10.96.3.1", "/one", 300, &[])?;
    eprintln!(
        "FIGURE 1 of 3 endpoints answering 500, 300 requests: it got {}, the client saw {} x 500",
        bad1("/one"),
        n(&run, "statuses", "500")
    );
    ensure!(bad1("/one") == 5 && n(&run, "statuses", "500") == 5, "ejected after 5 consecutive 500s: {run}");
    let ejections = metric(&proxy, "outrigger_endpoint_ejections_total", &[]);
    ensure!(ejections == 1.0, "ejections counted: {ejections}");
    // After its ejection time it is tried again (and ejected again).
    std::thread::sleep(Duration::from_millis(3500));
    drive(&mesh, client, "10.96.3.1", "/one-later", 300, &[])?;
    eprintln!("FIGURE after the 3 s ejection: it got {} of 300", bad1("/one-later"));
    ensure!(bad1("/one-later") == 5, "back after its ejection time, then ejected again: {}", bad1("/one-later"));
    // Two broken endpoints of three: only one may be out at once.
    let run = drive(&mesh, client, "10.96.3.2", "/two", 300, &[])?;
    let (b1, b2) = (bad1("/two"), served(&logs[3], "GET", "/two"));
    eprintln!("FIGURE 2 of 3 endpoints answering 500 (max 50 % ejected): they got {b1} and {b2} of 300");
    ensure!(b1 + b2 == n(&run, "statuses", "500") as usize, "{run}");
    ensure!(b1.max(b2) > 20 && b1.min(b2) <= 5, "one ejected, the other kept by the cap: {b1} {b2}");
    Ok(())
}

#[test]
fn a_circuit_breaker_fails_requests_past_its_limit_at_once() -> Result<()> {
    let s = setup(&[])?;
    let client = s.mesh.pod("client");
    // 50 requests at once (curl, one connection each) to a service whose
    // one endpoint answers in 1 s, with maxRequests 10.
    let mut curl = s.mesh.sb.in_pod(client, "curl");
    curl.args(["-s", "-Z", "--parallel-max", "50", "--parallel-immediate", "-w", "%{http_code} %{time_total}\n"]);
    for i in 0..50 {
        curl.args(["-o", "/dev/null", &format!("http://10.96.2.4/guarded/{i}")]);
    }
    let out = s.mesh.sb.run(curl)?;
    let results: Vec<(String, f64)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(code, t)| (code.to_string(), t.parse().unwrap_or(f64::MAX))))
        .collect();
    let ok = results.iter().filter(|(c, _)| c == "200").count();
    let refused: Vec<f64> = results.iter().filter(|(c, _)| c == "503").map(|(_, t)| *t).collect();
    let slowest_refusal = refused.iter().cloned().fold(0.0, f64::max);
    let reached = lines_starting(&s.slow, "GET /guarded/");
    eprintln!("FIGURE maxRequests 10, 50 at once to a 1 s endpoint: {ok} x 200, {} x 503 (slowest refusal {:.0} ms), {reached} reached the server", refused.len(), slowest_refusal * 1e3);
    ensure!(ok == 10 && refused.len() == 40, "10 served, 40 refused: {results:?}");
    ensure!(reached == 10, "requests that reached the server: {reached}");
    ensure!(slowest_refusal < 0.5, "refusals are immediate, not queued: {slowest_refusal} s");
    let overflows =
        metric(&s.proxy, "outrigger_circuit_overflows_total", &[("service", "guarded.default"), ("limit", "requests")]);
    ensure!(overflows == 40.0, "overflows counted: {overflows}");
    let uo = metric(
        &s.proxy,
        "outrigger_requests_total",
        &[("destination_service", "guarded.default"), ("response_code", "503")],
    );
    ensure!(uo == 40.0, "503s counted: {uo}");
    ensure!(logged(&s.proxy, "UO", "/guarded/") == 40, "UO lines: {}", logged(&s.proxy, "UO", "/guarded/"));
    // /config_dump shows the service's limits and what they refused.
    let dump = s.proxy.config_dump()?;
    let guarded =
        dump["services"].as_array().and_then(|v| v.iter().find(|r| r["service"] == "default/guarded")).cloned();
    let breaker = guarded.map(|g| g["circuit_breaker"].clone()).unwrap_or_default();
    ensure!(
        breaker["limits"]["max_requests"] == 10 && breaker["overflows"][2] == 40 && breaker["open"][2] == 0,
        "config_dump circuit_breaker: {breaker}"
    );
    Ok(())
}

#[test]
fn a_per_source_pod_rate_limit_holds_one_pod_and_spares_the_other() -> Result<()> {
    let s = setup(&[])?;
    // 100 requests/s per source pod (10 tokens, 10 more every 100 ms). One
    // pod sends as fast as it can for 5 s; the other, at the same time,
    // about 45 a second.
    let quiet = python(
        &s.mesh.sb,
        s.mesh.pod("client2"),
        "client.py",
        &["10.96.2.1", "80", "/limited", "0", "for:5", "pace:20"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()?;
    let noisy = drive(&s.mesh, s.mesh.pod("client"), "10.96.2.1", "/limited", 0, &["for:5"])?;
    let quiet: serde_json::Value = serde_json::from_slice(&quiet.wait_with_output()?.stdout)?;
    let (admitted, limited) = (n(&noisy, "statuses", "200"), n(&noisy, "statuses", "429"));
    eprintln!("FIGURE per-source-pod limit 100/s over 5 s: the busy pod got {admitted} admitted, {limited} x 429; the other pod {} of {} admitted",
        n(&quiet, "statuses", "200"), quiet["statuses"].as_object().map(|m| m.values().filter_map(|v| v.as_u64()).sum::<u64>()).unwrap_or(0));
    ensure!((475..=525).contains(&admitted), "100/s over 5 s within 5 %: {admitted}");
    ensure!(limited > 100, "the busy pod was limited: {noisy}");
    ensure!(
        quiet["statuses"].as_object().is_some_and(|m| m.len() == 1) && n(&quiet, "statuses", "200") > 100,
        "the other pod was not limited: {quiet}"
    );
    let h = &noisy["refused_headers"];
    ensure!(
        h["x-ratelimit-limit"] == "10" && h["x-ratelimit-remaining"] == "0" && h["retry-after"] == "1",
        "429 headers: {h}"
    );
    let counted =
        metric(&s.proxy, "outrigger_rate_limited_total", &[("route", "web/limited"), ("source_pod", "client")]);
    ensure!(counted == limited as f64, "429s counted for the pod: {counted} (client saw {limited})");
    let rl =
        wait_for(Duration::from_secs(5), || (logged(&s.proxy, "RL", "/limited") == limited as usize).then_some(()));
    ensure!(rl.is_some(), "RL lines: {} (client saw {limited})", logged(&s.proxy, "RL", "/limited"));
    let other = metric(&s.proxy, "outrigger_rate_limited_total", &[("source_pod", "client2")]);
    ensure!(other == 0.0, "the other pod counted as limited: {other}");
    Ok(())
}
