//! The HTTP layer with real clients and servers: routes in Gateway API
//! precedence, weighted splits, mirroring, faults, header changes,
//! per-request balancing, upgrades (WebSocket), h2 (h2load), gRPC, trace
//! context and the request access log. Origins are Debian's python3 (a
//! small HTTP/1.1 server whose answer names it), nginx, and python's
//! websockets and grpcio.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use outrigger_e2e::{
    mesh::Mesh,
    prometheus::{dashboard_queries, Prometheus},
    servers::{nginx, origin, python, python_server},
    traffic::{drive, lines, n},
    wait_for, Pod,
};
use serde_json::Value;

const PORT: u16 = 8080;
const H2C: u16 = 8082;

fn services_yaml(services: &[(&str, &str, &[&str])]) -> String {
    outrigger_e2e::traffic::services_yaml(PORT, services)
}

const ROUTES: &str = r#"routes:
  - name: web
    parentRefs: [{name: web, port: 80}]
    rules:
      - name: canary
        matches: [{headers: [{name: x-version, value: v2}]}]
        backendRefs: [{name: web-v2, port: 80}]
      - name: fault
        matches: [{path: {type: PathPrefix, value: /fault}}]
        filters: [{type: Fault, fault: {abort: {httpStatus: 503, percentage: 50}}}]
      - name: delay
        matches: [{path: {type: Exact, value: /delay}}]
        filters: [{type: Fault, fault: {delay: {fixedDelay: 100ms, percentage: 100}}}]
      - name: headers
        matches: [{path: {type: PathPrefix, value: /headers}}]
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier:
              set: [{name: x-set, value: by-route}]
              add: [{name: x-add, value: added}]
              remove: [x-drop]
          - type: ResponseHeaderModifier
            responseHeaderModifier: {add: [{name: x-route, value: headers}]}
      - name: mirror
        matches: [{path: {type: PathPrefix, value: /mirror/fast}}]
        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}]
      - name: mirror-slow
        matches: [{path: {type: PathPrefix, value: /mirror/slow}}]
        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow-slow, port: 80}}}]
      - name: mirror-down
        matches: [{path: {type: PathPrefix, value: /mirror/down}}]
        filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow-down, port: 80}}}]
      - name: split
        backendRefs: [{name: web, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
"#;

#[test]
fn routes_split_mirror_inject_faults_and_change_headers() -> Result<()> {
    let pods = ["client", "v1", "v2", "shadow", "shadowslow", "shadowdown"];
    let mesh = Mesh::new(&[&pods], &[])?;
    let client = mesh.pod("client");
    origin(&mesh.sb, mesh.pod("v1"), PORT, "v1", 0)?;
    origin(&mesh.sb, mesh.pod("v2"), PORT, "v2", 0)?;
    let shadow_log = origin(&mesh.sb, mesh.pod("shadow"), PORT, "shadow", 0)?;
    let slow_log = origin(&mesh.sb, mesh.pod("shadowslow"), PORT, "shadowslow", 1000)?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    let services = services_yaml(&[
        ("web", "10.96.1.1", &["v1"]),
        ("web-v2", "10.96.1.2", &["v2"]),
        ("shadow", "10.96.1.3", &["shadow"]),
        ("shadow-slow", "10.96.1.4", &["shadowslow"]),
        // Its pod serves nothing: every mirror copy is refused.
        ("shadow-down", "10.96.1.5", &["shadowdown"]),
    ]);
    mesh.write_files(&meshed, &format!("{services}{ROUTES}"))?;
    let proxy = mesh.start(0, &["--http", "true"])?;
    let web = "10.96.1.1";

    // 90/10 over 2 000 requests on one connection, within ±3 % (±60).
    let split = drive(&mesh, client, web, "/", 2000, &[])?;
    let (v1, v2) = (n(&split, "bodies", "v1"), n(&split, "bodies", "v2"));
    eprintln!("FIGURE split 90/10 over 2000 requests: v1 {v1}, v2 {v2}");
    ensure!(v1 + v2 == 2000 && (1740..=1860).contains(&v1), "90/10 split: {split}");

    // A header routes to v2.
    let canary = drive(&mesh, client, web, "/", 50, &["x-version:v2"])?;
    ensure!(n(&canary, "bodies", "v2") == 50, "x-version: v2 goes to v2: {canary}");

    // A 50 % abort with 503: 400 requests, 200 ± 40 (4 σ) aborted.
    let fault = drive(&mesh, client, web, "/fault/x", 400, &[])?;
    let aborted = n(&fault, "statuses", "503");
    eprintln!("FIGURE 50 % abort over 400 requests: {aborted} got 503");
    ensure!((160..=240).contains(&aborted) && aborted + n(&fault, "statuses", "200") == 400, "{fault}");
    // A fixed 100 ms delay on every request.
    let delayed = drive(&mesh, client, web, "/delay", 10, &[])?;
    let p50 = delayed["p50_ms"].as_f64().unwrap_or(0.0);
    eprintln!("FIGURE fixed 100 ms delay: client p50 {p50:.1} ms");
    ensure!((100.0..400.0).contains(&p50) && n(&delayed, "statuses", "200") == 10, "{delayed}");

    // Header changes: set replaces, add adds, remove removes; the response
    // gets its header.
    let headers =
        drive(&mesh, client, web, "/headers", 1, &["x-echo:x-set,x-add,x-drop", "x-set:from-client", "x-drop:secret"])?;
    let h = &headers["headers"];
    ensure!(
        h["x-echoed-x-set"] == "by-route"
            && h["x-echoed-x-add"] == "added"
            && h["x-echoed-x-drop"] == "(none)"
            && h["x-route"] == "headers",
        "header modifiers: {headers}"
    );

    // Mirroring: every request reaches the shadow; the client's answers are
    // the real backend's.
    let mirrored = drive(&mesh, client, web, "/mirror/fast", 200, &[])?;
    ensure!(n(&mirrored, "bodies", "v1") + n(&mirrored, "bodies", "v2") == 200, "{mirrored}");
    let copies = wait_for(Duration::from_secs(10), || (lines(&shadow_log) >= 200).then_some(()));
    eprintln!("FIGURE mirror: {} of 200 requests reached the shadow", lines(&shadow_log));
    ensure!(copies.is_some(), "the shadow saw {} of 200", lines(&shadow_log));
    // Bodies are copied too (up to 64 KiB): 20 POSTs of 10 000 bytes reach
    // the shadow whole; 5 of 100 000 bytes reach only the real backend.
    let posts = |bytes: usize| -> Result<Value> {
        let body = format!("body:{bytes}");
        drive(&mesh, client, web, "/mirror/fast/post", if bytes > 65536 { 5 } else { 20 }, &["method:POST", &body])
    };
    let (small, large) = (posts(10_000)?, posts(100_000)?);
    ensure!(n(&small, "statuses", "200") == 20 && n(&large, "statuses", "200") == 5, "{small} {large}");
    let shadow_posts = |bytes: &str| {
        std::fs::read_to_string(&shadow_log)
            .map(|s| s.lines().filter(|l| l.starts_with("POST ") && l.ends_with(&format!(" {bytes}"))).count())
            .unwrap_or(0)
    };
    let copied = wait_for(Duration::from_secs(10), || (shadow_posts("10000") == 20).then_some(()));
    eprintln!("FIGURE mirror: {} of 20 POST bodies of 10 000 bytes reached the shadow whole", shadow_posts("10000"));
    ensure!(copied.is_some(), "POST bodies mirrored whole: {} of 20", shadow_posts("10000"));
    let skipped_body = || {
        proxy
            .metrics()
            .map(|m| m.sum("outrigger_mirrored_requests_total", &[("result", "skipped_body")]))
            .unwrap_or(0.0)
    };
    ensure!(skipped_body() == 5.0, "bodies past 64 KiB are not mirrored: skipped_body {}", skipped_body());
    ensure!(
        std::fs::read_to_string(&shadow_log)?.lines().all(|l| !l.starts_with("POST ") || l.ends_with(" 10000")),
        "the shadow got a POST that was not whole"
    );
    // A shadow that takes 1 s, and one that refuses: the client sees
    // neither in its answers or its latency.
    let baseline = drive(&mesh, client, web, "/plain", 100, &[])?["p50_ms"].as_f64().unwrap_or(0.0);
    // Copies settled: every request's copy was sent, failed or skipped.
    let copies = |result: &str| {
        proxy.metrics().map(|m| m.sum("outrigger_mirrored_requests_total", &[("result", result)])).unwrap_or(0.0)
    };
    let settled = |total: f64| {
        wait_for(Duration::from_secs(10), || {
            let done = copies("sent") + copies("failed") + copies("skipped_busy") + copies("skipped_body");
            (done >= total).then_some(())
        })
    };
    for (i, path) in ["/mirror/slow", "/mirror/down"].into_iter().enumerate() {
        let r = drive(&mesh, client, web, path, 100, &[])?;
        let p50 = r["p50_ms"].as_f64().unwrap_or(f64::MAX);
        eprintln!("FIGURE {path}: client p50 {p50:.2} ms (no mirror: {baseline:.2} ms)");
        ensure!(n(&r, "statuses", "200") == 100 && p50 < baseline + 20.0, "{path}: {r}");
        ensure!(settled(325.0 + 100.0 * i as f64).is_some(), "mirror copies never settled");
    }
    // The slow shadow held every mirror slot (64 per pod): the rest of its
    // copies were skipped, not queued.
    eprintln!("FIGURE mirror copies skipped while the slow shadow held the slots: {}", copies("skipped_busy"));
    ensure!(copies("skipped_busy") > 0.0, "the mirror bound was never reached");
    ensure!(lines(&slow_log) > 0, "the slow shadow got copies");
    let metrics = proxy.metrics()?;
    ensure!(
        copies("failed") >= 50.0,
        "copies to shadow-down are counted failed: {:?}",
        metrics
            .matching("outrigger_mirrored_requests_total", &[])
            .map(|s| (s.labels.clone(), s.value))
            .collect::<Vec<_>>()
    );
    let sent = metrics.sum("outrigger_mirrored_requests_total", &[("result", "sent")]);
    ensure!(sent >= 220.0, "mirrored sent {sent}");

    // Every request was counted under its route and status.
    let count =
        |route: &str, code: &str| metrics.sum("outrigger_requests_total", &[("route", route), ("response_code", code)]);
    ensure!(count("web/split", "200") == 2000.0 + 100.0, "split: {}", count("web/split", "200"));
    ensure!(count("web/fault", "503") == aborted as f64, "fault 503s: {}", count("web/fault", "503"));
    ensure!(count("web/canary", "200") == 50.0, "canary: {}", count("web/canary", "200"));
    Ok(())
}

/// Gateway API conformance cases for matching and precedence
/// (HTTPRouteMatching, HTTPRouteMatchingAcrossRoutes, HeaderMatching,
/// QueryParamMatching, MethodMatching), two routes on one service, each
/// rule naming itself in a response header.
#[test]
fn matching_follows_gateway_api_precedence_in_a_running_proxy() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "v1"]], &[])?;
    origin(&mesh.sb, mesh.pod("v1"), PORT, "v1", 0)?;
    let rule = |name: &str, matches: &str| {
        format!(
            "      - name: {name}\n        matches: {matches}\n        filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-rule, value: {name}}}]}}}}]\n"
        )
    };
    let mut routes = String::from("routes:\n  - name: a\n    parentRefs: [{name: web}]\n    rules:\n");
    routes.push_str(&rule("exact", "[{path: {type: Exact, value: /}}]"));
    routes.push_str(&rule("v2", "[{path: {type: PathPrefix, value: /v2}}]"));
    routes.push_str(&rule("v2-example", "[{path: {type: PathPrefix, value: /v2/example}}]"));
    routes.push_str(&rule("regex", "[{path: {type: RegularExpression, value: '/re/[0-9]+'}}]"));
    routes.push_str("  - name: b\n    parentRefs: [{name: web}]\n    rules:\n");
    routes.push_str(&rule("header", "[{path: {value: /v2}, headers: [{name: version, value: two}]}]"));
    routes.push_str(&rule(
        "two-headers",
        "[{path: {value: /v2}, headers: [{name: version, value: two}, {name: color, value: orange}]}]",
    ));
    routes.push_str(&rule("query", "[{queryParams: [{name: animal, value: whale}]}]"));
    routes.push_str(&rule("post", "[{path: {value: /v2}, method: POST}]"));
    routes.push_str(&rule("catch-all", "[]"));
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    mesh.write_files(&meshed, &format!("{}{routes}", services_yaml(&[("web", "10.96.1.1", &["v1"])])))?;
    let _proxy = mesh.start(0, &["--http", "true"])?;
    let cases: &[(&str, &[&str], &str)] = &[
        ("/", &[], "exact"),
        ("/v2", &[], "v2"),
        ("/v2/", &[], "v2"),
        ("/v2x", &[], "catch-all"),
        ("/v2/example/deeper", &[], "v2-example"),
        ("/v2/other", &["version:two"], "header"),
        ("/v2/other", &["version:two", "color:orange"], "two-headers"),
        ("/v2/other", &["version:one"], "v2"),
        ("/v2/other", &["method:POST"], "post"),
        ("/re/123", &[], "regex"),
        ("/re/12a", &[], "catch-all"),
        ("/anything?animal=whale", &[], "query"),
        ("/anything?animal=dolphin", &[], "catch-all"),
    ];
    let mut wrong = Vec::new();
    for (path, headers, want) in cases {
        let got = drive(&mesh, mesh.pod("client"), "10.96.1.1", path, 1, headers)?;
        if got["headers"]["x-rule"] != *want {
            wrong.push(format!("{path} {headers:?}: {} (want {want})", got["headers"]["x-rule"]));
        }
    }
    ensure!(wrong.is_empty(), "precedence: {wrong:#?}");
    Ok(())
}

#[test]
fn requests_on_one_connection_are_balanced_and_a_slow_endpoint_gets_less() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "fast1", "fast2", "slow"]], &[])?;
    origin(&mesh.sb, mesh.pod("fast1"), PORT, "fast1", 0)?;
    origin(&mesh.sb, mesh.pod("fast2"), PORT, "fast2", 0)?;
    origin(&mesh.sb, mesh.pod("slow"), PORT, "slow", 50)?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    mesh.write_files(&meshed, &services_yaml(&[("pool", "10.96.1.9", &["fast1", "fast2", "slow"])]))?;
    let _proxy = mesh.start(0, &["--http", "true"])?;
    let got = drive(&mesh, mesh.pod("client"), "10.96.1.9", "/", 1000, &[])?;
    let share = |name: &str| n(&got, "bodies", name);
    eprintln!(
        "FIGURE 1000 requests over one connection: fast1 {}, fast2 {}, slow (50 ms) {}",
        share("fast1"),
        share("fast2"),
        share("slow")
    );
    ensure!(got["connections"] == 1 && n(&got, "statuses", "200") == 1000, "{got}");
    ensure!(share("fast1") >= 200 && share("fast2") >= 200, "both fast endpoints serve: {got}");
    ensure!(share("slow") >= 1 && share("slow") <= 100, "the slow endpoint gets a clearly smaller share: {got}");
    Ok(())
}

/// h2 (h2load, many streams over few connections), HTTP/1.1 keep-alive
/// (curl), a WebSocket upgrade and gRPC through the HTTP layer; the
/// detection counters and request metrics say so.
#[test]
fn h2_grpc_websocket_and_keepalive_work_through_the_http_layer() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "server"]], &[])?;
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let nginx_log = nginx(&mesh.sb, server, PORT, Some(H2C))?;
    python_server(&mesh.sb, server, "ws.py", 9001)?;
    python_server(&mesh.sb, server, "grpc_peer.py", 50051)?;
    let proxy = mesh.start(0, &["--http", "true", "--access-log", "requests"])?;
    let ip = server.ip4.to_string();

    // HTTP/1.1: three requests over one connection.
    let base = format!("http://{ip}:{PORT}");
    let out = mesh.sb.run({
        let mut c = mesh.sb.in_pod(client, "curl");
        c.args(["-sS", "-w", " %{http_code} %{num_connects}\n", "--max-time", "10"]);
        c.args([format!("{base}/a"), format!("{base}/b"), format!("{base}/c")]);
        c
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.matches("ok 200").count() == 3, "curl keep-alive: {text}");

    // h2: 2 000 requests, 4 connections, 10 streams each at a time.
    let out = mesh.sb.run({
        let mut c = mesh.sb.in_pod(client, "h2load");
        c.args(["-n", "2000", "-c", "4", "-m", "10", &format!("http://{ip}:{H2C}/")]);
        c
    })?;
    let h2load = String::from_utf8_lossy(&out.stdout);
    eprintln!("{h2load}");
    ensure!(h2load.contains("2000 succeeded, 0 failed, 0 errored"), "h2load: {h2load}");
    ensure!(h2load.contains("status codes: 2000 2xx"), "h2load: {h2load}");

    // A WebSocket upgrade, then messages both ways.
    let out = mesh.sb.run(python(&mesh.sb, client, "ws.py", &["call", &format!("ws://{ip}:9001/chat"), "hi"]))?;
    let ws = String::from_utf8_lossy(&out.stdout);
    ensure!(
        ws.lines().collect::<Vec<_>>() == ["echo:hi0", "echo:hi1", "echo:hi2"],
        "websocket: {ws} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // gRPC: a unary call, and one failing with NOT_FOUND in trailers.
    let target = format!("{ip}:50051");
    let out = mesh.sb.run(python(&mesh.sb, client, "grpc_peer.py", &["call", &target, "mesh"]))?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "hello mesh",
        "grpc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = mesh.sb.run(python(&mesh.sb, client, "grpc_peer.py", &["call", &target, "fail"]))?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).trim() == "status 5",
        "grpc failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A request is counted when its response has ended in the proxy, which
    // may trail the client's exit by a little.
    let settled = wait_for(Duration::from_secs(15), || {
        let m = proxy.metrics().ok()?;
        (m.sum("outrigger_requests_total", &[]) >= 2006.0).then_some(())
    });
    let series = |name: &str| -> Vec<String> {
        proxy
            .metrics()
            .map(|m| m.matching(name, &[]).map(|s| format!("{:?} {}", s.labels, s.value)).collect())
            .unwrap_or_default()
    };
    ensure!(
        settled.is_some(),
        "requests counted: {:#?}\ndetections: {:#?}",
        series("outrigger_requests_total"),
        series("outrigger_protocol_detections_total")
    );
    let m = proxy.metrics()?;
    let req = |labels: &[(&str, &str)]| m.sum("outrigger_requests_total", labels);
    ensure!(req(&[("request_protocol", "http2")]) == 2000.0, "h2 requests: {}", req(&[("request_protocol", "http2")]));
    ensure!(req(&[("request_protocol", "grpc"), ("grpc_response_status", "0")]) == 1.0, "grpc ok");
    ensure!(req(&[("request_protocol", "grpc"), ("grpc_response_status", "5")]) == 1.0, "grpc NOT_FOUND");
    ensure!(req(&[("request_protocol", "http"), ("response_code", "101")]) == 1.0, "websocket upgrade counted");
    ensure!(m.sum("outrigger_protocol_detections_total", &[("result", "h2")]) >= 5.0, "h2 detections");
    ensure!(m.sum("outrigger_protocol_detections_total", &[("result", "http1")]) >= 2.0, "http1 detections");
    ensure!(std::fs::read_to_string(&nginx_log)?.lines().count() == 2003, "nginx saw every request");
    // One access-log line per request with its fields.
    let log = proxy.log_text();
    let line =
        log.lines().find(|l| l.contains("kind=\"request\"") && l.contains("path=/b")).context("no request line")?;
    for field in ["method=GET", "status=200", "route=default", "upstream=", "duration_ms=", "trace_id="] {
        ensure!(line.contains(field), "request log line lacks {field}: {line}");
    }
    Ok(())
}

/// W3C trace context: a traceparent passes unchanged; without one, a trace
/// is started under --trace-sampling 100; the trace id is in the log.
#[test]
fn trace_context_is_propagated_or_started() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "v1"]], &[])?;
    origin(&mesh.sb, mesh.pod("v1"), PORT, "v1", 0)?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    mesh.write_files(&meshed, &services_yaml(&[("web", "10.96.1.1", &["v1"])]))?;
    let proxy = mesh.start(0, &["--http", "true", "--access-log", "requests", "--trace-sampling", "100"])?;
    let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let kept = drive(
        &mesh,
        mesh.pod("client"),
        "10.96.1.1",
        "/t",
        1,
        &["x-echo:traceparent,tracestate", &format!("traceparent:{given}"), "tracestate:vendor=1"],
    )?;
    ensure!(kept["headers"]["x-echoed-traceparent"] == given, "{kept}");
    ensure!(kept["headers"]["x-echoed-tracestate"] == "vendor=1", "{kept}");
    let started = drive(&mesh, mesh.pod("client"), "10.96.1.1", "/t", 1, &["x-echo:traceparent"])?;
    let tp = started["headers"]["x-echoed-traceparent"].as_str().unwrap_or_default().to_string();
    ensure!(tp.len() == 55 && tp.starts_with("00-") && tp.ends_with("-01"), "a started trace: {started}");
    let log = proxy.log_text();
    ensure!(log.contains("trace_id=\"0af7651916cd43dd8448eb211c80319c\""), "the given trace id is logged:\n{log}");
    ensure!(log.contains(&format!("trace_id=\"{}\"", &tp[3..35])), "the started trace id is logged:\n{log}");
    Ok(())
}

/// Opaque protocols are untouched with the HTTP layer on: redis (declared
/// opaque by port) and a byte stream on an undeclared port.
#[test]
fn opaque_traffic_is_unaffected_by_the_http_layer() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "server"]], &[])?;
    let (client, server) = (mesh.pod("client"), mesh.pod("server"));
    let mut cmd = mesh.sb.in_pod(server, "redis-server");
    cmd.args([
        "--bind",
        &server.ip4.to_string(),
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]);
    let spawned = mesh.sb.spawn("redis", cmd)?;
    outrigger_e2e::servers::wait_listening(server, 6379).with_context(|| spawned.stderr())?;
    let proxy = mesh.start(0, &["--http", "true"])?;
    let ip = server.ip4.to_string();
    let redis = |args: &[&str]| -> Result<String> {
        let mut c = mesh.sb.in_pod(client, "redis-cli");
        c.args(["-h", &ip, "-p", "6379"]).args(args);
        Ok(String::from_utf8_lossy(&mesh.sb.run(c)?.stdout).trim().to_string())
    };
    let set = redis(&["SET", "k", "meshed"])?;
    ensure!(set == "OK", "redis SET: {set:?}\n{}\n{}", spawned.stderr(), proxy.log_text());
    ensure!(redis(&["GET", "k"])? == "meshed");
    let bench = {
        let mut c = mesh.sb.in_pod(client, "redis-benchmark");
        c.args(["-h", &ip, "-p", "6379", "-n", "2000", "-c", "4", "-t", "set,get", "-q"]);
        String::from_utf8_lossy(&mesh.sb.run(c)?.stdout).to_string()
    };
    ensure!(bench.contains("SET:") && bench.contains("GET:"), "redis-benchmark: {bench}");
    let m = proxy.metrics()?;
    ensure!(m.sum("outrigger_requests_total", &[]) == 0.0, "redis is not HTTP");
    ensure!(m.sum("outrigger_protocol_detections_total", &[("result", "declared")]) >= 3.0, "6379 is declared opaque");
    Ok(())
}

/// A real Prometheus sees the requests per route and status that were
/// driven; the latency histograms are there; every panel of the requests
/// dashboard returns data; `outrigger stats` shows the routes.
#[test]
fn prometheus_sees_requests_per_route_and_the_dashboard_has_data() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "v1"]], &[])?;
    origin(&mesh.sb, mesh.pod("v1"), PORT, "v1", 0)?;
    let routes = r#"routes:
  - name: web
    parentRefs: [{name: web}]
    rules:
      - name: broken
        matches: [{path: {value: /broken}}]
        filters: [{type: Fault, fault: {abort: {httpStatus: 503}}}]
      - name: api
        matches: [{path: {value: /api}}]
"#;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    mesh.write_files(&meshed, &format!("{}{routes}", services_yaml(&[("web", "10.96.1.1", &["v1"])])))?;
    let proxy = mesh.start(0, &["--http", "true"])?;
    let prom = Prometheus::start(&mesh.sb, proxy.admin)?;
    let client = mesh.pod("client");
    for (path, count) in [("/api/x", 30), ("/broken", 20), ("/other", 10)] {
        drive(&mesh, client, "10.96.1.1", path, count, &[])?;
    }
    let mut expected = std::collections::BTreeMap::new();
    expected.insert(("web/api".to_string(), "200".to_string()), 30.0);
    expected.insert(("web/broken".to_string(), "503".to_string()), 20.0);
    expected.insert(("default".to_string(), "200".to_string()), 10.0);
    let q = "sum by (route, response_code) (outrigger_requests_total{reporter=\"outbound\",destination_service=\"web.default\"})";
    let seen = wait_for(Duration::from_secs(30), || {
        let got = prom.by_two(q, "route", "response_code").ok()?;
        (got == expected).then_some(())
    });
    ensure!(seen.is_some(), "Prometheus has {:?}, expected {expected:?}", prom.by_two(q, "route", "response_code")?);
    let histogram = prom.query("sum(outrigger_request_duration_seconds_count{destination_service=\"web.default\"})")?;
    ensure!(histogram.first().and_then(|r| r["value"][1].as_str()) == Some("60"), "latency histogram: {histogram:?}");
    for expr in dashboard_queries("outrigger-requests.json")? {
        let has_data = wait_for(Duration::from_secs(30), || (!prom.query(&expr).ok()?.is_empty()).then_some(()));
        ensure!(has_data.is_some(), "requests dashboard query returns no data: {expr}");
    }
    let stats = std::process::Command::new(outrigger_e2e::outrigger_bin())
        .args(["stats", "--admin-addr", &proxy.admin.to_string()])
        .output()?;
    let table = String::from_utf8_lossy(&stats.stdout);
    eprintln!("{table}");
    let row = table.lines().find(|l| l.contains("web/broken")).context("no route row in outrigger stats")?;
    ensure!(row.split_whitespace().nth(2) == Some("20") && row.contains("0.0%"), "broken route row: {row}");
    Ok(())
}

/// `--access-log off`: no access-log lines, connections or requests, while
/// the requests are still served and counted.
#[test]
fn access_log_off_logs_nothing_but_still_counts() -> Result<()> {
    let mesh = Mesh::new(&[&["client", "v1"]], &[])?;
    origin(&mesh.sb, mesh.pod("v1"), PORT, "v1", 0)?;
    let meshed: Vec<&Pod> = mesh.pods.iter().collect();
    mesh.write_files(&meshed, &services_yaml(&[("web", "10.96.1.1", &["v1"])]))?;
    let proxy = mesh.start(0, &["--access-log", "off"])?;
    let got = drive(&mesh, mesh.pod("client"), "10.96.1.1", "/", 3, &[])?;
    ensure!(n(&got, "bodies", "v1") == 3, "{got}");
    let counted = wait_for(Duration::from_secs(5), || {
        (proxy.metrics().ok()?.sum("outrigger_requests_total", &[]) >= 3.0).then_some(())
    });
    ensure!(counted.is_some(), "requests are counted with the access log off");
    let log = proxy.log_text();
    ensure!(!log.contains("outrigger::access"), "access-log lines with --access-log off:\n{log}");
    Ok(())
}
