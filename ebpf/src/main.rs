//! Outrigger's kernel programs.
//!
//! - `cgroup/connect4|6`: a meshed pod's TCP connect is steered to the node
//!   proxy's listener inside the pod (`127.0.0.1:15001` / `[::1]:15001`); the
//!   original destination is remembered by socket cookie.
//! - `sockops`: once such a connection is established, the original
//!   destination is re-keyed by (netns cookie, 4-tuple) — what the proxy can
//!   compute on `accept` — and both entries are removed when the socket closes.
//! - `cgroup/getpeername4|6`: the application still sees the address it dialled.
//!
//! The proxy's own sockets (marked with `SO_MARK`, or made by its process)
//! are never steered: that is the loop guard.
#![no_std]
#![no_main]

mod addr;

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use outrigger_common::{
    counter, AllowKey, ConnKey, InboundPod, MeshedPod, Settings, SockAddr, FAMILY_V4, FAMILY_V6, INBOUND_FLAG_CAPTURE,
    INBOUND_FLAG_STRICT, MAX_DELIVERIES, MAX_MESHED_NETNS, MAX_ORIG_DST, MAX_POD_ADDRS, MAX_SERVICES, MAX_STRICT_ALLOW,
    POD_FLAG_V6_LISTENER,
};

use addr::{is_loopback_v4, is_loopback_v6, is_v4_mapped, LOOPBACK_V4, LOOPBACK_V6, V4_MAPPED_PREFIX};

/// Allow the syscall (0 would fail it with EPERM).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const AF_INET: u32 = 2;

/// Meshed pods, keyed by netns cookie. Filled by the proxy.
#[map]
static MESHED_NETNS: HashMap<u64, MeshedPod> = HashMap::with_max_entries(MAX_MESHED_NETNS, 0);

/// Original destination of a steered socket, by socket cookie. Lives until
/// the socket closes (getpeername needs it); LRU so a socket that never
/// reaches sockops (a connect that failed early) cannot leak an entry forever.
#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);

/// Original destination of an established steered connection, by what the
/// proxy sees on accept.
#[map]
static ORIG_DST: LruHashMap<ConnKey, SockAddr> = LruHashMap::with_max_entries(MAX_ORIG_DST, 0);

/// Service VIP:ports with no endpoints, to the service's id: refused at
/// connect time, as kube-proxy refuses a Service without endpoints.
#[map]
static REFUSED_VIPS: HashMap<SockAddr, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Connects refused per service id.
#[map]
static SERVICE_REFUSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// How new connections to each address of this node's meshed pods are
/// treated (strict, captured), by address with port 0.
#[map]
static INBOUND_PODS: HashMap<SockAddr, InboundPod> = HashMap::with_max_entries(MAX_POD_ADDRS, 0);

/// The proxy's inbound listener in each meshed pod, by the pod's address
/// (port 0): plaintext arrivals are assigned to it.
#[map]
static INBOUND_LISTENERS: SockHash<SockAddr> = SockHash::with_max_entries(MAX_POD_ADDRS, 0);

/// Addresses of this node's meshed pods: their traffic to each other was
/// already handled (and authorized) by the proxy at the source.
#[map]
static LOCAL_MESHED: HashMap<SockAddr, u32> = HashMap::with_max_entries(MAX_POD_ADDRS, 0);

/// Connections the proxy is delivering to an application in a pod with the
/// client's address as source, by (client, application) address: they
/// must reach the application, not be captured again. Their SYN arrives
/// over loopback but looks, to the inbound program, like any other.
#[map]
static DELIVERIES: LruHashMap<ConnKey, u32> = LruHashMap::with_max_entries(MAX_DELIVERIES, 0);

/// Sources strict pods still take plaintext from (the node, for kubelet
/// probes), as CIDRs over IPv6 space (IPv4 mapped).
#[map]
static STRICT_ALLOW: LpmTrie<AllowKey, u32> = LpmTrie::with_max_entries(MAX_STRICT_ALLOW, 1);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs
        // do not preempt each other on one CPU.
        unsafe { *slot += 1 };
    }
}

/// What a connect hook decided.
enum Verdict {
    /// Leave the socket alone.
    Bypass,
    /// Steer it to the proxy's listener on this port.
    Steer(MeshedPod),
}

/// The checks shared by connect4 and connect6: TCP, a meshed netns, and not
/// the proxy itself.
#[inline(always)]
fn should_steer(ctx: &SockAddrContext) -> Verdict {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed in; fields are
    // read with volatile loads so LLVM keeps them as single 4-byte loads.
    let sock_type = unsafe { read_volatile(&(*sa).type_) };
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let pod = match unsafe { MESHED_NETNS.get(netns) } {
        Some(pod) => *pod,
        None => {
            count(counter::BYPASS_UNMESHED);
            return Verdict::Bypass;
        }
    };
    if sock_type != SOCK_STREAM {
        count(counter::BYPASS_NOT_TCP);
        return Verdict::Bypass;
    }
    if is_proxy(sa) {
        count(counter::BYPASS_PROXY);
        return Verdict::Bypass;
    }
    Verdict::Steer(pod)
}

/// The loop guard: a connect is the proxy's own only when it is made by the
/// proxy's process *and* its socket carries the proxy's mark. The mark
/// alone is not enough: a pod with CAP_NET_ADMIN can set any mark on its
/// sockets, but it cannot be the proxy's process.
#[inline(always)]
fn is_proxy(sa: *mut bpf_sock_addr) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if settings.proxy_tgid == 0 || tgid != settings.proxy_tgid {
        return false;
    }
    // SAFETY: `sk` of a sock_addr context is a PTR_TO_SOCKET the verifier
    // knows is valid; `mark` is a readable 4-byte field of bpf_sock.
    let mark = unsafe {
        let sk = read_volatile(&(*sa).__bindgen_anon_1.sk);
        read_volatile(&(*sk).mark)
    };
    (settings.mark != 0 && mark == settings.mark) || (settings.delivery_mark != 0 && mark == settings.delivery_mark)
}

/// True when `orig` is a VIP:port the proxy marked as having no endpoints:
/// the connect is then sent to port 0 on loopback, which nothing can
/// listen on, so the application gets ECONNREFUSED at once.
#[inline(always)]
fn refuse(orig: &SockAddr) -> bool {
    // SAFETY: the value is copied out immediately.
    let Some(id) = (unsafe { REFUSED_VIPS.get(orig) }).copied() else {
        return false;
    };
    count(counter::REFUSED_NO_ENDPOINTS);
    if let Some(slot) = SERVICE_REFUSED.get_ptr_mut(id) {
        // SAFETY: per-CPU slot, see `count`.
        unsafe { *slot += 1 };
    }
    true
}

#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &SockAddr) -> bool {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Err(errno) = ORIG_DST_BY_COOKIE.insert(cookie, orig, 0) {
        count(counter::MAP_UPDATE_FAILED);
        warn!(ctx, "ORIG_DST_BY_COOKIE update failed ({}): connect not captured", errno);
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn outrigger_connect4(ctx: SockAddrContext) -> i32 {
    let port = match should_steer(&ctx) {
        Verdict::Bypass => return ALLOW,
        Verdict::Steer(pod) => pod.outbound_port as u16,
    };
    let sa = ctx.sock_addr;
    // SAFETY: context field reads.
    let (ip, user_port) = unsafe { (read_volatile(&(*sa).user_ip4), read_volatile(&(*sa).user_port)) };
    if is_loopback_v4(ip) {
        count(counter::BYPASS_LOOPBACK);
        return ALLOW;
    }
    let orig = SockAddr { family: FAMILY_V4, port: u16::from_be(user_port as u16) as u32, ip: [ip, 0, 0, 0] };
    let port = if refuse(&orig) {
        0
    } else if remember(&ctx, &orig) {
        count(counter::CAPTURED);
        port
    } else {
        return ALLOW;
    };
    // SAFETY: whole-u32 context writes, as the verifier requires.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, LOOPBACK_V4);
        write_volatile(&mut (*sa).user_port, port.to_be() as u32);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn outrigger_connect6(ctx: SockAddrContext) -> i32 {
    let pod = match should_steer(&ctx) {
        Verdict::Bypass => return ALLOW,
        Verdict::Steer(pod) => pod,
    };
    let port = pod.outbound_port as u16;
    let sa = ctx.sock_addr;
    // SAFETY: context field reads, one u32 at a time.
    let (ip, user_port) = unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            read_volatile(&(*sa).user_port),
        )
    };
    let port_host = u16::from_be(user_port as u16) as u32;
    // An IPv4-mapped destination is an IPv4 connection on a dual-stack
    // socket: remember it as IPv4 and steer it to the IPv4 listener.
    let mapped = is_v4_mapped(&ip);
    let (orig, listener) = if mapped {
        if is_loopback_v4(ip[3]) {
            count(counter::BYPASS_LOOPBACK);
            return ALLOW;
        }
        let orig = SockAddr { family: FAMILY_V4, port: port_host, ip: [ip[3], 0, 0, 0] };
        (orig, [0, 0, V4_MAPPED_PREFIX, LOOPBACK_V4])
    } else {
        if is_loopback_v6(&ip) {
            count(counter::BYPASS_LOOPBACK);
            return ALLOW;
        }
        if pod.flags & POD_FLAG_V6_LISTENER == 0 {
            count(counter::BYPASS_NO_V6_LISTENER);
            return ALLOW;
        }
        (SockAddr { family: FAMILY_V6, port: port_host, ip }, LOOPBACK_V6)
    };
    let port = if refuse(&orig) {
        0
    } else if remember(&ctx, &orig) {
        count(counter::CAPTURED);
        port
    } else {
        return ALLOW;
    };
    // SAFETY: whole-u32 context writes.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], listener[0]);
        write_volatile(&mut (*sa).user_ip6[1], listener[1]);
        write_volatile(&mut (*sa).user_ip6[2], listener[2]);
        write_volatile(&mut (*sa).user_ip6[3], listener[3]);
        write_volatile(&mut (*sa).user_port, port.to_be() as u32);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn outrigger_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return ALLOW;
    };
    if orig.family != FAMILY_V4 {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: whole-u32 context writes.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, orig.ip[0]);
        write_volatile(&mut (*sa).user_port, (orig.port as u16).to_be() as u32);
    }
    count(counter::PEERNAME_REWRITTEN);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn outrigger_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return ALLOW;
    };
    let ip = if orig.family == FAMILY_V4 { [0, 0, V4_MAPPED_PREFIX, orig.ip[0]] } else { orig.ip };
    let sa = ctx.sock_addr;
    // SAFETY: whole-u32 context writes.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], ip[3]);
        write_volatile(&mut (*sa).user_port, (orig.port as u16).to_be() as u32);
    }
    count(counter::PEERNAME_REWRITTEN);
    ALLOW
}

/// The pod a socket's netns belongs to, if meshed.
#[inline(always)]
fn meshed_pod(ctx: &SockAddrContext) -> Option<MeshedPod> {
    // SAFETY: context pointer from the kernel.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    unsafe { MESHED_NETNS.get(netns) }.copied()
}

/// The original destination of a captured socket, if this is one.
#[inline(always)]
fn captured_orig(ctx: &SockAddrContext) -> Option<SockAddr> {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    unsafe { ORIG_DST_BY_COOKIE.get(cookie) }.copied()
}

/// A captured socket is really connected from loopback to the proxy's
/// listener; `getsockname` answers with the pod's own address (of the
/// destination's family) and the port the socket really uses, as without
/// the mesh — protocols that announce their own address (active FTP, SIP)
/// depend on it.
#[cgroup_sock_addr(getsockname4)]
pub fn outrigger_getsockname4(ctx: SockAddrContext) -> i32 {
    let Some(orig) = captured_orig(&ctx) else { return ALLOW };
    let Some(pod) = meshed_pod(&ctx) else { return ALLOW };
    if orig.family != FAMILY_V4 || pod.ip4 == 0 {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: whole-u32 context write; the port is left as it is.
    unsafe { write_volatile(&mut (*sa).user_ip4, pod.ip4) };
    count(counter::SOCKNAME_REWRITTEN);
    ALLOW
}

#[cgroup_sock_addr(getsockname6)]
pub fn outrigger_getsockname6(ctx: SockAddrContext) -> i32 {
    let Some(orig) = captured_orig(&ctx) else { return ALLOW };
    let Some(pod) = meshed_pod(&ctx) else { return ALLOW };
    let ip = if orig.family == FAMILY_V4 {
        if pod.ip4 == 0 {
            return ALLOW;
        }
        [0, 0, V4_MAPPED_PREFIX, pod.ip4]
    } else {
        if pod.ip6 == [0; 4] {
            return ALLOW;
        }
        pod.ip6
    };
    let sa = ctx.sock_addr;
    // SAFETY: whole-u32 context writes.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], ip[0]);
        write_volatile(&mut (*sa).user_ip6[1], ip[1]);
        write_volatile(&mut (*sa).user_ip6[2], ip[2]);
        write_volatile(&mut (*sa).user_ip6[3], ip[3]);
    }
    count(counter::SOCKNAME_REWRITTEN);
    ALLOW
}

#[sock_ops]
pub fn outrigger_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(&ctx),
        // arg(1) is the new state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    1
}

/// Ask for state callbacks on steered sockets only, so that their entries
/// can be dropped at close (including a connect that never completes).
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE.get_ptr(cookie).is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out immediately.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = conn_key(ctx);
    if let Err(errno) = ORIG_DST.insert(key, orig, 0) {
        count(counter::MAP_UPDATE_FAILED);
        warn!(ctx, "ORIG_DST update failed ({}): the proxy will not find this connection", errno);
        return;
    }
    count(counter::REKEYED);
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: context pointer from the kernel.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_DST_BY_COOKIE.get_ptr(cookie).is_none() {
        count(counter::COOKIE_MISS);
        return;
    }
    // The callback runs before the kernel clears the socket's addresses,
    // so the key computes as it did at establishment.
    let key = conn_key(ctx);
    let _ = ORIG_DST.remove(key);
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    count(counter::CLOSED);
}

/// The key the proxy computes on accept: its peer is our local end, its
/// local address is our remote end.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext) -> ConnKey {
    let ops = ctx.ops;
    // SAFETY: context field reads, each a single u32 load.
    unsafe {
        let family = read_volatile(&(*ops).family);
        let local_port = read_volatile(&(*ops).local_port);
        let remote_port = read_volatile(&(*ops).remote_port);
        // remote_port is network order in the upper 16 bits.
        let remote_port = u16::from_be((remote_port >> 16) as u16) as u32;
        let (client, listener) = if family == AF_INET {
            (
                SockAddr { family: FAMILY_V4, port: local_port, ip: [read_volatile(&(*ops).local_ip4), 0, 0, 0] },
                SockAddr { family: FAMILY_V4, port: remote_port, ip: [read_volatile(&(*ops).remote_ip4), 0, 0, 0] },
            )
        } else {
            let local = [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ];
            let remote = [
                read_volatile(&(*ops).remote_ip6[0]),
                read_volatile(&(*ops).remote_ip6[1]),
                read_volatile(&(*ops).remote_ip6[2]),
                read_volatile(&(*ops).remote_ip6[3]),
            ];
            (addr::normalize(local, local_port), addr::normalize(remote, remote_port))
        };
        ConnKey { netns_cookie: bpf_get_netns_cookie(ctx.as_ptr()), client, listener }
    }
}

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;
/// The loopback interface: its index is 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Whether a source may reach a strict pod in plaintext (an LPM match over
/// IPv6 space; IPv4 is looked up mapped).
#[inline(always)]
fn strict_allowed(remote: &SockAddr) -> bool {
    let ip = if remote.family == FAMILY_V4 { [0, 0, V4_MAPPED_PREFIX, remote.ip[0]] } else { remote.ip };
    STRICT_ALLOW.get(Key::new(128, AllowKey { ip })).is_some()
}

/// Attached to the netns of each meshed pod. A new TCP connection that
/// arrives from outside the pod (on an interface other than loopback, not
/// for the tunnel port) to one of the pod's addresses:
/// - strict pod: refused (the kernel answers the SYN with a reset) unless
///   its source is allowed (kubelet probes from the node);
/// - from a meshed pod of this node: let through — the proxy handled it at
///   the source, authorization included;
/// - captured pod (permissive): assigned to the proxy's inbound listener in
///   the pod, which authorizes, counts and delivers it with its source.
///
/// Connections from inside the pod — the application's own, and the proxy's
/// deliveries, which arrive over loopback — always pass: that is the loop
/// guard here.
#[sk_lookup]
pub fn outrigger_inbound(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: context field reads, one u32 at a time.
    let (local, remote) = unsafe {
        if read_volatile(&(*l).protocol) != IPPROTO_TCP {
            return SK_PASS;
        }
        let local_port = read_volatile(&(*l).local_port);
        if let Some(settings) = SETTINGS.get(0) {
            if local_port == settings.hbone_port {
                return SK_PASS;
            }
        }
        if read_volatile(&(*l).ingress_ifindex) == LOOPBACK_IFINDEX {
            return SK_PASS;
        }
        // remote_port is network order, in a 16-bit field.
        let remote_port = u16::from_be(read_volatile(&(*l).remote_port)) as u32;
        if read_volatile(&(*l).family) == AF_INET {
            (
                SockAddr { family: FAMILY_V4, port: local_port, ip: [read_volatile(&(*l).local_ip4), 0, 0, 0] },
                SockAddr { family: FAMILY_V4, port: remote_port, ip: [read_volatile(&(*l).remote_ip4), 0, 0, 0] },
            )
        } else {
            let local = [
                read_volatile(&(*l).local_ip6[0]),
                read_volatile(&(*l).local_ip6[1]),
                read_volatile(&(*l).local_ip6[2]),
                read_volatile(&(*l).local_ip6[3]),
            ];
            let remote = [
                read_volatile(&(*l).remote_ip6[0]),
                read_volatile(&(*l).remote_ip6[1]),
                read_volatile(&(*l).remote_ip6[2]),
                read_volatile(&(*l).remote_ip6[3]),
            ];
            (addr::normalize(local, local_port), addr::normalize(remote, remote_port))
        }
    };
    // The proxy's own delivery of a connection it already handled.
    let delivery = ConnKey { netns_cookie: 0, client: remote, listener: local };
    if DELIVERIES.get_ptr(delivery).is_some() {
        return SK_PASS;
    }
    // From here on addresses are compared without ports.
    let local = SockAddr { port: 0, ..local };
    let remote = SockAddr { port: 0, ..remote };
    if remote == local {
        return SK_PASS;
    }
    // SAFETY: the value is copied out immediately.
    let Some(pod) = (unsafe { INBOUND_PODS.get(local) }).copied() else {
        return SK_PASS;
    };
    if pod.flags & INBOUND_FLAG_STRICT != 0 {
        if strict_allowed(&remote) {
            count(counter::STRICT_ALLOWED);
            return SK_PASS;
        }
        count(counter::STRICT_DROPPED);
        return SK_DROP;
    }
    if LOCAL_MESHED.get_ptr(remote).is_some() {
        count(counter::INBOUND_FROM_MESH);
        return SK_PASS;
    }
    if pod.flags & INBOUND_FLAG_CAPTURE != 0 {
        if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, local, 0).is_ok() {
            count(counter::INBOUND_CAPTURED);
        } else {
            // Fail open, like the rest of capture: the application answers.
            count(counter::INBOUND_NO_LISTENER);
        }
    }
    SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
