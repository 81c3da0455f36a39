//! Forwards `aya-log` records from the kernel programs into our logs. The
//! records travel through a ring buffer and are dropped when it is full, so
//! they are for people, never for correctness (the counters are).

use aya::Ebpf;
use aya_log::EbpfLogger;

pub fn spawn(ebpf: &mut Ebpf) {
    let logger = match EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::debug!(error = %e, "kernel programs carry no log buffer");
            return;
        }
    };
    let mut fd = match crate::sys::async_fd_readable(logger) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "cannot poll the kernel programs' log buffer; their logs are lost");
            return;
        }
    };
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(guard) => guard,
                Err(_) => return,
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
