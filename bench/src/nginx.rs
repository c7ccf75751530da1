//! The reference the broker is measured against: nginx doing the same job as a reverse proxy.
//! It terminates TLS for [`HOST`] (h2 and HTTP/1.1, with the origin's own leaf, so the bench's
//! CA trusts it), sets `Authorization` to the real key, and forwards over HTTP/1.1 on pooled
//! (keepalive) TLS connections to the same origin, verifying the origin's certificate and
//! sending SNI. One process (`master_process off`: the process is the worker), no access log
//! (`--nginx-log`: one like the broker's audit line).
//! What it does not do that the broker does: classify, swap a placeholder, redact, audit,
//! check a run's ticket.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::origin::{HOST, REAL_KEY};

/// Where Debian's packages put it (`/usr/sbin` is not on a non-root user's `PATH`).
pub fn find() -> Option<PathBuf> {
    broker_integration::which("nginx").or_else(|| {
        ["/usr/sbin/nginx", "/usr/local/sbin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    })
}

/// A running nginx, stopped on drop.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Start nginx from `binary` in `dir` (config, logs, temp files), proxying to the origin at
    /// `upstream` whose CA is `origin_dir/ca.pem` and whose leaf is `origin_dir/leaf.pem`;
    /// with `access_log`, writing [`ACCESS_LOG`]'s line per request.
    pub fn start(
        binary: &Path,
        dir: &Path,
        origin_dir: &Path,
        upstream: SocketAddr,
        access_log: bool,
    ) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(dir.join("tmp"))?;
        // nginx cannot listen on port 0 and say which port it got: take a free port and hand
        // it over. Another program may take it in between; then nginx fails to bind, and a new
        // port is tried.
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, config(dir, origin_dir, addr, upstream, access_log))?;
            let child = crate::procs::clean(binary)
                .arg("-p")
                .arg(dir)
                .arg("-c")
                .arg(&conf)
                .arg("-e")
                .arg(dir.join("error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("start {}", binary.display()))?;
            let mut nginx = Nginx {
                child,
                addr,
                dir: dir.to_path_buf(),
            };
            match nginx.wait_listening() {
                Ok(()) => return Ok(nginx),
                Err(e) => last_error = format!("{e:#}"),
            }
        }
        bail!("nginx did not start: {last_error}")
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("nginx exited ({status}): {}", self.error_log());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "nginx is not listening on {}: {}",
                    self.addr,
                    self.error_log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::procs::rss_kib(self.pid())
    }

    /// `nginx -v`, for the report.
    pub fn version(binary: &Path) -> String {
        Command::new(binary)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bench nginx-config --dir DIR --origin-dir DIR --listen ADDR --upstream ADDR
/// [--access-log]`: write `DIR/nginx.conf` as the bench runs it (for
/// `scripts/bench-instructions --nginx`, which runs nginx under callgrind). `--access-log`:
/// with a log line per request the size of the broker's audit line ([`ACCESS_LOG`]).
pub fn write_config_main(args: &[String]) -> anyhow::Result<()> {
    let (mut dir, mut origin_dir, mut listen, mut upstream) = (None, None, None, None);
    let mut access_log = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--access-log" {
            access_log = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(value?)),
            "--origin-dir" => origin_dir = Some(PathBuf::from(value?)),
            "--listen" => listen = Some(value?.parse()?),
            "--upstream" => upstream = Some(value?.parse()?),
            other => bail!("nginx-config: unknown argument {other}"),
        }
    }
    let dir = dir.context("nginx-config: --dir DIR")?;
    let origin_dir = origin_dir.context("nginx-config: --origin-dir DIR")?;
    std::fs::create_dir_all(dir.join("tmp"))?;
    let conf = config(
        &dir,
        &origin_dir,
        listen.context("nginx-config: --listen ADDR")?,
        upstream.context("nginx-config: --upstream ADDR")?,
        access_log,
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    Ok(())
}

/// An access log line as long as the broker's audit line for the same request (about 550
/// bytes, the fields in its order), written the way nginx writes logs: into a 64 KB buffer,
/// flushed at least every 5 ms (the broker's audit writer writes every 5 ms). The run, command,
/// `prev` and `mac` are constants of the audit's lengths: nginx neither knows the agent nor
/// chains or MACs its lines. For `scripts/bench-instructions --nginx-log` and `bench
/// --nginx-log`: how much of the broker's distance to nginx is writing one line per request.
const ACCESS_LOG: &str = concat!(
    r#"log_format broker_audit escape=json '{"seq":$connection_requests,"time":"$time_iso8601","#,
    r#""event":"credential_use","run_id":"serve-run-2-1642","pid":$pid,"#,
    r#""command":"sh -c exec h2load --h1 -t1 -c 8 -m1 -n 100000 -H authorization: Bearer OPENAI_API_KEY https://api.openai.com/v1/models","#,
    r#""provider":"openai","profile":"default","host":"$host","sni":"$ssl_server_name","#,
    r#""method":"$request_method","path":"$uri","status":$status,"bytes":$body_bytes_sent,"#,
    r#""latency_ms":$request_time,"#,
    r#""prev":"2e42562ae1cc961a04449b6df27c9d29b4cb901854bcc7f5becf1dd34fa9dd70","#,
    r#""mac":"3029411a49f0ff0fc97a4b64321d8a60c03df41ca6a3d5d7f2c97f7e719ec9b8"}';"#,
);

/// The configuration: one process, TLS and h2 on the listener, the real key set on every
/// request, a verified and pooled HTTP/1.1 upstream. Keep-alive limits are raised so that
/// neither side closes a connection in the middle of a measured window (nginx's defaults
/// close a client connection after 1,000 requests and an upstream one after 1,000 too).
fn config(
    dir: &Path,
    origin_dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    access_log: bool,
) -> String {
    let dir = dir.display();
    let origin = origin_dir.display();
    let access_log = match access_log {
        true => format!(
            "{ACCESS_LOG}\n    access_log {dir}/access.log broker_audit buffer=64k flush=5ms;"
        ),
        false => "access_log off;".to_string(),
    };
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 8192;
}}
http {{
    {access_log}
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    upstream origin {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} ssl http2;
        server_name {HOST};
        ssl_certificate {origin}/leaf.pem;
        ssl_certificate_key {origin}/leaf.key;
        ssl_session_cache shared:tls:1m;
        location / {{
            proxy_pass https://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {HOST};
            proxy_set_header Authorization "Bearer {REAL_KEY}";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {origin}/ca.pem;
            proxy_ssl_server_name on;
            proxy_ssl_name {HOST};
            proxy_ssl_session_reuse on;
            # Streamed as it arrives, as the broker does (SSE answers must not wait).
            proxy_buffering off;
        }}
    }}
}}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--nginx-log` is the only difference: the audit-sized access line, buffered and flushed
    /// every 5 ms as the broker's writer writes; without it no access log at all.
    #[test]
    fn the_access_log_is_written_only_when_asked_for() {
        let (dir, origin) = (Path::new("/tmp/n"), Path::new("/tmp/o"));
        let listen: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
        let upstream: SocketAddr = "127.0.0.1:9443".parse().expect("addr");
        let with = config(dir, origin, listen, upstream, true);
        let without = config(dir, origin, listen, upstream, false);
        assert!(with.contains("log_format broker_audit escape=json"));
        assert!(with.contains("access_log /tmp/n/access.log broker_audit buffer=64k flush=5ms;"));
        assert!(!with.contains("access_log off;"));
        assert!(without.contains("access_log off;"));
        assert!(!without.contains("broker_audit"));
        // Everything else is the same configuration.
        let rest = |c: &str| c[c.find("client_body_temp_path").expect("temp paths")..].to_string();
        assert_eq!(rest(&with), rest(&without));
    }
}
