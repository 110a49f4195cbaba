//! YAML text -> raw schema, collecting unknown keys and type errors.
//!
//! The document is read into a `serde_yaml::Value`, then deserialized into
//! [`RawConfig`] through `serde_ignored` (unknown keys) around
//! `serde_path_to_error` (where a type error happened). A type error stops
//! serde, so the offending entry is cut out of the value and deserialization
//! is retried until it succeeds; each cut is reported once and remembered as
//! "poisoned" so validation does not also call it missing.

use std::collections::HashSet;

use serde_yaml::{Mapping, Value};

use crate::lines::{Seg, format_path, index_path, key_path};
use crate::problems::Problems;
use crate::raw::{
    RawApi, RawApiSubscription, RawAzureCli, RawBackend, RawBackendAuth, RawBreakerRule,
    RawCallLimit, RawCircuitBreaker, RawClientSecret, RawConfig, RawCounters, RawEmitTokenMetric,
    RawFailover, RawManagedIdentity, RawManagement, RawPolicy, RawPool, RawPoolMember,
    RawSecretFields, RawServer, RawSimDeployment, RawSimulator, RawSubscription, RawTimeouts,
    RawTokenLimit, RawValidateJwt, RawWorkloadIdentity, fields_of,
};

/// Names present in each list of the file, read before typed parsing so that
/// an entry with a type error still counts as a reference target.
#[derive(Debug, Default)]
pub(crate) struct KnownNames {
    pub simulators: HashSet<String>,
    pub backends: HashSet<String>,
    pub apis: HashSet<String>,
    pub pools: HashSet<String>,
}

/// The outcome of parsing: the raw config, plus the paths of values removed
/// because of type errors.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub raw: RawConfig,
    pub poisoned: HashSet<String>,
    pub names: KnownNames,
}

/// Parses `text`. Returns `None` when the document cannot be read at all
/// (syntax error, not a mapping); the reason is in `problems`.
pub(crate) fn parse(text: &str, problems: &mut Problems) -> Option<Parsed> {
    let mut root: Value = match serde_yaml::from_str(text) {
        Ok(value) => value,
        Err(err) => {
            let message = strip_location(&err.to_string());
            let duplicates = problems.lines().duplicates().to_vec();
            if message.starts_with("duplicate entry") && !duplicates.is_empty() {
                for (path, line) in duplicates {
                    problems.push_at(Some(line), path, "duplicate key");
                }
            } else {
                problems.push_at(err.location().map(|l| l.line()), "", message);
            }
            return None;
        }
    };
    if let Err(err) = root.apply_merge() {
        problems.push("", format!("cannot apply merge key '<<': {err}"));
        return None;
    }
    match root {
        Value::Null => root = Value::Mapping(Mapping::new()),
        Value::Mapping(_) => {}
        _ => {
            problems.push(
                "",
                "the file must be a mapping of settings (service_name, server, backends, apis, ...)",
            );
            return None;
        }
    }
    normalize_keys(&mut root, "", problems);
    let names = known_names(&root);

    let mut poisoned = HashSet::new();
    let mut reported_unknown = HashSet::new();
    // Each round either succeeds or removes one value, so this terminates;
    // the bound is a guard only.
    for _ in 0..100_000 {
        let mut track = serde_path_to_error::Track::new();
        let mut unknown: Vec<Vec<Seg>> = Vec::new();
        let result: Result<RawConfig, _> = {
            let de = serde_path_to_error::Deserializer::new(&root, &mut track);
            serde_ignored::deserialize(de, |path| unknown.push(ignored_segs(&path)))
        };
        for segs in unknown {
            let path = format_path(&segs);
            if reported_unknown.insert(path.clone()) {
                problems.push(path, unknown_key_message(&segs));
            }
        }
        match result {
            Ok(raw) => {
                return Some(Parsed {
                    raw,
                    poisoned,
                    names,
                });
            }
            Err(err) => {
                let segs = tracked_segs(&track.path());
                problems.push(format_path(&segs), type_error_message(&err.to_string()));
                match cut(&mut root, &segs) {
                    Some(path) => {
                        poisoned.insert(path);
                    }
                    None => return None,
                }
            }
        }
    }
    None
}

/// serde_yaml appends " at line L column C" to located errors; the line is
/// reported separately.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Makes serde's wording about Rust types readable for YAML authors.
fn type_error_message(message: &str) -> String {
    // Errors from deserializing a `Value` carry no location suffix.
    let mut message = message.to_string();
    for rust in ["u64", "u32", "u16", "usize"] {
        let suffix = format!("expected {rust}");
        if message.ends_with(&suffix) {
            let keep = message.len() - suffix.len();
            message.truncate(keep);
            message.push_str("expected a non-negative integer");
        }
    }
    if let Some(at) = message.find("expected struct ") {
        message.truncate(at);
        message.push_str("expected a mapping");
    }
    message.replace("unit value", "null")
}

/// Rewrites every mapping key as a string (`1:` becomes `"1"`) and reports
/// keys that are not plain scalars.
fn normalize_keys(value: &mut Value, path: &str, problems: &mut Problems) {
    match value {
        Value::Mapping(mapping) => {
            let old = std::mem::take(mapping);
            for (key, mut child) in old {
                let key = match key {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        problems.push(path, "mapping keys must be plain strings");
                        continue;
                    }
                };
                let child_path = key_path(path, &key);
                if mapping.contains_key(key.as_str()) {
                    problems.push(child_path, "duplicate key");
                    continue;
                }
                normalize_keys(&mut child, &child_path, problems);
                mapping.insert(Value::String(key), child);
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                normalize_keys(item, &index_path(path, i), problems);
            }
        }
        Value::Tagged(tagged) => normalize_keys(&mut tagged.value, path, problems),
        _ => {}
    }
}

fn known_names(root: &Value) -> KnownNames {
    let names_in = |list: &str| -> HashSet<String> {
        let Some(Value::Sequence(items)) = root.get(list) else {
            return HashSet::new();
        };
        items
            .iter()
            .filter_map(|item| match item.get("name")? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect()
    };
    KnownNames {
        simulators: names_in("simulators"),
        backends: names_in("backends"),
        apis: names_in("apis"),
        pools: names_in("pools"),
    }
}

fn ignored_segs(path: &serde_ignored::Path<'_>) -> Vec<Seg> {
    fn walk(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push(Seg::Index(*index));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                out.push(Seg::Key(key.clone()));
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out)
            }
        }
    }
    let mut out = Vec::new();
    walk(path, &mut out);
    out
}

fn tracked_segs(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    let mut out = Vec::new();
    for seg in path {
        match seg {
            Segment::Seq { index } => out.push(Seg::Index(*index)),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out.push(Seg::Key(key.clone()))
            }
            Segment::Unknown => break,
        }
    }
    out
}

/// Removes the value at `segs` (a mapping entry is deleted, a sequence item
/// becomes null so later indices keep their meaning). If that changes
/// nothing, tries the parent. Returns the path of what was removed.
fn cut(root: &mut Value, segs: &[Seg]) -> Option<String> {
    for len in (1..=segs.len()).rev() {
        let (parent, last) = (&segs[..len - 1], &segs[len - 1]);
        let Some(container) = navigate(root, parent) else {
            continue;
        };
        let changed = match (container, last) {
            (Value::Mapping(m), Seg::Key(k)) => m.remove(k.as_str()).is_some(),
            (Value::Sequence(items), Seg::Index(i)) => match items.get_mut(*i) {
                Some(item) if !item.is_null() => {
                    *item = Value::Null;
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if changed {
            return Some(format_path(&segs[..len]));
        }
    }
    None
}

fn navigate<'v>(mut value: &'v mut Value, segs: &[Seg]) -> Option<&'v mut Value> {
    for seg in segs {
        if let Value::Tagged(tagged) = value {
            value = &mut tagged.value;
        }
        value = match (value, seg) {
            (Value::Mapping(m), Seg::Key(k)) => m.get_mut(k.as_str())?,
            (Value::Sequence(items), Seg::Index(i)) => items.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(value)
}

/// The shape of a path: indices become `[]`, simulator deployment names
/// become `*`, e.g. `apis[].policies[].rate_limit`.
fn shape_of(parent: &[Seg]) -> String {
    let mut shape = String::new();
    let mut prev_key: Option<&str> = None;
    for seg in parent {
        match seg {
            Seg::Index(_) => shape.push_str("[]"),
            Seg::Key(k) => {
                if !shape.is_empty() {
                    shape.push('.');
                }
                if prev_key == Some("deployments") {
                    shape.push('*');
                } else {
                    shape.push_str(k);
                }
            }
        }
        prev_key = match seg {
            Seg::Key(k) => Some(k),
            Seg::Index(_) => None,
        };
    }
    shape
}

/// Keys accepted by the mapping at `parent`, derived from the raw types.
fn expected_keys(parent: &[Seg]) -> &'static [&'static str] {
    match shape_of(parent).as_str() {
        "" => fields_of::<RawConfig>(),
        "server" => fields_of::<RawServer>(),
        "server.management" => fields_of::<RawManagement>(),
        "server.counters" => fields_of::<RawCounters>(),
        "backends[].auth" => fields_of::<RawBackendAuth>(),
        "backends[].auth.managed_identity" => fields_of::<RawManagedIdentity>(),
        "backends[].auth.workload_identity" => fields_of::<RawWorkloadIdentity>(),
        "backends[].auth.client_secret" => fields_of::<RawClientSecret>(),
        "backends[].auth.azure_cli" => fields_of::<RawAzureCli>(),
        "backends[].auth.client_secret.secret" => fields_of::<RawSecretFields>(),
        "apis[].policies[]" => fields_of::<RawPolicy>(),
        "apis[].policies[].validate_jwt" => fields_of::<RawValidateJwt>(),
        "apis[].policies[].rate_limit" | "apis[].policies[].quota" => fields_of::<RawCallLimit>(),
        "apis[].policies[].token_limit" => fields_of::<RawTokenLimit>(),
        "apis[].policies[].emit_token_metric" => fields_of::<RawEmitTokenMetric>(),
        "server.timeouts" | "backends[].timeouts" => fields_of::<RawTimeouts>(),
        "simulators[]" => fields_of::<RawSimulator>(),
        "simulators[].deployments.*" => fields_of::<RawSimDeployment>(),
        "backends[]" => fields_of::<RawBackend>(),
        "subscriptions[]" => fields_of::<RawSubscription>(),
        "apis[]" => fields_of::<RawApi>(),
        "apis[].subscription" => fields_of::<RawApiSubscription>(),
        "apis[].failover" => fields_of::<RawFailover>(),
        "backends[].circuit_breaker" => fields_of::<RawCircuitBreaker>(),
        "backends[].circuit_breaker.rules[]" => fields_of::<RawBreakerRule>(),
        "pools[]" => fields_of::<RawPool>(),
        "pools[].backends[]" => fields_of::<RawPoolMember>(),
        s if s.ends_with("api_key")
            || s.ends_with("primary_key")
            || s.ends_with("secondary_key") =>
        {
            fields_of::<RawSecretFields>()
        }
        _ => &[],
    }
}

fn unknown_key_message(segs: &[Seg]) -> String {
    let Some((Seg::Key(key), parent)) = segs.split_last() else {
        return "unknown key".to_string();
    };
    let expected = expected_keys(parent);
    if expected.is_empty() {
        if shape_of(parent) == "backends[].auth.azure_cli" {
            return format!(
                "unknown key '{key}' (azure_cli takes no settings; write azure_cli: {{}})"
            );
        }
        return format!("unknown key '{key}'");
    }
    let closest = expected
        .iter()
        .map(|candidate| (edit_distance(key, candidate), *candidate))
        .min();
    match closest {
        Some((distance, candidate)) if distance <= 2 || key.eq_ignore_ascii_case(candidate) => {
            format!("unknown key '{key}' (did you mean '{candidate}'?)")
        }
        _ => format!(
            "unknown key '{key}' (expected one of: {})",
            expected.join(", ")
        ),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn readable_type_errors() {
        assert_eq!(
            type_error_message("invalid type: string \"many\", expected u64"),
            "invalid type: string \"many\", expected a non-negative integer"
        );
        assert_eq!(
            type_error_message("invalid type: unit value, expected struct RawServer"),
            "invalid type: null, expected a mapping"
        );
        assert_eq!(strip_location("bad thing at line 3 column 4"), "bad thing");
    }

    #[test]
    fn unknown_key_hints() {
        let segs = vec![Seg::Key("server".into()), Seg::Key("listn".into())];
        assert_eq!(
            unknown_key_message(&segs),
            "unknown key 'listn' (did you mean 'listen'?)"
        );
        let segs = vec![
            Seg::Key("backends".into()),
            Seg::Index(2),
            Seg::Key("api_key".into()),
            Seg::Key("value".into()),
        ];
        assert_eq!(
            unknown_key_message(&segs),
            "unknown key 'value' (expected one of: env, file)"
        );
    }
}
