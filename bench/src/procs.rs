//! The processes the benchmark drives: the origin (`bench origin`), `broker serve` with a
//! temporary `BROKER_HOME`, `broker run`, `wrk`, and the shim's own benchmark program.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use broker_contract::{run_ipv4, ShimConfig};

use crate::origin::{HOST, REAL_KEY};

/// `target/release` (the directory of this binary), where `broker` and `libbroker.so` are.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().context("exe dir")?.to_path_buf())
}

/// Where this run's `broker` and `libbroker.so` are: a snapshot copied at start, so a build
/// finishing during the run (other people's, in a shared target dir) cannot mix binaries.
static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Copy `broker` and `libbroker.so` from `target/release` into `dir` and use them from there.
pub fn snapshot_binaries(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let from = target_dir()?;
    for f in ["broker", "libbroker.so"] {
        std::fs::copy(from.join(f), dir.join(f)).with_context(|| format!("copy {f}"))?;
    }
    let _ = BIN_DIR.set(dir.to_path_buf());
    Ok(())
}

/// For a program that runs only `broker` (the soak), from wherever it was built: copy it
/// into `dir` and use it from there.
pub fn snapshot_from(broker: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::copy(broker, dir.join("broker"))
        .with_context(|| format!("copy {}", broker.display()))?;
    let _ = BIN_DIR.set(dir.to_path_buf());
    Ok(())
}

fn bin_dir() -> anyhow::Result<PathBuf> {
    match BIN_DIR.get() {
        Some(dir) => Ok(dir.clone()),
        None => target_dir(),
    }
}

/// A command with the machine's CA and proxy variables and any broker state removed.
pub fn clean(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    broker_integration::scrub(&mut cmd);
    cmd.env_remove("OPENAI_API_KEY");
    cmd
}

/// A running origin process, stopped on drop (its stdin closes).
pub struct OriginProc {
    child: Child,
    pub addr: SocketAddr,
    pub ca_pem_path: PathBuf,
}

impl OriginProc {
    /// `prefix` wraps the command (e.g. `ip netns exec NS`).
    pub fn start(dir: &Path, listen: &str, prefix: &[&str]) -> anyhow::Result<OriginProc> {
        OriginProc::start_with(dir, listen, prefix, &[])
    }

    /// [`OriginProc::start`] with more arguments for `bench origin` (`--stall-secs S`).
    pub fn start_with(
        dir: &Path,
        listen: &str,
        prefix: &[&str],
        extra: &[&str],
    ) -> anyhow::Result<OriginProc> {
        std::fs::create_dir_all(dir)?;
        let exe = std::env::current_exe()?;
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = clean(first);
                c.args(rest).arg(&exe);
                c
            }
            None => clean(&exe),
        };
        cmd.args(["origin", "--dir"])
            .arg(dir)
            .args(["--listen", listen])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("start origin")?;
        let stdout = child.stdout.take().context("origin stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("origin did not start: {line:?}"))?
            .parse()?;
        Ok(OriginProc {
            child,
            addr,
            ca_pem_path: dir.join("ca.pem"),
        })
    }
}

/// The first two cores this process may run on (`bench --pin`: the load's, the proxy's).
pub fn two_cores() -> anyhow::Result<(usize, usize)> {
    use rustix::thread::{sched_getaffinity, CpuSet};
    let allowed = sched_getaffinity(None).context("the cores this process may use")?;
    let mut cores = (0..CpuSet::MAX_CPU).filter(|&cpu| allowed.is_set(cpu));
    match (cores.next(), cores.next()) {
        (Some(load), Some(proxy)) => Ok((load, proxy)),
        _ => anyhow::bail!(
            "--pin needs two cores, this process may use {}",
            allowed.count()
        ),
    }
}

/// Pin every thread of process `pid` to CPU `cpu` (threads they start later inherit it):
/// `bench --pin`.
pub fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    use rustix::thread::{sched_setaffinity, CpuSet};
    let mut set = CpuSet::new();
    set.set(cpu);
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let name = entry?.file_name();
        let tid = name
            .to_str()
            .and_then(|s| s.parse().ok())
            .and_then(rustix::process::Pid::from_raw)
            .with_context(|| format!("/proc/{pid}/task/{name:?} is not a thread id"))?;
        match sched_setaffinity(Some(tid), &set) {
            // A thread that ended meanwhile.
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(e) => anyhow::bail!("cannot pin thread {name:?} of {pid} to CPU {cpu}: {e}"),
        }
    }
    Ok(())
}

impl OriginProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Requests the origin answered 401 because they lacked the real key (swaps that did not
    /// happen), from the count it keeps in its directory.
    pub fn refused(&self) -> u64 {
        let dir = self.ca_pem_path.parent().unwrap_or(Path::new("."));
        std::fs::read_to_string(dir.join("refused"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for OriginProc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary `BROKER_HOME` with the bench key stored, and `broker serve` running on it.
pub struct Serve {
    child: Child,
    pub home: PathBuf,
    pub config: ShimConfig,
    broker: PathBuf,
}

impl Serve {
    pub fn start(home: &Path, origin_ca: &Path, upstream: &str) -> anyhow::Result<Serve> {
        let broker = bin_dir()?.join("broker");
        std::fs::create_dir_all(home)?;
        let mut add = broker_cmd(&broker, home);
        add.args(["add", "openai"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = add.spawn().context("broker add")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(REAL_KEY.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "broker add openai: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let config_path = home
            .join("run")
            .join(broker_contract::DAEMON_SHIM_CONFIG_FILE);
        let _ = std::fs::remove_file(&config_path);
        let stderr = std::fs::File::create(home.join("serve.stderr"))?;
        let child = broker_cmd(&broker, home)
            .arg("serve")
            .arg("--upstream-ca")
            .arg(origin_ca)
            .arg("--resolve")
            .arg(format!("{HOST}:443:{upstream}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("broker serve")?;
        let mut serve = Serve {
            child,
            home: home.to_path_buf(),
            config: ShimConfig::default(),
            broker,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(text) = std::fs::read_to_string(&config_path) {
                if let Ok(config) = ShimConfig::parse(&text) {
                    serve.config = config;
                    return Ok(serve);
                }
            }
            if let Ok(Some(status)) = serve.child.try_wait() {
                bail!("broker serve exited ({status}): {}", serve.stderr());
            }
            if Instant::now() > deadline {
                bail!("broker serve did not start: {}", serve.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.home.join("serve.stderr")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The fake address the shim hands the agent for [`HOST`], with the broker's port.
    pub fn addr(&self) -> anyhow::Result<SocketAddr> {
        anyhow::ensure!(self.config.manages(HOST), "api.openai.com is not managed");
        Ok(SocketAddr::new(
            IpAddr::V4(run_ipv4(self.config.slot)),
            self.config.port,
        ))
    }

    pub fn ca_pem(&self) -> anyhow::Result<Vec<u8>> {
        Ok(std::fs::read(&self.config.ca_file)?)
    }

    pub fn placeholder(&self) -> anyhow::Result<String> {
        self.config
            .env
            .iter()
            .find(|(var, _)| var == "OPENAI_API_KEY")
            .map(|(_, p)| p.clone())
            .context("no OPENAI_API_KEY placeholder in shim.conf")
    }

    /// `broker run [extra] -- argv...` on this home (joins this serve unless `--embedded`).
    pub fn run_cmd(&self, extra: &[&str], argv: &[&str]) -> Command {
        let mut cmd = broker_cmd(&self.broker, &self.home);
        cmd.arg("run").args(extra).arg("--").args(argv);
        cmd
    }

    /// VmRSS of the serve process, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn broker_cmd(broker: &Path, home: &Path) -> Command {
    let mut cmd = clean(broker);
    cmd.env("BROKER_HOME", home)
        .env("BROKER_KEY_SOURCE", "file")
        .env_remove("BROKER_PASSPHRASE")
        .env_remove("XDG_RUNTIME_DIR");
    cmd
}

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// On-CPU nanoseconds of each thread of a process, by thread id.
pub type ThreadCpu = std::collections::HashMap<u32, u64>;

/// Read `/proc/PID/task/*/schedstat`, whose first field is a thread's time on a CPU in
/// nanoseconds (`/proc/PID/stat` has clock ticks, 10 ms here: too coarse for a window of a
/// second or two). It is per thread, so a process is the sum of its threads.
pub fn thread_cpu(pid: u32) -> anyhow::Result<ThreadCpu> {
    let mut threads = ThreadCpu::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        // A thread that ended since the listing has no file any more; it simply is not counted.
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        let ns = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/task/{tid}/schedstat: {text:?}"))?;
        threads.insert(tid, ns);
    }
    anyhow::ensure!(!threads.is_empty(), "no schedstat under /proc/{pid}/task");
    Ok(threads)
}

/// A process's user and kernel CPU time so far (all its threads, ended ones included), in
/// clock ticks, from `/proc/PID/stat`: coarse (10 ms), but the only user/kernel split here
/// (this VM has no hardware counters for `perf stat -e instructions:u,instructions:k`).
pub fn user_system_ticks(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14, stime 15.
    let rest = text.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat field {}", i + 3))
    };
    Ok((field(11)?, field(12)?))
}

/// CPU nanoseconds a process used between two readings, thread by thread: a thread started in
/// between counts from zero, and one that ended in between (idle pool threads do) drops out
/// instead of taking its whole past off the total, as subtracting two sums would.
pub fn cpu_between(before: &ThreadCpu, after: &ThreadCpu) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// Wall time of one run of `cmd` (output discarded); fails on a non-zero exit.
pub fn wall(cmd: &mut Command) -> anyhow::Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output()?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(elapsed)
}

/// The load generator of the shim legs: a dynamically linked program (OpenSSL), so under
/// `broker run` the shim reroutes it and makes it trust the run's CA. `wrk` speaks HTTP/1.1,
/// `h2load` (Debian's nghttp2-client) h2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadTool {
    Wrk,
    H2load,
}

/// What a load generator reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct ToolResult {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub non_2xx: u64,
    pub socket_errors: u64,
}

impl LoadTool {
    pub fn name(self) -> &'static str {
        match self {
            LoadTool::Wrk => "wrk",
            LoadTool::H2load => "h2load",
        }
    }

    /// A shell command (`sh -c`) keeping `conns` connections busy with one request at a time
    /// for `window` on `https://{host}/v1/models`, with this `Authorization` value (it may
    /// name `$OPENAI_API_KEY`). `connect_to`: the address to reach instead of the host's (the
    /// direct legs); `log`: where h2load writes each request's latency.
    pub fn script(
        self,
        conns: usize,
        window: Duration,
        auth: &str,
        connect_to: Option<SocketAddr>,
        log: &Path,
    ) -> String {
        let host = HOST;
        match self {
            // wrk runs whole seconds; it has no way to connect elsewhere, so the direct leg
            // names the address and sends the Host header.
            LoadTool::Wrk => {
                let secs = window.as_secs().max(1);
                let target = match connect_to {
                    Some(addr) => format!("-H 'Host: {host}' https://{addr}/v1/models"),
                    None => format!("https://{host}/v1/models"),
                };
                format!(
                    "exec wrk -t1 -c {conns} -d {secs}s --latency -H \"Authorization: {auth}\" {target}"
                )
            }
            LoadTool::H2load => {
                let to = connect_to.map_or(String::new(), |a| format!("--connect-to={a} "));
                format!(
                    "exec h2load -t1 -c {conns} -m1 -D {}ms --warm-up-time=300ms -H \"authorization: {auth}\" {to}--log-file={} https://{host}/v1/models",
                    window.as_millis().max(1),
                    log.display()
                )
            }
        }
    }

    pub fn run(self, cmd: &mut Command, log: &Path) -> anyhow::Result<ToolResult> {
        let _ = std::fs::remove_file(log);
        let out = cmd.stdin(Stdio::null()).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{} failed ({}): {text}{}",
                self.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let parsed = match self {
            LoadTool::Wrk => parse_wrk(&text),
            LoadTool::H2load => parse_h2load(&text, &std::fs::read_to_string(log)?),
        };
        parsed.with_context(|| format!("cannot parse {} output:\n{text}", self.name()))
    }
}

fn parse_wrk(text: &str) -> Option<ToolResult> {
    let mut r = ToolResult::default();
    let mut found = (false, false, false);
    for line in text.lines() {
        let line = line.trim();
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.per_sec = v.trim().parse().ok()?;
            found.0 = true;
        } else if let Some(v) = line.strip_prefix("50%") {
            r.p50_us = wrk_time_us(v.trim())?;
            found.1 = true;
        } else if let Some(v) = line.strip_prefix("99%") {
            r.p99_us = wrk_time_us(v.trim())?;
            found.2 = true;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().ok()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.socket_errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    (found == (true, true, true)).then_some(r)
}

/// h2load's summary (`finished in 2.00s, 18566.50 req/s, ...`, `requests: ... 0 errored,
/// 0 timeout`, `status codes: N 2xx, ...`) and its log file (one line per request of the
/// measured window: start, status, latency in µs), which gives the percentiles it does not
/// print.
fn parse_h2load(text: &str, log: &str) -> Option<ToolResult> {
    let mut r = ToolResult::default();
    // `N word` pairs of a comma-separated summary line.
    let count = |line: &str, word: &str| -> Option<u64> {
        line.split(',').find_map(|part| {
            let mut it = part.split_whitespace().rev();
            (it.next()? == word).then(|| it.next()?.parse().ok())?
        })
    };
    let mut found = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            r.per_sec = rest
                .split(',')
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            found = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            r.socket_errors = count(rest, "errored")? + count(rest, "timeout")?;
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            r.non_2xx = count(rest, "3xx")? + count(rest, "4xx")? + count(rest, "5xx")?;
        }
    }
    let mut latencies: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    if !found || latencies.is_empty() {
        return None;
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    r.p50_us = at(0.50);
    r.p99_us = at(0.99);
    Some(r)
}

/// `123.45us`, `1.23ms`, `1.00s` -> microseconds.
fn wrk_time_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num,
        "ms" => num * 1e3,
        "s" => num * 1e6,
        "m" => num * 60e6,
        _ => return None,
    })
}

/// The shim's benchmark program (`shim/examples/bench.rs`): pass-through `connect()` without
/// and with the preload, as (no preload ns, preload ns) for TCP and UDP.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnectResult {
    pub tcp: (f64, f64),
    pub udp: (f64, f64),
}

pub fn shim_connect_bench() -> anyhow::Result<(ConnectResult, String)> {
    let exe = target_dir()?.join("examples").join("bench");
    if !exe.exists() {
        bail!(
            "{} missing: cargo build --release -p broker-shim --example bench",
            exe.display()
        );
    }
    let out = clean(&exe).stdin(Stdio::null()).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "shim bench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let row = |prefix: &str| -> Option<(f64, f64)> {
        let line = text.lines().find(|l| l.starts_with(prefix))?;
        let rest = &line[prefix.len()..];
        let nums: Vec<f64> = rest
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        Some((*nums.first()?, *nums.get(1)?))
    };
    let r = ConnectResult {
        tcp: row("connect() TCP").context("no TCP row in the shim bench output")?,
        udp: row("connect() UDP").context("no UDP row in the shim bench output")?,
    };
    Ok((r, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let text = "Running 2s test @ https://x\n  1 threads and 1 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   101.59us   20.00us   1.20ms   95.00%\n  Latency Distribution\n     50%   98.00us\n     75%  102.00us\n     90%  110.00us\n     99%    1.01ms\n  19000 requests in 2.00s, 3.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:   9500.12\nTransfer/sec:      1.50MB\n";
        let r = parse_wrk(text).expect("parse");
        assert_eq!(r.per_sec, 9500.12);
        assert_eq!(r.p50_us, 98.0);
        assert_eq!(r.p99_us, 1010.0);
        assert_eq!(r.non_2xx, 3);
    }

    #[test]
    fn h2load_summary_and_log_give_rate_errors_and_percentiles() {
        let text = "finished in 2.00s, 18566.50 req/s, 1.89MB/s
requests: 40 total, 40 started, 40 done, 37 succeeded, 3 failed, 2 errored, 1 timeout
status codes: 37 2xx, 0 3xx, 1 4xx, 0 5xx
";
        let log: String = (1..=100)
            .map(|us| format!("1795911841079180\t200\t{us}\n"))
            .collect();
        let r = parse_h2load(text, &log).expect("parsed");
        assert_eq!(r.per_sec, 18566.5);
        assert_eq!((r.non_2xx, r.socket_errors), (1, 3));
        assert_eq!((r.p50_us, r.p99_us), (51.0, 99.0));
        assert!(parse_h2load(text, "").is_none(), "no log, no percentiles");
    }

    /// `pin` moves every thread of a running process, and the threads it starts afterwards.
    #[test]
    fn pin_moves_every_thread_of_a_process_to_the_core() {
        // The last core this process may use: on a machine of two or more, not all a child
        // may use by default, so the pin shows.
        let allowed = rustix::thread::sched_getaffinity(None).expect("affinity");
        let cpu = (0..rustix::thread::CpuSet::MAX_CPU)
            .rev()
            .find(|&c| allowed.is_set(c))
            .expect("a core");
        // A shell that starts a second thread of work (a background sleep, a process of its
        // own) only after it was pinned: it must inherit the core.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read _; sleep 30 & echo $!; wait"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let pid = child.id();
        pin(pid, cpu).expect("pin");
        let allowed = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .expect("status")
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
                .expect("Cpus_allowed_list")
        };
        assert_eq!(allowed(&pid.to_string()), cpu.to_string());
        use std::io::{BufRead as _, Write as _};
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("write");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("the sleep's pid");
        assert_eq!(
            allowed(line.trim()),
            cpu.to_string(),
            "started after the pin"
        );
        let _ = child.kill();
        let _ = std::process::Command::new("kill").arg(line.trim()).status();
        let _ = child.wait();
        assert!(
            pin(u32::MAX, 0).is_err(),
            "no such process: an error, not a silent no-op"
        );
    }
}
