//! The top of the program: parse the command line, run the command, turn
//! errors into a message and an exit code.
#![forbid(unsafe_code)]

use std::{
    process::ExitCode,
    sync::{Arc, RwLock},
};

use anyhow::Context;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, AdminState},
    capture::{self, Capture, CaptureOptions},
    config::{CaCommand, Cli, Command, MtlsMode, RunArgs, StatsArgs},
    identity::{self, CaSource, CertificateSource, DirSource, Identities, Identity},
    mesh::watch::FileWatch,
    metrics::{self, KernelCounters, Metrics, ProcessMetrics},
    netns::sockets::current_netns_cookie,
    node::{self, status::NodeStatus, Node},
    proxy::{ForwardSettings, Mtls, Proxy},
    stats, telemetry,
    tls::TlsConfigs,
    tunnel::Pool,
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
            eprintln!("outrigger: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn stats_command(args: &StatsArgs) -> anyhow::Result<()> {
    loop {
        let table = stats::snapshot(args.admin_addr, &args.reporter)?;
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
            let cert = identity::ca::init(&dir, &trust_domain, lifetime)?;
            println!(
                "wrote {} and its key; copy {} to every node and pass it as --ca-dir",
                cert.display(),
                dir.display()
            );
        }
        CaCommand::Issue { ca_dir, id, out, lifetime, backdate } => {
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

/// Mutual TLS when a certificate source is configured.
fn mtls(args: &RunArgs) -> anyhow::Result<Option<Mtls>> {
    let source: Box<dyn CertificateSource> = match (&args.cert_dir, &args.ca_dir) {
        (Some(dir), _) => Box::new(DirSource::new(dir)),
        (None, Some(dir)) => Box::new(CaSource::new(dir, args.cert_lifetime)?),
        (None, None) => return Ok(None),
    };
    let identities = Arc::new(Identities::new(&args.trust_domain, source));
    identities.refresh();
    Ok(Some(Mtls {
        tls: TlsConfigs::new(identities.clone()),
        identities,
        pool: Pool::new(
            args.max_streams_per_connection as usize,
            args.tunnel_connections_per_peer
                .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
            args.tunnel_idle_timeout,
        ),
        hbone_port: args.hbone_port,
        max_streams: args.max_streams_per_connection,
        strict: args.mtls == MtlsMode::Strict,
    }))
}

/// Re-reads certificates (rotation, renewal) and closes idle tunnels.
async fn maintain_mtls(proxy: Arc<Proxy>, interval: std::time::Duration, stop: CancellationToken) {
    let Some(mtls) = proxy.mtls.as_ref() else { return };
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let identities = mtls.identities.clone();
        // File reads and key generation: off the async workers.
        let _ = tokio::task::spawn_blocking(move || identities.refresh()).await;
        mtls.pool.reap();
    }
}

/// Drops the metric series of pods that left the node, once idle.
async fn sweep_metrics(proxy: Arc<Proxy>, idle: std::time::Duration, stop: CancellationToken) {
    let period = (idle / 4).clamp(std::time::Duration::from_millis(200), std::time::Duration::from_secs(30));
    let mut ticker = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let local: std::collections::HashSet<(String, String)> = proxy
            .mesh
            .load()
            .workloads
            .values()
            .filter(|w| w.is_local())
            .map(|w| (w.key.namespace.clone(), w.key.name.clone()))
            .collect();
        let dropped = proxy.metrics.conns.sweep(&local, idle);
        if dropped > 0 {
            tracing::debug!(dropped, "metric series of departed pods dropped");
        }
    }
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("outrigger");
    if let Some(n) = args.worker_threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.build().context("starting the async runtime")?;
    runtime.block_on(run(args))
}

/// Every connection is two sockets and every pod keeps a few listeners and
/// spares: take the whole file-descriptor allowance the system grants.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
            }
        }
        _ => {}
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let log = telemetry::init(args.log_format, &args.log_level)?;
    raise_fd_limit();
    let cgroup = capture::cgroup::resolve(args.cgroup2_path.as_deref())?;
    let own_netns_cookie =
        current_netns_cookie().context("reading the proxy's own netns cookie (needs Linux 5.14+)")?;

    // Refuse to start on a bad file: there is no last good state to keep.
    let mut watch = FileWatch::new(&args.pods_file);
    let initial = watch.poll().await.context("loading the mesh file at start")?.unwrap_or_default();

    let capture = Arc::new(Capture::load(&CaptureOptions {
        cgroup: &cgroup,
        object: args.ebpf_object.as_deref(),
        mark: args.mark,
        hbone_port: args.hbone_port,
    })?);
    tracing::info!(cgroup = %cgroup.display(), programs = capture.attached().len(), "capture programs attached");

    let metrics = Arc::new(Metrics::new(args.connection_metrics));
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessMetrics::default()));

    let proxy = Arc::new(Proxy {
        capture,
        metrics,
        forward: ForwardSettings {
            connect_timeout: args.connect_timeout,
            connect_attempts: args.connect_attempts,
            buffer_size: args.buffer_size as usize,
            mark: args.mark,
        },
        mesh: Default::default(),
        balance: args.balance_settings(),
        trust_domain: args.trust_domain.clone(),
        mtls: mtls(&args)?,
        connections: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });
    registry.register_collector(Box::new(KernelCounters(proxy.clone())));
    let status = Arc::new(RwLock::new(NodeStatus { capture_attached: true, ..Default::default() }));

    let admin_listener = admin::bind(args.admin_addr).await?;
    // The bound address (port 0 picks a free one).
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin_addr);
    tracing::info!(addr = %admin_addr, "admin server listening");
    let admin_stop = CancellationToken::new();
    let registry = Arc::new(registry);
    let admin_state =
        Arc::new(AdminState { proxy: proxy.clone(), status: status.clone(), registry: registry.clone(), log });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_state, admin_stop.clone()));

    let mut node = Node::new(proxy.clone(), args.outbound_port, own_netns_cookie, status.clone());
    node.reconcile(&initial).await;
    {
        let mut s = status.write().unwrap_or_else(|e| e.into_inner());
        s.loaded_once = true;
    }
    tracing::info!(pods = initial.pods.len(), file = %args.pods_file.display(), "mesh file applied");

    let reload_stop = CancellationToken::new();
    let reload = tokio::spawn(node::reload_loop(node, watch, args.reload_interval, reload_stop.clone()));
    tokio::spawn(maintain_mtls(proxy.clone(), args.reload_interval, reload_stop.clone()));
    tokio::spawn(sweep_metrics(proxy.clone(), args.metrics_idle_timeout, reload_stop.clone()));
    let textfile = args.textfile_dir.clone().map(|dir| {
        tracing::info!(dir = %dir.display(), interval = ?args.textfile_interval, "writing node-exporter textfile");
        tokio::spawn(metrics::textfile::run(dir, args.textfile_interval, registry.clone(), reload_stop.clone()))
    });

    let signal = wait_for_signal().await?;
    tracing::info!(signal, drain_timeout = ?args.drain_timeout, "shutting down: un-meshing pods, draining connections");
    status.write().unwrap_or_else(|e| e.into_inner()).shutting_down = true;
    reload_stop.cancel();
    let mut node = reload.await.context("the reload loop panicked")?;
    node.unmesh_all().await;
    proxy.shutdown.cancel();
    proxy.connections.close();
    let open = proxy.connections.len();
    if tokio::time::timeout(args.drain_timeout, proxy.connections.wait()).await.is_err() {
        tracing::warn!(
            cut = proxy.connections.len(),
            "drain deadline reached; closing the connections still open (raise --drain-timeout to wait longer)"
        );
    } else {
        tracing::info!(drained = open, "all connections finished");
    }
    admin_stop.cancel();
    let _ = admin_task.await;
    if let Some(textfile) = textfile {
        let _ = textfile.await;
    }
    drop(node);
    // Dropping the last handle on the capture detaches the programs.
    drop(proxy);
    tracing::info!("capture programs detached; exiting");
    Ok(())
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
