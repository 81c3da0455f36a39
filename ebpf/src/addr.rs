//! Address helpers. Addresses are u32 words holding network-order bytes,
//! exactly as the kernel's context structs hold them.

use outrigger_common::{SockAddr, FAMILY_V4, FAMILY_V6};

/// 127.0.0.1 as the kernel stores it.
pub const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as the kernel stores it.
pub const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// Word 2 of an IPv4-mapped address (::ffff:a.b.c.d).
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// 127.0.0.0/8 or 0.0.0.0 (which the kernel treats as loopback).
#[inline(always)]
pub fn is_loopback_v4(ip: u32) -> bool {
    let first_octet = ip.to_ne_bytes()[0];
    first_octet == 127 || ip == 0
}

/// ::1 or :: (which the kernel treats as loopback).
#[inline(always)]
pub fn is_loopback_v6(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && (ip[3] == 0 || ip[3] == LOOPBACK_V6[3])
}

#[inline(always)]
pub fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_PREFIX
}

/// An address from an IPv6 socket, with IPv4-mapped addresses turned into
/// IPv4 so both sides of a dual-stack connection build the same key.
#[inline(always)]
pub fn normalize(ip: [u32; 4], port: u32) -> SockAddr {
    if is_v4_mapped(&ip) {
        SockAddr { family: FAMILY_V4, port, ip: [ip[3], 0, 0, 0] }
    } else {
        SockAddr { family: FAMILY_V6, port, ip }
    }
}
