//! `sluice-load`: measure what Sluice adds over a direct call to the simulator, next to nginx
//! as a plain reverse proxy. See benches/README.md.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};

mod client;
mod procs;
mod streams;
mod ws;

use client::{Mode, PhaseResult, RequestSpec, percentile};
use procs::{Proc, ProcGroup, StopSignal, TempDir};

const READY_TIMEOUT: Duration = Duration::from_secs(20);
const CHAT_PATH: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
const RESPONSES_PATH: &str = "/openai/v1/responses";

#[derive(Parser, Debug)]
#[command(
    name = "sluice-load",
    about = "Load Sluice, nginx and the bare simulator side by side (127.0.0.1 only)"
)]
struct Args {
    /// The sluice binary: runs `sluice sim` (the upstream) and `sluice run` (the gateway).
    /// Without it the simulator runs in-process and only `direct`/`nginx` are measured
    /// (for working on the harness itself).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// Turn on Sluice's whole policy set: the key check, rate_limit, token_limit
    /// with a prompt estimate, emit_token_metric, routing over a pool of two
    /// backends with circuit breakers and failover, and tracing (a management
    /// listener and a debug signing key; only `traced` requests carry a
    /// credential). Limits are high enough never to refuse.
    #[arg(long)]
    policies: bool,
    /// Also measure the `traced` target: the same Sluice process, every request
    /// carrying a valid debug credential (`Apim-Debug-Authorization`), so that
    /// each is traced and its trace stored; against `sluice`, the cost of tracing.
    #[arg(long)]
    trace: bool,
    /// nginx binary; when given and present, nginx is measured as a plain reverse proxy.
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Persistent HTTP/1.1 connections per target.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Open-loop request rate (requests/s in total). Ignored with --max.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Length of each measured phase.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Unmeasured load before each measured phase.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Worker threads of Sluice (server.threads) and nginx (worker_processes).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Runtime threads of the load generator itself.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Comma-separated scenarios.
    #[arg(long, value_delimiter = ',', default_value = "chat,stream")]
    scenarios: Vec<Scenario>,
    /// Comma-separated targets (nginx only runs when --nginx is given, traced only
    /// with --trace).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,pingora,baseline,sluice,traced,nginx"
    )]
    targets: Vec<TargetKind>,
    /// Another `sluice` binary (the build before a change), run as target
    /// `baseline` with the same configuration as `sluice`, right before it in
    /// every round: a before-and-after comparison in one run, on the same
    /// machine state. Its simulator and bare proxy are `--sluice`'s.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// Measure every scenario this many times, the targets interleaved in
    /// each round; the tables give each figure's median over the rounds
    /// (requests, errors and late requests are summed), which steadies the
    /// ratios on a noisy machine.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Load the measured targets at the same time in each round (each at
    /// `--rate`, on its own connections) instead of one after another: the
    /// machine's changing load then falls on all of them alike, which
    /// steadies their ratios. The machine carries their sum, so use it with
    /// few targets (e.g. `pingora,baseline,sluice`) and a rate they can
    /// share; figures are comparable within a paired run, not with a
    /// sequential one.
    #[arg(long)]
    paired: bool,
    /// Make every request's user message different (it ends in the
    /// request's number), as real traffic is; by default every request of a
    /// scenario sends the same body (the system prompt is the same either
    /// way).
    #[arg(long)]
    unique_prompts: bool,
    /// Closed loop: every connection sends back to back (maximum throughput), no fixed rate.
    #[arg(long)]
    max: bool,
    /// Print the results as Markdown tables for docs/benchmarks.md.
    #[arg(long)]
    markdown: bool,
    /// After the scenarios, open this many idle Realtime sessions through each proxy
    /// (and directly) and report the resident memory each open socket costs.
    #[arg(long, default_value_t = 0)]
    ws_idle: usize,
    /// `streams` scenario: concurrent streams held open per target.
    #[arg(long, default_value_t = 2000)]
    open_streams: usize,
    /// `streams` scenario: tokens per stream (`max_tokens`).
    #[arg(long, default_value_t = 60)]
    stream_tokens: u32,
    /// `streams` scenario: the simulator's delay per token, ms
    /// (`x-sim-per-token-ms`); a stream lasts `stream_tokens` times this.
    #[arg(long, default_value_t = 250)]
    token_ms: u64,
}

/// The user's question of every scenario's body.
const QUESTION: &str = "Why would a team put an API gateway in front of Azure OpenAI? Mention quotas, failover between regions and per-team usage reporting.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Chat,
    Stream,
    /// A streamed Responses call on the v1 API (`/openai/v1/responses`).
    Responses,
    /// Realtime WebSocket sessions (`--concurrency` of them), each asking for
    /// one audio-sized delta at a time: frames per second, the round trip, and
    /// CPU per 1,000 frames.
    Realtime,
    /// `--open-streams` slow chat streams open at once, one connection
    /// each: resident memory per open stream, CPU per stream, time to the
    /// first event.
    Streams,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Chat => "chat",
            Scenario::Stream => "stream",
            Scenario::Responses => "responses",
            Scenario::Realtime => "realtime",
            Scenario::Streams => "streams",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Scenario::Responses => RESPONSES_PATH,
            _ => CHAT_PATH,
        }
    }

    fn streams(self) -> bool {
        matches!(
            self,
            Scenario::Stream | Scenario::Responses | Scenario::Streams
        )
    }

    /// What a complete stream of this scenario holds.
    fn stream_end(self) -> Option<&'static [u8]> {
        match self {
            Scenario::Chat | Scenario::Realtime => None,
            Scenario::Stream | Scenario::Streams => Some(b"[DONE]"),
            Scenario::Responses => Some(b"event: response.completed"),
        }
    }

    /// A ~300-byte chat completions body (the same prompt as a Responses
    /// `input`).
    /// The request body; with `unique`, the user's message ends in the
    /// request's number ([`client::UNIQUE_MARK`]), so that no two requests
    /// ask the same.
    fn body(self, unique: bool) -> Bytes {
        let question = if unique {
            format!("{QUESTION} (Request {}.)", client::UNIQUE_MARK)
        } else {
            QUESTION.to_string()
        };
        if self == Scenario::Responses {
            let body = serde_json::json!({
                "model": "gpt-4o",
                "instructions": "You are a terse assistant. Answer in one short sentence.",
                "input": question,
                "max_output_tokens": 16,
                "stream": true
            });
            return Bytes::from(body.to_string());
        }
        let mut body = serde_json::json!({
            "messages": [
                {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
                {"role": "user", "content": question}
            ],
            "max_tokens": 16
        });
        if matches!(self, Scenario::Stream | Scenario::Streams) {
            body["stream"] = true.into();
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum TargetKind {
    Direct,
    /// A bare pingora proxy (`sluice bare-proxy`): the floor under Sluice.
    Pingora,
    /// `--baseline`: the build before a change, configured as `sluice`.
    Baseline,
    Sluice,
    /// Sluice, with every request traced.
    Traced,
    Nginx,
}

impl TargetKind {
    fn name(self) -> &'static str {
        match self {
            TargetKind::Direct => "direct",
            TargetKind::Pingora => "pingora",
            TargetKind::Baseline => "baseline",
            TargetKind::Sluice => "sluice",
            TargetKind::Traced => "traced",
            TargetKind::Nginx => "nginx",
        }
    }
}

#[derive(Debug)]
struct Target {
    kind: TargetKind,
    /// Sent as `Apim-Debug-Authorization` on every request.
    debug_token: Option<String>,
    addr: SocketAddr,
    /// Processes charged for CPU and memory (proxies only).
    group: Option<ProcGroup>,
}

/// Everything started for a run; dropping it stops nginx, Sluice, the simulator (in that
/// order) and removes the temp dir.
#[derive(Debug)]
struct Stack {
    nginx: Option<Proc>,
    bare: Option<Proc>,
    baseline: Option<Proc>,
    sluice: Option<Proc>,
    sim: Option<Proc>,
    sim_in_process: Option<sluice_sim::SimHandle>,
    tmp: TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(p) = &mut self.nginx {
            p.stop();
        }
        if let Some(p) = &mut self.sluice {
            p.stop();
        }
        if let Some(p) = &mut self.baseline {
            p.stop();
        }
        if let Some(p) = &mut self.bare {
            p.stop();
        }
        if let Some(p) = &mut self.sim {
            p.stop();
        }
        if let Some(h) = &self.sim_in_process {
            h.shutdown();
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-load: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&args, &rt) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> Result<()> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if args.concurrency == 0
        || args.rounds == 0
        || !positive(args.rate)
        || !positive(args.duration_secs)
    {
        bail!("--concurrency, --rounds, --rate and --duration-secs must be positive");
    }
    if !args.warmup_secs.is_finite() || args.warmup_secs < 0.0 {
        bail!("--warmup-secs must not be negative");
    }
    raise_fd_limit();
    let mut stack = Stack {
        nginx: None,
        bare: None,
        baseline: None,
        sluice: None,
        sim: None,
        sim_in_process: None,
        tmp: TempDir::new("sluice-load")?,
    };
    let tmp = stack.tmp.path().to_path_buf();
    let key = subscription_key();
    // One key everywhere: the subscription's, which the direct, nginx and
    // bare pingora targets pass through unchanged, and the backend's, which
    // the simulator requires and Sluice's config gives the backend (as every
    // real deployment has one), so the gateway overwrites the client's
    // `api-key` with it as it would in front of Azure.
    let key_path = tmp.join("key.txt");
    std::fs::write(&key_path, format!("{key}\n"))?;

    // 1. The simulator.
    let sim_addr = match &args.sluice {
        Some(bin) => {
            let mut cmd = Command::new(own_copy(&tmp, bin, "sim")?);
            cmd.args(["sim", "--listen", "127.0.0.1:0", "--region", "loadtest"])
                .arg("--api-key-file")
                .arg(&key_path)
                .env("RUST_LOG", "warn");
            let (proc, addr) = Proc::spawn_until_line(
                "simulator",
                cmd,
                &tmp,
                StopSignal::Term,
                "listening on",
                READY_TIMEOUT,
            )?;
            stack.sim = Some(proc);
            addr
        }
        None => {
            eprintln!(
                "sluice-load: no --sluice given: in-process simulator, target sluice skipped"
            );
            let mut region = sluice_sim::RegionConfig::new("loadtest");
            region.api_key = Some(sluice_sim::Secret::new(key.clone()));
            let handle =
                rt.block_on(sluice_sim::Simulator::start("127.0.0.1:0".parse()?, region))?;
            let addr = handle.addr();
            stack.sim_in_process = Some(handle);
            addr
        }
    };
    eprintln!("sluice-load: simulator on {sim_addr}");
    let mut targets = vec![Target {
        kind: TargetKind::Direct,
        debug_token: None,
        addr: sim_addr,
        group: None,
    }];

    // 2. The bare pingora proxy (same binary, same server settings).
    if let Some(bin) = &args.sluice
        && args.targets.contains(&TargetKind::Pingora)
    {
        let mut cmd = Command::new(own_copy(&tmp, bin, "pingora")?);
        cmd.args(["bare-proxy", "--listen", "127.0.0.1:0", "--upstream"])
            .arg(sim_addr.to_string())
            .arg("--threads")
            .arg(args.threads.to_string())
            .env("RUST_LOG", "warn");
        let (proc, addr) = spawn_proxy("pingora", cmd, &tmp, "listening on")?;
        targets.push(Target {
            kind: TargetKind::Pingora,
            debug_token: None,
            addr,
            group: Some(ProcGroup {
                root: proc.pid(),
                with_children: false,
            }),
        });
        stack.bare = Some(proc);
    }

    // 3. Sluice (and the baseline build, with the same configuration).
    let conf = write_gateway_config(
        &tmp,
        sim_addr,
        args.threads,
        &key,
        args.policies,
        args.trace,
    )?;
    if args.sluice.is_some()
        && let Some(bin) = &args.baseline
        && args.targets.contains(&TargetKind::Baseline)
    {
        let mut cmd = Command::new(own_copy(&tmp, bin, "baseline")?);
        cmd.arg("run").arg("-c").arg(&conf).env("RUST_LOG", "warn");
        let (proc, addr) = spawn_proxy("baseline", cmd, &tmp, "sluice: listening on")?;
        targets.push(Target {
            kind: TargetKind::Baseline,
            debug_token: None,
            addr,
            group: Some(ProcGroup {
                root: proc.pid(),
                with_children: false,
            }),
        });
        stack.baseline = Some(proc);
    }
    if let Some(bin) = &args.sluice
        && args.targets.contains(&TargetKind::Sluice)
    {
        let mut cmd = Command::new(own_copy(&tmp, bin, "sluice")?);
        cmd.arg("run").arg("-c").arg(&conf).env("RUST_LOG", "warn");
        let (proc, addr) = spawn_proxy("sluice", cmd, &tmp, "sluice: listening on")?;
        let group = Some(ProcGroup {
            root: proc.pid(),
            with_children: false,
        });
        targets.push(Target {
            kind: TargetKind::Sluice,
            debug_token: None,
            addr,
            group,
        });
        if args.trace {
            // A credential signed with the key the config gives the gateway,
            // as listDebugCredentials would hand out.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let token = sluice_trace::credentials::DebugKey::new(DEBUG_SIGNING_KEY.as_bytes())
                .issue("azure-openai", Duration::from_secs(3600), now);
            targets.push(Target {
                kind: TargetKind::Traced,
                debug_token: Some(token),
                addr,
                group,
            });
        }
        stack.sluice = Some(proc);
    }

    // 4. nginx.
    if let Some(bin) = &args.nginx
        && args.targets.contains(&TargetKind::Nginx)
    {
        if bin.is_file() {
            // Held until nginx listens on it.
            let (port, held) = procs::held_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let conf = write_nginx_config(&tmp, sim_addr, port, args.threads)?;
            let mut cmd = Command::new(bin);
            cmd.arg("-e")
                .arg(tmp.join("error.log"))
                .arg("-c")
                .arg(&conf)
                .arg("-p")
                .arg(&tmp);
            let proc = Proc::spawn_until_listening(
                "nginx",
                cmd,
                &tmp,
                StopSignal::Term,
                addr,
                READY_TIMEOUT,
            )?;
            drop(held);
            eprintln!("sluice-load: nginx (master pid {}) on {addr}", proc.pid());
            targets.push(Target {
                kind: TargetKind::Nginx,
                debug_token: None,
                addr,
                group: Some(ProcGroup {
                    root: proc.pid(),
                    with_children: true,
                }),
            });
            stack.nginx = Some(proc);
        } else {
            eprintln!(
                "sluice-load: {} does not exist; nginx skipped",
                bin.display()
            );
        }
    }
    targets.retain(|t| args.targets.contains(&t.kind));
    if targets.is_empty() {
        bail!("no target left to measure");
    }

    // 5-7. Scenarios × targets; SIGINT/SIGTERM end the run through the Drop guard.
    let (rows, streams_report) = rt.block_on(async {
        tokio::select! {
            r = measure_all(args, &targets, &key) => r,
            sig = stop_signal() => bail!("{sig}: stopping"),
        }
    })?;

    let idle = if args.ws_idle > 0 {
        let sim = stack.sim.as_ref().map(|p| ProcGroup {
            root: p.pid(),
            with_children: false,
        });
        Some(rt.block_on(measure_idle(args.ws_idle, &targets, sim, &key))?)
    } else {
        None
    };
    let mut out = String::new();
    if args.markdown {
        markdown_report(&mut out, args, &rows);
    } else {
        text_report(&mut out, &rows);
    }
    out.push_str(&streams_report);
    if let Some(idle) = &idle {
        out.push_str(idle);
    }
    for r in &rows {
        if let Some(e) = &r.first_error {
            let _ = writeln!(out, "\nfirst error of {}/{}: {e}", r.scenario, r.target);
        }
    }
    for p in [&stack.sluice, &stack.baseline, &stack.bare, &stack.sim]
        .into_iter()
        .flatten()
    {
        let n = p.stderr_lines();
        if n > 0 {
            eprintln!(
                "sluice-load: note: {} wrote {n} line(s) to stderr{}",
                p.name(),
                p.stderr_tail()
            );
        }
    }
    print!("{out}");
    drop(stack);
    Ok(())
}

/// Start a `sluice` subcommand that prints `marker http://ADDR` when it
/// listens (stopped with SIGINT), and wait until ADDR accepts connections.
fn spawn_proxy(
    name: &'static str,
    cmd: Command,
    tmp: &Path,
    marker: &str,
) -> Result<(Proc, SocketAddr)> {
    let (proc, addr) =
        Proc::spawn_until_line(name, cmd, tmp, StopSignal::Int, marker, READY_TIMEOUT)?;
    procs::wait_connectable(addr, READY_TIMEOUT)
        .with_context(|| format!("{name} printed {addr}{}", proc.stderr_tail()))?;
    eprintln!("sluice-load: {name} (pid {}) on {addr}", proc.pid());
    Ok((proc, addr))
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// A copy of `bin` in `tmp` for one process (`name`): the simulator, bare
/// pingora, Sluice and the baseline each run from a file of their own.
/// Processes that run one executable file share its code pages (most
/// likely, the cache lines holding them too): a target launched from the
/// simulator's file ran
/// about 5 % cheaper than the same build from another file (paired runs,
/// 2026-12-03), which favoured `--sluice` over `--baseline`.
fn own_copy(tmp: &Path, bin: &Path, name: &str) -> Result<PathBuf> {
    let copy = tmp.join(format!("bin-{name}"));
    std::fs::copy(bin, &copy)
        .with_context(|| format!("copying {} to {}", bin.display(), copy.display()))?;
    Ok(copy)
}

fn subscription_key() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("sluice-load-{:x}{:x}", nanos, std::process::id())
}

fn write_gateway_config(
    tmp: &Path,
    sim: SocketAddr,
    threads: usize,
    key: &str,
    policies: bool,
    trace: bool,
) -> Result<PathBuf> {
    let key_path = tmp.join("key.txt");
    std::fs::write(&key_path, format!("{key}\n"))?;
    let backend_key = format!("    api_key: {{file: {}}}\n", key_path.display());
    let conf = tmp.join("gateway.yaml");
    // The full policy set traces debug-token requests: tracing is on with it.
    let tracing = if trace || policies {
        let op = tmp.join("operator.token");
        let signing = tmp.join("signing.key");
        std::fs::write(&op, "load-operator-token-0123456789\n")?;
        std::fs::write(&signing, DEBUG_SIGNING_KEY)?;
        format!(
            "  management:\n    listen: 127.0.0.1:0\n    operator_tokens: [{{file: {}}}]\n    debug_signing_key: {{file: {}}}\n",
            op.display(),
            signing.display()
        )
    } else {
        String::new()
    };
    let policy_list = if policies {
        "    policies:\n\
         \x20     - rate_limit: { calls: 100000000, renewal_period_seconds: 60, counter_key: subscription }\n\
         \x20     - token_limit: { counter_key: subscription, tokens_per_minute: 1000000000, remaining_tokens_header_name: x-remaining-tokens }\n\
         \x20     - emit_token_metric: { dimensions: [subscription, api, deployment, backend_region] }\n"
    } else {
        ""
    };
    // Routing: with the policies, a pool of two backends (both the same
    // simulator), each with its default circuit breaker, and failover.
    let routing = if policies {
        format!(
            "backends:\n  - name: sim-a\n    url: http://{sim}\n{backend_key}  - name: sim-b\n    url: http://{sim}\n{backend_key}\
             pools:\n  - name: load\n    backends:\n      - {{backend: sim-a, priority: 1, weight: 1}}\n      - {{backend: sim-b, priority: 1, weight: 1}}\n"
        )
    } else {
        format!("backends:\n  - name: sim\n    url: http://{sim}\n{backend_key}")
    };
    let api_routing = if policies {
        "    pool: load\n    failover: { max_attempts: 2 }\n"
    } else {
        "    backends: [sim]\n"
    };
    std::fs::write(
        &conf,
        format!(
            "server:\n  listen: 127.0.0.1:0\n  threads: {threads}\n{tracing}{routing}\
             subscriptions:\n  - name: load\n    primary_key: {{file: {}}}\n\
             apis:\n  - name: azure-openai\n    path: /openai\n{api_routing}{policy_list}",
            key_path.display()
        ),
    )?;
    Ok(conf)
}

/// The debug-credential signing key the `--trace` config gives the gateway.
const DEBUG_SIGNING_KEY: &str = "load-debug-signing-key-0123456789abcdef";

fn write_nginx_config(tmp: &Path, sim: SocketAddr, port: u16, threads: usize) -> Result<PathBuf> {
    let t = tmp.display();
    let conf = tmp.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;
master_process on;
worker_processes {threads};
pid {t}/nginx.pid;
error_log {t}/error.log warn;
worker_rlimit_nofile 200000;
events {{ worker_connections 100000; }}
http {{
    access_log off;
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream sim {{
        server {sim};
        keepalive 128;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 600s;
            proxy_buffering off;
        }}
    }}
}}
"
        ),
    )?;
    Ok(conf)
}

/// One (scenario, target) result.
#[derive(Debug)]
struct Row {
    scenario: &'static str,
    target: &'static str,
    sent: u64,
    errors: u64,
    late: u64,
    rps: f64,
    /// p50, p90, p99, max (ms).
    lat: [Option<f64>; 4],
    /// TTFB p50, p99 (ms); stream only.
    ttfb: [Option<f64>; 2],
    cpu_per_1k: Option<f64>,
    rss_mib: Option<f64>,
    first_error: Option<String>,
}

async fn measure_all(args: &Args, targets: &[Target], key: &str) -> Result<(Vec<Row>, String)> {
    let mode = if args.max {
        Mode::Max
    } else {
        Mode::Rate(args.rate)
    };
    let tck = procs::clk_tck() as f64;
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let duration = Duration::from_secs_f64(args.duration_secs);
    let mut rows = Vec::new();
    let mut streams_report = String::new();
    for &scenario in &args.scenarios {
        if scenario == Scenario::Streams {
            streams_report = measure_streams(args, targets, key).await?;
            continue;
        }
        let mut rounds = Vec::new();
        if args.paired && scenario != Scenario::Realtime {
            for round in 0..args.rounds {
                eprintln!(
                    "sluice-load: {}: round {} of {}, {} targets at once",
                    scenario.name(),
                    round + 1,
                    args.rounds,
                    targets.len()
                );
                rounds.extend(measure_paired(args, targets, key, scenario, mode).await?);
            }
            if args.rounds > 1 {
                streams_report.push_str(&rounds_report(&rounds));
            }
            rows.extend(merge_rounds(rounds));
            continue;
        }
        for (round, t) in (0..args.rounds).flat_map(|r| targets.iter().map(move |t| (r, t))) {
            if args.rounds > 1 && t.kind == targets[0].kind {
                eprintln!(
                    "sluice-load: {}: round {} of {}",
                    scenario.name(),
                    round + 1,
                    args.rounds
                );
            }
            if scenario == Scenario::Realtime {
                rounds.push(measure_ws(args, t, key).await?);
                continue;
            }
            let spec = request_spec(args, t, key, scenario);
            eprintln!(
                "sluice-load: {}/{}: warmup {:.1} s, measuring {:.1} s ({})",
                scenario.name(),
                t.kind.name(),
                args.warmup_secs,
                args.duration_secs,
                match mode {
                    Mode::Rate(r) =>
                        format!("{r} req/s open loop, {} connections", args.concurrency),
                    Mode::Max => format!("closed loop, {} connections", args.concurrency),
                }
            );
            let mut conns = client::connect_all(t.addr, args.concurrency)
                .await
                .with_context(|| format!("{} on {}", t.kind.name(), t.addr))?;
            if !warmup.is_zero() {
                conns = client::run_phase(t.addr, conns, spec.clone(), mode, warmup)
                    .await?
                    .0;
            }
            let before = t.group.map(|g| g.cpu_ticks());
            let (conns, r) = client::run_phase(t.addr, conns, spec, mode, duration).await?;
            let after = t.group.map(|g| g.cpu_ticks());
            drop(conns);
            let rss = t.group.map(|g| g.peak_rss_kib() as f64 / 1024.0);
            let cpu_per_1k = cpu_per_1k(before, after, tck, r.sent);
            rounds.push(row(scenario, t.kind, r, cpu_per_1k, rss));
        }
        if args.rounds > 1 {
            streams_report.push_str(&rounds_report(&rounds));
        }
        rows.extend(merge_rounds(rounds));
    }
    Ok((rows, streams_report))
}

/// CPU seconds per 1000 of `n` (requests, frames) from the CPU ticks read
/// before and after them; `None` without readings or without any.
fn cpu_per_1k(before: Option<u64>, after: Option<u64>, tck: f64, n: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if n > 0 => Some(a.saturating_sub(b) as f64 / tck / n as f64 * 1000.0),
        _ => None,
    }
}

/// What every request of `scenario` to target `t` is.
fn request_spec(args: &Args, t: &Target, key: &str, scenario: Scenario) -> Arc<RequestSpec> {
    Arc::new(RequestSpec {
        path: scenario.path().to_string(),
        host: t.addr.to_string(),
        api_key: sluice_sim::Secret::new(key),
        body: scenario.body(args.unique_prompts),
        stream_end: scenario.stream_end(),
        debug_token: t.debug_token.clone(),
        extra_headers: Vec::new(),
        numbered: args
            .unique_prompts
            .then(|| std::sync::atomic::AtomicU64::new(0)),
    })
}

/// One round of `--paired`: every target warmed up, then measured, at the
/// same time; each target's CPU is read around the common measured phase.
async fn measure_paired(
    args: &Args,
    targets: &[Target],
    key: &str,
    scenario: Scenario,
    mode: Mode,
) -> Result<Vec<Row>> {
    // Two targets served by one process (`sluice` and `traced`) cannot be
    // told apart when loaded at once: each would be charged both loads.
    for (i, a) in targets.iter().enumerate() {
        for b in &targets[i + 1..] {
            if let (Some(x), Some(y)) = (a.group, b.group)
                && x.root == y.root
            {
                bail!(
                    "--paired: {} and {} are the same process; measure them in separate runs",
                    a.kind.name(),
                    b.kind.name()
                );
            }
        }
    }
    let tck = procs::clk_tck() as f64;
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let duration = Duration::from_secs_f64(args.duration_secs);
    let mut conns = Vec::with_capacity(targets.len());
    for t in targets {
        conns.push(
            client::connect_all(t.addr, args.concurrency)
                .await
                .with_context(|| format!("{} on {}", t.kind.name(), t.addr))?,
        );
    }
    let specs: Vec<_> = targets
        .iter()
        .map(|t| request_spec(args, t, key, scenario))
        .collect();
    let phase = |conns: Vec<Vec<Option<client::Sender>>>, length: Duration| {
        futures_util::future::try_join_all(
            targets
                .iter()
                .zip(&specs)
                .zip(conns)
                .map(|((t, spec), c)| client::run_phase(t.addr, c, spec.clone(), mode, length)),
        )
    };
    if !warmup.is_zero() {
        conns = phase(conns, warmup)
            .await?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
    }
    let ticks = || -> Vec<_> {
        targets
            .iter()
            .map(|t| t.group.map(|g| g.cpu_ticks()))
            .collect()
    };
    let before = ticks();
    let results = phase(conns, duration).await?;
    let after = ticks();
    let mut rows = Vec::with_capacity(targets.len());
    for (i, (t, (_, r))) in targets.iter().zip(results).enumerate() {
        let rss = t.group.map(|g| g.peak_rss_kib() as f64 / 1024.0);
        let cpu_per_1k = cpu_per_1k(before[i], after[i], tck, r.sent);
        rows.push(row(scenario, t.kind, r, cpu_per_1k, rss));
    }
    Ok(rows)
}

/// The `streams` scenario on every target in turn: `--open-streams` slow
/// streams at once; a Markdown table of what an open stream costs.
async fn measure_streams(args: &Args, targets: &[Target], key: &str) -> Result<String> {
    let n = args.open_streams;
    let tck = procs::clk_tck() as f64;
    let stream_secs = args.stream_tokens as f64 * args.token_ms as f64 / 1000.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n`streams`: {n} concurrent chat streams per target, one connection each, {} tokens \
         {} ms apart (~{stream_secs:.0} s a stream). RSS is sampled while all are open; \
         \"per stream\" is (RSS open - RSS before) / streams open. CPU covers the whole \
         streams (connect, request, every event).\n\n\
         | Target | Open | Completed | Errors | Ramp s | TTFB p50 ms | TTFB p99 ms | RSS before MiB | RSS open MiB | KiB per open stream | CPU ms per stream | CPU / nginx |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        args.stream_tokens, args.token_ms
    );
    let mut body: serde_json::Value =
        serde_json::from_slice(&Scenario::Streams.body(args.unique_prompts))?;
    body["max_tokens"] = args.stream_tokens.into();
    let body = Bytes::from(body.to_string());
    let mut results = Vec::new();
    for t in targets {
        let spec = Arc::new(RequestSpec {
            path: CHAT_PATH.to_string(),
            host: t.addr.to_string(),
            api_key: sluice_sim::Secret::new(key),
            body: body.clone(),
            stream_end: Scenario::Streams.stream_end(),
            debug_token: t.debug_token.clone(),
            extra_headers: vec![("x-sim-per-token-ms", args.token_ms.to_string())],
            numbered: args
                .unique_prompts
                .then(|| std::sync::atomic::AtomicU64::new(0)),
        });
        eprintln!(
            "sluice-load: streams/{}: opening {n} streams of ~{stream_secs:.0} s",
            t.kind.name()
        );
        // Hold for a quarter of a stream's life, at most 2 s: every stream is still open.
        let hold = Duration::from_secs_f64((stream_secs / 4.0).min(2.0));
        let r = streams::run(t.addr, spec, n, t.group, hold).await?;
        results.push((t.kind, r));
    }
    let cpu_ms = |r: &streams::StreamsResult| {
        let done = r.completed + r.errors;
        r.cpu_ticks
            .filter(|_| done > 0)
            .map(|ticks| ticks as f64 / tck * 1000.0 / done as f64)
    };
    let nginx_cpu = results
        .iter()
        .find(|(k, _)| *k == TargetKind::Nginx)
        .and_then(|(_, r)| cpu_ms(r));
    let mut errors = String::new();
    for (kind, r) in &results {
        let ms = |us: Option<u64>| us.map(|v| v as f64 / 1000.0);
        let per = (r.opened > 0 && r.rss_open_kib > 0)
            .then(|| r.rss_open_kib.saturating_sub(r.rss_before_kib) as f64 / r.opened as f64);
        let cpu = cpu_ms(r);
        let ratio = match (cpu, nginx_cpu) {
            (Some(a), Some(b)) if b > 0.0 && *kind != TargetKind::Nginx => {
                format!("{:.2}x", a / b)
            }
            _ => "-".to_string(),
        };
        let mib = |kib: u64| (kib > 0).then(|| kib as f64 / 1024.0);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {ratio} |",
            kind.name(),
            r.opened,
            r.completed,
            r.errors,
            r.ramp.as_secs_f64(),
            f(ms(percentile(&r.ttfb_us, 50.0)), 3),
            f(ms(percentile(&r.ttfb_us, 99.0)), 3),
            f(mib(r.rss_before_kib), 1),
            f(mib(r.rss_open_kib), 1),
            f(per, 1),
            f(cpu, 3),
        );
        if let Some(e) = &r.first_error {
            let _ = writeln!(errors, "\nfirst error of streams/{}: {e}", kind.name());
        }
    }
    out.push_str(&errors);
    Ok(out)
}

/// Many open streams need many descriptors (each proxy holds two per
/// stream): raise this process's limit, which the targets inherit.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let want = soft.max(200_000);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_err() {
        // Not allowed to raise the hard limit: go as far as it allows.
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// The Realtime scenario on one target: `--concurrency` sessions, each
/// asking for one delta at a time.
async fn measure_ws(args: &Args, t: &Target, key: &str) -> Result<Row> {
    eprintln!(
        "sluice-load: realtime/{}: {} sessions, warmup {:.1} s, measuring {:.1} s",
        t.kind.name(),
        args.concurrency,
        args.warmup_secs,
        args.duration_secs
    );
    let tck = procs::clk_tck() as f64;
    let sessions = ws::open_all(t.addr, key, args.concurrency)
        .await
        .with_context(|| format!("realtime sessions on {}", t.kind.name()))?;
    let warmup = Duration::from_secs_f64(args.warmup_secs);
    let sessions = if warmup.is_zero() {
        sessions
    } else {
        ws::run_phase(sessions, warmup).await.0
    };
    let before = t.group.map(|g| g.cpu_ticks());
    let (sessions, mut r) =
        ws::run_phase(sessions, Duration::from_secs_f64(args.duration_secs)).await;
    let after = t.group.map(|g| g.cpu_ticks());
    ws::close_all(sessions).await;
    let rss_mib = t.group.map(|g| g.peak_rss_kib() as f64 / 1024.0);
    let cpu_per_1k = cpu_per_1k(before, after, tck, r.frames);
    r.rtt_us.sort_unstable();
    let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
    let secs = r.elapsed.as_secs_f64();
    Ok(Row {
        scenario: Scenario::Realtime.name(),
        target: t.kind.name(),
        sent: r.frames + r.errors,
        errors: r.errors,
        late: 0,
        rps: if secs > 0.0 {
            r.frames as f64 / secs
        } else {
            0.0
        },
        lat: [
            ms(percentile(&r.rtt_us, 50.0)),
            ms(percentile(&r.rtt_us, 90.0)),
            ms(percentile(&r.rtt_us, 99.0)),
            ms(r.rtt_us.last().copied()),
        ],
        ttfb: [None, None],
        cpu_per_1k,
        rss_mib,
        first_error: r.first_error,
    })
}

/// Resident memory per open Realtime session, per target: `n` idle sessions
/// opened, RSS read before and after (the direct row is the simulator's own).
async fn measure_idle(
    n: usize,
    targets: &[Target],
    sim: Option<ProcGroup>,
    key: &str,
) -> Result<String> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nIdle Realtime sessions: resident memory of the process(es) serving them\n\n| Target | Sessions | RSS before MiB | RSS open MiB | KiB per session |\n|---|---|---|---|---|"
    );
    for t in targets {
        if t.kind == TargetKind::Traced {
            continue;
        }
        let group = match t.kind {
            TargetKind::Direct => sim,
            _ => t.group,
        };
        let Some(group) = group else { continue };
        let before = group.rss_kib();
        let sessions = ws::open_all(t.addr, key, n)
            .await
            .with_context(|| format!("{n} idle sessions on {}", t.kind.name()))?;
        // Let the relays settle (every session has been read from once).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let open = group.rss_kib();
        ws::close_all(sessions).await;
        let per = open.saturating_sub(before) as f64 / n as f64;
        let _ = writeln!(
            out,
            "| {} | {n} | {:.1} | {:.1} | {per:.1} |",
            t.kind.name(),
            before as f64 / 1024.0,
            open as f64 / 1024.0
        );
    }
    Ok(out)
}

fn row(
    scenario: Scenario,
    target: TargetKind,
    mut r: PhaseResult,
    cpu_per_1k: Option<f64>,
    rss_mib: Option<f64>,
) -> Row {
    r.latency_us.sort_unstable();
    r.ttfb_us.sort_unstable();
    let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
    let lat = &r.latency_us;
    let ttfb = if scenario.streams() {
        [
            ms(percentile(&r.ttfb_us, 50.0)),
            ms(percentile(&r.ttfb_us, 99.0)),
        ]
    } else {
        [None, None]
    };
    let secs = r.elapsed.as_secs_f64();
    Row {
        scenario: scenario.name(),
        target: target.name(),
        sent: r.sent,
        errors: r.errors,
        late: r.late,
        rps: if secs > 0.0 { r.ok as f64 / secs } else { 0.0 },
        lat: [
            ms(percentile(lat, 50.0)),
            ms(percentile(lat, 90.0)),
            ms(percentile(lat, 99.0)),
            ms(lat.last().copied()),
        ],
        ttfb,
        cpu_per_1k,
        rss_mib,
        first_error: r.first_error,
    }
}

/// One row per target from the rows of every round (in the order the
/// targets first ran): each figure's median over the rounds; requests, errors
/// and late requests summed; the highest peak RSS; the first error seen.
fn merge_rounds(rounds: Vec<Row>) -> Vec<Row> {
    let mut groups: Vec<Vec<Row>> = Vec::new();
    for r in rounds {
        match groups
            .iter_mut()
            .find(|g| g[0].scenario == r.scenario && g[0].target == r.target)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|mut g| {
            if g.len() == 1 {
                return g.remove(0);
            }
            let med = |pick: &dyn Fn(&Row) -> Option<f64>| median(g.iter().filter_map(pick));
            Row {
                scenario: g[0].scenario,
                target: g[0].target,
                sent: g.iter().map(|r| r.sent).sum(),
                errors: g.iter().map(|r| r.errors).sum(),
                late: g.iter().map(|r| r.late).sum(),
                rps: median(g.iter().map(|r| r.rps)).unwrap_or(0.0),
                lat: [0, 1, 2, 3].map(|i| med(&|r: &Row| r.lat[i])),
                ttfb: [0, 1].map(|i| med(&|r: &Row| r.ttfb[i])),
                cpu_per_1k: med(&|r: &Row| r.cpu_per_1k),
                rss_mib: g.iter().filter_map(|r| r.rss_mib).reduce(f64::max),
                first_error: g.iter_mut().find_map(|r| r.first_error.take()),
            }
        })
        .collect()
}

/// The median of some figures (the mean of the middle two for an even count).
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

/// Every round's CPU per 1,000 requests, a line per target, so that the
/// spread behind a median is on the page; then each round's ratio of a
/// gateway's CPU to bare pingora's (and to the baseline build's), measured
/// minutes apart in the same round, and the median of those ratios: the
/// steadiest figure on a shared machine.
fn rounds_report(rounds: &[Row]) -> String {
    let mut out = String::new();
    let Some(first) = rounds.first() else {
        return out;
    };
    let _ = writeln!(out, "\nCPU s / 1k req by round ({}):", first.scenario);
    let mut seen: Vec<&str> = Vec::new();
    for r in rounds {
        if seen.contains(&r.target) {
            continue;
        }
        seen.push(r.target);
        let each: Vec<String> = rounds
            .iter()
            .filter(|x| x.target == r.target)
            .map(|x| f(x.cpu_per_1k, 3))
            .collect();
        let _ = writeln!(out, "  {:<8} {}", r.target, each.join("  "));
    }
    for (proxy, floor) in [
        ("baseline", "pingora"),
        ("sluice", "pingora"),
        ("traced", "pingora"),
        ("sluice", "baseline"),
    ] {
        let ratios = round_ratios(rounds, proxy, floor);
        if let Some(m) = median(ratios.iter().copied()) {
            let each: Vec<String> = ratios.iter().map(|x| format!("{x:.3}")).collect();
            let _ = writeln!(
                out,
                "  {proxy}/{floor} by round: {}; median {m:.3}x",
                each.join("  ")
            );
        }
    }
    out
}

/// `proxy`'s CPU per request over `floor`'s in each round where both were
/// measured (the n-th row of each is the n-th round).
fn round_ratios(rounds: &[Row], proxy: &str, floor: &str) -> Vec<f64> {
    let of = |t: &str| {
        rounds
            .iter()
            .filter(|r| r.target == t)
            .map(|r| r.cpu_per_1k)
            .collect::<Vec<_>>()
    };
    of(proxy)
        .into_iter()
        .zip(of(floor))
        .filter_map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect()
}

fn f(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.decimals$}"))
}

fn signed(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:+.3}"))
}

/// One proxy's figures in one scenario, against the direct call, nginx and
/// the bare pingora proxy.
#[derive(Debug, Clone, Copy)]
struct Added {
    proxy: &'static str,
    /// Added p50 and p99 over direct (ms).
    p50: Option<f64>,
    p99: Option<f64>,
    /// Added p50 and p99 over bare pingora (ms).
    p50_floor: Option<f64>,
    p99_floor: Option<f64>,
    /// CPU per request over nginx's and over bare pingora's.
    cpu_nginx: Option<f64>,
    cpu_floor: Option<f64>,
    /// CPU per request over the `--baseline` build's (sluice and traced).
    cpu_baseline: Option<f64>,
}

fn comparisons(rows: &[Row]) -> Vec<(&'static str, Vec<Added>)> {
    let mut scenarios: Vec<&'static str> = rows.iter().map(|r| r.scenario).collect();
    scenarios.dedup();
    scenarios
        .into_iter()
        .map(|s| {
            let find = |t: &str| rows.iter().find(|r| r.scenario == s && r.target == t);
            let direct = find("direct");
            let floor = find("pingora");
            let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            let nginx_cpu = find("nginx").and_then(|r| r.cpu_per_1k);
            let floor_cpu = floor.and_then(|r| r.cpu_per_1k);
            let baseline_cpu = find("baseline").and_then(|r| r.cpu_per_1k);
            let added = ["pingora", "baseline", "sluice", "traced", "nginx"]
                .into_iter()
                .filter_map(|p| {
                    let r = find(p)?;
                    // Without `direct`, the rows still compare the proxies.
                    let above_floor = !matches!(p, "pingora" | "nginx");
                    Some(Added {
                        proxy: p,
                        p50: diff(r.lat[0], direct.and_then(|d| d.lat[0])),
                        p99: diff(r.lat[2], direct.and_then(|d| d.lat[2])),
                        p50_floor: diff(r.lat[0], floor.and_then(|f| f.lat[0]))
                            .filter(|_| above_floor),
                        p99_floor: diff(r.lat[2], floor.and_then(|f| f.lat[2]))
                            .filter(|_| above_floor),
                        cpu_nginx: ratio(r.cpu_per_1k, nginx_cpu).filter(|_| p != "nginx"),
                        cpu_floor: ratio(r.cpu_per_1k, floor_cpu).filter(|_| above_floor),
                        cpu_baseline: ratio(r.cpu_per_1k, baseline_cpu)
                            .filter(|_| matches!(p, "sluice" | "traced")),
                    })
                })
                .collect();
            (s, added)
        })
        .collect()
}

fn text_report(out: &mut String, rows: &[Row]) {
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "{:<8} {:<8} {:>7} {:>6} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "scenario",
        "target",
        "sent",
        "errors",
        "late",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "ttfb p50",
        "ttfb p99",
        "cpu s/1k",
        "rss MiB"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:<8} {:>7} {:>6} {:>6} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}",
            r.scenario,
            r.target,
            r.sent,
            r.errors,
            r.late,
            r.rps,
            f(r.lat[0], 3),
            f(r.lat[1], 3),
            f(r.lat[2], 3),
            f(r.lat[3], 3),
            f(r.ttfb[0], 3),
            f(r.ttfb[1], 3),
            f(r.cpu_per_1k, 3),
            f(r.rss_mib, 1)
        );
    }
    for (s, added) in comparisons(rows) {
        let mut line = format!("{s}:");
        for a in added {
            let _ = write!(
                line,
                " {} adds p50 {} ms, p99 {} ms",
                a.proxy,
                signed(a.p50),
                signed(a.p99)
            );
            if let Some(x) = a.cpu_nginx {
                let _ = write!(line, ", CPU {}/nginx = {x:.2}x", a.proxy);
            }
            if let Some(x) = a.cpu_floor {
                let _ = write!(line, ", CPU {}/pingora = {x:.2}x", a.proxy);
            }
            if let Some(x) = a.cpu_baseline {
                let _ = write!(line, ", CPU {}/baseline = {x:.3}x", a.proxy);
            }
            line.push(';');
        }
        let _ = writeln!(out, "{line}");
    }
}

fn markdown_report(out: &mut String, args: &Args, rows: &[Row]) {
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mode = if args.max {
        format!("closed loop (--max), {} connections", args.concurrency)
    } else {
        format!(
            "open loop at {} req/s, {} connections",
            args.rate, args.concurrency
        )
    };
    let _ = writeln!(
        out,
        "Command: `{}` — {}; nproc {nproc}; CPU: {}; {mode}; {} s measured after {} s warmup per target.\n",
        command_line(),
        date(),
        procs::cpu_model(),
        args.duration_secs,
        args.warmup_secs
    );
    if rows.is_empty() {
        // Only `streams` ran: its own table follows.
        return;
    }
    let _ = writeln!(
        out,
        "| Scenario | Target | Requests | Errors | Late | req/s | p50 ms | p90 ms | p99 ms | max ms | TTFB p50 ms | TTFB p99 ms | CPU s / 1k req | Peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.target,
            r.sent,
            r.errors,
            r.late,
            r.rps,
            f(r.lat[0], 3),
            f(r.lat[1], 3),
            f(r.lat[2], 3),
            f(r.lat[3], 3),
            f(r.ttfb[0], 3),
            f(r.ttfb[1], 3),
            f(r.cpu_per_1k, 3),
            f(r.rss_mib, 1)
        );
    }
    let _ = writeln!(
        out,
        "\n| Scenario | Proxy | Added p50 ms | Added p99 ms | Over pingora p50 ms | Over pingora p99 ms | CPU / nginx | CPU / pingora | CPU / baseline |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let x = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.2}x"));
    for (s, added) in comparisons(rows) {
        for a in added {
            let _ = writeln!(
                out,
                "| {s} | {} | {} | {} | {} | {} | {} | {} | {} |",
                a.proxy,
                signed(a.p50),
                signed(a.p99),
                signed(a.p50_floor),
                signed(a.p99_floor),
                x(a.cpu_nginx),
                x(a.cpu_floor),
                x(a.cpu_baseline)
            );
        }
    }
}

/// The command line as typed (arguments with shell metacharacters single-quoted).
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown date".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(target: &'static str, cpu: f64, p50: f64, sent: u64, rss: f64) -> Row {
        Row {
            scenario: "chat",
            target,
            sent,
            errors: 1,
            late: 2,
            rps: sent as f64 / 10.0,
            lat: [Some(p50), Some(p50 * 2.0), None, Some(9.0)],
            ttfb: [None, None],
            cpu_per_1k: Some(cpu),
            rss_mib: Some(rss),
            first_error: None,
        }
    }

    #[test]
    fn unique_bodies_carry_the_mark_in_the_users_message() {
        for scenario in [Scenario::Chat, Scenario::Stream, Scenario::Responses] {
            let plain = scenario.body(false);
            let unique = scenario.body(true);
            assert!(memchr::memmem::find(&plain, client::UNIQUE_MARK.as_bytes()).is_none());
            let v: serde_json::Value = serde_json::from_slice(&unique).unwrap();
            let user = match scenario {
                Scenario::Responses => v["input"].as_str().unwrap().to_string(),
                _ => v["messages"][1]["content"].as_str().unwrap().to_string(),
            };
            assert!(
                user.starts_with(QUESTION) && user.contains(client::UNIQUE_MARK),
                "{user}"
            );
            let a = client::numbered_body(&unique, 1);
            let b = client::numbered_body(&unique, 2);
            assert_ne!(a, b);
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
        assert_eq!(median([7.0].into_iter()), Some(7.0));
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn each_process_gets_a_copy_of_its_binary() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = TempDir::new("own-copy").unwrap();
        let bin = tmp.path().join("tool");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = own_copy(tmp.path(), &bin, "sim").unwrap();
        let b = own_copy(tmp.path(), &bin, "sluice").unwrap();
        assert_ne!(a, b);
        for copy in [&a, &b] {
            assert_ne!(copy, &bin);
            assert_eq!(std::fs::read(copy).unwrap(), b"#!/bin/sh\n");
            let mode = std::fs::metadata(copy).unwrap().permissions().mode();
            assert_eq!(mode & 0o111, 0o111, "still executable");
        }
        assert!(own_copy(tmp.path(), &tmp.path().join("missing"), "x").is_err());
    }

    #[test]
    fn rounds_merge_into_one_row_per_target_by_median() {
        let rounds = vec![
            round("pingora", 0.20, 1.0, 100, 20.0),
            round("sluice", 0.30, 2.0, 100, 25.0),
            round("pingora", 0.10, 3.0, 100, 22.0),
            round("sluice", 0.26, 1.0, 100, 24.0),
            round("pingora", 0.40, 2.0, 100, 21.0),
            round("sluice", 0.28, 4.0, 100, 23.0),
        ];
        let merged = merge_rounds(rounds);
        assert_eq!(merged.len(), 2);
        let (p, s) = (&merged[0], &merged[1]);
        assert_eq!((p.target, s.target), ("pingora", "sluice"));
        assert_eq!((p.cpu_per_1k, s.cpu_per_1k), (Some(0.20), Some(0.28)));
        assert_eq!((p.lat[0], s.lat[0]), (Some(2.0), Some(2.0)));
        assert_eq!(s.lat[1], Some(4.0));
        assert_eq!((s.lat[2], s.ttfb[0]), (None, None));
        assert_eq!((s.sent, s.errors, s.late), (300, 3, 6));
        assert_eq!((p.rss_mib, s.rss_mib), (Some(22.0), Some(25.0)));
        assert!((s.rps - 10.0).abs() < 1e-9);
        // One round: the row as measured.
        let one = merge_rounds(vec![round("sluice", 0.5, 1.0, 7, 1.0)]);
        assert_eq!((one[0].cpu_per_1k, one[0].sent), (Some(0.5), 7));
    }

    #[test]
    fn the_baseline_ratio_is_given_for_sluice_only() {
        let rows = vec![
            round("direct", 0.0, 0.5, 100, 0.0),
            round("pingora", 0.20, 1.0, 100, 20.0),
            round("baseline", 0.25, 1.2, 100, 20.0),
            round("sluice", 0.24, 1.1, 100, 20.0),
        ];
        let cmp = comparisons(&rows);
        let added = &cmp[0].1;
        let get = |p: &str| added.iter().find(|a| a.proxy == p).unwrap();
        assert!((get("sluice").cpu_baseline.unwrap() - 0.96).abs() < 1e-9);
        assert!((get("sluice").cpu_floor.unwrap() - 1.2).abs() < 1e-9);
        assert!((get("baseline").cpu_floor.unwrap() - 1.25).abs() < 1e-9);
        assert_eq!(get("baseline").cpu_baseline, None);
        assert_eq!(get("pingora").cpu_baseline, None);
        let report = rounds_report(&rows);
        assert!(report.contains("baseline 0.250"), "{report}");
        assert!(
            report.contains("sluice/baseline by round: 0.960; median 0.960x"),
            "{report}"
        );
    }

    #[test]
    fn ratios_pair_the_rounds_of_two_targets() {
        let rounds: Vec<Row> = [
            ("pingora", 0.20),
            ("sluice", 0.30),
            ("pingora", 0.25),
            ("sluice", 0.25),
            ("pingora", 0.10),
            ("sluice", 0.12),
        ]
        .into_iter()
        .map(|(target, cpu)| round(target, cpu, 1.0, 100, 20.0))
        .collect();
        let r = round_ratios(&rounds, "sluice", "pingora");
        assert_eq!(r.len(), 3);
        assert!(
            (r[0] - 1.5).abs() < 1e-9 && (r[1] - 1.0).abs() < 1e-9 && (r[2] - 1.2).abs() < 1e-9
        );
        assert!(round_ratios(&rounds, "traced", "pingora").is_empty());
        let report = rounds_report(&rounds);
        assert!(
            report.contains("sluice/pingora by round: 1.500  1.000  1.200; median 1.200x"),
            "{report}"
        );
    }
}
