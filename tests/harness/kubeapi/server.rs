//! The HTTP side of the double: connections, routing, LIST, WATCH, GET,
//! discovery and event POSTs.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::BodyExt;
use hyper::{
    body::{Body, Bytes, Frame, Incoming, SizeHint},
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{json, Value};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, MissedTickBehavior},
};

use super::{
    lock,
    selector::{FieldSelector, LabelSelector},
    store::{AtError, Change, ChangeType, Expired, Key},
    Control, Kind, Shared,
};

/// A response body: whole, or a watch stream fed by its task (an `Err`
/// aborts the connection mid-body).
pub enum ApiBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<io::Result<Bytes>>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ApiBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|item| item.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(d)) => SizeHint::with_exact(d.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// Accepts connections until shut down; [`Control`] closes and reopens the
/// listener.
pub(super) async fn serve(
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let mut listener = to_tokio(listener);
    loop {
        let msg = match &listener {
            Some(l) => tokio::select! {
                biased;
                msg = control.recv() => msg,
                accepted = l.accept() => {
                    match accepted {
                        Ok((stream, _)) => {
                            // As kube-apiserver (Go sets TCP_NODELAY on every
                            // connection): without it a small watch event can
                            // wait ~40 ms for the client's delayed ACK.
                            let _ = stream.set_nodelay(true);
                            spawn_connection(&shared, stream)
                        }
                        Err(e) => {
                            eprintln!("kubeapi: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                    continue;
                }
            },
            None => control.recv().await,
        };
        match msg {
            None | Some(Control::Shutdown) => return,
            Some(Control::Down(ack)) => {
                listener = None;
                let _ = ack.send(());
            }
            Some(Control::Up(l)) => listener = to_tokio(l),
        }
    }
}

fn to_tokio(listener: std::net::TcpListener) -> Option<TcpListener> {
    match TcpListener::from_std(listener) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("kubeapi: cannot serve on the listener: {e}");
            None
        }
    }
}

fn spawn_connection(shared: &Arc<Shared>, stream: TcpStream) {
    let mut kill = shared.drop_conns.subscribe();
    let shared = shared.clone();
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(handle(&shared, req).await) }
        });
        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        // Dropping the connection closes the socket: that is how
        // `set_down(true)` cuts keep-alive connections and watches.
        tokio::select! {
            _ = conn => {}
            _ = kill.changed() => {}
        }
    });
}

enum Route {
    Version,
    ApiVersions,
    ApiGroups,
    Resources(String),
    Collection { kind: Kind, ns: Option<String> },
    Object { kind: Kind, ns: Option<String>, name: String },
    Events { ns: String },
}

fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return Some(Route::Version),
        ["api"] => return Some(Route::ApiVersions),
        ["apis"] => return Some(Route::ApiGroups),
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let kind = |plural: &str| Kind::from_path(group, version, plural);
    let events = |plural: &str| plural == "events" && version == "v1" && (group.is_empty() || group == "events.k8s.io");
    match rest {
        [] => (version == "v1" && Kind::ALL.iter().any(|k| k.group() == group))
            .then(|| Route::Resources(group.to_string())),
        [plural] => kind(plural).map(|kind| Route::Collection { kind, ns: None }),
        ["namespaces", ns, plural] if events(plural) => Some(Route::Events { ns: ns.to_string() }),
        ["namespaces", ns, plural] => {
            kind(plural).filter(|k| k.namespaced()).map(|kind| Route::Collection { kind, ns: Some(ns.to_string()) })
        }
        [plural, name] => kind(plural).filter(|k| !k.namespaced()).map(|kind| Route::Object {
            kind,
            ns: None,
            name: name.to_string(),
        }),
        ["namespaces", ns, plural, name] => kind(plural).filter(|k| k.namespaced()).map(|kind| Route::Object {
            kind,
            ns: Some(ns.to_string()),
            name: name.to_string(),
        }),
        _ => None,
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `application/x-www-form-urlencoded` decoding.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 2;
                } else {
                    out.push(b);
                }
            }
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<ApiBody> {
    let mut res = Response::new(ApiBody::Full(Some(Bytes::from(body))));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn respond_json<T: Serialize>(status: StatusCode, body: &T) -> Response<ApiBody> {
    match serde_json::to_vec(body) {
        Ok(bytes) => respond(status, bytes),
        Err(e) => {
            status_response(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", format!("encoding the response: {e}"))
        }
    }
}

/// A `metav1.Status` failure, as the API server sends it.
fn status(code: StatusCode, reason: &str, message: String) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    })
}

fn status_response(code: StatusCode, reason: &str, message: String) -> Response<ApiBody> {
    respond_json(code, &status(code, reason, message))
}

fn bad_request(message: String) -> Response<ApiBody> {
    status_response(StatusCode::BAD_REQUEST, "BadRequest", message)
}

fn too_old_message(e: &Expired) -> String {
    format!("too old resource version: {} ({})", e.requested, e.oldest)
}

fn too_large() -> Response<ApiBody> {
    status_response(StatusCode::GATEWAY_TIMEOUT, "Timeout", "Too large resource version".to_string())
}

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<ApiBody> {
    let line = format!("{} {}", req.method(), req.uri().path_and_query().map_or("/", |p| p.as_str()));
    shared.log_request(line.clone());
    let query = parse_query(req.uri().query().unwrap_or_default());
    let meta_only = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let Some(route) = route(req.uri().path()) else {
        return not_served(shared, line, StatusCode::NOT_FOUND);
    };
    match (req.method(), route) {
        (&Method::GET, Route::Version) => respond_json(StatusCode::OK, &version_info()),
        (&Method::GET, Route::ApiVersions) => respond_json(
            StatusCode::OK,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}],
            }),
        ),
        (&Method::GET, Route::ApiGroups) => respond_json(StatusCode::OK, &api_groups()),
        (&Method::GET, Route::Resources(group)) => respond_json(StatusCode::OK, &api_resources(&group)),
        (&Method::GET, Route::Collection { kind, ns }) => {
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                watch(shared, kind, ns, &query, meta_only)
            } else {
                list(shared, kind, ns.as_deref(), &query, meta_only)
            }
        }
        (&Method::GET, Route::Object { kind, ns, name }) => get_object(shared, kind, ns, name, meta_only),
        (&Method::POST, Route::Events { ns }) => post_event(shared, ns, req).await,
        _ => not_served(shared, line, StatusCode::METHOD_NOT_ALLOWED),
    }
}

fn not_served(shared: &Shared, line: String, code: StatusCode) -> Response<ApiBody> {
    eprintln!("kubeapi: not served ({code}): {line}");
    lock(&shared.unknown).push(line.clone());
    let reason = if code == StatusCode::NOT_FOUND { "NotFound" } else { "MethodNotAllowed" };
    status_response(code, reason, format!("the test API server does not serve {line}"))
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-outrigger-test-double",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn api_groups() -> Value {
    let groups: Vec<Value> = ["discovery.k8s.io", "security.istio.io"]
        .iter()
        .map(|g| {
            let gv = json!({"groupVersion": format!("{g}/v1"), "version": "v1"});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn api_resources(group: &str) -> Value {
    let resources: Vec<Value> = Kind::ALL
        .iter()
        .filter(|k| k.group() == group)
        .map(|k| {
            json!({
                "name": k.plural(),
                "singularName": k.name().to_lowercase(),
                "namespaced": k.namespaced(),
                "kind": k.name(),
                "verbs": ["get", "list", "watch"],
            })
        })
        .collect();
    let group_version = if group.is_empty() { "v1".to_string() } else { format!("{group}/v1") };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources})
}

/// One object as served: whole, without its type (list items of built-in
/// kinds), or as `PartialObjectMetadata`.
struct ItemView<'a> {
    obj: &'a Value,
    strip_type: bool,
    meta_only: bool,
}

impl Serialize for ItemView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.meta_only {
            let mut m = s.serialize_map(Some(3))?;
            m.serialize_entry("apiVersion", "meta.k8s.io/v1")?;
            m.serialize_entry("kind", "PartialObjectMetadata")?;
            m.serialize_entry("metadata", self.obj.get("metadata").unwrap_or(&Value::Null))?;
            return m.end();
        }
        match self.obj.as_object() {
            Some(map) if self.strip_type => {
                let mut m = s.serialize_map(None)?;
                for (k, v) in map {
                    if k != "apiVersion" && k != "kind" {
                        m.serialize_entry(k, v)?;
                    }
                }
                m.end()
            }
            _ => self.obj.serialize(s),
        }
    }
}

struct ListBody<'a> {
    kind: Kind,
    rv: u64,
    continue_: Option<String>,
    remaining: Option<usize>,
    items: &'a [&'a Value],
    meta_only: bool,
}

impl Serialize for ListBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(4))?;
        if self.meta_only {
            m.serialize_entry("kind", "PartialObjectMetadataList")?;
            m.serialize_entry("apiVersion", "meta.k8s.io/v1")?;
        } else {
            m.serialize_entry("kind", &format!("{}List", self.kind.name()))?;
            m.serialize_entry("apiVersion", self.kind.api_version())?;
        }
        let mut meta = json!({"resourceVersion": self.rv.to_string()});
        if let Some(c) = &self.continue_ {
            meta["continue"] = json!(c);
        }
        if let Some(r) = self.remaining {
            meta["remainingItemCount"] = json!(r);
        }
        m.serialize_entry("metadata", &meta)?;
        m.serialize_entry("items", &Items(self))?;
        m.end()
    }
}

struct Items<'a>(&'a ListBody<'a>);

impl Serialize for Items<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.items.len()))?;
        for obj in self.0.items {
            seq.serialize_element(&ItemView { obj, strip_type: self.0.kind.builtin(), meta_only: self.0.meta_only })?;
        }
        seq.end()
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let decoded = bytes
        .chunks(2)
        .map(|pair| Some(hex_value(pair[0])? << 4 | hex_value(pair[1])?))
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(decoded).ok()
}

/// An opaque continue token: the snapshot's version and the last key sent.
fn continue_token(rv: u64, key: &Key) -> String {
    format!("{rv}.{}.{}", hex(&key.1), hex(&key.2))
}

fn parse_continue(token: &str) -> Option<(u64, (String, String))> {
    let mut parts = token.split('.');
    let rv = parts.next()?.parse().ok()?;
    let ns = unhex(parts.next()?)?;
    let name = unhex(parts.next()?)?;
    parts.next().is_none().then_some((rv, (ns, name)))
}

fn selectors(kind: Kind, query: &HashMap<String, String>) -> Result<(LabelSelector, FieldSelector), String> {
    let get = |k: &str| query.get(k).map_or("", String::as_str);
    Ok((LabelSelector::parse(get("labelSelector"))?, FieldSelector::parse(kind, get("fieldSelector"))?))
}

fn list(
    shared: &Shared,
    kind: Kind,
    ns: Option<&str>,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Response<ApiBody> {
    let (labels, fields) = match selectors(kind, query) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let limit = match query.get("limit").filter(|s| !s.is_empty()).map(|s| s.parse::<usize>()) {
        None | Some(Ok(0)) => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return bad_request("limit must be a non-negative integer".to_string()),
    };
    let token = query.get("continue").filter(|s| !s.is_empty());
    shared.count(kind, |c| {
        c.list_pages += 1;
        if token.is_none() {
            c.lists += 1;
        }
    });
    // Which snapshot: `at` (None: the newest) and where the page starts.
    let (at, start) = match token {
        Some(token) => match parse_continue(token) {
            Some((rv, key)) => (Some(rv), Some(key)),
            None => return bad_request("continue key is not valid".to_string()),
        },
        None => match query.get("resourceVersion").filter(|s| !s.is_empty()) {
            None => (None, None),
            Some(rv) => {
                let Ok(n) = rv.parse::<u64>() else {
                    return bad_request(format!("invalid resource version {rv:?}"));
                };
                let exact = match query.get("resourceVersionMatch").map(String::as_str) {
                    Some("Exact") => true,
                    Some("NotOlderThan") | Some("") => false,
                    // Legacy: a version with a limit is an exact read.
                    None => limit.is_some() && n != 0,
                    Some(other) => return bad_request(format!("unsupported resourceVersionMatch {other:?}")),
                };
                if exact {
                    (Some(n), None)
                } else if n > lock(&shared.store).rv() {
                    return too_large();
                } else {
                    (None, None)
                }
            }
        },
    };
    let snapshot = lock(&shared.store).snapshot(kind, at);
    let (rv, objects) = match snapshot {
        Ok(s) => s,
        Err(AtError::TooLarge(_)) => return too_large(),
        Err(AtError::Expired(e)) => {
            let message = if token.is_some() {
                "The provided continue parameter is too old to display a consistent list result. \
                 You can start a new list without the continue parameter, or use the continue \
                 value from the response."
                    .to_string()
            } else {
                too_old_message(&e)
            };
            return status_response(StatusCode::GONE, "Expired", message);
        }
    };
    let mut selected = objects.iter().filter(|((_, ons, oname), obj)| {
        ns.is_none_or(|ns| ons == ns)
            && start.as_ref().is_none_or(|(sns, sname)| (ons, oname) > (sns, sname))
            && labels.matches(obj)
            && fields.matches(kind, obj)
    });
    let mut page: Vec<&(Key, Arc<Value>)> = Vec::new();
    for item in selected.by_ref() {
        page.push(item);
        if limit.is_some_and(|l| page.len() >= l) {
            break;
        }
    }
    let rest = selected.count();
    let continue_ = match page.last() {
        Some((key, _)) if rest > 0 => Some(continue_token(rv, key)),
        _ => None,
    };
    let remaining = (continue_.is_some() && labels.is_empty() && fields.is_empty()).then_some(rest);
    let items: Vec<&Value> = page.iter().map(|(_, obj)| obj.as_ref()).collect();
    respond_json(StatusCode::OK, &ListBody { kind, rv, continue_, remaining, items: &items, meta_only })
}

fn get_object(shared: &Shared, kind: Kind, ns: Option<String>, name: String, meta_only: bool) -> Response<ApiBody> {
    let key = (kind, ns.unwrap_or_default(), name);
    let found = lock(&shared.store).get(&key);
    match found {
        Some(obj) => respond_json(StatusCode::OK, &ItemView { obj: &obj, strip_type: false, meta_only }),
        None => {
            let resource = if kind.group().is_empty() {
                kind.plural().to_string()
            } else {
                format!("{}.{}", kind.plural(), kind.group())
            };
            let mut body = status(StatusCode::NOT_FOUND, "NotFound", format!("{resource} {:?} not found", key.2));
            body["details"] = json!({"name": key.2, "group": kind.group(), "kind": kind.plural()});
            respond_json(StatusCode::NOT_FOUND, &body)
        }
    }
}

async fn post_event(shared: &Shared, ns: String, req: Request<Incoming>) -> Response<ApiBody> {
    let body = match http_body_util::Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad_request(format!("reading the body: {e}")),
    };
    let mut event: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("the body is not JSON: {e}")),
    };
    if let Some(meta) = event.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("namespace".into(), json!(ns));
        meta.insert("uid".into(), json!(super::store::new_uid()));
        meta.insert("resourceVersion".into(), json!("1"));
        if let Some(prefix) = meta.get("generateName").and_then(Value::as_str) {
            if !meta.contains_key("name") {
                let name = format!("{prefix}{:05x}", fastrand::u32(..1 << 20));
                meta.insert("name".into(), json!(name));
            }
        }
    }
    lock(&shared.events).push(event.clone());
    respond_json(StatusCode::CREATED, &event)
}

/// What a watch selects: kind, namespace and selectors.
struct Filter {
    kind: Kind,
    ns: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, key: &Key, obj: &Value) -> bool {
        self.ns.as_ref().is_none_or(|ns| *ns == key.1)
            && self.labels.matches(obj)
            && self.fields.matches(self.kind, obj)
    }

    /// The event a change is for this watch, with the watch cache's
    /// transitions: leaving the selection is `DELETED`, entering it `ADDED`.
    fn event(&self, change: &Change) -> Option<&'static str> {
        let now = self.matches(&change.key, &change.object);
        let before = change.prev.as_ref().is_some_and(|prev| self.matches(&change.key, prev));
        match change.ty {
            ChangeType::Added => now.then_some("ADDED"),
            ChangeType::Deleted => now.then_some("DELETED"),
            ChangeType::Modified => match (before, now) {
                (true, true) => Some("MODIFIED"),
                (true, false) => Some("DELETED"),
                (false, true) => Some("ADDED"),
                (false, false) => None,
            },
        }
    }
}

enum Start {
    /// The current state as `ADDED` events first.
    Now,
    After(u64),
}

struct WatchSpec {
    filter: Filter,
    start: Start,
    initial_events_end: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
    meta_only: bool,
}

fn watch(
    shared: &Arc<Shared>,
    kind: Kind,
    ns: Option<String>,
    query: &HashMap<String, String>,
    meta_only: bool,
) -> Response<ApiBody> {
    let (labels, fields) = match selectors(kind, query) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let flag = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
    let initial_events_end = flag("sendInitialEvents");
    let start = match query.get("resourceVersion").map(String::as_str) {
        _ if initial_events_end => Start::Now,
        None | Some("") | Some("0") => Start::Now,
        Some(rv) => match rv.parse::<u64>() {
            Ok(n) => Start::After(n),
            Err(_) => return bad_request(format!("invalid resource version {rv:?}")),
        },
    };
    let timeout = match query.get("timeoutSeconds").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => return bad_request(format!("invalid timeoutSeconds {s:?}")),
        },
    };
    shared.count(kind, |c| c.watches += 1);
    let spec = WatchSpec {
        filter: Filter { kind, ns, labels, fields },
        start,
        initial_events_end,
        bookmarks: flag("allowWatchBookmarks"),
        timeout,
        meta_only,
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(watch_task(shared.clone(), spec, tx));
    let mut res = Response::new(ApiBody::Stream(rx));
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn push_json<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    match serde_json::to_writer(&mut *out, value) {
        Ok(()) => out.push(b'\n'),
        Err(e) => eprintln!("kubeapi: encoding a watch event: {e}"),
    }
}

struct EventView<'a> {
    ty: &'static str,
    object: ItemView<'a>,
}

impl Serialize for EventView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("type", self.ty)?;
        m.serialize_entry("object", &self.object)?;
        m.end()
    }
}

fn push_event(out: &mut Vec<u8>, ty: &'static str, obj: &Value, meta_only: bool) {
    let object = ItemView { obj, strip_type: false, meta_only };
    push_json(out, &EventView { ty, object });
}

fn push_bookmark(out: &mut Vec<u8>, kind: Kind, rv: u64, meta_only: bool, initial_events_end: bool) {
    let (kind_name, api_version) =
        if meta_only { ("PartialObjectMetadata", "meta.k8s.io/v1") } else { (kind.name(), kind.api_version()) };
    let mut metadata = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    push_json(
        out,
        &json!({"type": "BOOKMARK", "object": {"kind": kind_name, "apiVersion": api_version, "metadata": metadata}}),
    );
}

/// Sends what is buffered; `false` when the client has gone.
async fn flush(tx: &mpsc::Sender<io::Result<Bytes>>, out: &mut Vec<u8>) -> bool {
    if out.is_empty() {
        return true;
    }
    tx.send(Ok(Bytes::from(std::mem::take(out)))).await.is_ok()
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Counts an open watch while it lives.
struct OpenWatch<'a>(&'a Shared);

impl Drop for OpenWatch<'_> {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::Relaxed);
    }
}

const FLUSH_BYTES: usize = 64 * 1024;

async fn watch_task(shared: Arc<Shared>, spec: WatchSpec, tx: mpsc::Sender<io::Result<Bytes>>) {
    shared.open_watches.fetch_add(1, Ordering::Relaxed);
    let _open = OpenWatch(&shared);
    let kind = spec.filter.kind;
    let mut changed = shared.changed.subscribe();
    let mut dropped = shared.drop_watches.subscribe();
    let mut bookmark_now = shared.bookmark_now.subscribe();
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let period = Duration::from_millis(shared.bookmark_interval_ms.load(Ordering::Relaxed).max(1));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut out = Vec::new();
    let mut pos = match spec.start {
        Start::After(n) => n,
        Start::Now => {
            changed.borrow_and_update();
            let snapshot = lock(&shared.store).snapshot(kind, None);
            let Ok((rv, objects)) = snapshot else {
                return;
            };
            for (key, obj) in &objects {
                if spec.filter.matches(key, obj) {
                    push_event(&mut out, "ADDED", obj, spec.meta_only);
                    if out.len() >= FLUSH_BYTES && !flush(&tx, &mut out).await {
                        return;
                    }
                }
            }
            if spec.initial_events_end {
                push_bookmark(&mut out, kind, rv, spec.meta_only, true);
            }
            rv
        }
    };
    loop {
        changed.borrow_and_update();
        let changes = {
            let store = lock(&shared.store);
            let changes = store.changes_since(kind, pos);
            if changes.is_ok() {
                pos = pos.max(store.rv());
            }
            changes
        };
        match changes {
            Err(expired) => {
                let error = status(StatusCode::GONE, "Expired", too_old_message(&expired));
                push_json(&mut out, &json!({"type": "ERROR", "object": error}));
                flush(&tx, &mut out).await;
                return;
            }
            Ok(changes) => {
                for change in &changes {
                    if let Some(ty) = spec.filter.event(change) {
                        push_event(&mut out, ty, &change.object, spec.meta_only);
                        if out.len() >= FLUSH_BYTES && !flush(&tx, &mut out).await {
                            return;
                        }
                    }
                }
            }
        }
        if !flush(&tx, &mut out).await {
            return;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = dropped.changed() => {
                // An error from the body makes hyper abort the connection
                // mid-stream: the client sees the watch cut, not ended.
                let _ = tx.send(Err(io::Error::other("watch dropped by the test API server"))).await;
                return;
            }
            () = sleep_until(deadline) => return,
            _ = ticker.tick(), if spec.bookmarks => push_bookmark(&mut out, kind, pos, spec.meta_only, false),
            r = bookmark_now.changed(), if spec.bookmarks => {
                if r.is_err() {
                    return;
                }
                push_bookmark(&mut out, kind, pos, spec.meta_only, false);
            }
            () = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let collection = |p: &str| match route(p) {
            Some(Route::Collection { kind, ns }) => Some((kind, ns)),
            _ => None,
        };
        assert_eq!(collection("/api/v1/pods"), Some((Kind::Pod, None)));
        assert_eq!(collection("/api/v1/namespaces/a/pods"), Some((Kind::Pod, Some("a".into()))));
        assert_eq!(collection("/api/v1/namespaces"), Some((Kind::Namespace, None)));
        assert_eq!(collection("/apis/discovery.k8s.io/v1/endpointslices"), Some((Kind::EndpointSlice, None)));
        assert_eq!(
            collection("/apis/security.istio.io/v1/namespaces/x/authorizationpolicies"),
            Some((Kind::AuthorizationPolicy, Some("x".into())))
        );
        assert!(matches!(route("/api/v1/namespaces/foo"), Some(Route::Object { kind: Kind::Namespace, ns: None, .. })));
        assert!(matches!(route("/apis/events.k8s.io/v1/namespaces/foo/events"), Some(Route::Events { .. })));
        assert!(route("/api/v1/namespaces/a/namespaces").is_none());
        assert!(route("/apis/apps/v1/deployments").is_none());
        assert!(route("/healthz").is_none());
    }

    #[test]
    fn query_and_tokens() {
        let q = parse_query("labelSelector=app%3Dweb%2Ctier+in+%28a%2Cb%29&limit=5&watch");
        assert_eq!(q["labelSelector"], "app=web,tier in (a,b)");
        assert_eq!(q["limit"], "5");
        assert_eq!(q["watch"], "");
        let key = (Kind::Pod, "ns-1".to_string(), "p.q".to_string());
        let token = continue_token(42, &key);
        assert_eq!(parse_continue(&token), Some((42, ("ns-1".into(), "p.q".into()))));
        assert_eq!(parse_continue("x"), None);
    }
}
