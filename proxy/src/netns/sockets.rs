//! Sockets made inside a pod's netns, on its netns thread.

use std::{io, net::SocketAddr, os::fd::AsFd};

use socket2::{Domain, Protocol, Socket, Type};

/// The listen backlog of the pod-local listeners: a burst of connects from
/// one pod waits here while the proxy accepts.
const LISTEN_BACKLOG: i32 = 4096;

/// The cookie of the netns the calling thread is in.
pub fn current_netns_cookie() -> io::Result<u64> {
    let probe = Socket::new(Domain::IPV4, Type::DGRAM.cloexec(), None)
        .or_else(|_| Socket::new(Domain::IPV6, Type::DGRAM.cloexec(), None))?;
    crate::sys::netns_cookie(probe.as_fd())
}

/// A non-blocking TCP listener on `addr` in the calling thread's netns.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    // A pod whose definition changed gets new listeners while the old ones
    // drain their backlog: both must hold the port for that moment.
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // The IPv4 listener serves IPv4-mapped connects; this one is v6 only.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Turns Nagle off for every connection `listener` will accept: accepted
/// sockets inherit TCP_NODELAY from their listener, so this is one
/// setsockopt per listener instead of one per connection.
pub fn accept_without_nagle(listener: impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(&listener).set_tcp_nodelay(true)
}

/// Makes every connection `listener` will accept end with a reset if the
/// proxy dies (SO_LINGER 0, inherited on accept like TCP_NODELAY), from the
/// moment it is accepted: a crash, or a connection dropped before it is
/// served, never looks like a clean end to the client. One setsockopt per
/// listener instead of one per connection; whoever closes an accepted
/// connection in order must disarm it first.
pub fn accept_reset_on_close(listener: impl AsFd) -> io::Result<()> {
    socket2::SockRef::from(&listener).set_linger(Some(std::time::Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;

    use super::*;

    /// (client, accepted) through a listener `set_up` configured.
    fn accepted(set_up: impl FnOnce(&std::net::TcpListener) -> io::Result<()>) -> (TcpStream, TcpStream) {
        let listener = bind_listener("127.0.0.1:0".parse().expect("addr")).expect("listener");
        set_up(&listener).expect("listener option");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        listener.set_nonblocking(false).expect("blocking");
        (client, listener.accept().expect("accept").0)
    }

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let (_client, accepted) = accepted(|l| accept_without_nagle(l));
        assert!(accepted.nodelay().expect("nodelay"), "the accepted socket must not use Nagle");
    }

    #[test]
    fn accepted_sockets_inherit_reset_on_close_from_the_listener() {
        let (client, accepted) = accepted(|l| accept_reset_on_close(l));
        let linger = socket2::SockRef::from(&accepted).linger().expect("linger");
        assert_eq!(linger, Some(std::time::Duration::ZERO), "the accepted socket must close with a reset");
        // And the close is a reset, which the client reads as one.
        drop(accepted);
        let mut buf = [0u8; 1];
        let err = std::io::Read::read(&mut &client, &mut buf).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    }
}
