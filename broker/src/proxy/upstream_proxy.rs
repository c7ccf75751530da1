//! The proxy the broker reaches upstreams through, for a network whose only way out is a
//! (corporate) HTTP proxy: `upstream_proxy` in `$BROKER_HOME/config.toml`, else the broker's own
//! `https_proxy`/`HTTPS_PROXY`, with `upstream_no_proxy`/`NO_PROXY` naming hosts reached
//! directly.
//!
//! The broker asks the proxy for a tunnel with `CONNECT host:port` (with `Proxy-Authorization:
//! Basic` when the URL has a user) and runs its own TLS to the provider inside it, verified as
//! always: the proxy sees the host name and ciphertext, never the key. The proxy resolves the
//! host, so the SSRF guard (`upstream::address_class`) cannot check the provider's address;
//! the proxy's own address is the user's choice and is not checked either (a corporate proxy is
//! usually on a private address).
//!
//! The proxy's password is a secret of the user's: it is kept zeroized-on-drop, and every
//! message (errors, logs, `Debug`) names the proxy as `http://host:port (from WHERE)` only. It
//! is never given to the agent: `broker run` leaves the agent's environment as the user's shell
//! had it, and adds the run's managed hosts to its `NO_PROXY` (`launch::exempt_managed_hosts`).

use std::fmt;

use base64::Engine as _;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use super::upstream::ConnectError;
use crate::home::Home;

/// Longest proxy answer to a CONNECT the broker reads before giving up on it.
const MAX_ANSWER: usize = 16 * 1024;

/// A proxy to reach upstreams through.
pub struct UpstreamProxy {
    host: String,
    port: u16,
    /// `Basic <base64(user:password)>`, when the URL had a user.
    authorization: Option<Zeroizing<String>>,
    /// `NO_PROXY` entries: hosts reached directly.
    no_proxy: Vec<String>,
    /// Where the setting came from, for messages: `HTTPS_PROXY`, `/home/u/.../config.toml`.
    origin: String,
    /// May the CONNECT listener tunnel an agent's unmanaged hosts through it? Only a user's
    /// broker's proxy from `HTTPS_PROXY`, which that user's agents inherit anyway: never one
    /// from `config.toml` (the agent does not see it, nor its login), and never a system
    /// broker's (its environment is root's, not the users' whose agents it serves).
    lent_to_agents: bool,
}

impl fmt::Display for UpstreamProxy {
    /// `http://host:port (from WHERE)`: never the user or password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(f, "http://{host}:{} (from {})", self.port, self.origin)
    }
}

impl fmt::Debug for UpstreamProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamProxy")
            .field("proxy", &self.to_string())
            .field("credentials", &self.authorization.is_some())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// The keys of `config.toml` read here; the rest of the file is other modules' business.
#[derive(Deserialize, Default)]
struct ProxyConfig {
    upstream_proxy: Option<String>,
    upstream_no_proxy: Option<String>,
}

impl UpstreamProxy {
    /// The proxy configured for a broker of `home` (`None`: the system broker, which takes it
    /// from its environment only): `upstream_proxy` in `config.toml` first (`""` means none,
    /// whatever the environment says), else `https_proxy`/`HTTPS_PROXY`. Inside a run, the
    /// environment is not read: there `HTTPS_PROXY` may be the run's own CONNECT listener,
    /// and the broker that matters is the enclosing one.
    pub fn configured(home: Option<&Home>) -> anyhow::Result<Option<UpstreamProxy>> {
        // Inside a run the environment is the run's (its HTTPS_PROXY may be the run's own
        // CONNECT listener, its NO_PROXY lists the managed hosts): none of it is read.
        let inside_run = crate::hardening::inside_run().is_some();
        UpstreamProxy::configured_from(home, &|name| {
            std::env::var(name).ok().filter(|_| !inside_run)
        })
    }

    /// [`UpstreamProxy::configured`] with the environment read through `var`.
    fn configured_from(
        home: Option<&Home>,
        var: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<UpstreamProxy>> {
        let env = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let env_no_proxy = || env("no_proxy").or_else(|| env("NO_PROXY"));
        if let Some(home) = home {
            let path = home.config_path();
            let config: ProxyConfig = home.read_config().map_err(anyhow::Error::msg)?;
            if let Some(url) = config.upstream_proxy.map(Zeroizing::new) {
                let origin = format!("upstream_proxy in {}", path.display());
                if url.trim().is_empty() {
                    return Ok(None);
                }
                let no_proxy = config.upstream_no_proxy.or_else(env_no_proxy);
                return UpstreamProxy::parse(&url, no_proxy.as_deref(), &origin)
                    .map(Some)
                    .map_err(|e| anyhow::anyhow!("{origin}: {e}"));
            }
        }
        for name in ["https_proxy", "HTTPS_PROXY"] {
            if let Some(url) = env(name).map(Zeroizing::new) {
                return UpstreamProxy::parse(&url, env_no_proxy().as_deref(), name)
                    .map(|proxy| {
                        Some(UpstreamProxy {
                            lent_to_agents: home.is_some(),
                            ..proxy
                        })
                    })
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "{name}: {e} (the broker reaches providers through it; set upstream_proxy in $BROKER_HOME/config.toml to override it, \"\" for none)"
                        )
                    });
            }
        }
        Ok(None)
    }

    /// Parse `http://[user[:password]@]host:port` (the scheme may be left out). Errors never
    /// quote the URL: it may hold the password.
    pub fn parse(url: &str, no_proxy: Option<&str>, origin: &str) -> Result<UpstreamProxy, String> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                let scheme =
                    if scheme.len() <= 10 && scheme.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        scheme
                    } else {
                        "?"
                    };
                return Err(format!(
                    "the proxy URL's scheme is {scheme}://; the broker speaks to an http:// proxy only (CONNECT)"
                ));
            }
            None => url,
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| {
            "the proxy URL needs a host and a port: http://[user:password@]host:port".to_string()
        })?;
        let authorization = match userinfo {
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let mut pair = Zeroizing::new(percent_decode(user)?);
                pair.push(':');
                pair.push_str(&Zeroizing::new(percent_decode(password)?));
                let mut header = Zeroizing::new(String::from("Basic "));
                base64::engine::general_purpose::STANDARD
                    .encode_string(pair.as_bytes(), &mut header);
                Some(header)
            }
            None => None,
        };
        let no_proxy = no_proxy
            .unwrap_or("")
            .split([',', ' '])
            .map(|e| e.trim().trim_start_matches("*.").trim_start_matches('.'))
            .map(|e| strip_port(e).to_ascii_lowercase())
            .filter(|e| !e.is_empty())
            .collect();
        Ok(UpstreamProxy {
            host: host.to_ascii_lowercase(),
            port,
            authorization,
            no_proxy,
            origin: origin.to_string(),
            lent_to_agents: false,
        })
    }

    /// Whether `host` is reached without the proxy: it is in `NO_PROXY` (the entry itself or a
    /// name under it; `*` for every host).
    pub fn bypasses(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.no_proxy.iter().any(|entry| {
            entry == "*"
                || host == *entry
                || host
                    .strip_suffix(entry.as_str())
                    .is_some_and(|under| under.ends_with('.'))
        })
    }

    /// Whether the CONNECT listener may tunnel an agent's unmanaged hosts through this proxy
    /// (see the field).
    pub fn lent_to_agents(&self) -> bool {
        self.lent_to_agents
    }

    /// A TCP connection to the proxy, tunnelled to `host:port`: ready for the TLS handshake
    /// with the provider. Unbounded: callers bound the whole connection
    /// ([`super::upstream::CONNECT_TIMEOUT`]).
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
        let fail =
            |reason: String| ConnectError::Proxy(format!("the upstream proxy {self} {reason}"));
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| fail(format!("cannot be reached: {e}")))?;
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut head = Zeroizing::new(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"));
        if let Some(authorization) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(authorization);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes())
            .await
            .map_err(|e| fail(format!("closed the connection: {e}")))?;
        drop(head);

        // The answer's head, and nothing after it: the provider speaks only after our TLS
        // ClientHello, so bytes past the head are a proxy that does not tunnel.
        let mut answer = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        let end = loop {
            let n = tcp
                .read(&mut buf)
                .await
                .map_err(|e| fail(format!("broke off its answer to CONNECT: {e}")))?;
            if n == 0 {
                return Err(fail(
                    "closed the connection without answering CONNECT".into(),
                ));
            }
            answer.extend_from_slice(&buf[..n]);
            if let Some(at) = memchr::memmem::find(&answer, b"\r\n\r\n") {
                break at + 4;
            }
            if answer.len() > MAX_ANSWER {
                return Err(fail("answered CONNECT with an over-long head".into()));
            }
        };
        let status_line = answer.split(|&b| b == b'\n').next().unwrap_or(&[]);
        let status_line = printable(status_line);
        let code = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        match code {
            Some(200..=299) if answer.len() == end => Ok(tcp),
            Some(200..=299) => Err(fail(
                "sent data after its CONNECT answer, before TLS: it does not tunnel".into(),
            )),
            Some(407) if self.authorization.is_some() => Err(fail(format!(
                "refused its credentials ({status_line}): check the user and password in the proxy URL"
            ))),
            Some(407) => Err(fail(format!(
                "asks for credentials ({status_line}): give them in the proxy URL, http://user:password@host:port"
            ))),
            Some(_) => Err(fail(format!("refused CONNECT to {target} ({status_line})"))),
            None => Err(fail(format!("answered CONNECT with something not HTTP ({status_line})"))),
        }
    }
}

/// `host:port` or `[v6]:port`.
fn split_host_port(hostport: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, rest) = rest.split_once(']')?;
        (host, rest.strip_prefix(':')?)
    } else {
        hostport.rsplit_once(':')?
    };
    let port: u16 = port.parse().ok().filter(|&p| p != 0)?;
    (!host.is_empty()).then_some((host, port))
}

/// A `NO_PROXY` entry without its `:port` (the port is not used to decide).
fn strip_port(entry: &str) -> &str {
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => entry,
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bad = || "the proxy URL's user or password has a bad %-escape".to_string();
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// At most 120 printable ASCII characters of what the proxy said, for a message.
fn printable(bytes: &[u8]) -> String {
    bytes
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .take(120)
        .map(|&b| b as char)
        .collect::<String>()
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a user's broker lends its `HTTPS_PROXY` (and the login in it) to its agents'
    /// unmanaged tunnels: a system broker's environment is root's, and a config.toml proxy is
    /// the user's own secret. (The integration test `upstream_proxy.rs` shows the config.toml
    /// case end to end.)
    #[test]
    fn only_a_user_brokers_environment_proxy_is_lent_to_agents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path().to_path_buf());
        // An environment of its own: the process's is shared with the other tests.
        let env = |name: &str| {
            (name == "https_proxy").then(|| "http://admin:pw@proxy.corp:3128".to_string())
        };
        let lent = |home: Option<&Home>| {
            UpstreamProxy::configured_from(home, &env)
                .expect("configured")
                .expect("a proxy")
                .lent_to_agents()
        };
        assert!(
            lent(Some(&home)),
            "a user's broker: its agents inherit HTTPS_PROXY anyway"
        );
        assert!(!lent(None), "a system broker's proxy is not its users'");
        std::fs::write(
            home.config_path(),
            "upstream_proxy = \"http://bob:pw@proxy.corp:3128\"\n",
        )
        .expect("config.toml");
        assert!(!lent(Some(&home)), "a config.toml proxy is not the agent's");
    }

    #[test]
    fn parses_the_url_and_never_shows_the_password() {
        let p = UpstreamProxy::parse(
            "http://alice:s%3Acret@proxy.corp:3128/",
            None,
            "HTTPS_PROXY",
        )
        .expect("parse");
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:s:cret");
        assert_eq!(
            p.authorization.as_deref().map(String::as_str),
            Some(&*format!("Basic {expected}"))
        );
        assert_eq!(p.to_string(), "http://proxy.corp:3128 (from HTTPS_PROXY)");
        assert!(!format!("{p:?}").contains("cret"));

        let p = UpstreamProxy::parse("[::1]:8080", None, "x").expect("parse");
        assert_eq!(
            (p.host.as_str(), p.port, p.authorization.is_none()),
            ("::1", 8080, true)
        );
        for bad in [
            "http://u:secret@proxy.corp",
            "socks5://u:secret@h:1080",
            "http://u:secret@:1",
            "https://u:secret@h:1",
        ] {
            let err = UpstreamProxy::parse(bad, None, "x").expect_err(bad);
            assert!(!err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn no_proxy_entries_cover_the_host_and_names_under_it() {
        let p = UpstreamProxy::parse(
            "h:1",
            Some("localhost, .internal.corp,*.svc.local,10.0.0.1:8080,Example.com"),
            "x",
        )
        .expect("parse");
        for (host, bypass) in [
            ("localhost", true),
            ("a.internal.corp", true),
            ("internal.corp", true),
            ("x.svc.local", true),
            ("10.0.0.1", true),
            ("example.com", true),
            ("api.example.com.", true),
            ("badexample.com", false),
            ("api.openai.com", false),
        ] {
            assert_eq!(p.bypasses(host), bypass, "{host}");
        }
        let all = UpstreamProxy::parse("h:1", Some("*"), "x").expect("parse");
        assert!(all.bypasses("api.openai.com"));
    }
}
