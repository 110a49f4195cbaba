//! `gateway.yaml`: schema, loading, validation and secrets for Sluice.
//!
//! [`load_file`] / [`load_str`] read the YAML, reject unknown keys at every
//! level, check types and meaning, resolve `{env: ...}` / `{file: ...}`
//! secrets, and return either a resolved [`Config`] or every problem found
//! ([`ConfigErrors`]), each with its field path and, where known, its line.
//!
//! The pipeline: a path -> line map from yaml-rust2 marked events
//! (`lines`), typed parsing with serde that records unknown keys and type
//! errors (`parse`), then semantic validation and secret resolution
//! (`validate`). Both stages append to one `problems::Problems` list.
//! Dependencies go one way: `validate` -> `parse` -> (`raw`, `lines`,
//! `problems`); `parse` never calls into `validate`. See
//! `docs/configuration.md` for the schema.

use std::path::Path;

mod error;
mod lines;
mod parse;
mod problems;
mod raw;
mod types;
mod validate;

pub use error::{ConfigErrors, Problem};
pub use ipnet::IpNet;
/// The redacted secret type shared by every Sluice crate (resolved API keys, subscription keys, client secrets).
pub use sluice_base::Secret;
pub use types::{
    AffinitySettings, Api, ApiAuth, Backend, BackendAuth, BackendTarget, BackendUrl, BreakerRule,
    CallLimit, Config, CounterKey, Counters, Credential, Dimension, EmitTokenMetric,
    FIXED_CREDENTIAL_HEADERS, Failover, JwtKeys, Management, Policy, Pool, PoolMember, QuotaPeriod,
    Server, SimDeployment, SimulatorRegion, Subscription, SubscriptionSettings, Timeouts,
    TokenLimit, Tracing, ValidateJwt,
};

/// Loads and validates a configuration file. Relative secret `file:` paths
/// resolve against the directory of `path`; `env:` secrets read the process
/// environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let source_name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigErrors {
        source_name: source_name.clone(),
        problems: vec![Problem {
            path: String::new(),
            line: None,
            message: format!("cannot read the configuration file: {err}"),
        }],
    })?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    load_str(&text, &source_name, base_dir)
}

/// Loads and validates configuration text. `source_name` labels problems
/// (usually the file name); relative secret `file:` paths resolve against
/// `base_dir`; `env:` secrets read the process environment.
pub fn load_str(text: &str, source_name: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    load_str_with_env(text, source_name, base_dir, &|name| {
        std::env::var(name).ok()
    })
}

/// [`load_str`] with the environment lookup supplied by the caller (tests,
/// embedding). `env` returns the value of a variable, or `None` if unset.
pub fn load_str_with_env(
    text: &str,
    source_name: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let lines = lines::LineMap::build(text);
    let mut problems = problems::Problems::new(&lines);
    if let Some(parsed) = parse::parse(text, &mut problems) {
        let config = validate::build(parsed, &mut problems, env, base_dir);
        if problems.is_empty() {
            return Ok(config);
        }
    }
    Err(ConfigErrors {
        source_name: source_name.to_string(),
        problems: problems.into_sorted(),
    })
}
