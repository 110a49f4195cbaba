//! Region routing: `backends[].circuit_breaker`, `pools` and the routing
//! keys of an API (`pool`, `backends`, `deployment_pools`, `failover`).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{Cx, NameRule};
use crate::lines::key_path;
use crate::raw::{RawCircuitBreaker, RawFailover, RawPool, RawStatusRange};
use crate::types::{BreakerRule, Failover, Pool, PoolMember};

/// Most members a pool may hold (APIM's limit).
const MAX_POOL_MEMBERS: usize = 30;
const DEFAULT_HEADROOM_MAX_AGE_SECONDS: u64 = 60;

/// The routing keys of one API, as written.
pub(super) struct RawApiRouting {
    pub backends: Option<Vec<Option<String>>>,
    pub pool: Option<String>,
    pub deployment_pools: Option<BTreeMap<String, String>>,
    pub failover: Option<RawFailover>,
}

/// The routing of one API, resolved.
pub(super) struct ApiRouting {
    pub backends: Vec<String>,
    pub pool: String,
    pub deployment_pools: BTreeMap<String, String>,
    pub failover: Failover,
}

/// Parse `429` or `"500-599"` into an inclusive range of statuses.
fn status_range(raw: &RawStatusRange) -> Result<std::ops::RangeInclusive<u16>, String> {
    let code = |v: u64| -> Result<u16, String> {
        u16::try_from(v)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| format!("{v} is not an HTTP status (100-599)"))
    };
    match raw {
        RawStatusRange::Code(v) => code(*v).map(|c| c..=c),
        RawStatusRange::Text(text) => {
            let bad = || format!("'{text}' is not a status or a range such as 500-599");
            let (lo, hi) = match text.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (text.trim(), text.trim()),
            };
            let lo = code(lo.parse().map_err(|_| bad())?)?;
            let hi = code(hi.parse().map_err(|_| bad())?)?;
            if lo > hi {
                return Err(format!("'{text}': the range is empty ({lo} > {hi})"));
            }
            Ok(lo..=hi)
        }
    }
}

impl Cx<'_, '_> {
    /// `backends[i].circuit_breaker`: the defaults when absent.
    pub(super) fn breaker_rules(
        &mut self,
        raw: Option<RawCircuitBreaker>,
        backend_path: &str,
    ) -> Vec<BreakerRule> {
        let Some(raw) = raw else {
            return BreakerRule::defaults();
        };
        let path = key_path(backend_path, "circuit_breaker");
        let rules_path = key_path(&path, "rules");
        let Some(list) = self.required(raw.rules, &rules_path) else {
            return BreakerRule::defaults();
        };
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, rpath, rule) in self.entries(Some(list), &rules_path) {
            let name = self.name(rule.name, &rpath, i, &mut seen, NameRule::Identifier);
            let mut statuses = Vec::new();
            if let Some(codes) = rule.status_codes {
                let codes_path = key_path(&rpath, "status_codes");
                for (_, cpath, code) in self.entries(Some(codes), &codes_path) {
                    match status_range(&code) {
                        Ok(r) => statuses.push(r),
                        Err(message) => self.err(&cpath, message),
                    }
                }
            }
            let (mut connection_errors, mut timeouts) = (false, false);
            if let Some(errors) = rule.errors {
                let errors_path = key_path(&rpath, "errors");
                for (_, epath, e) in self.entries(Some(errors), &errors_path) {
                    match e.as_str() {
                        "connection" => connection_errors = true,
                        "timeout" => timeouts = true,
                        other => self.err(
                            &epath,
                            format!(
                                "'{other}' is not an error kind; use 'connection' or 'timeout'"
                            ),
                        ),
                    }
                }
            }
            if statuses.is_empty() && !connection_errors && !timeouts {
                self.err(
                    &rpath,
                    "the rule matches nothing: set status_codes and/or errors",
                );
            }
            let count = self.in_range(rule.count, &key_path(&rpath, "count"), 1, 10_000, 1);
            let interval = self.in_range(
                rule.interval_seconds,
                &key_path(&rpath, "interval_seconds"),
                1,
                86_400,
                10,
            );
            let trip = self.in_range(
                rule.trip_duration_seconds,
                &key_path(&rpath, "trip_duration_seconds"),
                1,
                86_400,
                5,
            );
            let max_retry_after = self.in_range(
                rule.max_retry_after_seconds,
                &key_path(&rpath, "max_retry_after_seconds"),
                1,
                86_400,
                60,
            );
            out.push(BreakerRule {
                name,
                statuses,
                connection_errors,
                timeouts,
                count: u32::try_from(count).unwrap_or(u32::MAX),
                interval: Duration::from_secs(interval),
                trip_duration: Duration::from_secs(trip),
                accept_retry_after: rule.accept_retry_after.unwrap_or(true),
                max_retry_after: Duration::from_secs(max_retry_after),
            });
        }
        out
    }

    /// The `pools` list.
    pub(super) fn pools(&mut self, list: Option<Vec<Option<RawPool>>>) -> Vec<Pool> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, path, raw) in self.entries(list, "pools") {
            let name = self.name(raw.name, &path, i, &mut seen, NameRule::Identifier);
            let members_path = key_path(&path, "backends");
            let mut members = Vec::new();
            match self.required(raw.backends, &members_path) {
                Some(list) if list.is_empty() => {
                    self.err(&members_path, "must name at least one backend");
                }
                Some(list) => {
                    if list.len() > MAX_POOL_MEMBERS {
                        self.err(
                            &members_path,
                            format!("a pool holds at most {MAX_POOL_MEMBERS} backends"),
                        );
                    }
                    let mut listed: HashMap<String, String> = HashMap::new();
                    for (_, mpath, m) in self.entries(Some(list), &members_path) {
                        let bpath = key_path(&mpath, "backend");
                        let Some(backend) = self.required(m.backend, &bpath) else {
                            continue;
                        };
                        if !self.names.backends.contains(&backend) {
                            self.err(
                                &bpath,
                                format!("unknown backend '{backend}' (not in backends)"),
                            );
                        } else if let Some(first) = listed.get(&backend) {
                            self.err(
                                &bpath,
                                format!("backend '{backend}' is listed twice (also at {first})"),
                            );
                        } else {
                            listed.insert(backend.clone(), mpath.clone());
                        }
                        let priority =
                            self.in_range(m.priority, &key_path(&mpath, "priority"), 0, 100, 1);
                        let weight =
                            self.in_range(m.weight, &key_path(&mpath, "weight"), 1, 1000, 1);
                        members.push(PoolMember {
                            backend,
                            priority: priority as u32,
                            weight: weight as u32,
                        });
                    }
                }
                None => {}
            }
            let headroom_max_age = self.in_range(
                raw.headroom_max_age_seconds,
                &key_path(&path, "headroom_max_age_seconds"),
                1,
                3600,
                DEFAULT_HEADROOM_MAX_AGE_SECONDS,
            );
            out.push(Pool {
                name,
                members,
                steering: raw.steering.unwrap_or(true),
                headroom_max_age: Duration::from_secs(headroom_max_age),
            });
        }
        out
    }

    /// The routing of the API at `path` named `api_name`. An API that lists
    /// `backends:` gets its own pool, added to `pools`.
    pub(super) fn api_routing(
        &mut self,
        raw: RawApiRouting,
        path: &str,
        api_name: &str,
        pools: &mut Vec<Pool>,
    ) -> ApiRouting {
        let backends_path = key_path(path, "backends");
        let pool_path = key_path(path, "pool");
        let pool = match (raw.backends, raw.pool) {
            (Some(_), Some(_)) => {
                self.err(path, "set either 'pool' or 'backends', not both");
                String::new()
            }
            (None, None) => {
                if !self.poisoned.contains(&backends_path) && !self.poisoned.contains(&pool_path) {
                    self.err(&backends_path, "is required (or name a pool with 'pool')");
                }
                String::new()
            }
            (None, Some(pool)) => {
                if !self.names.pools.contains(&pool) {
                    self.err(&pool_path, format!("unknown pool '{pool}' (not in pools)"));
                }
                pool
            }
            (Some(list), None) => {
                if list.is_empty() {
                    self.err(&backends_path, "must name at least one backend");
                }
                let mut listed: HashMap<String, usize> = HashMap::new();
                let mut members = Vec::new();
                for (j, item_path, backend) in self.entries(Some(list), &backends_path) {
                    if !self.names.backends.contains(&backend) {
                        self.err(
                            &item_path,
                            format!("unknown backend '{backend}' (not in backends)"),
                        );
                    } else if let Some(first) = listed.get(&backend) {
                        self.err(
                            &item_path,
                            format!(
                                "backend '{backend}' is listed twice (also at {backends_path}[{first}])"
                            ),
                        );
                    } else {
                        listed.insert(backend.clone(), j);
                    }
                    members.push(PoolMember {
                        backend,
                        priority: 1,
                        weight: 1,
                    });
                }
                let name = format!("api/{api_name}");
                pools.push(Pool {
                    name: name.clone(),
                    members,
                    steering: true,
                    headroom_max_age: Duration::from_secs(DEFAULT_HEADROOM_MAX_AGE_SECONDS),
                });
                name
            }
        };
        let deployment_pools = raw.deployment_pools.unwrap_or_default();
        let dp_path = key_path(path, "deployment_pools");
        for (deployment, pool) in &deployment_pools {
            let p = key_path(&dp_path, deployment);
            if let Err(message) = NameRule::Deployment.check(deployment) {
                self.err(&p, message);
            } else if !self.names.pools.contains(pool) {
                self.err(&p, format!("unknown pool '{pool}' (not in pools)"));
            }
        }
        let failover = match raw.failover {
            None => Failover::default(),
            Some(f) => {
                let fpath = key_path(path, "failover");
                let max_attempts = f.max_attempts.map(|n| {
                    self.in_range(Some(n), &key_path(&fpath, "max_attempts"), 1, 30, 1) as u32
                });
                let timeout = self.in_range(
                    f.timeout_ms,
                    &key_path(&fpath, "timeout_ms"),
                    1,
                    3_600_000,
                    Failover::default().timeout.as_millis() as u64,
                );
                let when_exhausted = match f.when_exhausted {
                    None => 429,
                    Some(s @ (429 | 503)) => s as u16,
                    Some(other) => {
                        self.err(
                            key_path(&fpath, "when_exhausted"),
                            format!("{other} is not allowed; use 429 or 503"),
                        );
                        429
                    }
                };
                Failover {
                    max_attempts,
                    timeout: Duration::from_millis(timeout),
                    when_exhausted,
                }
            }
        };
        // The backends the API can reach, each once, in pool order.
        let mut backends: Vec<String> = Vec::new();
        let pool_names = std::iter::once(&pool).chain(deployment_pools.values());
        for name in pool_names {
            if let Some(p) = pools.iter().find(|p| &p.name == name) {
                for m in &p.members {
                    if !backends.contains(&m.backend) {
                        backends.push(m.backend.clone());
                    }
                }
            }
        }
        ApiRouting {
            backends,
            pool,
            deployment_pools,
            failover,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ranges() {
        assert_eq!(status_range(&RawStatusRange::Code(429)), Ok(429..=429));
        assert_eq!(
            status_range(&RawStatusRange::Text("500-599".into())),
            Ok(500..=599)
        );
        assert_eq!(
            status_range(&RawStatusRange::Text(" 503 ".into())),
            Ok(503..=503)
        );
        assert!(status_range(&RawStatusRange::Code(99)).is_err());
        assert!(status_range(&RawStatusRange::Code(600)).is_err());
        assert!(status_range(&RawStatusRange::Code(100)).is_ok());
        assert!(status_range(&RawStatusRange::Code(599)).is_ok());
        assert!(status_range(&RawStatusRange::Text("599-500".into())).is_err());
        assert!(status_range(&RawStatusRange::Text("5xx".into())).is_err());
        assert!(status_range(&RawStatusRange::Text("500-".into())).is_err());
    }
}
