//! The top of the program: parse the command line, run the command, turn
//! errors into a message and an exit code. The only place `anyhow` is used.
#![forbid(unsafe_code)]

use std::{
    process::ExitCode,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    capture::{self, Capture, CaptureOptions},
    config::{self, CaCommand, Cli, Command, MtlsMode, RunArgs, StatsArgs},
    identity::{self, CaSource, CertificateSource, DirSource, Identities, Identity},
    inbound::{Inbound, InboundSettings},
    metrics::{self, KernelCounters, Metrics, ProcessMetrics, ResultLabels},
    netns::sockets::current_netns_cookie,
    node::{self, status::NodeStatus, Node, NodeDeps},
    outbound::{Connector, Core, Outbound, OutboundSettings},
    sources::{
        file::{self, FileLimits, FileSource, Loaded},
        kubernetes::{self, KubeSettings},
        SourceStatus,
    },
    stats,
    store::{MeshReader, Store, StoreSettings},
    telemetry,
    tls::TlsConfigs,
    tunnel::{Pool, TunnelClient},
};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
        Command::Ca(command) => ca_command(command),
        Command::Stats(args) => stats_command(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrigger: error: {}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: most messages already include
/// their cause's text, and `{:#}` would print it a second time.
fn report(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn stats_command(args: &StatsArgs) -> anyhow::Result<()> {
    let mut previous = None;
    loop {
        let (table, taken) = stats::snapshot(args.admin_addr, &args.reporter, previous)?;
        previous = taken;
        if !args.watch {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and redraw in place.
        print!(
            "\x1b[2J\x1b[H{} {} traffic per destination service (every {:?})\n\n{table}",
            args.admin_addr, args.reporter, args.interval
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(args.interval);
    }
}

fn ca_command(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Init { dir, trust_domain, lifetime } => {
            config::check_trust_domain("trust-domain", &trust_domain)?;
            config::check_lifetime("lifetime", lifetime, config::MAX_CA_LIFETIME)?;
            let cert = identity::ca::init(&dir, &trust_domain, lifetime)?;
            println!(
                "wrote {} and its key; copy {} to every node and pass it as --ca-dir",
                cert.display(),
                dir.display()
            );
        }
        CaCommand::Issue { ca_dir, id, out, lifetime, backdate } => {
            config::check_lifetime("lifetime", lifetime, config::MAX_CERT_LIFETIME)?;
            if backdate > config::MAX_CERT_LIFETIME {
                anyhow::bail!("--backdate: {backdate:?} is more than {:?}", config::MAX_CERT_LIFETIME);
            }
            let id: Identity = id.parse()?;
            let ca = identity::ca::CertificateAuthority::load(&ca_dir)?;
            let issued = ca.issue(&id, lifetime, backdate)?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            std::fs::write(out.join("tls.crt"), issued.chain_pem)
                .with_context(|| format!("writing into {}", out.display()))?;
            identity::ca::write_private(&out.join("tls.key"), &issued.key_pem)?;
            println!("wrote {}/tls.crt and tls.key for {id}", out.display());
        }
    }
    Ok(())
}

/// Certificates, when a source is configured.
fn identities(args: &RunArgs) -> anyhow::Result<Option<Arc<Identities>>> {
    let source: Box<dyn CertificateSource> = match (&args.cert_dir, &args.ca_dir) {
        (Some(dir), _) => Box::new(DirSource::new(dir)),
        (None, Some(dir)) => Box::new(CaSource::new(dir, args.cert_lifetime)?),
        (None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(Identities::new(&args.trust_domain, source))))
}

/// Re-reads certificates (rotation, renewal) and closes idle tunnels.
async fn maintain_mtls(
    identities: Arc<Identities>,
    tunnels: Arc<TunnelClient>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let ids = identities.clone();
        // File reads and key generation: off the async workers.
        let _ = tokio::task::spawn_blocking(move || ids.refresh()).await;
        tunnels.reap();
    }
}

/// Drops the metric series of pods that left the node, and of peers that
/// left the mesh, once idle.
async fn sweep_metrics(metrics: Arc<Metrics>, mesh: MeshReader, idle: Duration, stop: CancellationToken) {
    let period = (idle / 4).clamp(Duration::from_millis(200), Duration::from_secs(30));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let pods = {
            let snapshot = mesh.load();
            let name = |k: &crate::model::PodKey| (k.namespace.to_string(), k.name.to_string());
            crate::metrics::LivePods {
                local: snapshot.local_workloads().keys().map(name).collect(),
                meshed: snapshot.workload_keys().map(name).collect(),
            }
        };
        let dropped =
            metrics.conns.sweep(&pods, idle) + metrics.requests.sweep(&pods) + metrics.resilience.sweep(&pods);
        if dropped > 0 {
            tracing::debug!(dropped, "metric series of departed pods dropped");
        }
    }
}

/// Watches a background task: if it ends before shutdown (a panic, or a
/// loop that should never return), `/ready` fails with its name and the
/// error is logged, instead of the proxy silently losing a duty.
fn supervise(
    name: &'static str,
    status: Arc<RwLock<NodeStatus>>,
    stop: CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let handle = tokio::spawn(task);
    tokio::spawn(async move {
        let result = handle.await;
        if stop.is_cancelled() {
            return;
        }
        let why = match result {
            Ok(()) => "ended".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(task = name, error = %why, "a background task stopped; the proxy reports not ready");
        status.write().unwrap_or_else(|e| e.into_inner()).failed_tasks.push(format!("{name} ({why})"));
    })
}

/// Like [`supervise`], for a task whose handle is awaited elsewhere: polls
/// whether it ended before shutdown.
fn watch_liveness(
    name: &'static str,
    task: tokio::task::AbortHandle,
    status: Arc<RwLock<NodeStatus>>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if task.is_finished() {
                tracing::error!(task = name, "a background task stopped; the proxy reports not ready");
                status.write().unwrap_or_else(|e| e.into_inner()).failed_tasks.push(format!("{name} (ended)"));
                return;
            }
        }
    });
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("outrigger");
    builder.worker_threads(args.worker_threads.unwrap_or_else(default_worker_threads));
    let runtime = builder.build().context("starting the async runtime")?;
    runtime.block_on(run(args))
}

/// Half the CPUs this process may run on, at least one (see
/// `--worker-threads`).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get() / 2).unwrap_or(1).max(1)
}

/// The addresses of the proxy's own network namespace (loopback aside): the
/// node's, when the proxy runs with the host network — where kubelet probes
/// come from.
fn own_addresses() -> Vec<ipnet::IpNet> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<ipnet::IpNet> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            let ip: std::net::IpAddr = match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => v4.ip().into(),
                (_, Some(v6)) => v6.ip().into(),
                _ => return None,
            };
            (!ip.is_loopback()).then(|| ipnet::IpNet::from(ip))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Every connection is two sockets and every pod keeps a few listeners and
/// spares: take the whole file-descriptor allowance the system grants.
/// Returns the limit in force.
fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
                soft
            }
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // `--access-log off`: the access-log target is filtered out entirely.
    let filter = match args.protocol.access_log {
        crate::config::AccessLog::Off => format!("{},outrigger::access=off", args.log_level),
        _ => args.log_level.clone(),
    };
    let log = telemetry::init(args.log_format, &filter)?;
    let open_files = raise_fd_limit();
    let pod_limits = args.pod_limits(open_files);
    tracing::info!(open_files, max_connections_per_pod = pod_limits.connections, "limits");
    let cgroup = capture::cgroup::resolve(args.cgroup2_path.as_deref())?;
    let own_netns_cookie =
        current_netns_cookie().context("reading the proxy's own netns cookie (needs Linux 5.14+)")?;
    let metrics = Arc::new(
        Metrics::new(args.connection_metrics, args.metrics_destination_addresses as usize)
            .with_detection_results(&detection_labels()),
    );

    // The store, fed by the mesh file. A bad file at start stops the proxy:
    // there is no last good state to keep.
    let store_settings = StoreSettings {
        trust_domain: args.trust_domain.clone(),
        balance: args.balance_settings(),
        breaker: args.resilience.breaker_limits(),
    };
    let store = Arc::new(Mutex::new(Store::new(store_settings.clone())));
    let (mesh, snapshots) = {
        let s = store.lock().unwrap_or_else(|e| e.into_inner());
        (s.reader(), s.subscribe())
    };
    let (source, source_status) = open_source(&args, store_settings, &store, &metrics).await?;

    let strict_allow = match &args.mtls_strict_allow {
        Some(nets) => nets.clone(),
        None => own_addresses(),
    };
    let capture = Arc::new(Capture::load(&CaptureOptions {
        cgroup: &cgroup,
        object: args.ebpf_object.as_deref(),
        mark: args.mark,
        delivery_mark: if args.inbound_original_source { args.delivery_mark } else { 0 },
        hbone_port: args.hbone_port,
        strict_allow: &strict_allow,
    })?);
    tracing::info!(cgroup = %cgroup.display(), programs = capture.attached().len(), "capture programs attached");

    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessMetrics::default()));
    registry.register_collector(Box::new(KernelCounters { capture: capture.clone(), mesh: mesh.clone() }));
    let registry = Arc::new(registry);

    let identities = identities(&args)?;
    if let Some(ids) = identities.clone() {
        // File reads and key generation: on a blocking thread.
        tokio::task::spawn_blocking(move || ids.refresh()).await.context("loading certificates")?;
    }
    let tls = identities.clone().map(|ids| Arc::new(TlsConfigs::new(ids)));
    let strict = args.mtls == MtlsMode::Strict;
    let tunnels = tls.clone().map(|tls| {
        // Pools are per connection thread: the CPUs shared among them.
        let per_peer = args.tunnel_connections_per_peer.unwrap_or_else(|| {
            let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            cpus.div_ceil(args.connection_threads()).max(1)
        });
        let pool = Pool::new(args.max_streams_per_connection as usize, per_peer, args.tunnel_idle_timeout);
        let keepalive = (!args.tunnel_keepalive_interval.is_zero()).then_some(args.tunnel_keepalive_interval);
        Arc::new(TunnelClient::new(tls, pool, args.hbone_port, args.connect_timeout, keepalive))
    });
    let connections = TaskTracker::new();
    let workers = Arc::new(crate::transport::Workers::start(
        args.connection_threads(),
        args.pin_connection_threads,
        connections.clone(),
    )?);
    tracing::info!(threads = workers.count(), "serving connections");
    let shutdown = CancellationToken::new();
    let drain_cut = CancellationToken::new();
    let relay = args.relay_options();
    let outbound = Arc::new(Outbound::new(
        Core {
            mesh: mesh.clone(),
            orig_dst: capture.clone(),
            connector: Connector { tunnels: tunnels.clone(), strict },
            metrics: metrics.clone(),
            settings: OutboundSettings {
                connect_timeout: args.connect_timeout,
                connect_attempts: args.connect_attempts,
                relay,
                detect_timeout: args.protocol.protocol_detect_timeout,
                opaque_ports: args.protocol.opaque_ports.clone().into(),
                http: args.protocol.http,
                http_layer: crate::outbound::HttpSettings {
                    resilience: args.resilience.defaults(),
                    ..args.protocol.http_settings()
                },
            },
            pools: Default::default(),
            drain_cut: drain_cut.clone(),
        },
        workers.clone(),
    ));
    let inbound = Arc::new(Inbound::new(
        mesh.clone(),
        tls.clone(),
        metrics.clone(),
        InboundSettings {
            connect_timeout: args.connect_timeout,
            handshake_timeout: args.tunnel_handshake_timeout,
            idle_timeout: args.tunnel_idle_timeout,
            max_pending_handshakes: args.max_pending_handshakes as usize,
            max_streams: args.max_streams_per_connection,
            reserved_ports: [args.outbound_port, args.hbone_port, args.inbound_port],
            relay,
            http: args.protocol.http,
            detect_timeout: args.protocol.protocol_detect_timeout,
            opaque_ports: args.protocol.opaque_ports.clone().into(),
        },
        Some(capture.clone()),
        workers.clone(),
        drain_cut.clone(),
    ));

    let status = Arc::new(RwLock::new(NodeStatus { capture_attached: true, ..Default::default() }));
    let admin_listener = admin::bind(args.admin_addr).await?;
    // The bound address (port 0 picks a free one).
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin_addr);
    tracing::info!(addr = %admin_addr, "admin server listening");
    let admin_stop = CancellationToken::new();
    let admin_state = Arc::new(AdminState {
        status: status.clone(),
        source: source_status.clone(),
        registry: registry.clone(),
        log,
        capture: capture.clone(),
        mesh: mesh.clone(),
        identities: identities.clone(),
        tunnels: tunnels.clone(),
        strict,
        settings: serde_json::json!({
            "connect_timeout_ms": args.connect_timeout.as_millis() as u64,
            "connect_attempts": args.connect_attempts,
            "buffer_size": args.buffer_size,
            "initial_buffer_size": args.initial_buffer_size,
            "mark": args.mark,
            "tcp_keepalive_idle_ms": args.tcp_keepalive_idle.as_millis() as u64,
            "tcp_user_timeout_ms": args.tcp_user_timeout.as_millis() as u64,
            // What a route rule or service that sets nothing gets.
            "resilience_defaults": {
                "request_timeout_ms": args.resilience.http_request_timeout.as_millis() as u64,
                "backend_request_timeout_ms": args.resilience.http_backend_request_timeout.as_millis() as u64,
                "retry_backoff_ms": args.resilience.retry_backoff.as_millis() as u64,
                "retry_max_backoff_ms": args.resilience.retry_max_backoff.as_millis() as u64,
                "retry_budget_ratio": args.resilience.retry_budget_ratio,
                "retry_budget_min_per_second": args.resilience.retry_budget_min_per_second,
                "retry_budget_window_ms": args.resilience.retry_budget_window.as_millis() as u64,
                "circuit_breaker": args.resilience.breaker_limits(),
            },
        }),
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, admin_stop.clone()));

    let mut node = Node::new(
        NodeDeps {
            capture: capture.clone(),
            outbound,
            inbound,
            mtls: tls.is_some(),
            inbound_capture: args.inbound_capture,
            inbound_port: args.inbound_port,
            delivery_mark: args.inbound_original_source.then_some(args.delivery_mark),
            delivery_sockets: args.delivery_socket_options(),
            identities: identities.clone(),
            metrics: metrics.clone(),
            sockets: args.socket_options(),
            limits: pod_limits,
            outbound_port: args.outbound_port,
            hbone_port: args.hbone_port,
            strict,
            own_netns_cookie,
            shutdown: shutdown.clone(),
        },
        status.clone(),
    );
    let mut snapshots = snapshots;
    let first = snapshots.borrow_and_update().clone();
    node.reconcile(&first).await;
    tracing::info!(pods = first.local_workloads().len(), source = %source_status.read().unwrap_or_else(|e| e.into_inner()).source,
        "pods of the first state meshed");

    let background = CancellationToken::new();
    let reconciler = tokio::spawn(node::run(node, snapshots, args.reload_interval, background.clone()));
    watch_liveness("reconciler", reconciler.abort_handle(), status.clone(), background.clone());
    match source {
        Source::File(source) => supervise(
            "mesh file watch",
            status.clone(),
            background.clone(),
            file::watch::run(
                source,
                store.clone(),
                source_status,
                metrics.clone(),
                args.reload_interval,
                background.clone(),
            ),
        ),
        Source::Kubernetes(client, settings) => supervise(
            "Kubernetes watch",
            status.clone(),
            background.clone(),
            kubernetes::run(client, settings, store.clone(), source_status, background.clone()),
        ),
    };
    if let (Some(ids), Some(t)) = (identities.clone(), tunnels.clone()) {
        supervise(
            "certificate refresh",
            status.clone(),
            background.clone(),
            maintain_mtls(ids, t, args.reload_interval, background.clone()),
        );
    }
    supervise(
        "metrics sweep",
        status.clone(),
        background.clone(),
        sweep_metrics(metrics.clone(), mesh.clone(), args.metrics_idle_timeout, background.clone()),
    );
    let textfile = args.textfile_dir.clone().map(|dir| {
        tracing::info!(dir = %dir.display(), interval = ?args.textfile_interval, "writing node-exporter textfile");
        let task =
            tokio::spawn(metrics::textfile::run(dir, args.textfile_interval, registry.clone(), background.clone()));
        watch_liveness("textfile writer", task.abort_handle(), status.clone(), background.clone());
        task
    });

    let signal = wait_for_signal().await?;
    tracing::info!(signal, drain_timeout = ?args.drain_timeout, "shutting down: un-meshing pods, draining connections");
    status.write().unwrap_or_else(|e| e.into_inner()).shutting_down = true;
    background.cancel();
    match reconciler.await {
        Ok(mut node) => node.unmesh_all().await,
        // Capture still detaches below when the programs are dropped.
        Err(e) => {
            tracing::error!(error = %e, "the reconciler stopped unexpectedly; detaching capture without un-meshing")
        }
    }
    shutdown.cancel();
    connections.close();
    let open = connections.len();
    if tokio::time::timeout(args.drain_timeout, connections.wait()).await.is_err() {
        tracing::warn!(
            cut = connections.len(),
            "drain deadline reached; resetting the connections still open (raise --drain-timeout to wait longer)"
        );
        // Cut connections end with a reset (never a clean, short EOF) and
        // their access-log lines (flag DC) are written before exit.
        drain_cut.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), connections.wait()).await;
    } else {
        tracing::info!(drained = open, "all connections finished");
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    if let Some(textfile) = textfile {
        let _ = textfile.await;
    }
    drop((store, registry));
    // Dropping the last handle on the capture detaches the programs.
    drop(capture);
    tracing::info!("capture programs detached; exiting");
    Ok(())
}

/// Where the mesh state comes from.
enum Source {
    File(Arc<Mutex<FileSource>>),
    Kubernetes(kube::Client, KubeSettings),
}

/// Opens the source of the mesh state. The mesh file is applied at once (a
/// bad file at start stops the proxy: there is no last good state to keep);
/// the Kubernetes API is only configured here — it may be unreachable at
/// start, which `/ready` reports while the watchers retry.
async fn open_source(
    args: &RunArgs,
    settings: StoreSettings,
    store: &Arc<Mutex<Store>>,
    metrics: &Metrics,
) -> anyhow::Result<(Source, Arc<RwLock<SourceStatus>>)> {
    let k = &args.kubernetes;
    if k.kubernetes {
        let client = kubernetes::client().await?;
        let settings = KubeSettings {
            node_name: k.node_name.clone(),
            host_proc: k.host_proc.clone(),
            cluster_domain: k.cluster_domain.clone(),
            rescan_interval: args.reload_interval,
        };
        tracing::info!(node = %settings.node_name, host_proc = %settings.host_proc.display(),
            "mesh state from the Kubernetes API");
        return Ok((Source::Kubernetes(client, settings), Arc::new(RwLock::new(kubernetes::status()))));
    }
    let limits = FileLimits { max_bytes: args.max_mesh_file_bytes, ..FileLimits::default() };
    let source = Arc::new(Mutex::new(FileSource::new(&args.pods_file, limits, settings)));
    let status = Arc::new(RwLock::new(SourceStatus::new(format!("mesh file {}", args.pods_file.display()))));
    match file::watch::load_blocking(&source).await.context("loading the mesh file at start")? {
        Loaded::Changed { changes, objects } => {
            let rejected = file::watch::apply(store, changes);
            status.write().unwrap_or_else(|e| e.into_inner()).applied(objects, rejected);
            metrics.config_reloads.get_or_create(&ResultLabels { result: "applied" }).inc();
        }
        Loaded::Unchanged => {}
    }
    Ok((Source::File(source), status))
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// The detection counters' labels, in `Outcome::ALL` order.
fn detection_labels() -> Vec<&'static str> {
    crate::outbound::detect::Outcome::ALL.iter().map(|o| o.label()).collect()
}
