//! A test double of the Kubernetes API server, faithful to what kube-rs's
//! `runtime::watcher` relies on.
//!
//! Why: no kube-apiserver can run on the test machines, and the proxy's
//! Kubernetes source must be tested end to end — through the real kube-rs
//! client, over HTTP — including the faults a real cluster produces: a
//! dropped watch, an expired resource version, an unreachable API, an
//! object that does not decode. [`KubeApi::start`] serves plain HTTP on
//! `127.0.0.1:<port>` from its own thread (so sync and async tests can both
//! use it) and [`KubeApi::write_kubeconfig`] points kube-rs at it
//! (`KUBECONFIG`).
//!
//! What it serves (read-only, like the proxy's RBAC):
//! - core/v1 `pods`, `services`, `namespaces`; `discovery.k8s.io/v1`
//!   `endpointslices`; `security.istio.io/v1` `authorizationpolicies` (a CRD:
//!   stored and served as plain JSON). Namespaced collection paths
//!   (`/api/v1/namespaces/{ns}/pods`), all-namespaces paths (`/api/v1/pods`),
//!   single objects (`GET …/pods/{name}`), and discovery (`/version`, `/api`,
//!   `/apis`, `/api/v1`, `/apis/{group}/{version}`).
//! - LIST with a consistent snapshot: `resourceVersion` + `resourceVersionMatch`
//!   (unset: most recent; `0` or `NotOlderThan`: the newest state; `Exact`, or
//!   a version with `limit`: that version's snapshot rebuilt from history),
//!   `limit` + `continue` (every page from the first page's snapshot, like
//!   etcd; `remainingItemCount` without selectors), `labelSelector` (`=`,
//!   `==`, `!=`, `in`, `notin`, `k`, `!k`), `fieldSelector` (`=`, `==`, `!=`
//!   on the fields the API server allows for the kind: `metadata.name`,
//!   `metadata.namespace`, pods' `spec.nodeName`, `spec.hostNetwork`,
//!   `status.phase`, `status.podIP`, …; others are a 400 as in Kubernetes).
//!   List items of built-in kinds carry no `apiVersion`/`kind` (the real
//!   server omits them; CRD items keep them).
//! - WATCH (`watch=true|1`): newline-delimited `ADDED`/`MODIFIED`/`DELETED`
//!   events after `resourceVersion`, filtered by the selectors with the
//!   watch cache's transitions (an object that stops matching is `DELETED`,
//!   one that starts matching is `ADDED`); no version or `0`: synthetic
//!   `ADDED` for the current state first; `sendInitialEvents=true`: then a
//!   `BOOKMARK` annotated `k8s.io/initial-events-end`; `allowWatchBookmarks`:
//!   a `BOOKMARK` with only `metadata.resourceVersion` every
//!   [`KubeApi::set_bookmark_interval`] (1 s) and on [`KubeApi::bookmark_now`];
//!   `timeoutSeconds`: the stream ends cleanly then. A version older than the
//!   compaction point: HTTP 200 and one `ERROR` event holding a `Status`
//!   (410, `Expired`, `too old resource version: N (M)`) — as the real
//!   server; for a LIST (`Exact` version or a `continue` token) it is an
//!   HTTP 410 with that `Status`.
//! - Metadata-only requests (`Accept: …;as=PartialObjectMetadata[List]…`,
//!   what `Api<PartialObjectMeta<K>>` sends) get `PartialObjectMetadata`.
//! - POSTed events (`/api/v1/namespaces/{ns}/events`,
//!   `/apis/events.k8s.io/v1/namespaces/{ns}/events`) are accepted and kept
//!   for [`KubeApi::posted_events`].
//! - One global resource version for all kinds (like etcd), stored in each
//!   object's `metadata.resourceVersion`; `uid` and `creationTimestamp`
//!   given on create; an update that changes nothing is a no-op; an update
//!   with a different `uid` is a deletion and a creation (two events).
//!
//! Faults, driven from the test: [`KubeApi::drop_watches`] (every open
//! watch connection is cut mid-stream), [`KubeApi::compact`] (history before
//! now forgotten: a watch or list from an older version gets 410),
//! [`KubeApi::set_down`] (the port refuses connections and open ones are
//! closed; the same port comes back), [`KubeApi::inject_malformed`] (an
//! object whose JSON does not decode into the typed struct, served in lists
//! and watches). Counters ([`KubeApi::lists`], [`KubeApi::list_pages`],
//! [`KubeApi::watches`]) and the request log ([`KubeApi::requests`],
//! [`KubeApi::unknown_requests`]) let a test assert what the client did.
//!
//! To make a watcher miss a change and then expire (what "410 relists and
//! removes what disappeared" needs): `set_down(true)`, change or delete,
//! `compact()`, `set_down(false)`. `compact()` alone leaves open, caught-up
//! watches running, as a real server's watch cache does; an open watch that
//! has not yet sent the changes before the compaction ends with the 410
//! event.
//!
//! What it does NOT emulate: writes other than events (POST/PUT/PATCH/DELETE
//! of resources are a 405: the test changes state through this handle, with
//! no `resourceVersion` preconditions or conflicts), authentication,
//! authorization and RBAC (every request is allowed; no TLS), admission,
//! defaulting and validation (objects are stored as given, which is what
//! makes a malformed one possible), server-side apply and `managedFields`,
//! graceful deletion (`delete` removes at once; set `deletionTimestamp` with
//! `apply` to show a terminating pod) and finalizers, namespace deletion
//! cascading to its objects, generation and status subresources, protobuf,
//! CBOR, YAML and table output, `fieldSelector` escapes, `Watch` via
//! `watchList` feature gates, HTTP/2, compression, aggregated discovery
//! (v2), continue-token expiry by time (only by compaction), automatic
//! compaction (history is kept until [`KubeApi::compact`]), the real server's
//! "too large resource version" wait (a LIST gets a 504 at once; a WATCH
//! from the future simply waits for that version), priority and fairness,
//! and any kind not listed above (404, logged).

mod objects;
mod selector;
mod server;
mod store;

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

pub use objects::{authorization_policy, endpoint_slice, namespace, pod, service, EndpointDef, ServicePortDef};

use store::Store;

/// A kind the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Service,
    Namespace,
    EndpointSlice,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] =
        [Kind::Pod, Kind::Service, Kind::Namespace, Kind::EndpointSlice, Kind::AuthorizationPolicy];

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Service | Kind::Namespace => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::AuthorizationPolicy => "security.istio.io",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Pod | Kind::Service | Kind::Namespace => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::AuthorizationPolicy => "security.istio.io/v1",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::Namespace => "Namespace",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::Pod => "pods",
            Kind::Service => "services",
            Kind::Namespace => "namespaces",
            Kind::EndpointSlice => "endpointslices",
            Kind::AuthorizationPolicy => "authorizationpolicies",
        }
    }

    pub fn namespaced(self) -> bool {
        self != Kind::Namespace
    }

    /// Built into the API server (list items lose their type), not a CRD.
    pub fn builtin(self) -> bool {
        self != Kind::AuthorizationPolicy
    }

    /// The kind of an object from its `apiVersion` and `kind`.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.api_version() == api_version && k.name() == kind)
    }

    fn from_path(group: &str, version: &str, plural: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.group() == group && version == "v1" && k.plural() == plural)
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    lists: u64,
    list_pages: u64,
    watches: u64,
}

/// What the server and the handle share.
struct Shared {
    store: Mutex<Store>,
    /// The store's version after each change (watches wake on it).
    changed: watch::Sender<u64>,
    /// Bumped to cut every open watch.
    drop_watches: watch::Sender<u64>,
    /// Bumped to close every open connection.
    drop_conns: watch::Sender<u64>,
    /// Bumped to send a bookmark on every watch that allows them.
    bookmark_now: watch::Sender<u64>,
    bookmark_interval_ms: AtomicU64,
    counts: Mutex<HashMap<Kind, Counts>>,
    open_watches: AtomicUsize,
    requests: Mutex<Vec<String>>,
    unknown: Mutex<Vec<String>>,
    events: Mutex<Vec<Value>>,
    addr: SocketAddr,
}

/// Locks, ignoring poisoning (a panicking test thread must not turn every
/// later request into a second panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keep at most this many request lines.
const MAX_LOGGED_REQUESTS: usize = 100_000;

impl Shared {
    fn count(&self, kind: Kind, f: impl FnOnce(&mut Counts)) {
        f(lock(&self.counts).entry(kind).or_default());
    }

    fn counts(&self, kind: Kind) -> Counts {
        lock(&self.counts).get(&kind).copied().unwrap_or_default()
    }

    fn log_request(&self, line: String) {
        let mut requests = lock(&self.requests);
        if requests.len() < MAX_LOGGED_REQUESTS {
            requests.push(line);
        }
    }
}

enum Control {
    /// Close the listener, then acknowledge.
    Down(std::sync::mpsc::SyncSender<()>),
    /// Serve on this listener again.
    Up(TcpListener),
    Shutdown,
}

/// A listening socket on `addr` with `SO_REUSEADDR`, so the port can be
/// bound again right after [`KubeApi::set_down`] closed it.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The running double. Dropping it stops the server.
pub struct KubeApi {
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
    thread: Option<JoinHandle<()>>,
    down: Mutex<bool>,
}

impl KubeApi {
    /// Binds `127.0.0.1:0` and serves from a thread of its own.
    pub fn start() -> Result<Self> {
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0))).context("binding the test API server")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(0),
            drop_watches: watch::Sender::new(0),
            drop_conns: watch::Sender::new(0),
            bookmark_now: watch::Sender::new(0),
            bookmark_interval_ms: AtomicU64::new(1000),
            counts: Mutex::new(HashMap::new()),
            open_watches: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
            unknown: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
            addr,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the test API server's runtime")?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kubeapi".into())
            .spawn(move || {
                runtime.block_on(server::serve(server_shared, listener, control_rx));
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .context("starting the test API server's thread")?;
        Ok(Self { shared, control, thread: Some(thread), down: Mutex::new(false) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// A kubeconfig for this server: plain HTTP, no credentials (kube-rs
    /// accepts `http://` clusters), current context's namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: outrigger-test
  cluster:
    server: {}
contexts:
- name: outrigger-test
  context:
    cluster: outrigger-test
    user: outrigger-test
    namespace: default
current-context: outrigger-test
users:
- name: outrigger-test
  user: {{}}
preferences: {{}}
",
            self.url()
        )
    }

    /// Writes [`Self::kubeconfig`] to `path` (for `KUBECONFIG`).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.kubeconfig()).with_context(|| format!("writing {}", path.display()))
    }

    /// Creates or updates an object: a `k8s-openapi` type (`Pod`, `Service`,
    /// `EndpointSlice`, `Namespace`) or a `serde_json::Value` with
    /// `apiVersion`, `kind` and `metadata` (AuthorizationPolicy). Returns the
    /// stored object (with `uid`, `creationTimestamp`, `resourceVersion`).
    pub fn apply<T: Serialize>(&self, obj: &T) -> Result<Value> {
        let obj = serde_json::to_value(obj).context("serializing the object")?;
        self.apply_json(obj)
    }

    /// [`Self::apply`] for JSON, stored as given (no validation: a test can
    /// store any shape a real cluster could hold through a CRD or a bug).
    pub fn apply_json(&self, mut obj: Value) -> Result<Value> {
        let text = |field: &str| obj.get(field).and_then(Value::as_str).unwrap_or_default().to_string();
        let (api_version, kind_name) = (text("apiVersion"), text("kind"));
        let kind = Kind::of(&api_version, &kind_name)
            .ok_or_else(|| anyhow!("the test API server does not serve {api_version} {kind_name}"))?;
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| anyhow!("{kind_name} without metadata"))?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| anyhow!("{kind_name} without metadata.name"))?
            .to_string();
        let ns = if kind.namespaced() {
            meta.get("namespace").and_then(Value::as_str).filter(|n| !n.is_empty()).unwrap_or("default").to_string()
        } else {
            String::new()
        };
        if kind.namespaced() {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        let (stored, changed) = lock(&self.shared.store).apply((kind, ns, name), obj);
        if changed {
            self.notify();
        }
        Ok((*stored).clone())
    }

    fn notify(&self) {
        let rv = lock(&self.shared.store).rv();
        self.shared.changed.send_replace(rv);
    }

    /// Deletes an object (`ns` is ignored for namespaces): watchers get a
    /// `DELETED` event with its last state. Returns whether it existed.
    pub fn delete(&self, kind: Kind, ns: &str, name: &str) -> bool {
        let ns = if kind.namespaced() { ns } else { "" };
        let deleted = lock(&self.shared.store).delete(&(kind, ns.to_string(), name.to_string()));
        if deleted {
            self.notify();
        }
        deleted
    }

    /// The stored object, if any.
    pub fn get(&self, kind: Kind, ns: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { ns } else { "" };
        lock(&self.shared.store).get(&(kind, ns.to_string(), name.to_string())).map(|v| (*v).clone())
    }

    /// The current global resource version.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.store).rv()
    }

    /// Stores an object of `kind` whose JSON will not deserialize into the
    /// `k8s-openapi` type (a Pod's `spec.containers` is a string, a
    /// Service's `spec.ports`, an EndpointSlice's `endpoints`, a Namespace's
    /// `spec.finalizers`, an AuthorizationPolicy's `spec.rules`): an
    /// existing object keeps its metadata (labels, uid) and the rest of its
    /// fields, so it still matches the selectors it matched (a `MODIFIED`
    /// event); otherwise a new one is created with only metadata and the
    /// bad field (so a field selector such as `spec.nodeName=n1` does not
    /// select it: `apply` a whole object first to have one that does).
    ///
    /// What kube-rs (4.x) makes of it: a typed LIST fails whole with
    /// `Error::SerdeError`; a typed WATCH yields `Error::Api` with an empty
    /// `Status` (code 0) for that event, because kube retries an
    /// undecodable line as a `Status`, whose fields all have defaults; a
    /// `DynamicObject` list or watch decodes it (`try_parse` then fails).
    pub fn inject_malformed(&self, kind: Kind, ns: &str, name: &str) -> Result<Value> {
        let mut obj = self.get(kind, ns, name).unwrap_or_else(|| {
            json!({
                "apiVersion": kind.api_version(),
                "kind": kind.name(),
                "metadata": {"name": name, "namespace": ns},
            })
        });
        let (field, inner) = match kind {
            Kind::Pod => ("spec", "containers"),
            Kind::Service => ("spec", "ports"),
            Kind::Namespace => ("spec", "finalizers"),
            Kind::AuthorizationPolicy => ("spec", "rules"),
            Kind::EndpointSlice => ("", "endpoints"),
        };
        let bad = json!("not-a-list: injected by the test API server");
        let Some(map) = obj.as_object_mut() else {
            bail!("stored object is not a JSON object");
        };
        if field.is_empty() {
            map.insert(inner.into(), bad);
            map.entry("addressType").or_insert(json!("IPv4"));
        } else {
            let spec = map.entry(field).or_insert_with(|| json!({}));
            if !spec.is_object() {
                *spec = json!({});
            }
            if let Some(spec) = spec.as_object_mut() {
                spec.insert(inner.into(), bad);
            }
        }
        self.apply_json(obj)
    }

    /// Cuts every open watch connection mid-stream (no terminating chunk),
    /// as a restarting API server or a load balancer would.
    pub fn drop_watches(&self) {
        self.shared.drop_watches.send_modify(|g| *g += 1);
    }

    /// Forgets all history: a watch or LIST from an older version now gets
    /// 410 Gone (see the module doc for open watches).
    pub fn compact(&self) {
        lock(&self.shared.store).compact();
        // Wake watches so that one behind the compaction point ends now.
        self.notify();
    }

    /// `true`: the port refuses connections and every open connection is
    /// closed. `false`: the same port serves again (bound before returning).
    pub fn set_down(&self, down: bool) -> Result<()> {
        let mut is_down = lock(&self.down);
        if *is_down == down {
            return Ok(());
        }
        if down {
            let (ack, acked) = std::sync::mpsc::sync_channel(1);
            self.control.send(Control::Down(ack)).map_err(|_| anyhow!("the test API server has stopped"))?;
            acked.recv_timeout(Duration::from_secs(10)).context("the test API server did not close its listener")?;
            self.shared.drop_conns.send_modify(|g| *g += 1);
        } else {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let listener = loop {
                match listen(self.addr()) {
                    Ok(l) => break l,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(e).with_context(|| format!("binding {} again", self.addr())),
                }
            };
            self.control.send(Control::Up(listener)).map_err(|_| anyhow!("the test API server has stopped"))?;
        }
        *is_down = down;
        Ok(())
    }

    /// Period of the `BOOKMARK` events on watches that allow them (for
    /// watches started after the call).
    pub fn set_bookmark_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
        self.shared.bookmark_interval_ms.store(ms, Ordering::Relaxed);
    }

    /// A `BOOKMARK` now on every open watch that allows them.
    pub fn bookmark_now(&self) {
        self.shared.bookmark_now.send_modify(|g| *g += 1);
    }

    /// LIST requests of `kind` that started a list (no `continue` token):
    /// initial lists and relists.
    pub fn lists(&self, kind: Kind) -> u64 {
        self.shared.counts(kind).lists
    }

    /// Every LIST request (page) of `kind`.
    pub fn list_pages(&self, kind: Kind) -> u64 {
        self.shared.counts(kind).list_pages
    }

    /// WATCH requests of `kind`.
    pub fn watches(&self, kind: Kind) -> u64 {
        self.shared.counts(kind).watches
    }

    /// Watch streams open now (all kinds).
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }

    /// Every request so far, as `METHOD /path?query` (first 100 000).
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Requests the double does not serve (answered 404 or 405).
    pub fn unknown_requests(&self) -> Vec<String> {
        lock(&self.shared.unknown).clone()
    }

    /// Event objects POSTed by clients.
    pub fn posted_events(&self) -> Vec<Value> {
        lock(&self.shared.events).clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = self.control.send(Control::Shutdown);
        // Close open connections too: their tasks end with the runtime.
        self.shared.drop_conns.send_modify(|g| *g += 1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
