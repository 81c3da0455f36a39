//! Conversions between std socket addresses and the kernel's map layout
//! (network-order u32 words, IPv4-mapped addresses folded into IPv4).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use outrigger_common::{SockAddr, FAMILY_V4, FAMILY_V6};

pub fn to_kernel(addr: SocketAddr) -> SockAddr {
    let port = u32::from(addr.port());
    match addr.ip() {
        IpAddr::V4(ip) => v4(ip, port),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(ip4) => v4(ip4, port),
            None => {
                let o = ip.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                SockAddr { family: FAMILY_V6, port, ip: [word(0), word(4), word(8), word(12)] }
            }
        },
    }
}

fn v4(ip: Ipv4Addr, port: u32) -> SockAddr {
    SockAddr { family: FAMILY_V4, port, ip: [u32::from_ne_bytes(ip.octets()), 0, 0, 0] }
}

/// A CIDR as a key of the strict-mode allow list: IPv6 space, IPv4 mapped
/// (`::ffff:a.b.c.d/96+n`), words in network order like every address here.
pub fn allow_key(net: &ipnet::IpNet) -> (u32, outrigger_common::AllowKey) {
    let (octets, len) = match net {
        ipnet::IpNet::V4(n) => (n.addr().to_ipv6_mapped().octets(), u32::from(n.prefix_len()) + 96),
        ipnet::IpNet::V6(n) => (n.addr().octets(), u32::from(n.prefix_len())),
    };
    let word = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    (len, outrigger_common::AllowKey { ip: [word(0), word(4), word(8), word(12)] })
}

/// `None` when the family tag is not one the kernel programs write.
pub fn from_kernel(addr: &SockAddr) -> Option<SocketAddr> {
    let port = u16::try_from(addr.port).ok()?;
    let ip = match addr.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(addr.ip[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in ["10.1.2.3:8080", "[fd00::1:2]:443", "[::1]:15001"] {
            let addr: SocketAddr = s.parse().expect("valid");
            assert_eq!(from_kernel(&to_kernel(addr)), Some(addr), "{s}");
        }
    }

    #[test]
    fn mapped_v6_becomes_v4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:40000".parse().expect("valid");
        let plain: SocketAddr = "127.0.0.1:40000".parse().expect("valid");
        assert_eq!(to_kernel(mapped), to_kernel(plain));
    }

    #[test]
    fn matches_kernel_byte_layout() {
        // The kernel's user_ip4 for 127.0.0.1 holds the bytes 7f 00 00 01.
        let k = to_kernel("127.0.0.1:1".parse().expect("valid"));
        assert_eq!(k.ip[0].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
