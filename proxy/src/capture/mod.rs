//! Capture: the kernel programs that steer meshed pods' connects into the
//! proxy, and the maps shared with them.
//!
//! Loading attaches `cgroup/connect4|6`, `cgroup/getpeername4|6` and
//! `sockops` to one cgroup (the cgroup2 root in production). The links are
//! owned by this process: when it exits, for whatever reason, they detach
//! and pods' connections go direct again — capture fails open.
#![forbid(unsafe_code)]

pub mod addr;
pub mod cgroup;
mod logger;

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, SockHash},
    programs::{sk_lookup::SkLookupLinkId, CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps},
    Ebpf, EbpfError, EbpfLoader,
};
use outrigger_common::{counter, AllowKey, ConnKey, InboundPod, MeshedPod, Settings, SockAddr};
use serde::Serialize;

/// The kernel programs built by `cargo xtask build-ebpf`, embedded at build
/// time (empty when they were not built).
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/outrigger-ebpf.o"));

const CONNECT4: &str = "outrigger_connect4";
const CONNECT6: &str = "outrigger_connect6";
const GETPEERNAME4: &str = "outrigger_getpeername4";
const GETPEERNAME6: &str = "outrigger_getpeername6";
const GETSOCKNAME4: &str = "outrigger_getsockname4";
const GETSOCKNAME6: &str = "outrigger_getsockname6";
const SOCKOPS: &str = "outrigger_sockops";
const INBOUND: &str = "outrigger_inbound";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this outrigger binary was built without its eBPF programs: build them with \
         `cargo xtask build` (needs nightly rust-src and bpf-linker 0.10.4: `cargo xtask setup`), \
         or pass --ebpf-object"
    )]
    NotBuilt,
    #[error("no cgroup2 mount found in /proc/self/mounts: mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) or pass --cgroup2-path")]
    NoCgroup2,
    #[error("{0} is not a cgroup v2 directory (no cgroup.procs in it): check --cgroup2-path")]
    NotACgroup(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the eBPF object failed: {0} (is the proxy running as root with CAP_BPF and CAP_NET_ADMIN?)")]
    Load(#[source] Box<EbpfError>),
    #[error("{what} is not a usable eBPF object: {reason} (build it with `cargo xtask build-ebpf`, or drop --ebpf-object to use the built-in programs)")]
    BadObject { what: String, reason: String },
    #[error("eBPF program {name} is missing from the object: rebuild with `cargo xtask build-ebpf`")]
    MissingProgram { name: &'static str },
    #[error("eBPF map {name} is missing from the object: rebuild with `cargo xtask build-ebpf`")]
    MissingMap { name: &'static str },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<MapError>,
    },
}

/// Where a program is attached, for /config_dump.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub attach_type: &'static str,
    pub cgroup: PathBuf,
}

pub struct CaptureOptions<'a> {
    pub cgroup: &'a Path,
    pub object: Option<&'a Path>,
    pub mark: u32,
    /// The delivery sockets' mark (0: no original-source delivery).
    pub delivery_mark: u32,
    pub hbone_port: u16,
    /// Sources strict pods still take plaintext from.
    pub strict_allow: &'a [ipnet::IpNet],
}

/// The loaded, attached programs and handles to their maps.
pub struct Capture {
    // Owns the programs and their links; dropping it detaches them. Locked
    // only to attach or detach the strict-mode program of a pod.
    ebpf: Mutex<Ebpf>,
    meshed: Mutex<HashMap<MapData, u64, MeshedPod>>,
    orig_dst: HashMap<MapData, ConnKey, SockAddr>,
    orig_by_cookie: HashMap<MapData, u64, SockAddr>,
    counters: PerCpuArray<MapData, u64>,
    refused_vips: Mutex<HashMap<MapData, SockAddr, u32>>,
    service_refused: PerCpuArray<MapData, u64>,
    /// Per address of this node's pods: inbound treatment, the proxy's
    /// inbound listener, and "a meshed pod of this node".
    inbound: Mutex<InboundMaps>,
    attached: Vec<AttachedProgram>,
}

struct InboundMaps {
    deliveries: HashMap<MapData, ConnKey, u32>,
    pods: HashMap<MapData, SockAddr, InboundPod>,
    listeners: SockHash<MapData, SockAddr>,
    local_meshed: HashMap<MapData, SockAddr, u32>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("attached", &self.attached).finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source: Box::new(source) }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source: Box::new(source) }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::MissingMap { name })?;
    T::try_from(map).map_err(map_err(name))
}

impl Capture {
    /// Loads the programs, writes the loop-guard settings, and attaches.
    pub fn load(opts: &CaptureOptions<'_>) -> Result<Self, CaptureError> {
        let bytes = match opts.object {
            Some(path) => std::fs::read(path).map_err(|source| CaptureError::Io {
                what: format!("reading eBPF object {}", path.display()),
                source,
            })?,
            None if EMBEDDED_OBJECT.is_empty() => return Err(CaptureError::NotBuilt),
            None => EMBEDDED_OBJECT.to_vec(),
        };
        let what = opts.object.map(|p| p.display().to_string()).unwrap_or_else(|| "the built-in object".into());
        let mut ebpf = EbpfLoader::new().load(&bytes).map_err(|e| match e {
            // The file itself is wrong: saying "run as root" would mislead.
            EbpfError::ParseError(_)
            | EbpfError::BtfError(_)
            | EbpfError::RelocationError(_)
            | EbpfError::BtfRelocationError(_) => CaptureError::BadObject { what, reason: e.to_string() },
            e => CaptureError::Load(Box::new(e)),
        })?;
        logger::spawn(&mut ebpf);

        let mut settings: Array<MapData, Settings> = take_map(&mut ebpf, "SETTINGS")?;
        settings
            .set(
                0,
                Settings {
                    mark: opts.mark,
                    proxy_tgid: std::process::id(),
                    hbone_port: u32::from(opts.hbone_port),
                    delivery_mark: opts.delivery_mark,
                },
                0,
            )
            .map_err(map_err("SETTINGS"))?;
        let meshed = take_map(&mut ebpf, "MESHED_NETNS")?;
        let orig_dst = take_map(&mut ebpf, "ORIG_DST")?;
        let orig_by_cookie = take_map(&mut ebpf, "ORIG_DST_BY_COOKIE")?;
        let counters = take_map(&mut ebpf, "COUNTERS")?;
        let refused_vips = Mutex::new(take_map(&mut ebpf, "REFUSED_VIPS")?);
        let service_refused = take_map(&mut ebpf, "SERVICE_REFUSED")?;
        let inbound = Mutex::new(InboundMaps {
            deliveries: take_map(&mut ebpf, "DELIVERIES")?,
            pods: take_map(&mut ebpf, "INBOUND_PODS")?,
            listeners: take_map(&mut ebpf, "INBOUND_LISTENERS")?,
            local_meshed: take_map(&mut ebpf, "LOCAL_MESHED")?,
        });
        let mut allow: LpmTrie<MapData, AllowKey, u32> = take_map(&mut ebpf, "STRICT_ALLOW")?;
        for net in opts.strict_allow {
            let (len, key) = addr::allow_key(net);
            allow.insert(&LpmKey::new(len, key), 1, 0).map_err(map_err("STRICT_ALLOW"))?;
        }
        let cgroup = File::open(opts.cgroup)
            .map_err(|source| CaptureError::Io { what: format!("opening cgroup {}", opts.cgroup.display()), source })?;
        let mut attached = Vec::new();
        // sockops first: a connect steered before it is attached would never be re-keyed.
        {
            let prog: &mut SockOps = program(&mut ebpf, SOCKOPS)?;
            prog.load().map_err(prog_err(SOCKOPS))?;
            prog.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(SOCKOPS))?;
            attached.push(AttachedProgram { name: SOCKOPS, attach_type: "sock_ops", cgroup: opts.cgroup.into() });
        }
        for (name, attach_type) in [
            (GETPEERNAME4, "cgroup_inet4_getpeername"),
            (GETPEERNAME6, "cgroup_inet6_getpeername"),
            (GETSOCKNAME4, "cgroup_inet4_getsockname"),
            (GETSOCKNAME6, "cgroup_inet6_getsockname"),
            (CONNECT4, "cgroup_inet4_connect"),
            (CONNECT6, "cgroup_inet6_connect"),
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            // Single is the only mode bpf_link_create accepts here; links
            // still stack with other programs as if multi.
            prog.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(name))?;
            attached.push(AttachedProgram { name, attach_type, cgroup: opts.cgroup.into() });
        }
        {
            let prog: &mut SkLookup = program(&mut ebpf, INBOUND)?;
            prog.load().map_err(prog_err(INBOUND))?;
        }
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            meshed: Mutex::new(meshed),
            orig_dst,
            orig_by_cookie,
            counters,
            refused_vips,
            service_refused,
            inbound,
            attached,
        })
    }

    pub fn attached(&self) -> &[AttachedProgram] {
        &self.attached
    }

    /// Starts capturing the connects made in the netns with this cookie.
    pub fn mesh(&self, netns_cookie: u64, pod: MeshedPod) -> Result<(), CaptureError> {
        let mut map = self.meshed.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(netns_cookie, pod, 0).map_err(map_err("MESHED_NETNS"))
    }

    /// Stops capturing; connections already steered are unaffected.
    pub fn unmesh(&self, netns_cookie: u64) -> Result<(), CaptureError> {
        let mut map = self.meshed.lock().unwrap_or_else(|e| e.into_inner());
        match map.remove(&netns_cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err("MESHED_NETNS")(e)),
        }
    }

    /// The destination a captured connection was dialled to. One map lookup
    /// (a syscall) per accepted connection.
    pub fn original_destination(&self, key: &ConnKey) -> Result<Option<SocketAddr>, CaptureError> {
        match self.orig_dst.get(key, 0) {
            Ok(orig) => Ok(addr::from_kernel(&orig)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err("ORIG_DST")(e)),
        }
    }

    /// Attaches the inbound program to a pod's netns: plaintext from
    /// outside the pod is captured (or, strict, refused) per the pod's
    /// addresses registered with `inbound_pod`. The link lives until
    /// `detach_inbound` or the process ends (fail open).
    pub fn attach_inbound(&self, netns: &File) -> Result<SkLookupLinkId, CaptureError> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let prog: &mut SkLookup = program(&mut ebpf, INBOUND)?;
        prog.attach(netns).map_err(prog_err(INBOUND))
    }

    pub fn detach_inbound(&self, link: SkLookupLinkId) -> Result<(), CaptureError> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let prog: &mut SkLookup = program(&mut ebpf, INBOUND)?;
        prog.detach(link).map_err(prog_err(INBOUND))
    }

    /// Registers one address of a pod of this node: how plaintext arriving
    /// at it is treated, and (captured) the proxy's listener for it.
    pub fn inbound_pod(
        &self,
        ip: std::net::IpAddr,
        flags: u32,
        listener: Option<&impl std::os::fd::AsRawFd>,
    ) -> Result<(), CaptureError> {
        let key = addr::to_kernel(std::net::SocketAddr::new(ip, 0));
        let mut maps = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        maps.local_meshed.insert(key, 1, 0).map_err(map_err("LOCAL_MESHED"))?;
        if let Some(listener) = listener {
            maps.listeners.insert(key, listener.as_raw_fd(), 0).map_err(map_err("INBOUND_LISTENERS"))?;
        }
        maps.pods.insert(key, InboundPod { flags }, 0).map_err(map_err("INBOUND_PODS"))
    }

    /// Announces a delivery from `client` (a transparent socket already
    /// bound there) to `app`, so the inbound program lets its SYN through.
    pub fn expect_delivery(&self, client: SocketAddr, app: SocketAddr) -> Result<(), CaptureError> {
        let key = ConnKey { netns_cookie: 0, client: addr::to_kernel(client), listener: addr::to_kernel(app) };
        let mut maps = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        maps.deliveries.insert(key, 1, 0).map_err(map_err("DELIVERIES"))
    }

    /// The delivery's connect finished (either way): its entry goes.
    pub fn delivered(&self, client: SocketAddr, app: SocketAddr) {
        let key = ConnKey { netns_cookie: 0, client: addr::to_kernel(client), listener: addr::to_kernel(app) };
        let mut maps = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        // LRU: an entry that could not be removed ages out.
        let _ = maps.deliveries.remove(&key);
    }

    /// Forgets one address of a pod that left the node.
    pub fn forget_inbound_pod(&self, ip: std::net::IpAddr) -> Result<(), CaptureError> {
        let key = addr::to_kernel(std::net::SocketAddr::new(ip, 0));
        let mut maps = self.inbound.lock().unwrap_or_else(|e| e.into_inner());
        let gone = |r: Result<(), MapError>, name| match r {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err(name)(e)),
        };
        gone(maps.pods.remove(&key), "INBOUND_PODS")?;
        gone(maps.listeners.remove(&key), "INBOUND_LISTENERS")?;
        gone(maps.local_meshed.remove(&key), "LOCAL_MESHED")
    }

    /// Makes the kernel refuse connects to this VIP:port (a service with no
    /// endpoints), counted under the service's id.
    pub fn refuse_vip(&self, vip: SocketAddr, service_id: u32) -> Result<(), CaptureError> {
        let mut map = self.refused_vips.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(addr::to_kernel(vip), service_id, 0).map_err(map_err("REFUSED_VIPS"))
    }

    /// Stops refusing connects to this VIP:port.
    pub fn allow_vip(&self, vip: SocketAddr) -> Result<(), CaptureError> {
        let mut map = self.refused_vips.lock().unwrap_or_else(|e| e.into_inner());
        match map.remove(&addr::to_kernel(vip)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(map_err("REFUSED_VIPS")(e)),
        }
    }

    /// Connects the kernel refused for the service with this id.
    pub fn service_refused(&self, id: u32) -> u64 {
        self.service_refused.get(&id, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Kernel counters summed over CPUs, indexed like `outrigger_common::counter`.
    pub fn counters(&self) -> Result<[u64; counter::COUNT as usize], CaptureError> {
        let mut out = [0u64; counter::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let per_cpu = self.counters.get(&(i as u32), 0).map_err(map_err("COUNTERS"))?;
            *slot = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Entries in (ORIG_DST, ORIG_DST_BY_COOKIE, MESHED_NETNS). Walks the
    /// maps: for the admin server, not the data path.
    pub fn map_entries(&self) -> MapEntries {
        let meshed = self.meshed.lock().unwrap_or_else(|e| e.into_inner()).keys().count();
        MapEntries {
            orig_dst: self.orig_dst.keys().count(),
            orig_dst_by_cookie: self.orig_by_cookie.keys().count(),
            meshed_netns: meshed,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct MapEntries {
    pub orig_dst: usize,
    pub orig_dst_by_cookie: usize,
    pub meshed_netns: usize,
}

fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, CaptureError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(CaptureError::MissingProgram { name })?;
    prog.try_into().map_err(prog_err(name))
}
