//! The contract between `libbroker.so` (the shim, preloaded into the agent) and the broker.
//!
//! One source for everything both sides must agree on, like proxychains-ng's `common.h`:
//! the environment variable names, the run's fake loopback address, the host-pattern
//! grammar, the small text file the broker writes for the shim, and the run ticket the shim
//! presents on every connection to the broker ([`Ticket`]).
//!
//! This crate has no dependencies so the shim stays small and its constructor cheap.

pub mod elf;
pub mod handover;

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

/// Path of the shim config file for this run. Set by `broker run` and the launchers; inherited
/// by every child so the whole process tree shares one run.
pub const ENV_SHIM_CONFIG: &str = "BROKER_SHIM_CONFIG";
/// Where all broker state lives (vault, config, audit, custom providers, daemon runtime files).
pub const ENV_HOME: &str = "BROKER_HOME";
/// Set to `1` by the shim in a process where it is active, so launchers can tell it is loaded.
pub const ENV_SHIM_ACTIVE: &str = "BROKER_SHIM_ACTIVE";
/// File name, inside the daemon's runtime directory, of the shim config that a bare
/// `LD_PRELOAD=libbroker.so cmd` picks up when `BROKER_SHIM_CONFIG` is not set.
pub const DAEMON_SHIM_CONFIG_FILE: &str = "shim.conf";
/// File name of the control socket of `broker serve`, inside its runtime directory.
pub const DAEMON_CONTROL_SOCKET: &str = "control.sock";
/// Runtime directory of the system broker (`broker serve --system`, under its own user):
/// its shim config, CA and control socket. Created by root, owned by the broker's user, 0755:
/// agents read the config there, and a bare `LD_PRELOAD=libbroker.so` falls back to it when
/// the user has no `broker serve` of their own.
pub const SYSTEM_RUN_DIR: &str = "/run/broker";
/// Where a process looks for the system broker's runtime directory instead of
/// [`SYSTEM_RUN_DIR`] (tests, and installs under another prefix). It moves only where this
/// process looks, which its own environment decides anyway (as [`ENV_SHIM_CONFIG`] does);
/// the directory must still pass the shim's ownership checks.
pub const ENV_SYSTEM_RUN: &str = "BROKER_SYSTEM_RUN";
/// First line of every shim config file; the number is the format version.
pub const CONFIG_MAGIC: &str = "broker-shim-config 1";

/// The first two octets of every fake address: `127.77.<run slot>.<host>`.
///
/// 127.0.0.0/8 is loopback on Linux, so the broker can listen on these addresses without
/// privileges, and nothing outside the machine can ever be reached through them.
pub const FAKE_NET: [u8; 2] = [127, 77];

/// The run's one fake address, `127.77.<slot>.1`: every managed name of run `slot` resolves
/// to it, whatever the catalog's size, and the broker's one listener there tells the hosts
/// apart by the TLS server name (SNI), as its `[::1]` and CONNECT listeners do.
pub fn run_ipv4(slot: u8) -> Ipv4Addr {
    Ipv4Addr::new(FAKE_NET[0], FAKE_NET[1], slot, 1)
}

/// The run slot of an address in the fake range (`127.77.<slot>.<h>`, slot and `h` not 0),
/// else `None`. Any `h` counts: the shim sends every address of its run's range to the run's
/// listener (a numeric connect to `127.77.<slot>.9` reaches the broker, not some other local
/// service), and the SNI decides the host there.
pub fn fake_slot(ip: Ipv4Addr) -> Option<u8> {
    let [a, b, slot, host] = ip.octets();
    ([a, b] == FAKE_NET && slot != 0 && host != 0).then_some(slot)
}

/// The magic that opens the preamble the shim writes on every connection it reroutes to the
/// broker, before any byte of the agent's. Its first byte is NUL, which starts neither a TLS
/// record (0x16) nor an HTTP request, so the broker can tell a missing preamble from a wrong one.
pub const TICKET_MAGIC: [u8; 8] = *b"\0broker1";
/// Random bytes in a run ticket (128 bits: not guessable, not worth brute-forcing over loopback).
pub const TICKET_BYTES: usize = 16;
/// A ticket as text: [`TICKET_BYTES`] as lowercase hex.
pub const TICKET_HEX_LEN: usize = 2 * TICKET_BYTES;
/// The preamble: [`TICKET_MAGIC`] then the ticket's hex digits. 40 bytes.
pub const TICKET_PREAMBLE_LEN: usize = TICKET_MAGIC.len() + TICKET_HEX_LEN;
/// The user name in the CONNECT proxy URL (`http://broker:<ticket>@127.0.0.1:<port>`); only the
/// password (the ticket) is checked.
pub const TICKET_PROXY_USER: &str = "broker";

/// A run's ticket: a secret the broker makes for each run and writes only into that run's shim
/// config (0600, in the run's private directory). The shim presents it on every connection it
/// reroutes to the broker ([`Ticket::preamble`]), and the CONNECT fallback in
/// `Proxy-Authorization`, so the broker attributes a connection to its run by proof rather than
/// by the address it arrived on: a process of another run that connects to this run's
/// listeners is refused, not served under this run's `--allow` list and profile.
///
/// What it proves: the peer could read this run's shim config, or was handed the ticket by a
/// process that could. It does not stop a process of the same user outside any sandbox, which
/// can read every 0600 file of that user; the sandbox of `broker run` is what hides one run's
/// config from another run.
///
/// `Debug` never prints the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket(String);

impl Ticket {
    /// A ticket from [`TICKET_BYTES`] random bytes (the broker draws them from the OS).
    pub fn from_bytes(bytes: &[u8; TICKET_BYTES]) -> Ticket {
        let mut hex = String::with_capacity(TICKET_HEX_LEN);
        for b in bytes {
            let _ = write!(hex, "{b:02x}");
        }
        Ticket(hex)
    }

    /// A ticket as written in a config file or a proxy URL: exactly [`TICKET_HEX_LEN`]
    /// lowercase hex digits, else `None`.
    pub fn parse(text: &str) -> Option<Ticket> {
        (text.len() == TICKET_HEX_LEN
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Ticket(text.to_string()))
    }

    /// The hex digits. A secret: for the config file, the preamble and the proxy URL only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The bytes the shim writes first on a connection to the broker.
    pub fn preamble(&self) -> [u8; TICKET_PREAMBLE_LEN] {
        let mut out = [0u8; TICKET_PREAMBLE_LEN];
        out[..TICKET_MAGIC.len()].copy_from_slice(&TICKET_MAGIC);
        out[TICKET_MAGIC.len()..].copy_from_slice(self.0.as_bytes());
        out
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ticket(..)")
    }
}

/// What the first [`TICKET_PREAMBLE_LEN`] bytes of a connection hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble<'a> {
    /// The magic, then this many candidate ticket bytes (compare them in constant time).
    Ticket(&'a [u8]),
    /// Something else: a client that connected without the shim (a TLS ClientHello, an HTTP
    /// request) or garbage.
    Missing,
}

/// Split a received preamble. Comparing the ticket is the broker's job (in constant time).
pub fn parse_preamble(bytes: &[u8]) -> Preamble<'_> {
    match bytes.strip_prefix(&TICKET_MAGIC[..]) {
        Some(ticket) if bytes.len() == TICKET_PREAMBLE_LEN => Preamble::Ticket(ticket),
        _ => Preamble::Missing,
    }
}

/// Does `host` match `pattern`? Patterns are an exact hostname or `*.` followed by a domain,
/// which matches exactly one more label (`*.example.com` matches `a.example.com`, not
/// `example.com` nor `a.b.example.com`). ASCII case-insensitive; a trailing dot is ignored.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    match pattern.strip_prefix("*.") {
        Some(domain) => match host.split_once('.') {
            Some((label, rest)) => {
                !label.is_empty() && label != "*" && rest.eq_ignore_ascii_case(domain)
            }
            None => false,
        },
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// What the broker tells the shim about one run. Written by the broker as a small text file
/// (0600) whose path is in [`ENV_SHIM_CONFIG`]; read once by the shim's constructor. It holds
/// the run's [`Ticket`], so it is a secret of the run: whoever reads it can use the run's
/// policy (see [`Ticket`] for what that does and does not cover).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShimConfig {
    /// The run slot: the third octet of the run's fake address ([`run_ipv4`]).
    pub slot: u8,
    /// Port the broker listens on, on the run's fake address.
    pub port: u16,
    /// Port of the broker's `[::1]` listener, for IPv6-only sockets (classified by SNI/Host).
    pub port6: u16,
    /// PEM file with the run's CA certificate, which the shim adds to the agent's trust stores.
    pub ca_file: PathBuf,
    /// Refuse every outbound TCP connection that is not to a managed host or loopback.
    pub deny_unlisted: bool,
    /// Managed host patterns: a name matching one resolves to the run's fake address. As
    /// many as the catalog has; the address and the listener stay one.
    pub hosts: Vec<String>,
    /// Environment variables the agent reads, with the placeholder to put there.
    pub env: Vec<(String, String)>,
    /// Variables that get the placeholder only when they are set (a real key there is hidden);
    /// unset ones stay unset. See the providers' `env_if_set`.
    pub env_if_set: Vec<(String, String)>,
    /// Address of the broker's CONNECT proxy, for children the shim cannot preload.
    pub connect_proxy: Option<String>,
    /// File (0600, in the run's private directory) where the shim appends one line per
    /// connection it refused under `deny_unlisted`: `<pid> <destination>`. The broker moves
    /// those lines into the audit log.
    pub denial_log: Option<PathBuf>,
    /// The run's ticket, presented on every connection to the broker. `None` only in a config
    /// of a broker older than tickets (the shim then sends no preamble).
    pub ticket: Option<Ticket>,
    /// The run's DNS responder (UDP and TCP, loopback): the shim steers the agent's port-53
    /// traffic there, so resolvers that bypass `getaddrinfo` (c-ares in Node's `dns.resolve*`
    /// and in Bun) get the run's fake addresses for managed names. `None` in a config of a
    /// broker older than the responder (port-53 traffic then passes through).
    pub dns: Option<SocketAddr>,
}

/// Variables that name a CA bundle, pointed at the run's merged bundle for a program that goes
/// through the CONNECT listener (by `broker run` for its own child, by the shim's exec hooks
/// for a child started inside a run).
pub const CA_BUNDLE_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "NODE_EXTRA_CA_CERTS",
    "AWS_CA_BUNDLE",
];

/// Where distributions keep the system's CA bundle (Debian/Ubuntu, Fedora/RHEL, openSUSE,
/// Alpine/Arch, RHEL's extracted bundle), most common first.
pub const SYSTEM_CA_BUNDLES: &[&std::ffi::CStr] = &[
    c"/etc/ssl/certs/ca-certificates.crt",
    c"/etc/pki/tls/certs/ca-bundle.crt",
    c"/etc/ssl/ca-bundle.pem",
    c"/etc/ssl/cert.pem",
    c"/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
];

/// Prefix of the bundles the shim writes next to the run CA for children on the CONNECT
/// fallback: `<prefix><hash of the bundle merged in>.pem`.
pub const MERGED_BUNDLE_PREFIX: &str = "ssl-ca-";

/// The `HTTPS_PROXY` value for a run's CONNECT listener at `proxy_addr`: the run's ticket as
/// the password (`http://broker:<ticket>@addr`), which curl, wget, git, Python and Go send as
/// `Proxy-Authorization: Basic` on CONNECT. Hex digits need no percent-encoding in userinfo.
pub fn connect_proxy_url(proxy_addr: &str, ticket: Option<&Ticket>) -> String {
    match ticket {
        Some(ticket) => format!(
            "http://{TICKET_PROXY_USER}:{}@{proxy_addr}",
            ticket.expose()
        ),
        None => format!("http://{proxy_addr}"),
    }
}

/// The port DNS clients send to; the shim steers traffic to it (see [`ShimConfig::dns`]).
pub const DNS_PORT: u16 = 53;

impl ShimConfig {
    /// Is `host` one of the run's managed names (does a pattern of [`ShimConfig::hosts`]
    /// match it)?
    pub fn manages(&self, host: &str) -> bool {
        self.hosts.iter().any(|p| host_matches(p, host))
    }

    /// Render the config file. Values never contain newlines (checked by the broker).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{CONFIG_MAGIC}");
        let _ = writeln!(out, "slot {}", self.slot);
        let _ = writeln!(out, "port {}", self.port);
        let _ = writeln!(out, "port6 {}", self.port6);
        let _ = writeln!(out, "ca {}", self.ca_file.display());
        let _ = writeln!(out, "deny-unlisted {}", u8::from(self.deny_unlisted));
        if let Some(proxy) = &self.connect_proxy {
            let _ = writeln!(out, "connect-proxy {proxy}");
        }
        if let Some(log) = &self.denial_log {
            let _ = writeln!(out, "denial-log {}", log.display());
        }
        if let Some(ticket) = &self.ticket {
            let _ = writeln!(out, "ticket {}", ticket.expose());
        }
        if let Some(dns) = &self.dns {
            let _ = writeln!(out, "dns {dns}");
        }
        for host in &self.hosts {
            let _ = writeln!(out, "host {host}");
        }
        for (var, placeholder) in &self.env {
            let _ = writeln!(out, "env {var} {placeholder}");
        }
        for (var, placeholder) in &self.env_if_set {
            let _ = writeln!(out, "env-if-set {var} {placeholder}");
        }
        out
    }

    /// Parse a config file. Unknown keys are ignored so an older shim can read a newer broker's
    /// file; a wrong magic line or a malformed known key is an error naming the line.
    pub fn parse(text: &str) -> Result<ShimConfig, ConfigError> {
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, first)) if first.trim_end() == CONFIG_MAGIC => {}
            _ => {
                return Err(ConfigError {
                    line: 1,
                    what: "missing 'broker-shim-config 1' header",
                })
            }
        }
        let mut cfg = ShimConfig::default();
        for (i, raw) in lines {
            let line = raw.trim_end();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |what| ConfigError { line: i + 1, what };
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "slot" => cfg.slot = value.parse().map_err(|_| err("bad slot"))?,
                "port" => cfg.port = value.parse().map_err(|_| err("bad port"))?,
                "port6" => cfg.port6 = value.parse().map_err(|_| err("bad port6"))?,
                "ca" => cfg.ca_file = PathBuf::from(value),
                "deny-unlisted" => cfg.deny_unlisted = value == "1",
                "connect-proxy" => cfg.connect_proxy = Some(value.to_string()),
                "denial-log" => cfg.denial_log = Some(PathBuf::from(value)),
                "ticket" => cfg.ticket = Some(Ticket::parse(value).ok_or(err("bad ticket"))?),
                "dns" => cfg.dns = Some(value.parse().map_err(|_| err("bad dns address"))?),
                "host" if !value.is_empty() => cfg.hosts.push(value.to_string()),
                "env" | "env-if-set" => {
                    let (var, placeholder) = value.split_once(' ').ok_or(err("bad env line"))?;
                    let list = match key {
                        "env" => &mut cfg.env,
                        _ => &mut cfg.env_if_set,
                    };
                    list.push((var.to_string(), placeholder.to_string()));
                }
                _ => {}
            }
        }
        if cfg.slot == 0 || cfg.port == 0 {
            return Err(ConfigError {
                line: 1,
                what: "slot and port are required",
            });
        }
        Ok(cfg)
    }
}

/// A malformed shim config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: usize,
    pub what: &'static str,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "shim config line {}: {}", self.line, self.what)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_address_round_trips_and_rejects_others() {
        let ip = run_ipv4(3);
        assert_eq!(ip, Ipv4Addr::new(127, 77, 3, 1));
        assert_eq!(fake_slot(ip), Some(3));
        // Every address of the run's range belongs to the run.
        assert_eq!(fake_slot(Ipv4Addr::new(127, 77, 3, 17)), Some(3));
        assert_eq!(fake_slot(Ipv4Addr::new(127, 0, 0, 1)), None);
        assert_eq!(fake_slot(Ipv4Addr::new(127, 77, 0, 5)), None);
        assert_eq!(fake_slot(Ipv4Addr::new(127, 77, 3, 0)), None);
        assert_eq!(fake_slot(Ipv4Addr::new(10, 77, 3, 17)), None);
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("api.openai.com", "API.OpenAI.com"));
        assert!(host_matches("api.openai.com", "api.openai.com."));
        assert!(!host_matches("api.openai.com", "api.openai.com.evil.com"));
        assert!(!host_matches("api.openai.com", "xapi.openai.com"));
        assert!(host_matches("*.openai.azure.com", "res1.openai.azure.com"));
        assert!(!host_matches("*.openai.azure.com", "openai.azure.com"));
        assert!(!host_matches("*.openai.azure.com", "a.b.openai.azure.com"));
        assert!(!host_matches("*.openai.azure.com", ".openai.azure.com"));
    }

    #[test]
    fn config_round_trips() {
        let cfg = ShimConfig {
            slot: 9,
            port: 40123,
            port6: 40124,
            ca_file: PathBuf::from("/tmp/run/ca.pem"),
            deny_unlisted: true,
            hosts: vec!["api.openai.com".into(), "*.example.org".into()],
            env: vec![("OPENAI_API_KEY".into(), "sk-broker-placeholder".into())],
            env_if_set: vec![("GOOGLE_API_KEY".into(), "AIza-placeholder".into())],
            connect_proxy: Some("127.0.0.1:40125".into()),
            denial_log: Some(PathBuf::from("/tmp/run/denials.log")),
            ticket: Some(Ticket::from_bytes(&[0xa5; TICKET_BYTES])),
            dns: Some("127.0.0.1:40126".parse().expect("addr")),
        };
        let parsed = ShimConfig::parse(&cfg.render()).expect("parses");
        assert_eq!(parsed, cfg);
        assert!(parsed.manages("x.example.org"));
        assert!(!parsed.manages("example.org"));
    }

    #[test]
    fn a_config_holds_any_number_of_hosts() {
        // The run has one fake address whatever the catalog's size: no ceiling of 254.
        let cfg = ShimConfig {
            slot: 1,
            port: 2,
            hosts: (0..1000).map(|i| format!("*.r{i}.example.org")).collect(),
            ..Default::default()
        };
        let parsed = ShimConfig::parse(&cfg.render()).expect("parses");
        assert_eq!(parsed.hosts.len(), 1000);
        assert!(parsed.manages("bucket.r999.example.org"));
    }

    #[test]
    fn tickets_are_hex_and_never_printed() {
        let t = Ticket::from_bytes(&[0, 1, 0xab, 0xff, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert_eq!(t.expose(), "0001abff02030405060708090a0b0c0d");
        assert_eq!(Ticket::parse(t.expose()), Some(t.clone()));
        assert_eq!(format!("{t:?}"), "Ticket(..)");
        let cfg = ShimConfig {
            slot: 1,
            port: 2,
            ticket: Some(t.clone()),
            ..Default::default()
        };
        assert!(!format!("{cfg:?}").contains(t.expose()));
        for bad in [
            "",
            "0001",
            "0001ABFF02030405060708090a0b0c0d",
            "0001abff02030405060708090a0b0c0dd",
            "g001abff02030405060708090a0b0c0d",
            "0001abff 2030405060708090a0b0c0d",
        ] {
            assert_eq!(Ticket::parse(bad), None, "{bad:?}");
        }
        let bad = format!("{CONFIG_MAGIC}\nslot 1\nport 2\nticket 12\n");
        assert_eq!(
            ShimConfig::parse(&bad).expect_err("short ticket"),
            ConfigError {
                line: 4,
                what: "bad ticket"
            }
        );
        // A config without a ticket (an older broker's) still parses.
        let old = format!("{CONFIG_MAGIC}\nslot 1\nport 2\n");
        assert_eq!(ShimConfig::parse(&old).expect("parses").ticket, None);
    }

    #[test]
    fn preamble_round_trips_and_refuses_anything_else() {
        let t = Ticket::from_bytes(&[7; TICKET_BYTES]);
        let p = t.preamble();
        assert_eq!(p.len(), 40);
        assert_eq!(parse_preamble(&p), Preamble::Ticket(t.expose().as_bytes()));
        // A TLS ClientHello, plain HTTP, a short read, the magic alone.
        let mut hello = [0u8; TICKET_PREAMBLE_LEN];
        hello[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
        assert_eq!(parse_preamble(&hello), Preamble::Missing);
        assert_eq!(
            parse_preamble(b"GET / HTTP/1.1\r\nHost: api.openai.com\r\n\r\n"),
            Preamble::Missing
        );
        assert_eq!(parse_preamble(&p[..39]), Preamble::Missing);
        assert_eq!(parse_preamble(&TICKET_MAGIC), Preamble::Missing);
        assert_ne!(TICKET_MAGIC[0], 0x16);
    }

    #[test]
    fn config_errors_name_the_line() {
        assert_eq!(ShimConfig::parse("nope").expect_err("no header").line, 1);
        let bad = format!("{CONFIG_MAGIC}\nslot 1\nport x\n");
        assert_eq!(
            ShimConfig::parse(&bad).expect_err("bad port"),
            ConfigError {
                line: 3,
                what: "bad port"
            }
        );
        let unknown = format!("{CONFIG_MAGIC}\nslot 1\nport 2\nfuture-key 1\n");
        assert!(ShimConfig::parse(&unknown).is_ok());
        let bad = format!("{CONFIG_MAGIC}\nslot 1\nport 2\ndns localhost\n");
        assert_eq!(
            ShimConfig::parse(&bad).expect_err("bad dns"),
            ConfigError {
                line: 4,
                what: "bad dns address"
            }
        );
        // A config without a responder (an older broker's) parses, with port-53 traffic
        // left alone.
        let old = format!("{CONFIG_MAGIC}\nslot 1\nport 2\n");
        assert_eq!(ShimConfig::parse(&old).expect("parses").dns, None);
    }
}
