//! A pod's network namespace made ready for original-source delivery.
//!
//! The proxy delivers a connection to the application from a transparent
//! socket bound to the real client's address, inside the pod. The SYN goes
//! over loopback; the replies, addressed to that client, must come back to
//! the proxy's socket rather than leave on the pod's interface with a
//! spoofed source. Two settings do it, both scoped to the pod's netns and
//! to the proxy's delivery mark — no iptables:
//!
//! - `net.ipv4.tcp_fwmark_accept = 1`: a connection the application
//!   accepts takes the mark of the SYN that opened it, so its packets (the
//!   SYN-ACK included) carry the delivery mark;
//! - `net.ipv4.fwmark_reflect = 1` (and IPv6's): a reset or ICMP error the
//!   kernel sends back for a marked packet — a delivery to a closed port —
//!   carries the mark too, so the proxy's socket learns of the refusal at
//!   once instead of the reset going out to the real client;
//! - `ip rule fwmark MARK lookup TABLE` with `local default dev lo` in
//!   TABLE (IPv4 and IPv6): packets with that mark are delivered locally,
//!   to the proxy's transparent socket.
//!
//! Nothing else in the pod carries the delivery mark, so nothing else is
//! affected; the settings are harmless if the proxy goes away.

use std::net::{Ipv4Addr, Ipv6Addr};

use rtnetlink::packet_route::{
    route::{RouteScope, RouteType},
    rule::RuleAction,
};

use super::{Netns, NetnsError};

/// Ahead of the main table (32766), after the local table (0).
const RULE_PRIORITY: u32 = 100;
const LOOPBACK_IFINDEX: u32 = 1;

fn route_err(what: &'static str) -> impl Fn(rtnetlink::Error) -> NetnsError {
    move |e| NetnsError::Routing { what, reason: e.to_string() }
}

/// Adding what is already there (a restarted proxy) is not an error.
fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}

impl Netns {
    /// Sets the pod's netns up for original-source delivery with `mark`,
    /// using routing table `table`.
    pub async fn enable_original_source(&self, mark: u32, table: u32) -> Result<(), NetnsError> {
        let runtime = tokio::runtime::Handle::current();
        // The netlink socket must be made inside the pod's netns (it talks
        // to the netns it was made in), with the runtime entered so it can
        // register with the reactor.
        let made = self
            .run(move || {
                for (sysctl, what) in [
                    ("/proc/sys/net/ipv4/tcp_fwmark_accept", "setting net.ipv4.tcp_fwmark_accept"),
                    ("/proc/sys/net/ipv4/fwmark_reflect", "setting net.ipv4.fwmark_reflect"),
                ] {
                    std::fs::write(sysctl, "1").map_err(|e| NetnsError::Routing { what, reason: e.to_string() })?;
                }
                // Absent when the pod has no IPv6; nothing to reflect then.
                let _ = std::fs::write("/proc/sys/net/ipv6/fwmark_reflect", "1");
                let _entered = runtime.enter();
                let (connection, handle, _) = rtnetlink::new_connection()
                    .map_err(|e| NetnsError::Routing { what: "opening a netlink socket", reason: e.to_string() })?;
                Ok::<_, NetnsError>((connection, handle))
            })
            .await??;
        let (connection, handle) = made;
        let driver = tokio::spawn(connection);
        let result = async {
            for v6 in [false, true] {
                let rule = handle
                    .rule()
                    .add()
                    .fw_mark(mark)
                    .table_id(table)
                    .priority(RULE_PRIORITY)
                    .action(RuleAction::ToTable);
                let added = if v6 { rule.v6().execute().await } else { rule.v4().execute().await };
                match added {
                    Err(e) if !exists(&e) => return Err(route_err("adding the delivery rule")(e)),
                    _ => {}
                }
                let route = if v6 {
                    rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                        .table_id(table)
                        .kind(RouteType::Local)
                        // Local routes are host-scoped, as `ip route add local` makes them.
                        .scope(RouteScope::Host)
                        .output_interface(LOOPBACK_IFINDEX)
                        .build()
                } else {
                    rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                        .table_id(table)
                        .kind(RouteType::Local)
                        // Local routes are host-scoped, as `ip route add local` makes them.
                        .scope(RouteScope::Host)
                        .output_interface(LOOPBACK_IFINDEX)
                        .build()
                };
                match handle.route().add(route).execute().await {
                    // A pod without IPv6 has no IPv6 to deliver.
                    Err(e) if v6 && !exists(&e) => {
                        tracing::debug!(netns = %self.path().display(), error = %e, "no IPv6 delivery route");
                    }
                    Err(e) if !exists(&e) => return Err(route_err("adding the delivery route")(e)),
                    _ => {}
                }
            }
            Ok(())
        }
        .await;
        driver.abort();
        result
    }
}
