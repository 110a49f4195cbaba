//! Starting the simulated regions a config names, and `sluice sim`.

use std::net::SocketAddr;
use std::process::ExitCode;

use sluice_config::{Config, SimulatorRegion};
use sluice_sim::{DeploymentConfig, Latency, RegionConfig, SimHandle, Simulator};

/// A running simulator.
#[derive(Debug)]
pub struct Started {
    pub name: String,
    pub region: String,
    pub handle: SimHandle,
}

/// The simulator settings for one `simulators[]` entry.
pub fn region_config(s: &SimulatorRegion) -> RegionConfig {
    let mut c = RegionConfig::new(&s.name);
    c.display_region = s.region.clone();
    c.api_key = s.api_key.clone();
    c.latency = Latency {
        time_to_first_token: s.time_to_first_token,
        per_token: s.per_token,
        embeddings: s.embeddings_latency,
    };
    c.default_tokens_per_minute = s.tokens_per_minute;
    c.completion_tokens = s.completion_tokens;
    c.embedding_dimensions = s.embedding_dimensions;
    c.deployments = s
        .deployments
        .iter()
        .map(|(name, d)| {
            (
                name.clone(),
                DeploymentConfig {
                    model: d.model.clone(),
                    tokens_per_minute: d.tokens_per_minute,
                },
            )
        })
        .collect();
    c
}

/// Start every simulator in the config on a dedicated runtime, which must
/// stay alive as long as they serve.
pub fn start_all(cfg: &Config) -> std::io::Result<(Option<tokio::runtime::Runtime>, Vec<Started>)> {
    if cfg.simulators.is_empty() {
        return Ok((None, Vec::new()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("sluice-sim")
        .enable_all()
        .build()?;
    let mut started = Vec::with_capacity(cfg.simulators.len());
    for s in &cfg.simulators {
        let handle = rt.block_on(Simulator::start(s.listen, region_config(s)))?;
        started.push(Started {
            name: s.name.clone(),
            region: s.region.clone(),
            handle,
        });
    }
    Ok((Some(rt), started))
}

/// `sluice sim`: one region until Ctrl-C or SIGTERM.
pub fn run_one(listen: SocketAddr, cfg: RegionConfig) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice sim: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        let name = cfg.name.clone();
        let handle = match Simulator::start(listen, cfg).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("sluice sim: cannot listen on {listen}: {e}");
                return ExitCode::from(1);
            }
        };
        println!("sluice sim: region {name} listening on {}", handle.url());
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("sluice sim: {e}");
                    return ExitCode::from(1);
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        handle.shutdown();
        ExitCode::SUCCESS
    })
}
