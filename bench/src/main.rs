//! `bench`: what the broker and the shim add, side by side with going direct, in one run.
//!
//! ```text
//! cargo run --release -p broker-bench --bin bench [-- --json FILE --rounds N --secs S]
//! ```
//!
//! Starts a local TLS origin (h1 + h2, a JSON answer for the real key only, an SSE endpoint)
//! and `broker serve` (temporary `BROKER_HOME`, key file, the key stored with `broker add`),
//! both on port 0, then measures each leg against the direct leg, legs interleaved (A B A B)
//! and the median of the rounds kept. Prints a table (leg, direct, broker, shim, ratio; for the
//! keep-alive legs also the CPU each process spent per request) and writes JSON
//! (`target/bench.json` by default). It reports; it asserts nothing.
//!
//! Everything stays on this machine: loopback, plus (as root, with netem) a network namespace
//! and veth pair of its own for the 20 ms round-trip leg, removed when the run ends.

use broker_bench::{client, netem, nginx, origin, procs};

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{json, Value};

use client::Target;
use origin::{HOST, REAL_KEY};
use procs::{OriginProc, Serve};

struct Opts {
    json: Option<PathBuf>,
    rounds: usize,
    window: Duration,
    build: bool,
    /// Only these sections (all when empty).
    only: Vec<String>,
    /// Measure nginx as a reverse proxy doing the broker's job beside it.
    nginx: bool,
    /// nginx writes an access line per request, as long as the broker's audit line.
    nginx_log: bool,
    /// Load generators on one core, origin and proxy on another (`--pin`).
    pin: bool,
}

const SECTIONS: &[&str] = &[
    "keepalive",
    "newconn",
    "sse",
    "run",
    "connect",
    "rss",
    "rtt",
];

const USAGE: &str =
    "usage: bench [--json FILE] [--rounds N] [--secs S] [--no-build] [--nginx | --no-nginx] [--nginx-log] [--pin]

  --json FILE   where to write the results (default: target/bench.json)
  --rounds N    interleaved rounds per leg; the median is kept (default 3)
  --secs S      measured seconds per load run (default 2)
  --only LIST   only these sections (comma-separated): keepalive, newconn, sse, run,
                connect, rss, rtt
  --no-build    do not build broker, libbroker.so and the shim benchmark first
  --nginx       only the sections with an nginx column (keepalive, newconn, rss): the
                broker against nginx doing the same job, broker/nginx as the headline
  --no-nginx    leave nginx out (it is measured whenever it is installed)
  --nginx-log   nginx writes an access line per request as long as the broker's audit line
                (buffered 64 KB, flushed every 5 ms): the reference with a log of its own,
                as nginx runs by default, against the broker's audit
  --pin         load generators (this process, wrk, h2load, broker run) on the first core this
                process may use, the origin and the proxy (broker serve, nginx) on the
                second: req/s then measure the proxy's CPU per request, without the kernel's
                run-to-run placement of three processes on two cores (README, \"Sixth
                round\"); needs two cores";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("origin") {
        return match origin::main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench origin: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.first().map(String::as_str) == Some("nginx-config") {
        return match nginx::write_config_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench nginx-config: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match parse_opts(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("bench: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_opts(args: &[String]) -> anyhow::Result<Opts> {
    let mut opts = Opts {
        json: None,
        rounds: 3,
        window: Duration::from_secs(2),
        build: true,
        only: Vec::new(),
        nginx: true,
        nginx_log: false,
        pin: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => opts.json = Some(it.next().context("--json FILE")?.into()),
            "--rounds" => opts.rounds = it.next().context("--rounds N")?.parse()?,
            "--secs" => {
                opts.window = Duration::from_secs_f64(it.next().context("--secs S")?.parse()?)
            }
            "--no-build" => opts.build = false,
            "--no-nginx" => opts.nginx = false,
            "--pin" => opts.pin = true,
            "--nginx-log" => opts.nginx_log = true,
            "--nginx" => {
                opts.nginx = true;
                for name in ["keepalive", "newconn", "rss"] {
                    opts.only.push(name.to_string());
                }
            }
            "--only" => {
                for name in it.next().context("--only LIST")?.split(',') {
                    anyhow::ensure!(SECTIONS.contains(&name), "--only: unknown section {name}");
                    opts.only.push(name.to_string());
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        opts.nginx || !opts.nginx_log,
        "--nginx-log measures nginx, which --no-nginx leaves out"
    );
    opts.rounds = opts.rounds.clamp(1, 50);
    Ok(opts)
}

/// One line of the table. `ratio` is (broker or shim) / direct, `vs_nginx` broker (or shim) /
/// nginx.
struct Row {
    leg: String,
    unit: &'static str,
    direct: Option<f64>,
    broker: Option<f64>,
    shim: Option<f64>,
    nginx: Option<f64>,
    /// The lowest and highest broker/nginx of a single round (each round runs both, one after
    /// the other): how far the median could move from run to run on a shared machine.
    vs_nginx_rounds: Option<(f64, f64)>,
}

impl Row {
    fn new(leg: impl Into<String>, unit: &'static str) -> Row {
        Row {
            leg: leg.into(),
            unit,
            direct: None,
            broker: None,
            shim: None,
            nginx: None,
            vs_nginx_rounds: None,
        }
    }
    /// Record the spread of broker/nginx over the rounds, from each round's figures.
    fn rounds(mut self, proxy: &[f64], nginx: &[f64]) -> Row {
        let ratios: Vec<f64> = proxy
            .iter()
            .zip(nginx)
            .filter(|(_, n)| **n > 0.0)
            .map(|(p, n)| p / n)
            .collect();
        let lowest = ratios.iter().copied().reduce(f64::min);
        let highest = ratios.iter().copied().reduce(f64::max);
        self.vs_nginx_rounds = lowest.zip(highest);
        self
    }
    fn nginx(mut self, v: Option<f64>) -> Row {
        self.nginx = v;
        self
    }
    fn vs_nginx(&self) -> Option<f64> {
        Some(self.broker.or(self.shim)? / self.nginx?)
    }
    fn direct(mut self, v: f64) -> Row {
        self.direct = Some(v);
        self
    }
    fn broker(mut self, v: f64) -> Row {
        self.broker = Some(v);
        self
    }
    fn shim(mut self, v: f64) -> Row {
        self.shim = Some(v);
        self
    }
    fn ratio(&self) -> Option<f64> {
        Some(self.broker.or(self.shim)? / self.direct?)
    }
    fn json(&self) -> Value {
        json!({
            "leg": self.leg, "unit": self.unit, "direct": self.direct,
            "broker": self.broker, "shim": self.shim, "ratio": self.ratio(),
            "nginx": self.nginx, "broker_over_nginx": self.vs_nginx(),
            "broker_over_nginx_rounds": self.vs_nginx_rounds.map(|(lo, hi)| [lo, hi]),
        })
    }
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    let Some(v) = v else {
        return "-".into();
    };
    match unit {
        "req/s" | "conn/s" => format!("{v:.0} {unit}"),
        "µs" if v >= 10_000.0 => format!("{:.1} ms", v / 1e3),
        "µs" => format!("{v:.0} µs"),
        "µs CPU" => format!("{v:.1} µs"),
        "ms" => format!("{v:.1} ms"),
        "ns" => format!("{v:.0} ns"),
        "MiB" => format!("{v:.1} MiB"),
        "s" => format!("{v:.2} s"),
        _ => format!("{v:.2} {unit}"),
    }
}

/// Each round's throughput, in the order the rounds ran.
fn per_sec(v: &[client::LoadResult]) -> Vec<f64> {
    v.iter().map(|r| r.per_sec).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU time of the whole machine and the part of it the hypervisor gave to other guests
/// ("steal"), in clock ticks since boot, from the first line of `/proc/stat`.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    Some((fields.iter().take(8).sum(), *fields.get(7)?))
}

/// Percent of the CPU time between two readings that the hypervisor stole: on a shared VM the
/// figures of a run with much steal are not comparable with a quiet one.
fn steal_pct(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((t0, s0), (t1, s1)) = (before?, after?);
    let total = t1.checked_sub(t0).filter(|&t| t > 0)?;
    Some(100.0 * s1.saturating_sub(s0) as f64 / total as f64)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    // Not available_parallelism(): under --pin this process may use one core of them.
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    json!({ "cpu": model, "cores": cores, "kernel": kernel, "commit": commit })
}

/// Build what the benchmark runs (when started by cargo, which sets `$CARGO`).
fn build() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        return Ok(());
    };
    eprintln!("bench: building broker, libbroker.so and the shim benchmark (release)");
    let mut command = Command::new(cargo);
    // `cargo run` set these for this program; a nested cargo that sees them believes ring's
    // build script changed inputs and rebuilds ring, rustls and everything above them.
    for (name, _) in std::env::vars_os() {
        let var = name.to_string_lossy();
        if var.starts_with("CARGO_PKG_")
            || matches!(
                &*var,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            command.env_remove(&name);
        }
    }
    let status = command
        // Not `--workspace`: that would rebuild this running program under its feet.
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "broker-cli",
            "-p",
            "broker-shim",
        ])
        .args(["--bins", "--lib", "--example", "bench"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo build failed");
    Ok(())
}

/// Raise the soft open-files limit to the hard one (the broker inherits it): 1,000 client
/// connections need 2,000+ descriptors between the client and the broker.
fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Removes the benchmark's temporary directory on every exit path.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn section(
    opts: &Opts,
    key: &str,
    name: &str,
    notes: &mut Vec<String>,
    f: impl FnOnce(&mut Vec<String>) -> anyhow::Result<()>,
) {
    if !opts.only.is_empty() && !opts.only.iter().any(|o| o == key) {
        return;
    }
    eprintln!("bench: {name}");
    let t = Instant::now();
    let ticks = cpu_ticks();
    if let Err(e) = f(notes) {
        let msg = format!("{name}: failed: {e:#}");
        eprintln!("bench: {msg}");
        notes.push(msg);
    }
    let steal = steal_pct(ticks, cpu_ticks());
    eprintln!(
        "bench:   {:.1} s, hypervisor steal {}",
        t.elapsed().as_secs_f64(),
        steal.map_or("unknown".into(), |p| format!("{p:.0}%"))
    );
    if let Some(p) = steal.filter(|&p| p >= 5.0) {
        notes.push(format!(
            "{name}: the hypervisor took {p:.0}% of the CPU time (steal): these figures are noisy"
        ));
    }
}

fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.build {
        build()?;
    }
    let target_dir = procs::target_dir()?;
    for f in ["broker", "libbroker.so"] {
        let p = target_dir.join(f);
        anyhow::ensure!(
            p.exists(),
            "{} missing: cargo build --release --workspace",
            p.display()
        );
    }
    let started = Instant::now();
    let load_start = loadavg();
    let ticks_start = cpu_ticks();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    if let Some(one) = load_start
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
    {
        if one > 0.5 * cores as f64 {
            eprintln!(
                "bench: warning: load average {load_start} on {cores} cores: numbers will be noisy"
            );
        }
    }
    // The first two cores this process may use: the load's, then the proxy's.
    let pinned = match opts.pin {
        true => Some(procs::two_cores()?),
        false => None,
    };
    if let Some((load_core, _)) = pinned {
        // Everything started from here runs on the load's core, but for the origin and the
        // proxies, moved to the other as they start.
        procs::pin(std::process::id(), load_core)?;
    }
    let pin_to_proxy_core = |pid: u32| match pinned {
        Some((_, proxy_core)) => procs::pin(pid, proxy_core),
        None => Ok(()),
    };
    let nofile = raise_nofile();
    let tmp = TempDir(std::env::temp_dir().join(format!("broker-bench-{}", std::process::id())));
    std::fs::create_dir_all(&tmp.0)?;
    procs::snapshot_binaries(&tmp.0.join("bin"))?;
    let broker_built = std::fs::metadata(target_dir.join("broker"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());

    let origin = OriginProc::start(&tmp.0.join("origin"), "127.0.0.1:0", &[])?;
    pin_to_proxy_core(origin.pid())?;
    let serve = Serve::start(
        &tmp.0.join("home"),
        &origin.ca_pem_path,
        &origin.addr.to_string(),
    )?;
    pin_to_proxy_core(serve.pid())?;
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle_fresh = serve.rss_kib()?;
    eprintln!(
        "bench: origin pid {}, broker serve pid {}",
        origin.pid(),
        serve.pid()
    );

    let direct = Target {
        addr: origin.addr,
        ca_pem: std::fs::read(&origin.ca_pem_path)?,
        auth: format!("Bearer {REAL_KEY}"),
        preamble: None,
    };
    let brokered = Target {
        addr: serve.addr()?,
        ca_pem: serve.ca_pem()?,
        auth: format!("Bearer {}", serve.placeholder()?),
        preamble: serve.config.ticket.as_ref().map(|t| t.preamble()),
    };
    let mut notes: Vec<String> = Vec::new();
    if let Some((load_core, proxy_core)) = pinned {
        notes.push(format!(
            "pinned (--pin): this process, wrk, h2load and broker run on CPU {load_core}; the \
             origin, broker serve and nginx on CPU {proxy_core}"
        ));
    }
    // nginx as a reverse proxy doing the broker's job, the reference for what a proxy of two
    // TLS legs costs on this machine (bench/src/nginx.rs).
    let nginx = match (opts.nginx, nginx::find()) {
        (false, _) => None,
        (true, None) => {
            notes.push("nginx legs skipped: nginx not found (apt-get install nginx-light)".into());
            None
        }
        (true, Some(binary)) => {
            let origin_dir = origin.ca_pem_path.parent().context("origin dir")?;
            let n = nginx::Nginx::start(
                &binary,
                &tmp.0.join("nginx"),
                origin_dir,
                origin.addr,
                opts.nginx_log,
            )?;
            pin_to_proxy_core(n.pid())?;
            eprintln!("bench: {}, pid {}", nginx::Nginx::version(&binary), n.pid());
            notes.push(format!(
                "nginx: {}, one process, TLS + h2 on the listener, proxy_pass https:// with \
                 proxy_ssl_verify, upstream keepalive, Authorization set, {} (bench/src/nginx.rs)",
                nginx::Nginx::version(&binary),
                match opts.nginx_log {
                    true => "an access line per request as long as the broker's audit line (--nginx-log)",
                    false => "no access log",
                }
            ));
            Some(n)
        }
    };
    let nginx_target = nginx.as_ref().map(|n| Target {
        addr: n.addr,
        ca_pem: direct.ca_pem.clone(),
        // What the agent sends the broker; nginx replaces it with the real key.
        auth: brokered.auth.clone(),
        preamble: None,
    });
    let rss_nginx_fresh = nginx.as_ref().map(|n| n.rss_kib()).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Every path answers 200 before anything is timed (the origin answers 401 to anything but
    // the real key, so this also proves the swap).
    for (name, t) in [
        ("direct", Some(&direct)),
        ("broker", Some(&brokered)),
        ("nginx", nginx_target.as_ref()),
    ]
    .into_iter()
    .filter_map(|(name, t)| Some((name, t?)))
    {
        rt.block_on(client::keep_alive(
            t,
            false,
            1,
            Duration::ZERO,
            Duration::from_millis(100),
            || (),
        ))
        .with_context(|| format!("sanity request ({name})"))?;
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut raw = serde_json::Map::new();
    let warmup = Duration::from_millis(300);
    let rounds = opts.rounds;
    // The shim legs' load generators: wrk for h1, h2load for h2.
    let tools = [
        (procs::LoadTool::Wrk, "wrk"),
        (procs::LoadTool::H2load, "nghttp2-client"),
    ]
    .map(|(tool, package)| {
        let found = broker_integration::which(tool.name()).is_some();
        if !found {
            notes.push(format!(
                "{} shim legs skipped: {} not found (apt-get install {package})",
                if tool == procs::LoadTool::Wrk {
                    "h1"
                } else {
                    "h2"
                },
                tool.name()
            ));
        }
        found.then_some(tool)
    });
    let tool_log = tmp.0.join("h2load.log");

    // Keep-alive requests, and the CPU each process spends on them. The third process is the
    // proxy of the leg: `broker serve` (idle in the direct leg) or nginx.
    let probe_for = |proxy: u32| {
        let pids = [std::process::id(), origin.pid(), proxy];
        move || -> CpuReading {
            (
                Instant::now(),
                pids.map(procs::thread_cpu),
                procs::user_system_ticks(proxy).ok(),
            )
        }
    };
    let nginx_pid = nginx.as_ref().map(nginx::Nginx::pid);
    section(
        &opts,
        "keepalive",
        "keep-alive requests",
        &mut notes,
        |notes| {
            for (h2, conns) in [(false, 1), (false, 8), (true, 1), (true, 8)] {
                let proto = if h2 { "h2" } else { "h1" };
                let (mut d, mut b, mut n) = (Vec::new(), Vec::new(), Vec::new());
                let (mut dc, mut bc, mut nc, mut cpu_err) =
                    (Vec::new(), Vec::new(), Vec::new(), None);
                let (mut wd, mut ws, mut wn) = (Vec::new(), Vec::new(), Vec::new());
                let tool = tools[usize::from(h2)];
                for _ in 0..rounds {
                    let legs = [
                        (Some(&direct), serve.pid(), &mut d, &mut dc),
                        (Some(&brokered), serve.pid(), &mut b, &mut bc),
                        (
                            nginx_target.as_ref(),
                            nginx_pid.unwrap_or(0),
                            &mut n,
                            &mut nc,
                        ),
                    ];
                    for (target, proxy, runs, cpu) in legs {
                        let Some(target) = target else { continue };
                        let (r, readings) = rt.block_on(client::keep_alive(
                            target,
                            h2,
                            conns,
                            warmup,
                            opts.window,
                            probe_for(proxy),
                        ))?;
                        runs.push(r);
                        cpu.push(
                            cpu_use(readings, r.count)
                                .map_err(|e| cpu_err = Some(e))
                                .ok(),
                        );
                    }
                    if let Some(tool) = tool {
                        // Direct: to the origin's address with the real key.
                        let script = tool.script(
                            conns,
                            opts.window,
                            &format!("Bearer {REAL_KEY}"),
                            Some(origin.addr),
                            &tool_log,
                        );
                        let mut cmd = procs::clean("sh");
                        cmd.args(["-c", &script]);
                        wd.push(tool.run(&mut cmd, &tool_log)?);
                        // Shim: under `broker run`, the placeholder from its environment.
                        let script = tool.script(
                            conns,
                            opts.window,
                            "Bearer $OPENAI_API_KEY",
                            None,
                            &tool_log,
                        );
                        ws.push(
                            tool.run(&mut serve.run_cmd(&[], &["sh", "-c", &script]), &tool_log)?,
                        );
                        // nginx: to its address with the placeholder, which it replaces.
                        if let Some(t) = &nginx_target {
                            let script =
                                tool.script(conns, opts.window, &t.auth, Some(t.addr), &tool_log);
                            let mut cmd = procs::clean("sh");
                            cmd.args(["-c", &script]);
                            wn.push(tool.run(&mut cmd, &tool_log)?);
                        }
                    }
                }
                let label = format!("{proto}, {conns} conn{}", if conns > 1 { "s" } else { "" });
                let med_of = |v: &[client::LoadResult], f: fn(&client::LoadResult) -> f64| {
                    (!v.is_empty()).then(|| median(v.iter().map(f).collect()))
                };
                let tmed_of = |v: &[procs::ToolResult], f: fn(&procs::ToolResult) -> f64| {
                    (!v.is_empty()).then(|| median(v.iter().map(f).collect()))
                };
                rows.push(
                    Row::new(format!("keep-alive {label}"), "req/s")
                        .direct(median(d.iter().map(|r| r.per_sec).collect()))
                        .broker(median(b.iter().map(|r| r.per_sec).collect()))
                        .nginx(med_of(&n, |r| r.per_sec))
                        .rounds(&per_sec(&b), &per_sec(&n)),
                );
                rows.push(
                    Row::new(format!("  p50 latency {label}"), "µs")
                        .direct(median(d.iter().map(|r| r.p50_us).collect()))
                        .broker(median(b.iter().map(|r| r.p50_us).collect()))
                        .nginx(med_of(&n, |r| r.p50_us)),
                );
                rows.push(
                    Row::new(format!("  p99 latency {label}"), "µs")
                        .direct(median(d.iter().map(|r| r.p99_us).collect()))
                        .broker(median(b.iter().map(|r| r.p99_us).collect()))
                        .nginx(med_of(&n, |r| r.p99_us)),
                );
                match cpu_err {
                    Some(e) => notes.push(format!("CPU per request {label}: left out: {e:#}")),
                    None => cpu_rows(&label, &dc, &bc, &nc, cores, &mut rows, notes),
                }
                let errors: u64 = wd
                    .iter()
                    .chain(&ws)
                    .chain(&wn)
                    .map(|r| r.non_2xx + r.socket_errors)
                    .sum();
                if let Some(tool) = tool {
                    let name = tool.name();
                    if errors > 0 {
                        notes.push(format!(
                            "{name} {label}: {errors} non-2xx responses or socket errors"
                        ));
                    }
                    rows.push(
                        Row::new(format!("keep-alive {label}, {name}"), "req/s")
                            .direct(median(wd.iter().map(|r| r.per_sec).collect()))
                            .shim(median(ws.iter().map(|r| r.per_sec).collect()))
                            .nginx(tmed_of(&wn, |r| r.per_sec))
                            .rounds(
                                &ws.iter().map(|r| r.per_sec).collect::<Vec<_>>(),
                                &wn.iter().map(|r| r.per_sec).collect::<Vec<_>>(),
                            ),
                    );
                    rows.push(
                        Row::new(format!("  p50 latency {label}, {name}"), "µs")
                            .direct(median(wd.iter().map(|r| r.p50_us).collect()))
                            .shim(median(ws.iter().map(|r| r.p50_us).collect()))
                            .nginx(tmed_of(&wn, |r| r.p50_us)),
                    );
                    rows.push(
                        Row::new(format!("  p99 latency {label}, {name}"), "µs")
                            .direct(median(wd.iter().map(|r| r.p99_us).collect()))
                            .shim(median(ws.iter().map(|r| r.p99_us).collect()))
                            .nginx(tmed_of(&wn, |r| r.p99_us)),
                    );
                }
                let samples = |v: &[client::LoadResult], cpu: &[Option<CpuUse>]| -> Value {
                    v.iter().zip(cpu)
                    .map(|(r, c)| json!({"per_sec": r.per_sec, "p50_us": r.p50_us, "p99_us": r.p99_us, "count": r.count, "cpu": c.map(|c| c.json())}))
                    .collect()
                };
                let wsamples = |v: &[procs::ToolResult]| -> Value {
                    v.iter()
                    .map(|r| json!({"per_sec": r.per_sec, "p50_us": r.p50_us, "p99_us": r.p99_us, "non_2xx": r.non_2xx, "socket_errors": r.socket_errors}))
                    .collect()
                };
                raw.insert(
                format!("keep_alive_{proto}_{conns}"),
                json!({"direct": samples(&d, &dc), "broker": samples(&b, &bc), "nginx": samples(&n, &nc), "shim_tool": tool.map(procs::LoadTool::name), "tool_direct": wsamples(&wd), "tool_shim": wsamples(&ws), "tool_nginx": wsamples(&wn)}),
            );
            }
            Ok(())
        },
    );

    // New TLS connections.
    section(&opts, "newconn", "new TLS connections", &mut notes, |_| {
        for conc in [1, 8] {
            let (mut d, mut b, mut n) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                d.push(rt.block_on(client::new_connections(&direct, conc, warmup, opts.window))?);
                b.push(rt.block_on(client::new_connections(
                    &brokered,
                    conc,
                    warmup,
                    opts.window,
                ))?);
                if let Some(t) = &nginx_target {
                    n.push(rt.block_on(client::new_connections(t, conc, warmup, opts.window))?);
                }
            }
            let med_of = |v: &[client::LoadResult], f: fn(&client::LoadResult) -> f64| {
                (!v.is_empty()).then(|| median(v.iter().map(f).collect()))
            };
            rows.push(
                Row::new(format!("new TLS connections, {conc} at a time"), "conn/s")
                    .direct(median(d.iter().map(|r| r.per_sec).collect()))
                    .broker(median(b.iter().map(|r| r.per_sec).collect()))
                    .nginx(med_of(&n, |r| r.per_sec))
                    .rounds(&per_sec(&b), &per_sec(&n)),
            );
            rows.push(
                Row::new(format!("  p50 connect+request, {conc} at a time"), "µs")
                    .direct(median(d.iter().map(|r| r.p50_us).collect()))
                    .broker(median(b.iter().map(|r| r.p50_us).collect()))
                    .nginx(med_of(&n, |r| r.p50_us)),
            );
            raw.insert(
                format!("new_connections_{conc}"),
                json!({"direct": d.iter().map(|r| r.per_sec).collect::<Vec<_>>(), "broker": b.iter().map(|r| r.per_sec).collect::<Vec<_>>(), "nginx": n.iter().map(|r| r.per_sec).collect::<Vec<_>>()}),
            );
        }
        Ok(())
    });

    // SSE.
    section(&opts, "sse", "streamed response (SSE)", &mut notes, |_| {
        let (n, gap) = (20usize, Duration::from_millis(20));
        let sse_rounds = rounds.max(5);
        let mut d = Vec::new();
        let mut b = Vec::new();
        for _ in 0..sse_rounds {
            d.push(rt.block_on(client::sse(&direct, n, gap))?);
            b.push(rt.block_on(client::sse(&brokered, n, gap))?);
        }
        let ttfb = |v: &[client::SseRun]| median(v.iter().map(|r| r.ttfb_us).collect());
        let late = |v: &[client::SseRun]| {
            median(v.iter().map(|r| median(r.lateness_us.clone())).collect())
        };
        let gap_med =
            |v: &[client::SseRun]| median(v.iter().map(|r| median(r.gaps_us.clone())).collect());
        let gap_max = |v: &[client::SseRun]| {
            median(
                v.iter()
                    .map(|r| r.gaps_us.iter().copied().fold(0.0, f64::max))
                    .collect(),
            )
        };
        rows.push(
            Row::new("SSE time to first byte", "µs")
                .direct(ttfb(&d))
                .broker(ttfb(&b)),
        );
        rows.push(
            Row::new(
                format!("SSE event delay ({n} events, {} ms apart)", gap.as_millis()),
                "µs",
            )
            .direct(late(&d))
            .broker(late(&b)),
        );
        rows.push(
            Row::new("  median inter-event gap", "µs")
                .direct(gap_med(&d))
                .broker(gap_med(&b)),
        );
        rows.push(
            Row::new("  largest inter-event gap", "µs")
                .direct(gap_max(&d))
                .broker(gap_max(&b)),
        );
        raw.insert(
            "sse".into(),
            json!({
                "events": n, "gap_ms": gap.as_millis() as u64,
                "added_delay_per_event_us": late(&b) - late(&d),
                "direct": d.iter().map(|r| json!({"ttfb_us": r.ttfb_us, "lateness_us": r.lateness_us})).collect::<Vec<_>>(),
                "broker": b.iter().map(|r| json!({"ttfb_us": r.ttfb_us, "lateness_us": r.lateness_us})).collect::<Vec<_>>(),
            }),
        );
        Ok(())
    });

    // broker run -- CMD.
    section(&opts, "run", "broker run", &mut notes, |notes| {
        let python = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let mut cases: Vec<(String, Vec<String>, usize)> =
            vec![("true".into(), vec!["true".into()], 20)];
        match &python {
            Some(py) => cases.push((
                "python3 -c pass".into(),
                vec![py.clone(), "-c".into(), "pass".into()],
                10,
            )),
            None => notes.push("broker run -- python3 skipped: python3 not found".into()),
        }
        let mut out = serde_json::Map::new();
        for (name, argv, n) in cases {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let (mut bare, mut joined, mut embedded) = (Vec::new(), Vec::new(), Vec::new());
            let mut unsandboxed = Vec::new();
            for _ in 0..n {
                let mut cmd = procs::clean(argv[0]);
                cmd.args(&argv[1..]);
                bare.push(procs::wall(&mut cmd)?.as_secs_f64() * 1e3);
                joined.push(procs::wall(&mut serve.run_cmd(&[], &argv))?.as_secs_f64() * 1e3);
                unsandboxed.push(
                    procs::wall(&mut serve.run_cmd(&["--no-sandbox"], &argv))?.as_secs_f64() * 1e3,
                );
                embedded.push(
                    procs::wall(&mut serve.run_cmd(&["--embedded"], &argv))?.as_secs_f64() * 1e3,
                );
            }
            rows.push(
                Row::new(format!("broker run -- {name} (joins serve)"), "ms")
                    .direct(median(bare.clone()))
                    .broker(median(joined.clone())),
            );
            rows.push(
                Row::new(
                    format!("broker run --no-sandbox -- {name} (joins serve)"),
                    "ms",
                )
                .direct(median(bare.clone()))
                .broker(median(unsandboxed.clone())),
            );
            rows.push(
                Row::new(format!("broker run --embedded -- {name}"), "ms")
                    .direct(median(bare.clone()))
                    .broker(median(embedded.clone())),
            );
            out.insert(
                name,
                json!({"bare_ms": bare, "joined_ms": joined, "no_sandbox_ms": unsandboxed, "embedded_ms": embedded}),
            );
        }
        if let Some(py) = python {
            out.insert("python".into(), json!(py));
        }
        raw.insert("broker_run".into(), Value::Object(out));
        Ok(())
    });

    // connect() pass-through: the shim's own benchmark program.
    section(
        &opts,
        "connect",
        "connect() pass-through (shim/examples/bench.rs)",
        &mut notes,
        |_| {
            let (r, text) = procs::shim_connect_bench()?;
            rows.push(
                Row::new("connect() TCP, unmanaged loopback", "ns")
                    .direct(r.tcp.0)
                    .shim(r.tcp.1),
            );
            rows.push(
                Row::new("connect() UDP, unmanaged loopback", "ns")
                    .direct(r.udp.0)
                    .shim(r.udp.1),
            );
            raw.insert(
                "connect".into(),
                json!({"tcp_ns": [r.tcp.0, r.tcp.1], "udp_ns": [r.udp.0, r.udp.1], "output": text}),
            );
            Ok(())
        },
    );

    // Resident memory.
    section(&opts, "rss", "broker memory", &mut notes, |notes| {
        let rss_idle_after = serve.rss_kib()?;
        let want = 1_000usize;
        let n = if nofile < 2 * want as u64 + 200 {
            notes.push(format!(
                "RLIMIT_NOFILE {nofile}: fewer than 1,000 connections held"
            ));
            (nofile as usize).saturating_sub(200) / 2
        } else {
            want
        };
        let rss_conns = rt.block_on(client::hold_open(&brokered, n, 50, || serve.rss_kib()))??;
        std::thread::sleep(Duration::from_millis(500));
        let rss_after_close = serve.rss_kib()?;
        let nginx_idle_after = nginx.as_ref().map(|x| x.rss_kib()).transpose()?;
        let nginx_conns = match (&nginx, &nginx_target) {
            (Some(x), Some(t)) => Some(rt.block_on(client::hold_open(t, n, 50, || x.rss_kib()))??),
            _ => None,
        };
        let mib = |k: u64| k as f64 / 1024.0;
        rows.push(
            Row::new("proxy RSS, idle (fresh)", "MiB")
                .broker(mib(rss_idle_fresh))
                .nginx(rss_nginx_fresh.map(mib)),
        );
        rows.push(
            Row::new("proxy RSS, idle after the load legs", "MiB")
                .broker(mib(rss_idle_after))
                .nginx(nginx_idle_after.map(mib)),
        );
        rows.push(
            Row::new(format!("proxy RSS, {n} open client connections"), "MiB")
                .broker(mib(rss_conns))
                .nginx(nginx_conns.map(mib)),
        );
        raw.insert(
            "rss_kib".into(),
            json!({"idle_fresh": rss_idle_fresh, "idle_after_load": rss_idle_after, "open_connections": n, "with_connections": rss_conns, "after_close": rss_after_close,
                "nginx": {"idle_fresh": rss_nginx_fresh, "idle_after_load": nginx_idle_after, "with_connections": nginx_conns}}),
        );
        Ok(())
    });

    // 20 ms round trip: 50 short-lived curl runs.
    section(
        &opts,
        "rtt",
        "20 ms RTT, 50 sequential curl runs",
        &mut notes,
        |notes| {
            if broker_integration::which("curl").is_none() {
                notes.push("20 ms RTT leg skipped: curl not found".into());
                return Ok(());
            }
            let delayed = netem::setup(&tmp.0.join("origin-delayed"), &origin, notes)?;
            let serve2 = Serve::start(
                &tmp.0.join("home-delayed"),
                &delayed.ca_pem_path,
                &delayed.upstream.to_string(),
            )?;
            let runs = 50;
            let curl = "curl -sS -o /dev/null -w '%{http_code} %{time_total} %{time_appconnect} %{time_starttransfer}\\n'";
            // Two trust setups. With the system bundle (curl's default) each run spends
            // 20-60 ms loading 140-odd certificates under OpenSSL 3, which overlaps the direct
            // leg's TCP round trip and hides what the pooled upstream saves; with only the CA
            // each leg needs, that load is gone and the round trips show. The direct curl
            // trusts the system roots plus the origin's CA in the first setup, so it loads the
            // same bundle the brokered curl loads (the shim adds the run CA to that store).
            let bundle = tmp.0.join("direct-bundle.pem");
            let mut pem = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
            pem.extend(std::fs::read(&delayed.ca_pem_path)?);
            std::fs::write(&bundle, pem)?;
            let setups = [
                ("system bundle", bundle.display().to_string(), String::new()),
                (
                    "only the needed CA",
                    delayed.ca_pem_path.display().to_string(),
                    // The run's CA, next to the run's shim config.
                    " --cacert \"${BROKER_SHIM_CONFIG%/*}/ca.pem\"".to_string(),
                ),
            ];
            for (label, direct_ca, broker_ca) in setups {
                let direct_script = format!(
                    "for i in $(seq {runs}); do {curl} --connect-to {HOST}:443:{}:{} --cacert '{direct_ca}' -H 'Authorization: Bearer {REAL_KEY}' https://{HOST}/v1/models; done",
                    delayed.upstream.ip(),
                    delayed.upstream.port(),
                );
                let broker_script = format!(
                    "for i in $(seq {runs}); do {curl}{broker_ca} -H \"Authorization: Bearer $OPENAI_API_KEY\" https://{HOST}/v1/models; done"
                );
                let (mut d, mut b) = (Vec::new(), Vec::new());
                for _ in 0..rounds {
                    let mut cmd = procs::clean("sh");
                    cmd.args(["-c", &direct_script]);
                    d.push(time_curl_loop(&mut cmd, runs)?);
                    b.push(time_curl_loop(
                        &mut serve2.run_cmd(&[], &["sh", "-c", &broker_script]),
                        runs,
                    )?);
                }
                rows.push(
                    Row::new(format!("{runs} curl runs, 20 ms RTT, {label} (total)"), "s")
                        .direct(median(d.iter().map(|x| x.0).collect()))
                        .broker(median(b.iter().map(|x| x.0).collect())),
                );
                rows.push(
                    Row::new("  per curl run (curl time_total, median)", "ms")
                        .direct(median(d.iter().map(|x| x.1).collect()))
                        .broker(median(b.iter().map(|x| x.1).collect())),
                );
                let key = match label {
                    "system bundle" => "rtt20_curl",
                    _ => "rtt20_curl_own_ca",
                };
                raw.insert(
                    key.into(),
                    json!({"method": delayed.method, "trust": label, "runs": runs,
                        "direct_total_s": d.iter().map(|x| x.0).collect::<Vec<_>>(), "broker_total_s": b.iter().map(|x| x.0).collect::<Vec<_>>(),
                        "direct_median_ms": d.iter().map(|x| x.1).collect::<Vec<_>>(), "broker_median_ms": b.iter().map(|x| x.1).collect::<Vec<_>>(),
                        "direct_tls_done_ms": d.iter().map(|x| x.2).collect::<Vec<_>>(), "broker_tls_done_ms": b.iter().map(|x| x.2).collect::<Vec<_>>(),
                        "direct_first_byte_ms": d.iter().map(|x| x.3).collect::<Vec<_>>(), "broker_first_byte_ms": b.iter().map(|x| x.3).collect::<Vec<_>>()}),
                );
            }
            notes.push(format!("20 ms RTT via {}", delayed.method));
            Ok(())
        },
    );

    let load_end = loadavg();
    drop(nginx);
    drop(serve);
    drop(origin);

    // The table.
    let width = rows
        .iter()
        .map(|r| r.leg.chars().count())
        .max()
        .unwrap_or(10)
        .max(10);
    println!();
    println!(
        "{:<width$}  {:>12}  {:>12}  {:>12}  {:>12}  {:>7}  {:>7}",
        "leg", "direct", "broker", "shim", "nginx", "ratio", "/nginx"
    );
    for r in &rows {
        let ratio = r.ratio().map_or("-".into(), |x| format!("{x:.2}x"));
        let vs_nginx = r.vs_nginx().map_or("-".into(), |x| format!("{x:.2}"));
        println!(
            "{:<width$}  {:>12}  {:>12}  {:>12}  {:>12}  {:>7}  {:>7}",
            r.leg,
            fmt(r.direct, r.unit),
            fmt(r.broker, r.unit),
            fmt(r.shim, r.unit),
            fmt(r.nginx, r.unit),
            ratio,
            vs_nginx
        );
    }
    println!();
    println!(
        "ratio = (broker or shim) / direct; /nginx = (broker or shim) / nginx; medians of {rounds} \
         interleaved rounds, {} s each",
        opts.window.as_secs_f64()
    );
    // The headline: throughput against nginx doing the same job (>= 1.00 is the target).
    let headline: Vec<String> = rows
        .iter()
        .filter(|r| r.unit == "req/s" || r.unit == "conn/s")
        .filter_map(|r| {
            let spread = r
                .vs_nginx_rounds
                .map(|(lo, hi)| format!(" (single rounds {lo:.2}-{hi:.2})"))
                .unwrap_or_default();
            Some(format!("{} {:.2}{spread}", r.leg, r.vs_nginx()?))
        })
        .collect();
    if !headline.is_empty() {
        println!(
            "broker/nginx throughput (>= 1.00: as fast as nginx; the median of the rounds, and \
             the lowest and highest of a single round):"
        );
        for h in &headline {
            println!("  {h}");
        }
    }
    let steal = steal_pct(ticks_start, cpu_ticks());
    println!("load average: {load_start} at start, {load_end} at end");
    if let Some(p) = steal {
        println!("hypervisor steal: {p:.1}% of the CPU time during the run");
    }
    for n in &notes {
        println!("note: {n}");
    }

    let report = json!({
        "machine": machine(),
        "broker_binary_mtime_unix": broker_built,
        "load_average": {"start": load_start, "end": load_end},
        "steal_pct": steal,
        "rounds": rounds,
        "window_s": opts.window.as_secs_f64(),
        // The cores --pin put the load and the proxy on (null unpinned).
        "pinned": pinned.map(|(load, proxy)| json!({ "load": load, "proxy": proxy })),
        // Whether nginx wrote an access line per request (--nginx-log).
        "nginx_access_log": opts.nginx_log,
        "elapsed_s": started.elapsed().as_secs_f64(),
        "rows": rows.iter().map(Row::json).collect::<Vec<_>>(),
        "raw": raw,
        "notes": notes,
    });
    let json_path = opts.json.unwrap_or_else(|| {
        target_dir
            .parent()
            .map_or(PathBuf::from("bench.json"), |t| t.join("bench.json"))
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", json_path.display());
    Ok(())
}

/// Whose CPU the keep-alive legs read, in the order of [`CpuUse`]'s arrays. The client is this
/// process: it runs the in-repo client on its current-thread runtime and does nothing else
/// during a leg. The figures include the kernel's loopback TCP work: softirq processing is
/// charged to whichever task was on the CPU (on loopback usually the sender, whose write runs
/// the receiving side's TCP input too), so the kernel's share lands on both ends of each hop.
/// The proxy is `broker serve` in the direct and broker legs, nginx in the nginx leg.
const CPU_PROCS: [&str; 3] = ["client", "origin", "proxy"];

/// A reading of [`CPU_PROCS`] as a keep-alive window opens or closes, and the proxy's user
/// and kernel clock ticks.
type CpuReading = (
    Instant,
    [anyhow::Result<procs::ThreadCpu>; 3],
    Option<(u64, u64)>,
);

/// What each of [`CPU_PROCS`] spent on CPU in one keep-alive window.
#[derive(Debug, Clone, Copy, Default)]
struct CpuUse {
    us_per_req: [f64; 3],
    /// CPU time over the window's wall time: how many of the machine's cores it kept busy.
    cores: [f64; 3],
    threads: [usize; 3],
    /// Threads gone by the window's end: their CPU in the window is not counted.
    ended: [usize; 3],
    /// The proxy's user time over its user + kernel time in the window.
    proxy_user_share: Option<f64>,
}

impl CpuUse {
    fn json(&self) -> Value {
        json!({"us_per_request": self.us_per_req, "cores": self.cores,
            "threads": self.threads, "threads_ended": self.ended, "processes": CPU_PROCS,
            "proxy_user_share": self.proxy_user_share})
    }
}

/// CPU per request between the two readings, over the `count` requests of the window.
fn cpu_use([before, after]: [CpuReading; 2], count: usize) -> anyhow::Result<CpuUse> {
    let secs = (after.0 - before.0).as_secs_f64();
    let mut cpu = CpuUse::default();
    if let (Some((u0, s0)), Some((u1, s1))) = (before.2, after.2) {
        let (u, s) = (u1.saturating_sub(u0), s1.saturating_sub(s0));
        cpu.proxy_user_share = (u + s > 0).then(|| u as f64 / (u + s) as f64);
    }
    for (i, (b, a)) in before.1.into_iter().zip(after.1).enumerate() {
        let (b, a) = (b?, a?);
        let ns = procs::cpu_between(&b, &a) as f64;
        cpu.us_per_req[i] = ns / 1e3 / count as f64;
        cpu.cores[i] = ns / 1e9 / secs;
        cpu.threads[i] = a.len();
        cpu.ended[i] = b.keys().filter(|tid| !a.contains_key(tid)).count();
    }
    Ok(cpu)
}

/// Rows of CPU per request by process (medians over the rounds), the proxy's split into user
/// and kernel time, and a note of the cores each kept busy, which shows where the machine's
/// CPU went.
fn cpu_rows(
    label: &str,
    d: &[Option<CpuUse>],
    b: &[Option<CpuUse>],
    n: &[Option<CpuUse>],
    cores: usize,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) {
    let med = |v: &[Option<CpuUse>], f: &dyn Fn(&CpuUse) -> f64| {
        median(v.iter().flatten().map(f).collect())
    };
    let nginx_med = |f: &dyn Fn(&CpuUse) -> f64| n.iter().any(Option::is_some).then(|| med(n, f));
    for (i, name) in CPU_PROCS.iter().enumerate() {
        let name = match i {
            2 => "broker serve | nginx",
            _ => name,
        };
        let row = Row::new(format!("  CPU per request {label}: {name}"), "µs CPU")
            .broker(med(b, &|c| c.us_per_req[i]))
            .nginx(nginx_med(&|c| c.us_per_req[i]));
        // `broker serve` idles in the direct leg: its crumbs count in the total and the JSON,
        // but a ratio against them would mean nothing.
        rows.push(match i {
            2 => row,
            _ => row.direct(med(d, &|c| c.us_per_req[i])),
        });
    }
    // User and kernel time of the proxy (clock ticks of the window, so a share, applied to
    // the per-request figure above).
    for (part, user) in [("user", true), ("kernel", false)] {
        let share = move |c: &CpuUse| {
            c.proxy_user_share
                .map_or(f64::NAN, |u| if user { u } else { 1.0 - u })
                * c.us_per_req[2]
        };
        rows.push(
            Row::new(format!("    of which {part}"), "µs CPU")
                .broker(med(b, &share))
                .nginx(nginx_med(&share)),
        );
    }
    rows.push(
        Row::new(format!("  CPU per request {label}: all three"), "µs CPU")
            .direct(med(d, &|c| c.us_per_req.iter().sum()))
            .broker(med(b, &|c| c.us_per_req.iter().sum()))
            .nginx(nginx_med(&|c| c.us_per_req.iter().sum())),
    );
    let busy = |v: &[Option<CpuUse>]| {
        let each: Vec<String> = (0..3)
            .map(|i| format!("{} {:.2}", CPU_PROCS[i], med(v, &|c| c.cores[i])))
            .collect();
        format!(
            "{} = {:.2}",
            each.join(" + "),
            med(v, &|c| c.cores.iter().sum())
        )
    };
    let nginx_busy = if n.iter().any(Option::is_some) {
        format!("; nginx {}", busy(n))
    } else {
        String::new()
    };
    notes.push(format!(
        "CPU {label}, cores busy of {cores}: direct {}; broker {}{nginx_busy}",
        busy(d),
        busy(b)
    ));
    let ended: usize = d
        .iter()
        .chain(b)
        .chain(n)
        .flatten()
        .flat_map(|c| c.ended)
        .sum();
    if ended > 0 {
        notes.push(format!(
            "CPU {label}: {ended} thread(s) ended inside a window (idle pool threads retire); \
             their time in it is not counted"
        ));
    }
}

/// Run a shell loop of `runs` curl calls that each print `code total appconnect starttransfer`
/// (seconds); the wall time (s) and the medians of the three phases (ms). Every answer must be
/// a 200.
fn time_curl_loop(cmd: &mut Command, runs: usize) -> anyhow::Result<(f64, f64, f64, f64)> {
    let t = Instant::now();
    let out = cmd.stdin(std::process::Stdio::null()).output()?;
    let wall = t.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut totals, mut tls_done, mut first_byte) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let code = parts.next().unwrap_or_default();
        anyhow::ensure!(
            code == "200",
            "curl got {code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut next = || {
            parts
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
                * 1e3
        };
        totals.push(next());
        tls_done.push(next());
        first_byte.push(next());
    }
    anyhow::ensure!(
        totals.len() == runs,
        "{} of {runs} curl runs answered: {}",
        totals.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((wall, median(totals), median(tls_done), median(first_byte)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn nginx_log_is_refused_where_nginx_is_left_out() {
        let Err(err) = parse_opts(&args(&["--no-nginx", "--nginx-log"])) else {
            panic!("--no-nginx --nginx-log was accepted");
        };
        assert!(err.to_string().contains("--no-nginx"), "{err}");
        let opts = parse_opts(&args(&["--nginx", "--nginx-log"])).expect("accepted");
        assert!(opts.nginx && opts.nginx_log);
    }
}
