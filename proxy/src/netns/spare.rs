//! Spare upstream sockets, made ahead of time in a pod's netns.
//!
//! Making a socket in a pod's netns is a hop to the pod's netns thread and
//! back — two context switches on every new connection. Instead a few
//! marked sockets per address family wait ready; a connection takes one
//! without leaving its task, and when the spares run low the netns thread
//! makes a batch in one go. Pods that never connect out never get spares.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use super::{Netns, NetnsError};
use crate::transport::SocketOptions;

/// Refill below this many spares...
const LOW: usize = 4;
/// ...up to this many (each is one file descriptor).
const HIGH: usize = 16;

#[derive(Debug)]
pub struct SpareSockets {
    options: SocketOptions,
    /// Index 0: IPv4, 1: IPv6.
    pools: [Mutex<Vec<std::net::TcpStream>>; 2],
    refilling: [AtomicBool; 2],
}

fn family(ip: IpAddr) -> usize {
    usize::from(ip.is_ipv6())
}

impl SpareSockets {
    pub fn new(options: SocketOptions) -> Arc<Self> {
        Arc::new(Self { options, pools: Default::default(), refilling: Default::default() })
    }

    /// A marked, non-blocking TCP socket in the pod's netns for a
    /// connection to `ip`.
    pub async fn take(
        self: &Arc<Self>,
        netns: &Netns,
        ip: IpAddr,
    ) -> Result<io::Result<std::net::TcpStream>, NetnsError> {
        let f = family(ip);
        let (spare, left) = {
            let mut pool = self.pools[f].lock().unwrap_or_else(|e| e.into_inner());
            let spare = pool.pop();
            (spare, pool.len())
        };
        if left < LOW && !self.refilling[f].swap(true, Ordering::AcqRel) {
            let me = self.clone();
            if netns.spawn(move || me.refill(f)).is_err() {
                self.refilling[f].store(false, Ordering::Release);
            }
        }
        match spare {
            Some(socket) => Ok(Ok(socket)),
            None => {
                let options = self.options;
                netns.run(move || options.tcp(ip)).await
            }
        }
    }

    /// Runs on the netns thread.
    fn refill(&self, f: usize) {
        let ip: IpAddr = if f == 1 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
        let have = self.pools[f].lock().unwrap_or_else(|e| e.into_inner()).len();
        let made: Vec<_> = (have..HIGH).map_while(|_| self.options.tcp(ip).ok()).collect();
        self.pools[f].lock().unwrap_or_else(|e| e.into_inner()).extend(made);
        self.refilling[f].store(false, Ordering::Release);
    }
}
