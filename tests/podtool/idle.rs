//! `idle`: many connections that stay open doing nothing, to measure what
//! an idle connection costs the proxy (`cargo xtask bench --only idle_memory`).
//!
//! - `idle serve --listen ADDR...`: an echo server for tens of thousands of
//!   concurrent connections. The `serve` mode's thread per connection does
//!   not scale that far (a thread and a 64 KiB buffer each, and a pid per
//!   thread); this one is a single-threaded async loop. Prints
//!   `{"event":"listening","addr":..}` per address.
//! - `idle open --connect ADDR --conns N`: opens N connections (`--parallel`
//!   at once), echoes `--bytes` on each — so the relay has moved data both
//!   ways and any buffer it keeps has been allocated — and keeps them all
//!   open. Prints `{"event":"established","ok":..,"failed":..}` once every
//!   connection is up or failed, then holds them until stdin closes or
//!   `--hold-ms` passes, and ends them with a reset: no TIME_WAIT is left
//!   behind on any hop to exhaust ports for the next run.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Args;

pub fn run(mut args: Args) -> Result<()> {
    let mode = if args.rest.is_empty() { String::new() } else { args.rest.remove(0) };
    match mode.as_str() {
        "serve" => serve(args),
        "open" => open(args),
        _ => bail!("usage: outrigger-podtool idle serve --listen ADDR... | idle open --connect ADDR --conns N"),
    }
}

/// Every connection is a file descriptor: take all the system grants, and
/// fail early and clearly if that is not `needed`.
fn raise_fd_limit(needed: u64) -> Result<()> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    if hard < needed {
        bail!("the open-file limit is {hard}, {needed} descriptors are needed");
    }
    Ok(())
}

fn serve(mut args: Args) -> Result<()> {
    let listens = args.take_all("--listen");
    if listens.is_empty() {
        bail!("idle serve needs --listen ADDR");
    }
    raise_fd_limit(0)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    runtime.block_on(async {
        let mut accepting = Vec::new();
        for addr in listens {
            let addr: SocketAddr = addr.parse().with_context(|| format!("--listen {addr}"))?;
            let listener = super::bind(addr)?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            println!("{}", serde_json::json!({"event": "listening", "addr": addr.to_string()}));
            std::io::stdout().flush()?;
            accepting.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(echo(stream));
                        }
                        // Out of descriptors, most likely: let some close.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
        for task in accepting {
            task.await?;
        }
        anyhow::Ok(())
    })
}

async fn echo(mut stream: tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                let _ = stream.shutdown().await;
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

struct OpenOpts {
    target: SocketAddr,
    bytes: usize,
    timeout: Duration,
}

fn open(mut args: Args) -> Result<()> {
    let opts = Arc::new(OpenOpts {
        target: args.take("--connect").context("idle open needs --connect ADDR")?.parse().context("--connect")?,
        bytes: args.num("--bytes", 64)?,
        timeout: Duration::from_millis(args.num("--timeout-ms", 10_000)?),
    });
    let conns: usize = args.num("--conns", 1)?;
    let parallel: usize = args.num("--parallel", 32)?;
    let hold = Duration::from_millis(args.num("--hold-ms", 120_000)?);
    raise_fd_limit(conns as u64 + 64)?;

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::with_capacity(conns)));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..parallel.clamp(1, conns.max(1)))
        .map(|_| {
            let (opts, next, open, errors) = (opts.clone(), next.clone(), open.clone(), errors.clone());
            thread::Builder::new().stack_size(256 * 1024).spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < conns {
                    match one(&opts) {
                        Ok(stream) => open.lock().unwrap_or_else(|e| e.into_inner()).push(stream),
                        Err(e) => errors.lock().unwrap_or_else(|e| e.into_inner()).push(format!("{e:#}")),
                    }
                }
            })
        })
        .collect::<std::io::Result<_>>()?;
    for w in workers {
        let _ = w.join();
    }
    let open = std::mem::take(&mut *open.lock().unwrap_or_else(|e| e.into_inner()));
    let errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    println!(
        "{}",
        serde_json::json!({
            "event": "established",
            "ok": open.len(),
            "failed": errors.len(),
            "errors": &errors[..errors.len().min(10)],
            "elapsed_ms": started.elapsed().as_secs_f64() * 1e3,
        })
    );
    std::io::stdout().flush()?;

    // Hold until whoever started us closes our stdin (or the time is up).
    let (closed, stdin_closed) = mpsc::channel();
    thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let _ = stdin_closed.recv_timeout(hold);
    for stream in &open {
        let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
    }
    Ok(())
}

/// One connection, with `bytes` echoed on it.
fn one(opts: &OpenOpts) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&opts.target, opts.timeout).context("connect")?;
    stream.set_read_timeout(Some(opts.timeout))?;
    stream.set_nodelay(true)?;
    let sent: Vec<u8> = (0..opts.bytes).map(|i| i as u8).collect();
    stream.write_all(&sent).context("sending")?;
    let mut echoed = vec![0u8; opts.bytes];
    stream.read_exact(&mut echoed).context("reading the echo")?;
    if echoed != sent {
        bail!("the echo differs from what was sent");
    }
    Ok(stream)
}
