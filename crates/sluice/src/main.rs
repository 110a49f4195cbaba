//! `sluice`: run the gateway, check a config, or run a simulated Azure OpenAI region.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod sims;

/// mimalloc instead of glibc's allocator: the request path allocates and
/// frees many small buffers across threads, where glibc's malloc showed up as
/// ~12% of the gateway's CPU under load (docs/benchmarks.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "sluice", version, about = "An API gateway for Azure OpenAI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the Azure OpenAI data plane as gateway.yaml describes.
    Run {
        /// The configuration file.
        #[arg(short, long, default_value = "gateway.yaml")]
        config: PathBuf,
    },
    /// Validate a configuration file: list every problem and exit 2 if there are any.
    Check {
        #[arg(short, long, default_value = "gateway.yaml")]
        config: PathBuf,
    },
    /// Run one simulated Azure OpenAI region.
    Sim {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Short region name (also the default for --display-region).
        #[arg(long, default_value = "eastus")]
        region: String,
        /// Value of x-ms-region, e.g. "East US".
        #[arg(long)]
        display_region: Option<String>,
        /// Name of an environment variable holding the api-key the simulator requires.
        #[arg(long, conflicts_with = "api_key_file")]
        api_key_env: Option<String>,
        /// A file holding the api-key the simulator requires.
        #[arg(long)]
        api_key_file: Option<PathBuf>,
        /// Milliseconds before the first token.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Milliseconds between tokens.
        #[arg(long, default_value_t = 0)]
        per_token_ms: u64,
        /// Tokens-per-minute limit per deployment (unlimited when omitted).
        #[arg(long)]
        tpm: Option<u64>,
        /// Completion length when a request sets no max_tokens.
        #[arg(long, default_value_t = 24)]
        completion_tokens: u32,
    },
    /// A bare pingora reverse proxy (no Sluice logic) with the gateway's
    /// server settings: the floor `sluice-load` measures the gateway against.
    #[command(hide = true)]
    BareProxy {
        /// Address to listen on (port 0 picks a free port).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The upstream every request goes to (plain HTTP/1.1).
        #[arg(long)]
        upstream: SocketAddr,
        /// Worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// Log targets capped whatever `RUST_LOG` asks for, because above the cap
/// they print what may carry a secret:
/// - pingora at debug and trace prints request and response heads
///   (`Sending header to upstream {:?}`, the client's raw request head, the
///   upstream request as raw bytes), with the callers' keys and tokens in
///   them;
/// - the HTTP clients behind Entra ID and JWKS fetches (reqwest, hyper, h2,
///   rustls, azure_core, azure_identity) at trace print connection and
///   protocol detail that is of no use to an operator and may include
///   token responses.
///
/// Sluice's own targets are not capped: they never log a secret (the
/// test `tests/python/test_hardening.py::test_no_secret_reaches_the_log_at_trace_level`
/// runs every flow at `RUST_LOG=trace` and scans the log).
const LOG_CAPS: &[(&str, tracing::Level)] = &[
    ("pingora", tracing::Level::INFO),
    ("reqwest", tracing::Level::DEBUG),
    ("hyper", tracing::Level::DEBUG),
    ("hyper_util", tracing::Level::DEBUG),
    ("h2", tracing::Level::DEBUG),
    ("rustls", tracing::Level::DEBUG),
    ("azure_core", tracing::Level::DEBUG),
    ("azure_identity", tracing::Level::DEBUG),
    ("typespec_client_core", tracing::Level::DEBUG),
];

fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let wanted = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,pingora=warn"));
    let cap = LOG_CAPS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, (target, level)| t.with_target(*target, *level),
    );
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(wanted.and(cap)),
        )
        .try_init();
}

fn load(config: &std::path::Path) -> Result<sluice_config::Config, ExitCode> {
    sluice_config::load_file(config).map_err(|errors| {
        eprintln!("{errors}");
        eprintln!(
            "{}: {} problem(s); nothing was started",
            config.display(),
            errors.problems.len()
        );
        ExitCode::from(2)
    })
}

/// Transparent huge pages off for this process (and the children it
/// starts). mimalloc asks for huge pages on its arenas where the kernel
/// allows it (`madvise` mode); a connection then touches a few bytes of a
/// 2 MiB page, and every open stream cost about twice the resident memory
/// (docs/benchmarks.md, issue #11).
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("sluice: cannot turn transparent huge pages off: {e}");
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Check { config } => match load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: OK ({} API(s), {} backend(s), {} subscription(s), {} simulator(s))",
                    config.display(),
                    cfg.apis.len(),
                    cfg.backends.len(),
                    cfg.subscriptions.len(),
                    cfg.simulators.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::BareProxy {
            listen,
            upstream,
            threads,
        } => {
            // Held until the process exits: see `HeldAddr`.
            let held = match sluice_proxy::hold_listen_addr(listen) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("sluice bare-proxy: cannot listen on {listen}: {e}");
                    return ExitCode::from(1);
                }
            };
            let listen = held.addr();
            println!("sluice bare-proxy: listening on http://{listen} -> {upstream}");
            let _ = std::io::stdout().flush();
            sluice_proxy::run_bare_proxy(
                listen,
                upstream,
                threads,
                sluice_proxy::Tuning::from_env(),
            );
            ExitCode::SUCCESS
        }
        Command::Run { config } => match load(&config) {
            Ok(cfg) => run(cfg),
            Err(code) => code,
        },
        Command::Sim {
            listen,
            region,
            display_region,
            api_key_env,
            api_key_file,
            ttft_ms,
            per_token_ms,
            tpm,
            completion_tokens,
        } => {
            let api_key = match api_key_env {
                Some(var) => match std::env::var(&var) {
                    Ok(v) if !v.is_empty() => Some(v),
                    _ => {
                        eprintln!("sluice sim: environment variable {var} is not set");
                        return ExitCode::from(2);
                    }
                },
                None => match api_key_file {
                    Some(path) => match std::fs::read_to_string(&path) {
                        Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
                        _ => {
                            eprintln!("sluice sim: cannot read a key from {}", path.display());
                            return ExitCode::from(2);
                        }
                    },
                    None => None,
                },
            };
            let mut cfg = sluice_sim::RegionConfig::new(&region);
            cfg.display_region = display_region.unwrap_or_else(|| region.clone());
            cfg.api_key = api_key.map(sluice_sim::Secret::new);
            cfg.latency.time_to_first_token = Duration::from_millis(ttft_ms);
            cfg.latency.per_token = Duration::from_millis(per_token_ms);
            cfg.default_tokens_per_minute = tpm;
            cfg.completion_tokens = completion_tokens;
            preload_tokenizers(vec![
                sluice_tokens::Encoding::O200kBase,
                sluice_tokens::Encoding::Cl100kBase,
            ]);
            sims::run_one(listen, cfg)
        }
    }
}

fn run(cfg: sluice_config::Config) -> ExitCode {
    // Token counting (token_limit, emit_token_metric, the simulators) builds
    // the vocabularies of the encodings the configured deployments use, in
    // the background, rather than on the first request (a few MiB each).
    preload_tokenizers(encodings_in_use(&cfg));
    // The listen addresses are held until the process exits (see
    // `HeldAddr`): the simulators below bind port 0 too.
    let data = match sluice_proxy::hold_listen_addr(cfg.server.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sluice: cannot listen on {}: {e}", cfg.server.listen);
            return ExitCode::from(1);
        }
    };
    let management = match cfg.server.management.as_ref().map(|m| m.listen) {
        None => None,
        Some(addr) => match sluice_proxy::hold_listen_addr(addr) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("sluice: cannot listen on {addr} (management): {e}");
                return ExitCode::from(1);
            }
        },
    };
    let listen = sluice_proxy::Listeners {
        data: data.addr(),
        management: management.as_ref().map(sluice_proxy::HeldAddr::addr),
    };
    // Simulated regions run on their own small runtime, beside pingora's.
    let (sim_runtime, started) = match sims::start_all(&cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("sluice: could not start the simulators: {e}");
            return ExitCode::from(1);
        }
    };
    let sim_addrs: HashMap<String, SocketAddr> = started
        .iter()
        .map(|s| (s.name.clone(), s.handle.addr()))
        .collect();
    let state = match sluice_proxy::GatewayState::new(&cfg, &sim_addrs) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sluice: {e}");
            return ExitCode::from(1);
        }
    };
    print_banner(&cfg, listen, &started);
    sluice_proxy::run_blocking(
        state,
        listen,
        cfg.server.threads,
        cfg.server.shutdown_timeout,
    );
    drop(sim_runtime);
    ExitCode::SUCCESS
}

/// Build these tokenizer vocabularies in the background.
fn preload_tokenizers(encodings: Vec<sluice_tokens::Encoding>) {
    if encodings.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        for e in encodings {
            sluice_tokens::preload(e);
        }
        release_free_memory();
    });
}

/// Building a vocabulary goes through tiktoken-rs's full tokenizer (tens of
/// MiB) and drops it; mimalloc keeps freed pages for reuse and, in an idle
/// process, would hold them resident indefinitely. Ask it to give them back.
#[cfg(feature = "mimalloc")]
#[allow(unsafe_code)]
fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointers and only returns free memory
    // to the OS; it may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

#[cfg(not(feature = "mimalloc"))]
fn release_free_memory() {}

/// The encodings token counting will need: those of the deployment names
/// each API that counts tokens knows (its `models`, or the names its
/// routing and simulators use; o200k when it names none), for every API when
/// simulators run (they count their own usage). A name the configuration
/// does not list still works: its encoding is built on first use.
fn encodings_in_use(cfg: &sluice_config::Config) -> Vec<sluice_tokens::Encoding> {
    let mut out = Vec::new();
    for api in &cfg.apis {
        let counts = !cfg.simulators.is_empty()
            || api.policies.iter().any(|p| {
                matches!(
                    p,
                    sluice_config::Policy::TokenLimit(_)
                        | sluice_config::Policy::EmitTokenMetric(_)
                )
            });
        if !counts {
            continue;
        }
        let names = cfg.api_models(api);
        let wanted = if names.is_empty() {
            vec![sluice_tokens::Encoding::O200kBase]
        } else {
            names
                .iter()
                .map(|n| sluice_tokens::encoding_for_model(n))
                .collect()
        };
        for e in wanted {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out
}

fn print_banner(
    cfg: &sluice_config::Config,
    listeners: sluice_proxy::Listeners,
    sims: &[sims::Started],
) {
    let listen = listeners.data;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "Sluice {} — Azure OpenAI gateway",
        env!("CARGO_PKG_VERSION")
    );
    let _ = writeln!(out, "sluice: listening on http://{listen}");
    if let Some(m) = listeners.management {
        let _ = writeln!(
            out,
            "sluice: management on http://{m} (/metrics, /health, /backends, /traces, trace viewer at /viewer)"
        );
    }
    for api in &cfg.apis {
        let _ = writeln!(
            out,
            "  API '{}': http://{listen}{} -> backends {}",
            api.name,
            api.path,
            api.backends.join(", ")
        );
    }
    for s in sims {
        let _ = writeln!(
            out,
            "  simulator '{}' ({}): {}",
            s.name,
            s.region,
            s.handle.url()
        );
    }
    if let Some(api) = cfg.apis.first() {
        let header = &api.subscription.challenge_name;
        let _ = writeln!(
            out,
            "Call it like Azure OpenAI, with a subscription key from gateway.yaml:"
        );
        let _ = writeln!(
            out,
            "  curl -s 'http://{listen}{}/deployments/gpt-4o/chat/completions?api-version=2024-10-21' \\\n    -H '{header}: <subscription key>' -H 'content-type: application/json' \\\n    -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
            api.path
        );
        let _ = writeln!(
            out,
            "  Python: AzureOpenAI(azure_endpoint='http://{listen}{}', api_key=..., api_version='2024-10-21')",
            api.path.trim_end_matches("/openai")
        );
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_tokens::Encoding::{Cl100kBase, O200kBase};

    fn config(api_extra: &str) -> sluice_config::Config {
        let text = format!(
            "backends:\n  - name: b\n    url: http://127.0.0.1:9\n\
             apis:\n  - name: a\n    path: /openai\n    backends: [b]\n{api_extra}"
        );
        sluice_config::load_str(&text, "test", std::path::Path::new("."))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_the_encodings_of_counting_apis_are_preloaded() {
        // Nothing counts tokens: nothing is built.
        assert!(encodings_in_use(&config("    models: [gpt-4o]\n")).is_empty());
        let limit = "    policies:\n      - token_limit: { counter_key: subscription, tokens_per_minute: 1000 }\n";
        // A chat model only: o200k only.
        assert_eq!(
            encodings_in_use(&config(&format!(
                "    models: [gpt-4o, gpt-4o-mini]\n{limit}"
            ))),
            vec![O200kBase]
        );
        // An embedding deployment adds cl100k; gpt-4 is cl100k.
        assert_eq!(
            encodings_in_use(&config(&format!(
                "    models: [text-embedding-3-small, gpt-4o]\n{limit}"
            ))),
            vec![Cl100kBase, O200kBase]
        );
        assert_eq!(
            encodings_in_use(&config(&format!("    models: [gpt-4]\n{limit}"))),
            vec![Cl100kBase]
        );
        // No name known: o200k, the encoding of unknown names.
        assert_eq!(encodings_in_use(&config(limit)), vec![O200kBase]);
    }
}
