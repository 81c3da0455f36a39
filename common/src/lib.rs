//! Types shared by the kernel programs (`outrigger-ebpf`) and the proxy.
//!
//! Every type here is `#[repr(C)]` and built only from `u32`/`u64` fields so
//! that there is no padding for the kernel and user space to disagree about:
//! a key built differently on the two sides misses silently.
//!
//! Addresses are stored as the kernel hands them over: four `u32` words in
//! network byte order, i.e. the raw bytes of an `in6_addr` (an IPv4 address
//! uses word 0 and leaves the rest zero). Ports are stored in host order.
#![no_std]

/// Address family tags used inside keys (not `AF_*`, so that an IPv4-mapped
/// IPv6 socket and a plain IPv4 socket produce the same key).
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;

/// The port the proxy listens on inside every meshed pod (`127.0.0.1` and
/// `::1`), unless `--outbound-port` says otherwise.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Max entries of the refused-VIP map, and size of the per-service refusal
/// counters (service ids are below this).
pub const MAX_SERVICES: u32 = 16_384;

/// Max entries of the meshed-netns map: pods on one node.
pub const MAX_MESHED_NETNS: u32 = 4096;
/// Max entries of the per-address maps of this node's pods (two addresses
/// per pod, dual stack).
pub const MAX_POD_ADDRS: u32 = 2 * MAX_MESHED_NETNS;
/// Max entries of each original-destination map: concurrent captured
/// connections on one node. Both maps are LRU so a leak cannot fill them.
pub const MAX_ORIG_DST: u32 = 262_144;

/// A socket address as stored in maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
    /// Host byte order.
    pub port: u32,
    /// Network byte order words; IPv4 in `ip[0]`.
    pub ip: [u32; 4],
}

/// Identifies an established captured connection the way the proxy sees it
/// on `accept`: the pod's netns plus the 4-tuple of the client socket.
/// Every pod talks to its own `127.0.0.1:15001`, so the 4-tuple alone would
/// collide across pods; the netns cookie tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey {
    pub netns_cookie: u64,
    /// The client's own address (the proxy's peer address).
    pub client: SockAddr,
    /// The listener address the client was steered to.
    pub listener: SockAddr,
}

/// What the proxy registers for each meshed pod, keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MeshedPod {
    /// The proxy's own index for the pod (for logs and counters).
    pub pod_id: u32,
    /// The port the proxy listens on inside this pod.
    pub outbound_port: u32,
    /// `POD_FLAG_*` bits.
    pub flags: u32,
    /// The pod's IPv4 address, network order (0: none): what
    /// `getsockname` of a captured socket reports instead of 127.0.0.1.
    pub ip4: u32,
    /// The pod's IPv6 address, network-order words (all 0: none).
    pub ip6: [u32; 4],
}

/// How the inbound program treats new connections to a meshed pod's
/// address, keyed by that address (`SockAddr` with port 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct InboundPod {
    /// `INBOUND_FLAG_*` bits.
    pub flags: u32,
}

/// `--mtls strict`: plaintext from outside the pod is refused, except from
/// the allowed sources (`STRICT_ALLOW`).
pub const INBOUND_FLAG_STRICT: u32 = 1;
/// Plaintext from outside the pod is handed to the proxy's inbound
/// listener (found in `INBOUND_LISTENERS` under the same key).
pub const INBOUND_FLAG_CAPTURE: u32 = 2;

/// Max entries of the delivery map: original-source deliveries being set
/// up at once (each entry lives from just before its connect to just
/// after; LRU so a lost removal cannot fill it).
pub const MAX_DELIVERIES: u32 = 65_536;

/// Max entries of the strict-mode allow list (CIDRs).
pub const MAX_STRICT_ALLOW: u32 = 256;

/// A key of the strict-mode allow list: an LPM-trie key over IPv6 space,
/// IPv4 addresses mapped (`::ffff:a.b.c.d`, prefix length + 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AllowKey {
    pub ip: [u32; 4],
}

/// The proxy listens on `[::1]` in this pod: IPv6 connects may be steered.
/// (A pod without IPv6 loopback keeps its IPv6 connects direct.)
pub const POD_FLAG_V6_LISTENER: u32 = 1;

/// Global settings the proxy writes once before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// `SO_MARK` value carried by the proxy's own sockets (the loop guard).
    pub mark: u32,
    /// Process id (tgid) of the proxy: the loop guard requires both this
    /// and the mark (a pod can set a mark, not be the proxy).
    pub proxy_tgid: u32,
    /// The tunnel port: in strict pods, the only port that takes
    /// connections from outside the pod.
    pub hbone_port: u32,
    /// The mark of the proxy's delivery sockets (original source): the
    /// loop guard accepts it like `mark`.
    pub delivery_mark: u32,
}

/// Indices into the per-CPU counter array.
pub mod counter {
    /// A meshed pod's connect was steered into the proxy.
    pub const CAPTURED: u32 = 0;
    /// A connect from a netns that is not meshed.
    pub const BYPASS_UNMESHED: u32 = 1;
    /// A connect made by the proxy process on a socket carrying its mark.
    pub const BYPASS_PROXY: u32 = 2;
    /// A meshed pod's connect to loopback (never captured).
    pub const BYPASS_LOOPBACK: u32 = 3;
    /// A meshed pod's connect that is not TCP.
    pub const BYPASS_NOT_TCP: u32 = 4;
    /// An established captured connection re-keyed by 4-tuple.
    pub const REKEYED: u32 = 5;
    /// Inserting into an original-destination map failed.
    pub const MAP_UPDATE_FAILED: u32 = 6;
    /// A captured socket reached established but its cookie entry was gone.
    pub const COOKIE_MISS: u32 = 7;
    /// `getpeername` answered with the original destination.
    pub const PEERNAME_REWRITTEN: u32 = 8;
    /// Captured sockets whose entries were removed at close.
    pub const CLOSED: u32 = 9;
    /// A meshed pod's IPv6 connect left alone: the pod has no IPv6 listener.
    pub const BYPASS_NO_V6_LISTENER: u32 = 10;
    /// A meshed pod dialled a service VIP with no endpoints: refused at connect.
    pub const REFUSED_NO_ENDPOINTS: u32 = 11;
    /// A plaintext connection to a strict pod from outside it, dropped.
    pub const STRICT_DROPPED: u32 = 12;
    /// `getsockname` of a captured socket answered with the pod's address.
    pub const SOCKNAME_REWRITTEN: u32 = 13;
    /// A plaintext connection from outside a meshed pod handed to the proxy.
    pub const INBOUND_CAPTURED: u32 = 14;
    /// A plaintext connection to a strict pod from an allowed source (probes).
    pub const STRICT_ALLOWED: u32 = 15;
    /// A connection from a meshed pod of this node (the proxy already
    /// handled it at the source) let through to the application.
    pub const INBOUND_FROM_MESH: u32 = 16;
    /// Captured inbound, but the proxy's listener was missing: let through.
    pub const INBOUND_NO_LISTENER: u32 = 17;
    pub const COUNT: u32 = 18;

    /// Names as exported in metrics, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "captured",
        "bypass_unmeshed",
        "bypass_proxy",
        "bypass_loopback",
        "bypass_not_tcp",
        "rekeyed",
        "map_update_failed",
        "cookie_miss",
        "peername_rewritten",
        "closed",
        "bypass_no_v6_listener",
        "refused_no_endpoints",
        "strict_dropped",
        "sockname_rewritten",
        "inbound_captured",
        "strict_allowed",
        "inbound_from_mesh",
        "inbound_no_listener",
    ];
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: each type is `#[repr(C)]`, `Copy`, built only from u32/u64
    // fields with no padding, so any bit pattern is a valid value — what
    // aya::Pod requires to copy it to and from kernel maps.
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::SockAddr {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::ConnKey {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::MeshedPod {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::Settings {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::InboundPod {}
    #[allow(unsafe_code)]
    unsafe impl aya::Pod for super::AllowKey {}
}
