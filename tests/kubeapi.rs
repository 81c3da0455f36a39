//! The test API server (`outrigger_e2e::kubeapi`) against the real kube-rs
//! client and `runtime::watcher`: what kube asks for, and how the watcher
//! reacts to each fault the double can produce. No root needed.
//!
//! Run with `--nocapture` to see the requests kube made and the errors the
//! watcher yielded.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{
        Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PartialObjectMeta, ResourceExt, VersionMatch,
        WatchEvent, WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        watcher::{self, Event},
        WatchStreamExt,
    },
    Client, Config,
};
use outrigger_e2e::kubeapi::{self, EndpointDef, Kind, KubeApi, ServicePortDef};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

/// No test may take longer than this.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Nor wait longer than this for one event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(40);

static KUBECONFIGS: AtomicUsize = AtomicUsize::new(0);

/// A kube client made the way the proxy will make one: from a kubeconfig
/// file written by the double.
async fn client(api: &KubeApi) -> Result<Client> {
    let path = std::env::temp_dir().join(format!(
        "outrigger-kubeapi-{}-{}.yaml",
        std::process::id(),
        KUBECONFIGS.fetch_add(1, Ordering::Relaxed)
    ));
    api.write_kubeconfig(&path)?;
    let kubeconfig = Kubeconfig::read_from(&path)?;
    let _ = std::fs::remove_file(&path);
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn describe<K: kube::Resource>(event: &Event<K>) -> String {
    match event {
        Event::Init => "Init".into(),
        Event::InitDone => "InitDone".into(),
        Event::InitApply(o) => format!("InitApply {}", o.name_any()),
        Event::Apply(o) => format!("Apply {}", o.name_any()),
        Event::Delete(o) => format!("Delete {}", o.name_any()),
    }
}

type Item<K> = (Instant, Result<Event<K>, watcher::Error>);

/// A watcher driven by a task of its own (so the watch stays open while the
/// test acts), its items forwarded here.
struct Watched<K> {
    rx: mpsc::UnboundedReceiver<Item<K>>,
    task: JoinHandle<()>,
    errors: Vec<(Instant, String)>,
}

impl<K> Drop for Watched<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<K: kube::Resource + Send + 'static> Watched<K> {
    fn spawn(stream: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if tx.send((Instant::now(), item)).is_err() {
                    return;
                }
            }
        });
        Self { rx, task, errors: Vec::new() }
    }

    /// The next item, error or event.
    async fn next(&mut self) -> Result<Result<Event<K>, watcher::Error>> {
        let (at, item) = timeout(EVENT_TIMEOUT, self.rx.recv())
            .await
            .context("no watcher item in time")?
            .context("watcher ended")?;
        if let Err(e) = &item {
            eprintln!("watcher error: {e}");
            self.errors.push((at, e.to_string()));
        }
        Ok(item)
    }

    /// The next event, errors skipped (and kept in `errors`).
    async fn event(&mut self) -> Result<Event<K>> {
        loop {
            if let Ok(event) = self.next().await? {
                return Ok(event);
            }
        }
    }

    /// The next events described, errors skipped.
    async fn events(&mut self, n: usize) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(describe(&self.event().await?));
        }
        Ok(out)
    }

    /// Reads up to the next `InitDone`: the objects of that (last) init.
    async fn init(&mut self) -> Result<Vec<K>> {
        let mut objects = Vec::new();
        loop {
            match self.event().await? {
                Event::Init => objects.clear(),
                Event::InitApply(o) => objects.push(o),
                Event::InitDone => return Ok(objects),
                other => bail!("{} before InitDone", describe(&other)),
            }
        }
    }

    /// Asserts nothing arrives for `quiet`.
    async fn assert_quiet(&mut self, quiet: Duration) -> Result<()> {
        match timeout(quiet, self.rx.recv()).await {
            Err(_) => Ok(()),
            Ok(None) => bail!("watcher ended"),
            Ok(Some((_, Ok(e)))) => bail!("unexpected {}", describe(&e)),
            Ok(Some((_, Err(e)))) => bail!("unexpected error {e}"),
        }
    }
}

fn names<K: kube::Resource>(objects: &[K]) -> BTreeSet<String> {
    objects.iter().map(ResourceExt::name_any).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !check() {
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn web_pod(ns: &str, name: &str, node: &str, app: &str) -> Pod {
    let ip = format!("10.1.{}.{}", name.len(), fastrand::u8(1..250));
    kubeapi::pod(ns, name, node, &[&ip], &[("app", app)], "default", None)
}

fn run(test: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async { timeout(TEST_TIMEOUT, test).await.context("test timed out")? })
}

fn assert_all_served(api: &KubeApi) -> Result<()> {
    let unknown = api.unknown_requests();
    ensure!(unknown.is_empty(), "kube asked for what the double does not serve: {unknown:?}");
    Ok(())
}

#[test]
fn paging_lists_every_item_once_from_one_snapshot() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        for i in 0..1200 {
            let node = if i % 2 == 0 { "n1" } else { "n2" };
            api.apply(&web_pod("bulk", &format!("p{i:04}"), node, "web"))?;
        }
        let pods: Api<Pod> = Api::all(client(&api).await?);

        let first = pods.list(&ListParams::default().limit(500)).await?;
        let rv = first.metadata.resource_version.clone();
        ensure!(first.items.len() == 500, "page 1: {}", first.items.len());
        ensure!(first.metadata.remaining_item_count == Some(700));
        // Changes after the first page are not in the later pages.
        api.apply(&web_pod("bulk", "p9999", "n1", "web"))?;
        api.delete(Kind::Pod, "bulk", "p1199");
        let mut seen = names(&first.items);
        let mut token = first.metadata.continue_.clone();
        let mut pages = 1;
        while let Some(t) = token {
            let page = pods.list(&ListParams::default().limit(500).continue_token(&t)).await?;
            ensure!(page.metadata.resource_version == rv, "every page is from one snapshot");
            pages += 1;
            for p in &page.items {
                ensure!(seen.insert(p.name_any()), "{} listed twice", p.name_any());
            }
            token = page.metadata.continue_.clone();
        }
        ensure!(pages == 3, "{pages} pages");
        let expected: BTreeSet<String> = (0..1200).map(|i| format!("p{i:04}")).collect();
        ensure!(seen == expected, "the three pages are the snapshot's 1200 pods");
        ensure!(api.list_pages(Kind::Pod) == 3 && api.lists(Kind::Pod) == 1);

        // The watcher pages by 500 by default.
        let mut w = Watched::spawn(watcher(pods.clone(), watcher::Config::default()));
        let listed = w.init().await?;
        ensure!(listed.len() == 1200, "watcher listed {}", listed.len());
        ensure!(names(&listed).contains("p9999") && !names(&listed).contains("p1199"));
        ensure!(api.list_pages(Kind::Pod) == 6 && api.lists(Kind::Pod) == 2);
        eprintln!("requests: {:#?}", api.requests());
        assert_all_served(&api)
    })
}

fn watcher<K>(api: Api<K>, config: watcher::Config) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // As the proxy runs it: with kube's default backoff between retries.
    watcher::watcher(api, config).default_backoff()
}

#[test]
fn label_and_field_selectors() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        let mut tiered =
            kubeapi::pod("a", "tiered", "n2", &["10.0.0.9"], &[("app", "db"), ("tier", "back")], "db", None);
        if let Some(spec) = tiered.spec.as_mut() {
            spec.host_network = Some(true);
        }
        api.apply(&tiered)?;
        api.apply(&web_pod("a", "web-a", "n1", "web"))?;
        api.apply(&web_pod("b", "web-b", "n2", "web"))?;
        api.apply(&web_pod("b", "cache-b", "n1", "cache"))?;
        let client = client(&api).await?;
        let all: Api<Pod> = Api::all(client.clone());
        let list = |lp: ListParams| {
            let all = all.clone();
            async move { Ok::<_, anyhow::Error>(names(&all.list(&lp).await?.items)) }
        };
        let l = |s: &str| ListParams::default().labels(s);
        let f = |s: &str| ListParams::default().fields(s);
        ensure!(list(l("app=web")).await? == set(&["web-a", "web-b"]));
        ensure!(list(l("app!=web")).await? == set(&["cache-b", "tiered"]));
        ensure!(list(l("app in (web, cache)")).await? == set(&["web-a", "web-b", "cache-b"]));
        ensure!(list(l("app notin (web)")).await? == set(&["cache-b", "tiered"]));
        ensure!(list(l("tier")).await? == set(&["tiered"]));
        ensure!(list(l("!tier,app=db")).await?.is_empty());
        ensure!(list(f("spec.nodeName=n1")).await? == set(&["web-a", "cache-b"]));
        ensure!(list(f("spec.nodeName!=n1")).await? == set(&["web-b", "tiered"]));
        ensure!(list(f("metadata.namespace=b,metadata.name=web-b")).await? == set(&["web-b"]));
        ensure!(list(f("spec.hostNetwork=true")).await? == set(&["tiered"]));
        ensure!(list(l("app=web").fields("spec.nodeName=n2")).await? == set(&["web-b"]));
        let in_b: Api<Pod> = Api::namespaced(client.clone(), "b");
        ensure!(names(&in_b.list(&l("app")).await?.items) == set(&["web-b", "cache-b"]));
        match all.list(&f("spec.containers=x")).await {
            Err(kube::Error::Api(s)) if s.code == 400 => eprintln!("unsupported field: {}", s.message),
            other => bail!("expected a 400, got {other:?}"),
        }
        match all.list(&l("app in web")).await {
            Err(kube::Error::Api(s)) if s.code == 400 => {}
            other => bail!("expected a 400, got {other:?}"),
        }
        assert_all_served(&api)
    })
}

#[test]
fn watcher_follows_changes_through_its_selectors() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&web_pod("a", "web-1", "n1", "web"))?;
        api.apply(&web_pod("a", "web-2", "n2", "web"))?;
        api.apply(&web_pod("a", "db-1", "n1", "db"))?;
        let pods: Api<Pod> = Api::all(client(&api).await?);
        let config = watcher::Config::default().labels("app=web").fields("spec.nodeName=n1");
        let mut w = Watched::spawn(watcher(pods, config));
        ensure!(names(&w.init().await?) == set(&["web-1"]));

        api.apply(&web_pod("a", "web-3", "n1", "web"))?;
        let mut web3 = web_pod("a", "web-3", "n1", "web");
        web3.metadata.labels.get_or_insert_default().insert("v".into(), "2".into());
        api.apply(&web3)?;
        // Leaves the selection: a deletion for this watch.
        api.apply(&web_pod("a", "web-1", "n1", "db"))?;
        // Enters it: an addition.
        api.apply(&web_pod("a", "db-1", "n1", "web"))?;
        // Not selected before or after: nothing.
        api.apply(&web_pod("a", "web-2", "n2", "web-2"))?;
        api.delete(Kind::Pod, "a", "web-3");
        let got = w.events(5).await?;
        ensure!(got == ["Apply web-3", "Apply web-3", "Delete web-1", "Apply db-1", "Delete web-3"], "{got:?}");
        w.assert_quiet(Duration::from_millis(300)).await?;
        ensure!(w.errors.is_empty(), "{:?}", w.errors);
        ensure!(api.lists(Kind::Pod) == 1 && api.watches(Kind::Pod) == 1);
        assert_all_served(&api)
    })
}

#[test]
fn dropped_watch_resumes_from_its_version_without_relisting() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&web_pod("a", "p1", "n1", "web"))?;
        api.apply(&web_pod("a", "p2", "n1", "web"))?;
        let pods: Api<Pod> = Api::all(client(&api).await?);
        let mut w = Watched::spawn(watcher(pods, watcher::Config::default()));
        ensure!(names(&w.init().await?) == set(&["p1", "p2"]));
        wait_until("the watch is open", || api.open_watches() == 1).await?;
        let (lists, watches) = (api.lists(Kind::Pod), api.watches(Kind::Pod));

        api.drop_watches();
        api.apply(&web_pod("a", "p3", "n1", "web"))?;
        api.apply(&web_pod("a", "p1", "n1", "web-v2"))?;
        api.delete(Kind::Pod, "a", "p2");
        let got = w.events(3).await?;
        ensure!(got == ["Apply p3", "Apply p1", "Delete p2"], "{got:?}");
        wait_until("the watch is open again", || api.open_watches() == 1).await?;
        ensure!(api.lists(Kind::Pod) == lists, "no relist");
        ensure!(api.watches(Kind::Pod) == watches + 1, "one new watch");
        eprintln!("errors after a dropped watch: {:?}", w.errors);

        // A longer gap: the API is down while things change; the watch
        // resumes from its version and gets the changes from history.
        let errors = w.errors.len();
        api.set_down(true)?;
        api.apply(&web_pod("a", "p4", "n1", "web"))?;
        api.delete(Kind::Pod, "a", "p3");
        tokio::time::sleep(Duration::from_millis(300)).await;
        api.set_down(false)?;
        let got = w.events(2).await?;
        ensure!(got == ["Apply p4", "Delete p3"], "{got:?}");
        ensure!(api.lists(Kind::Pod) == lists, "still no relist");
        ensure!(w.errors.len() > errors, "the outage is reported");
        eprintln!("errors while down: {:?}", &w.errors[errors..]);
        eprintln!("requests: {:#?}", api.requests());
        assert_all_served(&api)
    })
}

#[test]
fn expired_version_relists_and_the_init_omits_what_was_deleted() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        for name in ["a", "b", "c"] {
            api.apply(&web_pod("ns", name, "n1", "web"))?;
        }
        let pods: Api<Pod> = Api::all(client(&api).await?);
        let old = pods.list(&ListParams::default().limit(2)).await?;
        let mut w = Watched::spawn(watcher(pods.clone(), watcher::Config::default()));
        ensure!(names(&w.init().await?) == set(&["a", "b", "c"]));
        wait_until("the watch is open", || api.open_watches() == 1).await?;
        let lists = api.lists(Kind::Pod);

        // Compaction alone does not disturb a watch that is caught up.
        api.compact();
        api.apply(&web_pod("ns", "e", "n1", "web"))?;
        ensure!(w.events(1).await? == ["Apply e"]);
        ensure!(api.lists(Kind::Pod) == lists);

        // The watcher misses a deletion, and its version expires meanwhile.
        api.set_down(true)?;
        api.delete(Kind::Pod, "ns", "b");
        api.apply(&web_pod("ns", "d", "n1", "web"))?;
        api.compact();
        api.set_down(false)?;
        let relisted = w.init().await?;
        ensure!(names(&relisted) == set(&["a", "c", "d", "e"]), "{:?}", names(&relisted));
        ensure!(api.lists(Kind::Pod) == lists + 1, "one relist");
        let gone = w.errors.iter().any(|(_, e)| e.contains("too old resource version"));
        ensure!(gone, "the 410 reached the watcher: {:?}", w.errors);
        eprintln!("errors on expiry: {:?}", w.errors);

        // A LIST at an expired version, or with an expired continue token.
        let exact = ListParams::default()
            .at(&old.metadata.resource_version.clone().unwrap_or_default())
            .matching(VersionMatch::Exact);
        match pods.list(&exact).await {
            Err(kube::Error::Api(s)) if s.code == 410 && s.reason == "Expired" => eprintln!("{}", s.message),
            other => bail!("expected 410, got {other:?}"),
        }
        let token = old.metadata.continue_.clone().context("a continue token")?;
        match pods.list(&ListParams::default().limit(2).continue_token(&token)).await {
            Err(kube::Error::Api(s)) if s.code == 410 => {}
            other => bail!("expected 410, got {other:?}"),
        }
        assert_all_served(&api)
    })
}

#[test]
fn down_at_start_retries_with_backoff_then_lists() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.set_down(true)?;
        api.apply(&web_pod("ns", "a", "n1", "web"))?;
        let pods: Api<Pod> = Api::all(client(&api).await?);
        let mut w = Watched::spawn(watcher(pods, watcher::Config::default()));
        // Init, then errors until the API is back: wait for three failed
        // lists (two gaps between retries; each wait bounded by
        // EVENT_TIMEOUT, not a time window).
        while w.errors.len() < 3 {
            if let Ok(e) = w.next().await? {
                ensure!(matches!(e, Event::Init), "only Init while down: {}", describe(&e));
            }
        }
        let errors: Vec<_> = w.errors.clone();
        ensure!(errors.iter().all(|(_, e)| e.contains("failed to perform initial object list")));
        let gaps: Vec<Duration> = errors.windows(2).map(|p| p[1].0 - p[0].0).collect();
        eprintln!("retries while down: {} errors, gaps {gaps:?}, first: {}", errors.len(), errors[0].1);
        ensure!(gaps.iter().all(|g| *g >= Duration::from_millis(300)), "backoff between retries");
        ensure!(api.lists(Kind::Pod) == 0);

        api.set_down(false)?;
        ensure!(names(&w.init().await?) == set(&["a"]));
        ensure!(api.lists(Kind::Pod) == 1);
        api.apply(&web_pod("ns", "b", "n1", "web"))?;
        ensure!(w.events(1).await? == ["Apply b"]);
        assert_all_served(&api)
    })
}

#[test]
fn one_malformed_object_fails_a_typed_list_whole() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&web_pod("ns", "good-1", "n1", "web"))?;
        api.apply(&web_pod("ns", "good-2", "n1", "web"))?;
        api.inject_malformed(Kind::Pod, "ns", "bad")?;
        let pods: Api<Pod> = Api::all(client(&api).await?);

        match pods.list(&ListParams::default()).await {
            Err(kube::Error::SerdeError(e)) => eprintln!("typed LIST: {e}"),
            other => bail!("expected a decode error, got {other:?}"),
        }
        // The typed watcher never gets past its initial list: Init, error,
        // Init, error, ... (the whole page fails, not one item).
        let mut w = Watched::spawn(watcher::watcher(pods.clone(), watcher::Config::default()));
        let mut inits = 0;
        for _ in 0..6 {
            match w.next().await? {
                Ok(Event::Init) => inits += 1,
                Ok(e) => bail!("unexpected {}", describe(&e)),
                Err(watcher::Error::InitialListFailed(kube::Error::SerdeError(_))) => {}
                Err(e) => bail!("unexpected error {e:?}"),
            }
        }
        ensure!(inits == 3 && api.lists(Kind::Pod) >= 3, "retried from scratch each time");
        drop(w);

        // On a live watch, one bad event is one error; the stream goes on,
        // but the watcher's version does not move past it.
        api.delete(Kind::Pod, "ns", "bad");
        let mut w = Watched::spawn(watcher(pods.clone(), watcher::Config::default()));
        ensure!(names(&w.init().await?) == set(&["good-1", "good-2"]));
        api.inject_malformed(Kind::Pod, "ns", "good-1")?;
        // kube-rs decodes each watch line as `WatchEvent<Pod>`; when that
        // fails it tries the line as a `Status` (for an error response
        // without a `type`), and as every field of kube's `Status` has a
        // default and unknown fields are ignored, the event line
        // `{"type":"MODIFIED","object":{...}}` decodes as an empty Status.
        // So a real server's undecodable event reaches the watcher as
        // `WatchFailed(Api(Status { code: 0, message: "", .. }))`, not as
        // a `SerdeError` (kube-client 4.2 `Client::request_events`).
        match w.next().await? {
            Err(watcher::Error::WatchFailed(kube::Error::Api(s)))
                if s.code == 0 && s.message.is_empty() && s.reason.is_empty() =>
            {
                eprintln!("typed WATCH: {s:?}")
            }
            other => bail!("expected an empty Status for an undecodable event, got {:?}", other.map(|e| describe(&e))),
        }
        api.apply(&web_pod("ns", "good-3", "n1", "web"))?;
        ensure!(w.events(1).await? == ["Apply good-3"]);

        // And any relist now fails for good: the typed watcher is stuck.
        // To force a relist the watcher must miss a change and then find
        // its version expired (compacting alone would not do: the watcher
        // is caught up, and a watch from the newest version is not expired,
        // so a dropped watch just resumes).
        api.set_down(true)?;
        api.apply(&web_pod("ns", "good-4", "n1", "web"))?;
        api.compact();
        api.set_down(false)?;
        let mut stuck = 0;
        while stuck < 2 {
            match w.next().await? {
                Err(watcher::Error::InitialListFailed(kube::Error::SerdeError(_))) => stuck += 1,
                Ok(Event::Init) | Err(_) => {}
                Ok(e) => bail!("unexpected {}", describe(&e)),
            }
        }
        Ok(())
    })
}

/// The way to skip one bad object: watch `DynamicObject`s of the same
/// resource (metadata typed, the rest kept as JSON) and decode each with
/// `try_parse`.
#[test]
fn dynamic_object_watcher_reports_one_malformed_object_and_keeps_the_rest() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&web_pod("ns", "good-1", "n1", "web"))?;
        // A pod on this node that turns malformed: `inject_malformed` keeps
        // its `spec.nodeName`, so the watcher's field selector still selects
        // it (a malformed pod created from nothing has no node, and a real
        // server would not list it for `spec.nodeName=n1`).
        api.apply(&web_pod("ns", "bad", "n1", "web"))?;
        api.inject_malformed(Kind::Pod, "ns", "bad")?;
        api.apply(&web_pod("ns", "good-2", "n1", "web"))?;
        let resource = ApiResource::erase::<Pod>(&());
        let pods: Api<DynamicObject> = Api::all_with(client(&api).await?, &resource);
        let config = watcher::Config::default().fields("spec.nodeName=n1");
        let mut w = Watched::spawn(watcher(pods, config));
        let decode = |o: DynamicObject| {
            let name = o.name_any();
            (name, o.try_parse::<Pod>().map_err(|e| e.to_string()))
        };
        let listed: Vec<_> = w.init().await?.into_iter().map(decode).collect();
        let good: BTreeSet<String> = listed.iter().filter(|(_, p)| p.is_ok()).map(|(n, _)| n.clone()).collect();
        let bad: Vec<_> = listed.iter().filter(|(_, p)| p.is_err()).collect();
        ensure!(good == set(&["good-1", "good-2"]), "{listed:?}");
        ensure!(bad.len() == 1 && bad[0].0 == "bad", "{bad:?}");
        eprintln!("skipped: {bad:?}");

        // Live: a good object turning bad, then fixed.
        api.inject_malformed(Kind::Pod, "ns", "good-2")?;
        match w.event().await? {
            Event::Apply(o) => ensure!(decode(o).1.is_err()),
            e => bail!("unexpected {}", describe(&e)),
        }
        api.apply(&web_pod("ns", "good-2", "n1", "web"))?;
        match w.event().await? {
            Event::Apply(o) => ensure!(decode(o).1.is_ok()),
            e => bail!("unexpected {}", describe(&e)),
        }
        // A relist with the bad object in it completes.
        api.set_down(true)?;
        api.delete(Kind::Pod, "ns", "good-1");
        api.compact();
        api.set_down(false)?;
        let relisted: Vec<_> = w.init().await?.into_iter().map(decode).collect();
        let relisted_names: BTreeSet<String> = relisted.iter().map(|(n, _)| n.clone()).collect();
        ensure!(relisted.len() == 2 && relisted_names == set(&["bad", "good-2"]), "{relisted:?}");
        ensure!(w.errors.iter().all(|(_, e)| !e.contains("invalid type")), "{:?}", w.errors);
        assert_all_served(&api)
    })
}

#[test]
fn services_slices_namespaces_policies_and_discovery() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&kubeapi::namespace("shop", &[("outrigger.dev/mesh", "enabled")]))?;
        api.apply(&kubeapi::namespace("plain", &[]))?;
        api.apply(&kubeapi::service(
            "shop",
            "cart",
            &["10.96.0.10", "fd00::10"],
            &[ServicePortDef::named("http", 80, "web").app_protocol("http")],
        ))?;
        api.apply(&kubeapi::service("shop", "headless", &[], &[ServicePortDef::new("tcp", 9000, 9000)]))?;
        api.apply(&kubeapi::endpoint_slice(
            "shop",
            "cart-abc",
            "cart",
            "IPv4",
            &[
                EndpointDef::ready("10.1.0.5", Some("cart-1"), Some("n1")),
                EndpointDef::ready("10.1.0.6", Some("cart-2"), Some("n2")).terminating(),
            ],
            &[("http", 8080)],
        ))?;
        api.apply(&kubeapi::authorization_policy(
            "shop",
            "allow-front",
            json!({"selector": {"matchLabels": {"app": "cart"}}, "action": "ALLOW",
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/front"]}}]}]}),
        ))?;
        let client = client(&api).await?;

        let namespaces: Api<Namespace> = Api::all(client.clone());
        let enrolled = namespaces.list(&ListParams::default().labels("outrigger.dev/mesh=enabled")).await?;
        ensure!(names(&enrolled.items) == set(&["shop"]));
        ensure!(namespaces.get("plain").await?.metadata.uid.is_some());

        let services: Api<Service> = Api::namespaced(client.clone(), "shop");
        let cart = services.get("cart").await?;
        let spec = cart.spec.context("spec")?;
        ensure!(spec.cluster_ips == Some(vec!["10.96.0.10".into(), "fd00::10".into()]));
        let headless = services.get("headless").await?.spec.context("spec")?;
        ensure!(headless.cluster_ip.as_deref() == Some("None"));
        match services.get("missing").await {
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            other => bail!("expected 404, got {other:?}"),
        }

        let slices: Api<EndpointSlice> = Api::all(client.clone());
        let listed = slices.list(&ListParams::default().labels("kubernetes.io/service-name=cart")).await?;
        let slice = listed.items.first().context("the slice")?;
        let conditions: Vec<_> = slice.endpoints.iter().map(|e| e.conditions.clone().unwrap_or_default()).collect();
        ensure!(conditions[1].terminating == Some(true) && conditions[1].ready == Some(false));

        // The CRD, watched as a dynamic object (group, version, kind).
        let gvk = GroupVersionKind::gvk("security.istio.io", "v1", "AuthorizationPolicy");
        let resource = ApiResource::from_gvk_with_plural(&gvk, "authorizationpolicies");
        let policies: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let mut w = Watched::spawn(watcher(policies, watcher::Config::default()));
        let init = w.init().await?;
        ensure!(init.len() == 1 && init[0].data["spec"]["action"] == "ALLOW");
        api.delete(Kind::AuthorizationPolicy, "shop", "allow-front");
        ensure!(w.events(1).await? == ["Delete allow-front"]);

        // On the wire, list items of built-in kinds have no apiVersion and
        // kind (the real server omits them), CRD items do.
        let raw = |path: &str| http::Request::get(path).body(Vec::new());
        let pods_json: serde_json::Value =
            client.request(raw("/apis/discovery.k8s.io/v1/endpointslices?limit=1")?).await?;
        ensure!(pods_json["kind"] == "EndpointSliceList" && pods_json["items"][0].get("kind").is_none());
        api.apply(&kubeapi::authorization_policy("shop", "p2", json!({})))?;
        let policies_json: serde_json::Value =
            client.request(raw("/apis/security.istio.io/v1/namespaces/shop/authorizationpolicies")?).await?;
        ensure!(policies_json["items"][0]["kind"] == "AuthorizationPolicy");

        // Discovery.
        let version = client.apiserver_version().await?;
        ensure!(version.major == "1" && version.minor == "32");
        let groups = client.list_api_groups().await?;
        ensure!(groups.groups.iter().any(|g| g.name == "security.istio.io"));
        let core = client.list_core_api_resources("v1").await?;
        ensure!(core.resources.iter().any(|r| r.name == "pods" && r.namespaced));
        ensure!(api.unknown_requests().is_empty());

        // Something it does not serve: a 404, logged.
        let deployments = client.request::<serde_json::Value>(raw("/apis/apps/v1/deployments")?).await;
        ensure!(matches!(deployments, Err(kube::Error::Api(ref s)) if s.code == 404));
        ensure!(api.unknown_requests() == ["GET /apis/apps/v1/deployments"]);
        Ok(())
    })
}

#[test]
fn raw_watch_bookmarks_timeout_and_initial_events() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.set_bookmark_interval(Duration::from_millis(300));
        api.apply(&web_pod("ns", "a", "n1", "web"))?;
        let pods: Api<Pod> = Api::all(client(&api).await?);
        let started = Instant::now();
        let mut stream = std::pin::pin!(pods.watch(&WatchParams::default().timeout(2), "0").await?);
        let mut added = Vec::new();
        let mut bookmarks = Vec::new();
        while let Some(event) = timeout(EVENT_TIMEOUT, stream.next()).await? {
            match event? {
                WatchEvent::Added(p) => added.push(p.name_any()),
                WatchEvent::Bookmark(b) => bookmarks.push(b.metadata.resource_version),
                other => bail!("unexpected {other:?}"),
            }
        }
        let elapsed = started.elapsed();
        ensure!(added == ["a"], "version 0: the current state first");
        ensure!(bookmarks.len() >= 3, "{bookmarks:?}");
        let rv = api.resource_version().to_string();
        ensure!(bookmarks.iter().all(|b| *b == rv));
        // Bookmarks keep the stream busy, so only the server's timeout can
        // have ended it: not before 2 s (the upper bound is only a bound
        // for failure, not a timing assertion).
        ensure!(elapsed >= Duration::from_secs(2) && elapsed < EVENT_TIMEOUT, "{elapsed:?}");

        // A watch from before the compaction point: one ERROR event (410).
        api.apply(&web_pod("ns", "b", "n1", "web"))?;
        api.compact();
        let mut stream = std::pin::pin!(pods.watch(&WatchParams::default(), "1001").await?);
        match timeout(EVENT_TIMEOUT, stream.next()).await? {
            Some(Ok(WatchEvent::Error(s))) if s.code == 410 => eprintln!("watch: {}", s.message),
            other => bail!("expected a 410 event, got {other:?}"),
        }
        ensure!(timeout(EVENT_TIMEOUT, stream.next()).await?.is_none(), "then the stream ends");

        // Streaming lists (sendInitialEvents) end the initial events with an
        // annotated bookmark.
        let mut w = Watched::spawn(watcher(pods.clone(), watcher::Config::default().streaming_lists()));
        ensure!(names(&w.init().await?) == set(&["a", "b"]));
        ensure!(api.lists(Kind::Pod) == 0);
        api.bookmark_now();
        api.delete(Kind::Pod, "ns", "a");
        ensure!(w.events(1).await? == ["Delete a"]);
        assert_all_served(&api)
    })
}

#[test]
fn metadata_only_watch() -> Result<()> {
    run(async {
        let api = KubeApi::start()?;
        api.apply(&web_pod("ns", "a", "n1", "web"))?;
        let pods: Api<PartialObjectMeta<Pod>> = Api::all(client(&api).await?);
        let listed = pods.list(&ListParams::default()).await?;
        ensure!(names(&listed.items) == set(&["a"]));
        let mut w = Watched::spawn(watcher(pods, watcher::Config::default()));
        let init = w.init().await?;
        ensure!(init[0].labels().get("app").map(String::as_str) == Some("web"));
        api.apply(&web_pod("ns", "b", "n1", "web"))?;
        ensure!(w.events(1).await? == ["Apply b"]);
        assert_all_served(&api)
    })
}

#[test]
fn kubeconfig_file_is_what_kube_reads() -> Result<()> {
    let api = KubeApi::start()?;
    let path: PathBuf = std::env::temp_dir().join(format!("outrigger-kubeconfig-{}", std::process::id()));
    api.write_kubeconfig(&path)?;
    let kubeconfig = Kubeconfig::read_from(&path)?;
    std::fs::remove_file(&path)?;
    let cluster = kubeconfig.clusters[0].cluster.clone().context("cluster")?;
    ensure!(cluster.server == Some(api.url()));
    ensure!(kubeconfig.current_context.as_deref() == Some("outrigger-test"));
    Ok(())
}
