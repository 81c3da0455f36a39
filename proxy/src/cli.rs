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
    config::{Cli, Command, RunArgs},
    mesh::watch::FileWatch,
    metrics::{KernelCounters, Metrics},
    netns::sockets::current_netns_cookie,
    node::{self, status::NodeStatus, Node},
    proxy::{ForwardSettings, Proxy},
    telemetry,
};

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run_command(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrigger: error: {e:#}");
            ExitCode::FAILURE
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

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let log = telemetry::init(args.log_format, &args.log_level)?;
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
    })?);
    tracing::info!(cgroup = %cgroup.display(), programs = capture.attached().len(), "capture programs attached");

    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);

    let proxy = Arc::new(Proxy {
        capture,
        metrics,
        forward: ForwardSettings {
            connect_timeout: args.connect_timeout,
            connect_attempts: args.connect_attempts,
            buffer_size: args.buffer_size as usize,
            mark: args.mark,
        },
        services: Default::default(),
        balance: args.balance_settings(),
        connections: TaskTracker::new(),
        shutdown: CancellationToken::new(),
    });
    registry.register_collector(Box::new(KernelCounters(proxy.clone())));
    let status = Arc::new(RwLock::new(NodeStatus { capture_attached: true, ..Default::default() }));

    let admin_listener = admin::bind(args.admin_addr).await?;
    tracing::info!(addr = %args.admin_addr, "admin server listening");
    let admin_stop = CancellationToken::new();
    let admin_state = Arc::new(AdminState { proxy: proxy.clone(), status: status.clone(), registry, log });
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
