//! The shim's decisions, as pure functions over plain Rust values.
//!
//! The `extern "C"` hooks in [`crate::hooks`] only convert pointers into these types, ask here,
//! and carry out the answer. Unit tests call these directly, without preloading anything.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use broker_contract::{fake_slot, run_ipv4, ShimConfig, DNS_PORT};

/// What to do with one `connect()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// Call the real `connect` on the same fd with this address instead.
    Redirect(SocketAddr),
    /// Call the real `connect` unchanged.
    Bypass(Bypass),
    /// Fail with `ECONNREFUSED` without connecting anywhere.
    Refuse(Refuse),
    /// DNS (port 53, UDP or TCP): call the real `connect` with the run's DNS responder
    /// instead, without a ticket (plain DNS), and remember the original server for the fd so
    /// answers can be reported as coming from it ([`reply_source`]).
    Dns(SocketAddr),
}

/// Why a connect is left alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Not an IPv4/IPv6 destination (unix sockets, `AF_UNSPEC` dissociation, ...).
    NotIp,
    /// Not `SOCK_STREAM`: UDP and raw sockets are not rerouted to the broker's TLS listeners
    /// (DNS to port 53 is steered to the run's responder instead, see [`Connect::Dns`]).
    NotStream,
    /// A destination the broker does not manage, and egress is not restricted.
    Unmanaged,
    /// A fake address of another run: loopback, that run's broker decides.
    OtherRun,
    /// Loopback or this host, allowed even when egress is restricted.
    Local,
}

/// Why a connect is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// `deny_unlisted` is on and this is a TCP connection to somewhere else.
    Unlisted,
    /// An `IPV6_V6ONLY` socket to a managed host, but the broker has no `[::1]` listener.
    NoV6Listener,
}

/// What the hook learns about the socket, only when a decision needs it (one `getsockopt`
/// each), so pass-through connects to unmanaged hosts cost nothing extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    /// `SO_TYPE` is `SOCK_STREAM`.
    pub stream: bool,
    /// An `AF_INET6` socket with `IPV6_V6ONLY` set: it cannot reach a v4-mapped address.
    pub v6only: bool,
}

/// The IPv4 address inside `ip`, if it is one or is v4-mapped (`::ffff:a.b.c.d`).
fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// Loopback or "this host" (`0.0.0.0`/`::` connect to the local machine on Linux).
pub fn is_local(ip: IpAddr) -> bool {
    match (ip, as_v4(ip)) {
        (_, Some(v4)) => v4.is_loopback() || v4.is_unspecified(),
        (IpAddr::V6(v6), None) => v6.is_loopback() || v6.is_unspecified(),
        (IpAddr::V4(_), None) => false,
    }
}

/// Decide one `connect()` to `dest` (`None`: not an IP family).
///
/// A fake address of this run (`127.77.<slot>.<h>`, any port, or its v4-mapped form) goes to
/// the broker's one listener of the run, `127.77.<slot>.1:cfg.port`, which tells the hosts
/// apart by the TLS server name (SNI). An `IPV6_V6ONLY` socket cannot reach a v4 address: it
/// goes to `[::1]:cfg.port6`, classified the same way.
pub fn decide_connect(
    cfg: &ShimConfig,
    dest: Option<SocketAddr>,
    facts: impl FnOnce() -> SocketFacts,
) -> Connect {
    let Some(dest) = dest else {
        return Connect::Bypass(Bypass::NotIp);
    };
    match as_v4(dest.ip()).and_then(fake_slot) {
        Some(slot) if slot != cfg.slot => Connect::Bypass(Bypass::OtherRun),
        Some(slot) => {
            let v4 = run_ipv4(slot);
            let facts = facts();
            if !facts.stream {
                return Connect::Bypass(Bypass::NotStream);
            }
            match dest {
                SocketAddr::V4(_) => Connect::Redirect(SocketAddrV4::new(v4, cfg.port).into()),
                SocketAddr::V6(_) if facts.v6only => match cfg.port6 {
                    0 => Connect::Refuse(Refuse::NoV6Listener),
                    port6 => Connect::Redirect(
                        SocketAddrV6::new(Ipv6Addr::LOCALHOST, port6, 0, 0).into(),
                    ),
                },
                SocketAddr::V6(_) => {
                    Connect::Redirect(SocketAddrV6::new(v4.to_ipv6_mapped(), cfg.port, 0, 0).into())
                }
            }
        }
        None => match (cfg.dns, dest.port()) {
            (Some(responder), DNS_PORT) => {
                let facts = facts();
                match dns_target(responder, dest, facts.v6only) {
                    Some(to) => Connect::Dns(to),
                    None => unmanaged(cfg, dest, || facts),
                }
            }
            _ => unmanaged(cfg, dest, facts),
        },
    }
}

/// A destination the broker does not manage: refused only under `deny_unlisted`, for TCP
/// to somewhere other than this host.
fn unmanaged(cfg: &ShimConfig, dest: SocketAddr, facts: impl FnOnce() -> SocketFacts) -> Connect {
    if !cfg.deny_unlisted {
        return Connect::Bypass(Bypass::Unmanaged);
    }
    if is_local(dest.ip()) {
        return Connect::Bypass(Bypass::Local);
    }
    match facts().stream {
        true => Connect::Refuse(Refuse::Unlisted),
        false => Connect::Bypass(Bypass::NotStream),
    }
}

/// Where DNS traffic to `dest` (port 53) goes instead: the run's `responder`, in the family of
/// the agent's socket (v4-mapped for an `AF_INET6` socket). `None` for an `IPV6_V6ONLY`
/// socket, which cannot reach the IPv4 responder (its traffic passes through), and for the
/// responder itself.
pub fn dns_target(responder: SocketAddr, dest: SocketAddr, v6only: bool) -> Option<SocketAddr> {
    let SocketAddr::V4(r) = responder else {
        return None; // the broker binds it on 127.0.0.1
    };
    if dest.port() != DNS_PORT || as_v4(dest.ip()) == Some(*r.ip()) && dest.port() == r.port() {
        return None;
    }
    match dest {
        SocketAddr::V4(_) => Some(responder),
        SocketAddr::V6(_) if v6only => None,
        SocketAddr::V6(_) => {
            Some(SocketAddrV6::new(r.ip().to_ipv6_mapped(), r.port(), 0, 0).into())
        }
    }
}

/// The source address to report for a datagram a steered DNS socket received from `from`:
/// the server the agent sent to (`original`), in `from`'s family, when `from` is the run's
/// responder; `None` (report `from` as it is) for anything else. c-ares (Node, Bun) and
/// glibc's resolver drop an answer whose source is not the server they asked.
pub fn reply_source(
    responder: SocketAddr,
    from: SocketAddr,
    original: SocketAddr,
) -> Option<SocketAddr> {
    let from_responder = as_v4(from.ip()) == as_v4(responder.ip())
        && as_v4(from.ip()).is_some()
        && from.port() == responder.port();
    if !from_responder {
        return None;
    }
    match (from, original) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            Some(original)
        }
        (SocketAddr::V6(_), SocketAddr::V4(o)) => {
            Some(SocketAddrV6::new(o.ip().to_ipv6_mapped(), o.port(), 0, 0).into())
        }
        // An AF_INET socket cannot have sent to an IPv6 server.
        (SocketAddr::V4(_), SocketAddr::V6(_)) => None,
    }
}

/// The address family a resolver call asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `AF_UNSPEC`: answered with IPv4 only, so Happy Eyeballs has nothing to race.
    Any,
    V4,
    V6,
    /// Anything else (`AF_UNIX`, ...): never answered by the shim.
    Other,
}

/// The fake address to answer for `name`, or `None` to let the real resolver answer.
///
/// Numeric addresses are never rewritten here (`connect` handles fake ones); every managed
/// hostname gets the run's one address, `127.77.<slot>.1`, for IPv4 or any family, and
/// `::ffff:127.77.<slot>.1` for IPv6 (the `connect` hook sends that to the broker, or to
/// `[::1]` for `IPV6_V6ONLY` sockets).
pub fn decide_resolve(cfg: &ShimConfig, name: &str, family: Family) -> Option<IpAddr> {
    if name.parse::<IpAddr>().is_ok() || !cfg.manages(name) {
        return None;
    }
    let v4 = run_ipv4(cfg.slot);
    match family {
        Family::Any | Family::V4 => Some(IpAddr::V4(v4)),
        Family::V6 => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        Family::Other => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(deny_unlisted: bool) -> ShimConfig {
        ShimConfig {
            slot: 7,
            port: 40000,
            port6: 40001,
            deny_unlisted,
            hosts: vec!["api.openai.com".into(), "*.example.org".into()],
            dns: Some(RESPONDER.parse().expect("addr")),
            ..Default::default()
        }
    }

    const RESPONDER: &str = "127.0.0.1:40053";

    const TCP: SocketFacts = SocketFacts {
        stream: true,
        v6only: false,
    };
    const TCP6ONLY: SocketFacts = SocketFacts {
        stream: true,
        v6only: true,
    };
    const UDP: SocketFacts = SocketFacts {
        stream: false,
        v6only: false,
    };

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().expect("test address"))
    }

    fn never() -> SocketFacts {
        panic!("socket facts must not be fetched for this destination")
    }

    #[test]
    fn fake_v4_goes_to_the_runs_one_listener() {
        for dest in ["127.77.7.1:443", "127.77.7.2:443", "127.77.7.255:8443"] {
            let d = decide_connect(&cfg(false), addr(dest), || TCP);
            assert_eq!(
                d,
                Connect::Redirect("127.77.7.1:40000".parse().expect("addr")),
                "{dest}"
            );
        }
        let d = decide_connect(&cfg(false), addr("[::ffff:127.77.7.9]:443"), || TCP);
        assert_eq!(
            d,
            Connect::Redirect("[::ffff:127.77.7.1]:40000".parse().expect("addr"))
        );
    }

    #[test]
    fn v4_mapped_stays_v6_unless_v6only() {
        let d = decide_connect(&cfg(false), addr("[::ffff:127.77.7.1]:443"), || TCP);
        assert_eq!(
            d,
            Connect::Redirect("[::ffff:127.77.7.1]:40000".parse().expect("addr"))
        );
        let d = decide_connect(&cfg(false), addr("[::ffff:127.77.7.1]:443"), || TCP6ONLY);
        assert_eq!(d, Connect::Redirect("[::1]:40001".parse().expect("addr")));
        let no_v6 = ShimConfig {
            port6: 0,
            ..cfg(false)
        };
        let d = decide_connect(&no_v6, addr("[::ffff:127.77.7.1]:443"), || TCP6ONLY);
        assert_eq!(d, Connect::Refuse(Refuse::NoV6Listener));
    }

    #[test]
    fn udp_to_fake_address_is_untouched() {
        let d = decide_connect(&cfg(true), addr("127.77.7.1:53"), || UDP);
        assert_eq!(d, Connect::Bypass(Bypass::NotStream));
    }

    #[test]
    fn pass_through_does_not_ask_the_socket() {
        let c = cfg(false);
        assert_eq!(
            decide_connect(&c, None, never),
            Connect::Bypass(Bypass::NotIp)
        );
        assert_eq!(
            decide_connect(&c, addr("1.2.3.4:443"), never),
            Connect::Bypass(Bypass::Unmanaged)
        );
        assert_eq!(
            decide_connect(&c, addr("127.77.8.1:443"), never),
            Connect::Bypass(Bypass::OtherRun)
        );
        // host 0 is not a fake address (decode refuses it): plain loopback
        assert_eq!(
            decide_connect(&c, addr("127.77.7.0:443"), never),
            Connect::Bypass(Bypass::Unmanaged)
        );
        assert_eq!(
            decide_connect(&cfg(true), addr("127.0.0.1:5432"), never),
            Connect::Bypass(Bypass::Local)
        );
        assert_eq!(
            decide_connect(&cfg(true), addr("[::1]:5432"), never),
            Connect::Bypass(Bypass::Local)
        );
    }

    #[test]
    fn deny_unlisted_refuses_remote_tcp_only() {
        let c = cfg(true);
        assert_eq!(
            decide_connect(&c, addr("93.184.216.34:443"), || TCP),
            Connect::Refuse(Refuse::Unlisted)
        );
        assert_eq!(
            decide_connect(&c, addr("[2001:db8::1]:443"), || TCP),
            Connect::Refuse(Refuse::Unlisted)
        );
        assert_eq!(
            decide_connect(&c, addr("[::ffff:8.8.8.8]:443"), || TCP),
            Connect::Refuse(Refuse::Unlisted)
        );
        let no_dns = ShimConfig {
            dns: None,
            ..cfg(true)
        };
        assert_eq!(
            decide_connect(&no_dns, addr("8.8.8.8:53"), || UDP),
            Connect::Bypass(Bypass::NotStream)
        );
        assert_eq!(
            decide_connect(&no_dns, addr("8.8.8.8:53"), || TCP),
            Connect::Refuse(Refuse::Unlisted)
        );
        assert_eq!(
            decide_connect(&c, addr("[::ffff:127.0.0.1]:80"), never),
            Connect::Bypass(Bypass::Local)
        );
        assert_eq!(
            decide_connect(&c, addr("0.0.0.0:80"), never),
            Connect::Bypass(Bypass::Local)
        );
    }

    #[test]
    fn dns_goes_to_the_responder_over_udp_and_tcp() {
        let to: SocketAddr = RESPONDER.parse().expect("addr");
        for deny in [false, true] {
            for facts in [UDP, TCP] {
                assert_eq!(
                    decide_connect(&cfg(deny), addr("10.0.0.2:53"), || facts),
                    Connect::Dns(to)
                );
            }
        }
        assert_eq!(
            decide_connect(&cfg(false), addr("[2001:db8::53]:53"), || UDP),
            Connect::Dns("[::ffff:127.0.0.1]:40053".parse().expect("addr"))
        );
        // A v6-only socket cannot reach the responder: left alone, or refused as any TCP.
        assert_eq!(
            decide_connect(&cfg(false), addr("[2001:db8::53]:53"), || TCP6ONLY),
            Connect::Bypass(Bypass::Unmanaged)
        );
        assert_eq!(
            decide_connect(&cfg(true), addr("[2001:db8::53]:53"), || TCP6ONLY),
            Connect::Refuse(Refuse::Unlisted)
        );
        // Other ports, no responder in the config: untouched, and the socket is not asked.
        assert_eq!(
            decide_connect(&cfg(false), addr("10.0.0.2:5353"), never),
            Connect::Bypass(Bypass::Unmanaged)
        );
        let old = ShimConfig {
            dns: None,
            ..cfg(false)
        };
        assert_eq!(
            decide_connect(&old, addr("10.0.0.2:53"), never),
            Connect::Bypass(Bypass::Unmanaged)
        );
        // A fake address of this run on port 53 is still the broker's TCP listener.
        assert_eq!(
            decide_connect(&cfg(false), addr("127.77.7.1:53"), || TCP),
            Connect::Redirect("127.77.7.1:40000".parse().expect("addr"))
        );
    }

    #[test]
    fn dns_target_never_loops_to_itself() {
        let r: SocketAddr = RESPONDER.parse().expect("addr");
        assert_eq!(
            dns_target(r, "127.0.0.1:40053".parse().expect("a"), false),
            None
        );
        assert_eq!(
            dns_target(r, "127.0.0.53:53".parse().expect("a"), false),
            Some(r)
        );
        assert_eq!(
            dns_target(r, "1.1.1.1:443".parse().expect("a"), false),
            None
        );
    }

    #[test]
    fn replies_from_the_responder_name_the_original_server() {
        let r: SocketAddr = RESPONDER.parse().expect("addr");
        let server: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        assert_eq!(reply_source(r, r, server), Some(server));
        // An AF_INET6 socket sees the responder v4-mapped and gets the server v4-mapped.
        assert_eq!(
            reply_source(r, "[::ffff:127.0.0.1]:40053".parse().expect("a"), server),
            Some("[::ffff:10.0.0.2]:53".parse().expect("a"))
        );
        let server6: SocketAddr = "[2001:db8::53]:53".parse().expect("addr");
        assert_eq!(
            reply_source(r, "[::ffff:127.0.0.1]:40053".parse().expect("a"), server6),
            Some(server6)
        );
        // Anything else is reported as it is.
        assert_eq!(
            reply_source(r, "127.0.0.1:40054".parse().expect("a"), server),
            None
        );
        assert_eq!(
            reply_source(r, "10.0.0.9:53".parse().expect("a"), server),
            None
        );
        assert_eq!(reply_source(r, r, server6), None);
    }

    #[test]
    fn resolve_answers_managed_hosts_only() {
        let c = cfg(false);
        let v4: IpAddr = "127.77.7.1".parse().expect("ip");
        assert_eq!(decide_resolve(&c, "api.openai.com", Family::Any), Some(v4));
        assert_eq!(decide_resolve(&c, "API.OPENAI.COM.", Family::V4), Some(v4));
        // Every managed name gets the run's one address.
        assert_eq!(decide_resolve(&c, "x.example.org", Family::V4), Some(v4));
        assert_eq!(
            decide_resolve(&c, "x.example.org", Family::V6),
            Some("::ffff:127.77.7.1".parse().expect("ip"))
        );
        assert_eq!(decide_resolve(&c, "api.openai.com", Family::Other), None);
        assert_eq!(decide_resolve(&c, "example.org", Family::Any), None);
        assert_eq!(decide_resolve(&c, "127.77.7.1", Family::Any), None);
        assert_eq!(decide_resolve(&c, "localhost", Family::Any), None);
    }
}
