//! `outrigger-storebench`: the store at cluster scale, for `cargo xtask bench --only store`.
//!
//! Issue #8 asks what one endpoint change costs with 10 000 services and
//! 100 000 endpoints in the store, and how much memory that state takes
//! (goals: < 1 ms per change, < 100 MB). This builds that state through
//! the store's public API — the way a source would feed it — then times
//! single-object changes, each followed by a publish (what makes a change
//! visible to the data path), and prints one JSON object on stdout.
//!
//! The state: 100 namespaces × 100 services, each with one IPv4 VIP, one
//! port (80 → 8080) and one hostname, and one endpoint slice of 10 ready
//! endpoints; each endpoint is a pod, listed as a workload of another node
//! (no netns, one IPv4 address, one label). Every object owns its strings,
//! as objects decoded from the Kubernetes API would (no interning across
//! objects), so the memory figure is not flattered by sharing.
//!
//! Memory is measured two ways: the process's resident set (statm) before
//! and after building and publishing — what a node pays, allocator slack
//! included — and the bytes live on the heap, counted by a wrapper around
//! the system allocator — what the state itself holds.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use outrigger::{
    balance::BalanceSettings,
    model::{Endpoint, EndpointSlice, Object, ObjectKey, ObjectRef, Service, ServicePort, TargetPort, Workload},
    store::{Store, StoreSettings},
};
use serde_json::json;

const NAMESPACES: usize = 100;
const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// Changes timed per kind: enough for a stable p99.
const CHANGES: usize = 2_000;
const SERVICE_CYCLES: usize = 1_000;

/// Counts the bytes live on the heap; the system allocator does the work.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// A global allocator can only be written with `unsafe`: these forward each
// call unchanged to `System`, so its contract is the caller's, passed on.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same layout, same contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same layout, same contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count_alloc(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with this layout.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            count_alloc(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() {
    if let Err(e) = run() {
        eprintln!("outrigger-storebench: {e:#}");
        std::process::exit(2);
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident set of this process in bytes: statm's second field, in pages.
fn rss_bytes() -> Result<usize> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: usize = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).context("parsing statm")?;
    Ok(pages * page_size()?)
}

/// The page size statm counts in, from the auxiliary vector the kernel gave
/// this process (`AT_PAGESZ`): no libc call, so no `unsafe`.
fn page_size() -> Result<usize> {
    const AT_PAGESZ: u64 = 6;
    let auxv = std::fs::read("/proc/self/auxv").context("reading /proc/self/auxv")?;
    let word = |b: &[u8]| b.try_into().map(u64::from_ne_bytes).unwrap_or(0);
    auxv.chunks_exact(16)
        .find(|pair| word(&pair[..8]) == AT_PAGESZ)
        .map(|pair| word(&pair[8..]) as usize)
        .context("no AT_PAGESZ in /proc/self/auxv")
}

fn namespace(service: usize) -> String {
    format!("ns-{:02}", service % NAMESPACES)
}

fn service_name(service: usize) -> String {
    format!("svc-{service:05}")
}

fn vip(service: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + service as u32))
}

/// Endpoint `e` of `service`: its pod's address, or (moved) another one.
fn endpoint_ip(service: usize, e: usize, moved: bool) -> IpAddr {
    let base = if moved { Ipv4Addr::new(10, 200, 0, 1) } else { Ipv4Addr::new(10, 128, 0, 1) };
    IpAddr::V4(Ipv4Addr::from(u32::from(base) + (service * ENDPOINTS_PER_SERVICE + e) as u32))
}

fn pod_name(service: usize, e: usize) -> String {
    format!("{}-{e}", service_name(service))
}

fn pod(service: usize, e: usize) -> Object {
    let name = pod_name(service, e);
    Object::Workload(Workload {
        uid: format!("uid-{name}").into(),
        key: ObjectKey::new(&namespace(service), &name),
        service_account: service_name(service).into(),
        node: Some(format!("node-{}", (service * ENDPOINTS_PER_SERVICE + e) % 500).into()),
        ips: vec![endpoint_ip(service, e, false)],
        labels: [("app".to_string(), service_name(service))].into(),
        netns: None,
    })
}

fn service_key(s: usize) -> ObjectKey {
    ObjectKey::new(&namespace(s), &service_name(s))
}

/// One slice per service, named like the ones Kubernetes generates.
fn slice_key(s: usize) -> ObjectKey {
    ObjectKey::new(&namespace(s), &format!("{}-abcde", service_name(s)))
}

fn service(s: usize) -> Object {
    let (ns, name) = (namespace(s), service_name(s));
    Object::Service(Service {
        key: service_key(s),
        vips: vec![vip(s)],
        hostnames: vec![format!("{name}.{ns}.svc.cluster.local").into()],
        ports: vec![ServicePort {
            name: None,
            port: PORT,
            app_protocol: None,
            target_port: TargetPort::Number(TARGET_PORT),
        }],
        circuit_breaker: Default::default(),
        inbound_rate_limit: None,
    })
}

/// What has been changed in a service's endpoints: bit `e` = endpoint `e`
/// not ready; bit `16 + e` = endpoint `e` moved to another address.
type SliceState = u32;
const MOVED: usize = 16;

fn slice(s: usize, state: SliceState) -> Object {
    let ns = namespace(s);
    Object::Endpoints(EndpointSlice {
        key: slice_key(s),
        service: service_name(s).into(),
        ports: vec![],
        endpoints: (0..ENDPOINTS_PER_SERVICE)
            .map(|e| Endpoint {
                address: endpoint_ip(s, e, state & (1 << (MOVED + e)) != 0),
                pod: Some(ObjectKey::new(&ns, &pod_name(s, e))),
                ready: state & (1 << e) == 0,
                terminating: false,
                weight: 1,
            })
            .collect(),
    })
}

/// The objects of one kind that service `s` brings. A slice's routes are
/// built when it is applied, so they are counted with the slices.
fn objects_of(kind: &str, s: usize) -> Vec<Object> {
    match kind {
        "pods" => (0..ENDPOINTS_PER_SERVICE).map(|e| pod(s, e)).collect(),
        "services" => vec![service(s)],
        _ => vec![slice(s, 0)],
    }
}

fn upsert(store: &mut Store, object: Object) -> Result<()> {
    store.upsert(object).map_err(|r| anyhow::anyhow!("{r}"))
}

/// p50, p99 and max of durations in µs.
fn percentiles(mut us: Vec<f64>) -> serde_json::Value {
    us.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| us.get(((us.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN);
    json!({ "p50_us": at(0.5), "p99_us": at(0.99), "max_us": at(1.0), "n": us.len() })
}

/// Applies `change` to the store, then publishes; returns the time of both in µs.
fn timed(store: &mut Store, change: impl FnOnce(&mut Store) -> Result<()>) -> Result<f64> {
    let started = Instant::now();
    change(store)?;
    store.publish();
    Ok(started.elapsed().as_secs_f64() * 1e6)
}

fn run() -> Result<()> {
    // Allocated before the baseline: bookkeeping of the benchmark, not state.
    let mut states: Vec<SliceState> = vec![0; SERVICES];
    let mut rng = fastrand::Rng::with_seed(8);
    let mut store = Store::new(StoreSettings {
        trust_domain: "cluster.local".into(),
        balance: BalanceSettings::default(),
        breaker: Default::default(),
    });
    let (rss_before, heap_before) = (rss_bytes()?, LIVE.load(Ordering::Relaxed));
    PEAK.store(heap_before, Ordering::Relaxed);

    // One kind of object after the other, with the heap after each kind:
    // where the memory goes.
    let started = Instant::now();
    let mut heap_by_kind = serde_json::Map::new();
    let mut heap_mark = heap_before;
    for kind in ["pods", "services", "slices"] {
        for s in 0..SERVICES {
            for object in objects_of(kind, s) {
                upsert(&mut store, object)?;
            }
        }
        let heap = LIVE.load(Ordering::Relaxed);
        heap_by_kind.insert(format!("{kind}_heap_mb"), json!(mib(heap.saturating_sub(heap_mark))));
        heap_mark = heap;
    }
    let snapshot = store.publish();
    let build = started.elapsed();
    let (rss_after, heap_after, heap_peak) = (rss_bytes()?, LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed));

    // The state is what it should be: every VIP routes to its 10 endpoints.
    if snapshot.service_count() != SERVICES || snapshot.workload_count() != SERVICES * ENDPOINTS_PER_SERVICE {
        bail!("built {} services and {} pods", snapshot.service_count(), snapshot.workload_count());
    }
    for s in [0, SERVICES / 2, SERVICES - 1] {
        let n = snapshot.route(SocketAddr::new(vip(s), PORT)).map(|r| r.balancer.endpoints().len());
        if n != Some(ENDPOINTS_PER_SERVICE) {
            bail!("service {s}'s VIP routes to {n:?} endpoints");
        }
    }
    drop(snapshot);

    // One endpoint of a random service: readiness flips, or it moves.
    let mut ready_flip = Vec::with_capacity(CHANGES);
    let mut address_change = Vec::with_capacity(CHANGES);
    for i in 0..2 * CHANGES {
        let s = rng.usize(..SERVICES);
        let e = rng.usize(..ENDPOINTS_PER_SERVICE);
        let (bit, times) = if i % 2 == 0 { (e, &mut ready_flip) } else { (MOVED + e, &mut address_change) };
        states[s] ^= 1 << bit;
        let object = slice(s, states[s]);
        times.push(timed(&mut store, |st| upsert(st, object))?);
    }
    // A whole service (service + its slice) removed, then added back.
    let (mut removes, mut adds) = (Vec::with_capacity(SERVICE_CYCLES), Vec::with_capacity(SERVICE_CYCLES));
    for _ in 0..SERVICE_CYCLES {
        let s = rng.usize(..SERVICES);
        let (service_ref, slice_ref) = (ObjectRef::Service(service_key(s)), ObjectRef::Endpoints(slice_key(s)));
        removes.push(timed(&mut store, |st| {
            st.delete(&service_ref);
            st.delete(&slice_ref);
            Ok(())
        })?);
        let (svc, eps) = (service(s), slice(s, states[s]));
        adds.push(timed(&mut store, |st| {
            upsert(st, svc)?;
            upsert(st, eps)
        })?);
    }
    let final_snapshot = store.publish();
    if final_snapshot.service_count() != SERVICES {
        bail!("{} services after the changes", final_snapshot.service_count());
    }

    let mut out = json!({
        "namespaces": NAMESPACES,
        "services": SERVICES,
        "endpoints": SERVICES * ENDPOINTS_PER_SERVICE,
        "pods": final_snapshot.workload_count(),
        "build_s": build.as_secs_f64(),
        "rss_before_mb": mib(rss_before),
        "rss_after_mb": mib(rss_after),
        "rss_mb": mib(rss_after.saturating_sub(rss_before)),
        "heap_mb": mib(heap_after.saturating_sub(heap_before)),
        "heap_peak_mb": mib(heap_peak.saturating_sub(heap_before)),
        "heap_after_changes_mb": mib(LIVE.load(Ordering::Relaxed).saturating_sub(heap_before)),
        "rss_after_changes_mb": mib(rss_bytes()?.saturating_sub(rss_before)),
        "endpoint_ready_flip": percentiles(ready_flip),
        "endpoint_address_change": percentiles(address_change),
        "service_removed": percentiles(removes),
        "service_added": percentiles(adds),
    });
    if let Some(out) = out.as_object_mut() {
        out.extend(heap_by_kind);
    }
    println!("{out}");
    Ok(())
}
