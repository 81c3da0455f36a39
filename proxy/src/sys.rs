//! The few system calls no safe crate wraps. Each `unsafe` block states why
//! it is sound.
#![allow(unsafe_code)]

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

/// The network namespace cookie of the namespace a socket lives in
/// (`SO_NETNS_COOKIE`, Linux 5.14+). It is the key the kernel programs use
/// for meshed pods, read with `bpf_get_netns_cookie` on their side.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the duration of the borrow; `cookie`
    // and `len` are valid for writes and `len` tells the kernel the buffer
    // size, so it cannot write past `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Registers a file-descriptor owner with the async runtime for readiness.
pub fn async_fd_readable<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd takes ownership of `inner`, which owns the fd, so
    // the fd stays open for as long as it is registered and is deregistered
    // before `inner` (and the fd) is dropped.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// The kernel's smoothed round-trip time of a TCP socket (`TCP_INFO`).
pub fn tcp_rtt(fd: BorrowedFd<'_>) -> Option<std::time::Duration> {
    // SAFETY: zeroed tcp_info is a valid value (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the borrow; `info` and `len` are
    // valid for writes and `len` bounds what the kernel writes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 || info.tcpi_rtt == 0 {
        return None;
    }
    Some(std::time::Duration::from_micros(u64::from(info.tcpi_rtt)))
}

/// Segments a TCP socket has received (`tcpi_segs_in`, at byte 140 of
/// `struct tcp_info` since Linux 4.2; `libc::tcp_info` stops short of it).
/// What tests count to see how data and FIN were sent.
#[cfg(test)]
pub fn tcp_segments_in(fd: BorrowedFd<'_>) -> Option<u32> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `fd` is a live socket for the borrow; `info` and `len` are
    // valid for writes and `len` bounds what the kernel writes.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, info.as_mut_ptr().cast(), &mut len)
    };
    if rc != 0 || len < 144 {
        return None;
    }
    Some(u32::from_ne_bytes(info[140..144].try_into().ok()?))
}

/// `IPV6_TRANSPARENT` (socket2 wraps only the IPv4 option): lets the socket
/// bind an address that is not local — the client's, for original-source
/// delivery.
pub fn set_ipv6_transparent(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is a live socket for the borrow; the option value is a
    // c_int the kernel reads `size_of::<c_int>()` bytes of.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
