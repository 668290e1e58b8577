//! Addresses in a run that spans nodes: what other nodes can reach, and which network interface
//! carries an address (for NCCL's and gloo's interface hints).
//!
//! The launcher sets [`MULTI_NODE_ENV`] on every process of a run whose groups sit on more than
//! one node; the roles then refuse to listen on, or point peers at, an address only their own
//! node can reach (loopback, link-local, or the unspecified address as a peer's URL).

use std::net::{IpAddr, SocketAddr};

/// Set to `1` by `grpo-node launch` when the run spans nodes.
pub const MULTI_NODE_ENV: &str = "GRPO_MULTI_NODE";

/// Whether this process is part of a run that spans nodes.
pub fn multi_node() -> bool {
    std::env::var(MULTI_NODE_ENV).is_ok_and(|v| v == "1")
}

/// An address other nodes cannot use.
#[derive(Debug, thiserror::Error)]
#[error(
    "--{flag} {addr}: a {kind} address in a run that spans nodes; other nodes cannot reach it \
     (use this node's own address, `{{host:GROUP}}` in a launch manifest)"
)]
pub struct LocalOnly {
    pub flag: &'static str,
    pub addr: String,
    pub kind: &'static str,
}

/// "loopback", "link-local" or "unspecified" for an address only this node (or nothing) can
/// reach.
pub fn local_only_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

/// A listen address of a multi-node run: loopback, link-local and the unspecified address are
/// refused (a sidecar advertises the address it listens on: peers cannot dial 0.0.0.0).
pub fn check_listen(flag: &'static str, addr: SocketAddr) -> Result<(), LocalOnly> {
    match local_only_kind(canonical(addr.ip())) {
        Some(kind) => Err(LocalOnly {
            flag,
            addr: addr.to_string(),
            kind,
        }),
        None => Ok(()),
    }
}

/// An IPv4-mapped IPv6 address as IPv4 (`::ffff:127.0.0.1` is loopback).
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A peer's URL in a multi-node run: its host must not be loopback, link-local, unspecified or
/// `localhost`. Host names other than `localhost` pass (they are resolved by the peer's DNS).
pub fn check_url(flag: &'static str, url: &str) -> Result<(), LocalOnly> {
    let host = url_host(url);
    let kind = if host.eq_ignore_ascii_case("localhost") {
        Some("loopback")
    } else {
        host.parse::<IpAddr>().ok().map(canonical).and_then(local_only_kind)
    };
    match kind {
        Some(kind) => Err(LocalOnly {
            flag,
            addr: url.to_string(),
            kind,
        }),
        None => Ok(()),
    }
}

/// The host part of `scheme://host:port/path` (IPv6 without its brackets).
fn url_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// The name of the network interface that holds `ip` (Linux `getifaddrs`), for
/// `NCCL_SOCKET_IFNAME` and `GLOO_SOCKET_IFNAME`.
pub fn interface_of(ip: IpAddr) -> Option<String> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        if let Some(addr) = sockaddr_ip(ifa.ifa_addr) {
            if addr == ip && !ifa.ifa_name.is_null() {
                // SAFETY: ifa_name is a NUL-terminated C string owned by the list.
                let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
                found = Some(name.to_string_lossy().into_owned());
                break;
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: `sa` is non-null and points at a sockaddr whose family says its real type.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let v4 = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
            }
            libc::AF_INET6 => {
                let v6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::from(v6.sin6_addr.s6_addr))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_only_addresses_are_named_and_refused() {
        let bad = |u: &str| check_url("sidecar", u).map_err(|e| e.kind).err();
        assert_eq!(bad("http://127.0.0.1:50051"), Some("loopback"));
        assert_eq!(bad("http://localhost:8000/v1"), Some("loopback"));
        assert_eq!(bad("http://0.0.0.0:8000"), Some("unspecified"));
        assert_eq!(bad("http://169.254.3.4:8000"), Some("link-local"));
        assert_eq!(bad("http://[fe80::1]:8000"), Some("link-local"));
        assert_eq!(bad("http://[::1]:8000"), Some("loopback"));
        assert_eq!(bad("http://10.77.0.12:50051"), None);
        assert_eq!(bad("http://sidecar-0.grpo:50051"), None);
        let listen = |a: &str| {
            check_listen("listen", a.parse().expect("addr"))
                .map_err(|e| e.kind)
                .err()
        };
        assert_eq!(listen("127.0.0.1:1"), Some("loopback"));
        assert_eq!(listen("169.254.0.9:1"), Some("link-local"));
        assert_eq!(
            listen("0.0.0.0:1"),
            Some("unspecified"),
            "peers cannot dial what is advertised"
        );
        assert_eq!(listen("[::ffff:127.0.0.1]:1"), Some("loopback"));
        assert_eq!(listen("10.0.0.2:1"), None);
    }

    #[test]
    fn loopback_is_on_an_interface() {
        let lo = interface_of(IpAddr::from([127, 0, 0, 1]));
        assert!(lo.is_some(), "127.0.0.1 is held by some interface");
        assert_eq!(interface_of(IpAddr::from([203, 0, 113, 77])), None);
    }
}
