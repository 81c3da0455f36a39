//! The mesh file: parsing, translation, whole-file validation, per-object
//! diffs, and refusal of hostile files.

use std::{io::Write, path::PathBuf, time::Instant};

use super::*;
use crate::{balance::BalanceSettings, model::TargetPort, store::StoreSettings};

fn settings() -> StoreSettings {
    StoreSettings {
        trust_domain: "cluster.local".into(),
        balance: BalanceSettings::default(),
        breaker: Default::default(),
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("outrigger-unit-{tag}-{}-{}", std::process::id(), fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
    fn file(&self, text: &str) -> PathBuf {
        let path = self.0.join("mesh.yaml");
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses `text` as a whole file: the objects, or the error message.
fn parse(text: &str) -> Result<Vec<Object>, String> {
    let dir = TempDir::new("parse");
    let mut source = FileSource::new(&dir.file(text), FileLimits::default(), settings());
    match source.load() {
        Ok(Loaded::Changed { changes, .. }) => Ok(changes
            .into_iter()
            .filter_map(|c| match c {
                Change::Upsert(o) => Some(o),
                Change::Delete(_) => None,
            })
            .collect()),
        Ok(Loaded::Unchanged) => Err("unchanged".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn workloads(objects: &[Object]) -> Vec<&crate::model::Workload> {
    objects.iter().filter_map(|o| if let Object::Workload(w) = o { Some(w) } else { None }).collect()
}

fn slices(objects: &[Object]) -> Vec<&crate::model::EndpointSlice> {
    objects.iter().filter_map(|o| if let Object::Endpoints(e) = o { Some(e) } else { None }).collect()
}

#[test]
fn parses_pods_with_defaults() {
    let objects =
        parse("pods:\n  - name: a\n    netns: /var/run/netns/a\n    ips: [10.0.0.1, 'fd00::1']\n").expect("valid");
    let pod = workloads(&objects)[0];
    assert_eq!(&*pod.key.namespace, "default");
    assert_eq!(&*pod.service_account, "default");
    assert_eq!(pod.ips.len(), 2);
    assert!(pod.is_local());
    assert!(parse("").expect("empty file").is_empty());
}

#[test]
fn rejects_unknown_fields_with_location() {
    let msg = parse("pods:\n  - name: a\n    netns: /x\n    ipz: []\n").expect_err("unknown field");
    assert!(msg.contains("ipz") && msg.contains("not valid mesh YAML"), "{msg}");
    assert!(msg.contains("line") || msg.contains(":4"), "no location in {msg}");
}

#[test]
fn rejects_duplicates_and_conflicts() {
    let dup_ip = "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.1]}\n  - {name: b, netns: /n/b, ips: [10.0.0.1]}\n";
    assert!(parse(dup_ip).expect_err("dup ip").contains("both claim 10.0.0.1"));
    let dup_netns = "pods:\n  - {name: a, netns: /n/a}\n  - {name: b, netns: /n/a}\n";
    assert!(parse(dup_netns).expect_err("dup netns").contains("share netns"));
    let dup_name = "pods:\n  - {name: a, netns: /n/a}\n  - {name: a, netns: /n/b}\n";
    assert!(parse(dup_name).expect_err("dup").contains("listed twice"));
}

#[test]
fn rejects_bad_names_and_addresses() {
    assert!(parse("pods:\n  - {name: A_b, netns: /n/a}\n").is_err());
    assert!(parse("pods:\n  - {name: a, netns: relative}\n").expect_err("relative").contains("absolute"));
    assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [127.0.0.1]}\n").is_err());
    assert!(parse("pods:\n  - {name: a, netns: /n/a, ips: [not-an-ip]}\n").is_err());
    assert!(parse("pods:\n  - {name: r}\n").expect_err("no ips").contains("neither"));
}

const PODS: &str = "pods:\n  - {name: web-0, namespace: shop, netns: /n/w0, ips: [10.0.0.5, 'fd00::5'], ports: [{name: http, port: 8081}]}\n";

fn with_services(services: &str) -> String {
    format!("{PODS}services:\n{services}")
}

#[test]
fn services_become_a_service_and_endpoint_slices() {
    let text = with_services(
        "  - name: web\n    namespace: shop\n    vips: [10.96.0.10, 'fd00:96::10']\n    ports: [{port: 80, targetPort: 8080, protocol: http}]\n    endpoints:\n      - pod: web-0\n      - {address: 10.0.0.9, weight: 2}\n",
    );
    let objects = parse(&text).expect("valid");
    let svc = objects.iter().find_map(|o| if let Object::Service(s) = o { Some(s) } else { None }).expect("service");
    assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
    assert_eq!(svc.ports[0].app_protocol, Some(crate::model::AppProtocol::Http));
    let slices = slices(&objects);
    assert_eq!(slices.len(), 1, "same resolved ports: one slice");
    let addrs: Vec<String> = slices[0].endpoints.iter().map(|e| e.address.to_string()).collect();
    assert_eq!(addrs, ["10.0.0.5", "fd00::5", "10.0.0.9"], "a pod endpoint is each of its addresses");
    assert_eq!(slices[0].endpoints[2].weight, 2);
    assert_eq!(slices[0].endpoints[0].pod.as_ref().map(|k| k.to_string()), Some("shop/web-0".into()));
}

#[test]
fn unnamed_ports_of_a_multi_port_service_are_named_by_number() {
    let text = with_services(
        "  - name: web\n    namespace: shop\n    vips: [10.96.0.10]\n    ports: [{port: 80, targetPort: 8080}, {port: 81, targetPort: 8081}]\n    endpoints: [{pod: web-0}]\n",
    );
    let objects = parse(&text).expect("valid, as before names were required");
    let ports: Vec<(String, u16)> =
        slices(&objects)[0].ports.iter().map(|p| (p.name.as_deref().unwrap_or("").to_string(), p.port)).collect();
    assert_eq!(ports, [("80".to_string(), 8080), ("81".to_string(), 8081)]);
}

#[test]
fn named_target_ports_resolve_per_pod() {
    let text = with_services(
        "  - name: web\n    namespace: shop\n    vips: [10.96.0.10]\n    ports: [{name: web, port: 80, targetPort: http}]\n    endpoints: [{pod: web-0}]\n",
    );
    let objects = parse(&text).expect("valid");
    let slices = slices(&objects);
    assert_eq!(slices[0].ports.len(), 1);
    assert_eq!(slices[0].ports[0].port, 8081);
    let bad = with_services(
        "  - name: web\n    namespace: shop\n    vips: [10.96.0.10]\n    ports: [{port: 80, targetPort: grpc}]\n    endpoints: [{pod: web-0}]\n",
    );
    assert!(parse(&bad).expect_err("unknown port name").contains("no port named grpc"));
}

#[test]
fn rejects_what_an_operator_would_get_wrong() {
    let cases = [
        ("  - {name: web, vips: [], ports: [{port: 80}]}\n", "no vips"),
        ("  - {name: web, vips: [10.96.0.1], ports: []}\n", "no ports"),
        ("  - {name: web, vips: [10.0.0.5], ports: [{port: 80}]}\n", "pod shop/web-0's address"),
        ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{pod: nope}]}\n", "no pod default/nope"),
        (
            "  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{pod: web-0, address: 10.0.0.1}]}\n",
            "exactly one",
        ),
        ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}], endpoints: [{address: 10.0.0.1, weight: 0}]}\n", "weight 0"),
        ("  - {name: a, vips: [10.96.0.1], ports: [{port: 80}]}\n  - {name: b, vips: [10.96.0.1], ports: [{port: 80}]}\n", "both claim"),
        ("  - {name: web, vips: [10.96.0.1], ports: [{port: 80}, {port: 80}]}\n", "port 80 twice"),
    ];
    for (services, expect) in cases {
        let err = parse(&with_services(services)).expect_err(expect);
        assert!(err.contains(expect), "{expect:?} not in {err:?}");
    }
}

#[test]
fn policies_parse_and_invalid_ones_are_refused() {
    let objects = parse("authorization:\n  - {name: p, action: allow, selector: {serviceAccounts: [db]}, rules: [{principals: ['spiffe://cluster.local/ns/default/sa/a'], ports: [5432]}]}\n").expect("valid");
    assert!(matches!(objects[0], Object::Policy(_)));
    assert!(parse("authorization:\n  - {name: p, action: deny, rules: [{principals: ['sa/a']}]}\n")
        .expect_err("bad principal")
        .contains("spiffe://"));
    assert!(parse("authorization:\n  - {name: p, action: maybe}\n").is_err());
}

#[test]
fn a_changed_file_yields_only_the_changed_objects() {
    let dir = TempDir::new("diff");
    let two = "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.1]}\n  - {name: b, netns: /n/b, ips: [10.0.0.2]}\n";
    let path = dir.file(two);
    let mut source = FileSource::new(&path, FileLimits::default(), settings());
    assert!(matches!(source.load(), Ok(Loaded::Changed { ref changes, .. }) if changes.len() == 2));
    assert!(matches!(source.load(), Ok(Loaded::Unchanged)));
    // Rewriting it with a comment changes bytes, not objects: nothing to do.
    std::fs::write(&path, format!("# touched\n{two}")).expect("write");
    assert!(matches!(source.load(), Ok(Loaded::Changed { ref changes, .. }) if changes.is_empty()));
    // One pod moves, one leaves, one arrives.
    std::fs::write(
        &path,
        "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.9]}\n  - {name: c, netns: /n/c, ips: [10.0.0.3]}\n",
    )
    .expect("write");
    let Ok(Loaded::Changed { changes, .. }) = source.load() else { panic!("changed") };
    let summary: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::Upsert(o) => format!("upsert {}", o.object_ref()),
            Change::Delete(r) => format!("delete {r}"),
        })
        .collect();
    assert_eq!(summary, ["delete pod default/b", "upsert pod default/a", "upsert pod default/c"]);
}

#[test]
fn a_bad_file_is_refused_and_the_next_good_one_clears_it() {
    let dir = TempDir::new("bad");
    let good = "pods:\n  - {name: a, netns: /n/a, ips: [10.0.0.1]}\n";
    let path = dir.file(good);
    let mut source = FileSource::new(&path, FileLimits::default(), settings());
    source.load().expect("good");
    std::fs::write(&path, "pods: [unclosed\n").expect("write");
    let err = source.load().expect_err("bad");
    // The cause appears once, and the file is named.
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    assert!(matches!(source.load(), Ok(Loaded::Unchanged)), "the same bad bytes are reported once");
    std::fs::remove_file(&path).expect("rm");
    let err = source.load().expect_err("missing").to_string();
    assert_eq!(err.matches("No such file").count(), 1, "cause printed once: {err}");
    std::fs::write(&path, good).expect("restore");
    assert!(
        matches!(source.load(), Ok(Loaded::Changed { ref changes, .. }) if changes.is_empty()),
        "the restored file parses again (so its error clears) and changes nothing"
    );
}

#[test]
fn fifos_devices_and_huge_files_are_refused_without_blocking() {
    let dir = TempDir::new("hostile");
    let fifo = dir.0.join("fifo.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).expect("mkfifo");
    let mut source = FileSource::new(&fifo, FileLimits::default(), settings());
    assert!(matches!(source.load(), Err(FileError::NotRegular { kind: "a FIFO", .. })));

    let zero = dir.0.join("zero.yaml");
    std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
    let mut source = FileSource::new(&zero, FileLimits::default(), settings());
    assert!(matches!(source.load(), Err(FileError::NotRegular { kind: "a character device", .. })));

    let big = dir.0.join("big.yaml");
    let mut f = std::fs::File::create(&big).expect("create");
    f.write_all(&vec![b'#'; 2048]).expect("write");
    let mut source = FileSource::new(&big, FileLimits { max_bytes: 1024, max_depth: 32 }, settings());
    assert!(matches!(source.load(), Err(FileError::TooLarge { limit: 1024, .. })));
}

#[test]
fn deep_nesting_is_refused_quickly() {
    let dir = TempDir::new("deep");
    let start = Instant::now();
    let mut source = FileSource::new(&dir.file(&"[".repeat(100_000)), FileLimits::default(), settings());
    let err = source.load().expect_err("too deep").to_string();
    assert!(err.contains("not valid mesh YAML"), "{err}");
    eprintln!("100 000 nested '[' refused in {:?}", start.elapsed());
}

#[test]
fn routes_translate_into_the_model_and_bad_ones_are_refused_by_location() {
    let routes = "routes:\n  - name: r\n    parentRefs: [{name: web, port: 80}]\n    rules:\n      - name: canary\n        matches: [{headers: [{name: x-version, value: v2}], method: GET}]\n        filters:\n          - {type: Fault, fault: {abort: {httpStatus: 503, percentage: 50}, headerControl: true}}\n          - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}, fraction: {numerator: 1, denominator: 4}}}\n        backendRefs: [{name: web-v2, port: 80, weight: 10}]\n";
    let svc = "  - name: web\n    vips: [10.96.0.10]\n    ports: [{port: 80}]\n";
    let objects = parse(&format!("{}{routes}", with_services(svc))).expect("valid");
    let route =
        objects.iter().find_map(|o| if let Object::Route(r) = o { Some(r) } else { None }).expect("a route object");
    assert_eq!(route.parents[0].service, crate::model::ObjectKey::new("default", "web"));
    assert_eq!(route.parents[0].port, Some(80));
    let rule = &route.rules[0];
    assert_eq!(rule.matches[0].method, Some(http::Method::GET));
    assert_eq!(rule.backends[0].weight, 10);
    assert!(
        matches!(&rule.filters[0], crate::model::Filter::Fault(f) if f.header_control && f.abort.map(|a| a.0) == Some(503))
    );
    assert!(
        matches!(&rule.filters[1], crate::model::Filter::RequestMirror { share, .. } if share.0 == 250_000),
        "{:?}",
        rule.filters[1]
    );
    let bad = |rules: &str, want: &str| {
        let text =
            format!("{}routes:\n  - name: r\n    parentRefs: [{{name: web}}]\n    rules:\n{rules}", with_services(svc));
        let err = parse(&text).expect_err("refused");
        assert!(err.contains(want), "{err}");
    };
    bad("      - filters: [{type: URLRewrite}]\n", "filter type \"URLRewrite\" is not supported");
    bad("      - matches: [{path: {type: RegularExpression, value: '('}}]\n", "regular expression");
    bad("      - matches: [{path: {type: Exact, value: nope}}]\n", "must start with '/'");
    bad("      - filters: [{type: Fault, fault: {abort: {httpStatus: 99}}}]\n", "outside 200..=599");
    bad("      - backendRefs: [{name: x, port: 80, kind: Pod}]\n", "only Service references");
}
