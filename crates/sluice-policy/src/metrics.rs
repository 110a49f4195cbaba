//! Token metrics (APIM's azure-openai-emit-token-metric) as Prometheus
//! counters: prompt, completion and total tokens, labelled by the dimensions
//! each API configures.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use sluice_config::Dimension;
use smallvec::SmallVec;

/// The value a client-driven label reports once it has seen its cap of
/// distinct values.
pub const OTHER: &str = "other";

/// The distinct combinations of client-driven label values a metric has
/// reported, up to a cap.
#[derive(Debug)]
struct SeenValues {
    cap: usize,
    /// Each combination is known by a keyed 64-bit hash of its values (a
    /// random key per process): nothing is joined or copied per request.
    /// Two combinations would have to collide for the cap to be passed, and
    /// then by one.
    hasher: RandomState,
    combinations: Mutex<HashSet<u64>>,
}

impl SeenValues {
    /// Whether this combination of values is known or has room.
    fn admit(&self, combination: &[&str]) -> bool {
        let key = self.hasher.hash_one(combination);
        let mut seen = self
            .combinations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&key) {
            return true;
        }
        if seen.len() < self.cap {
            seen.insert(key);
            return true;
        }
        false
    }
}

/// Whether a dimension's values come from the client (a header, the
/// address, the caller's identity, the deployment named in the path) and
/// so must be bounded. Subscription, API, backend and region names come
/// from the config or the backends.
pub fn client_driven(d: &Dimension) -> bool {
    matches!(
        d,
        Dimension::Header(_) | Dimension::ClientIp | Dimension::Identity | Dimension::Deployment
    )
}

/// The three token counters. Their label set is the union of every API's
/// dimensions (Prometheus needs one label set per metric name); an API that
/// does not use a dimension leaves that label empty.
///
/// The labels whose values come from the client keep at most
/// `max_label_values` distinct combinations of values; a new combination
/// beyond that has every client-driven label reported as `other`. So however
/// many client-driven labels a metric has, it holds at most that many series
/// per combination of the other labels (which come from the config), and a
/// client cannot grow the registry (or the `/metrics` page) without bound.
#[derive(Debug, Clone)]
pub struct TokenMetrics {
    labels: Vec<Dimension>,
    /// Positions of the client-driven labels in `labels`.
    client_driven: Arc<[usize]>,
    /// The combinations of their values seen so far.
    seen: Arc<SeenValues>,
    prompt: IntCounterVec,
    completion: IntCounterVec,
    total: IntCounterVec,
    /// The three counters of each label set recorded so far, found by a
    /// hash of the values: a response's tokens are added without building
    /// the labels again or looking them up three times in the vectors.
    /// Bounded like the series themselves.
    handles: Arc<Handles>,
}

/// One label set's values and its prompt, completion and total counters.
type LabelSet = (Box<[Box<str>]>, [IntCounter; 3]);

/// Counter handles by label values (see [`TokenMetrics`]).
#[derive(Debug, Default)]
struct Handles {
    hasher: RandomState,
    by_hash: Mutex<HashMap<u64, Vec<LabelSet>>>,
}

impl TokenMetrics {
    /// Register the counters in `registry` with labels for `dimensions`
    /// (duplicates are ignored; order is kept). Client-driven labels keep at
    /// most `max_label_values` distinct values.
    pub fn new(
        registry: &Registry,
        dimensions: &[Dimension],
        max_label_values: usize,
    ) -> prometheus::Result<Self> {
        // One label per name: two header dimensions can map to the same label
        // name on different APIs (`x-a` and `x_a`); the first one names it.
        let mut labels: Vec<Dimension> = Vec::new();
        for d in dimensions {
            if !labels.iter().any(|l| l.label() == d.label()) {
                labels.push(d.clone());
            }
        }
        let names: Vec<String> = labels.iter().map(Dimension::label).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let make = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &names)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let client_driven_at: Arc<[usize]> = labels
            .iter()
            .enumerate()
            .filter(|(_, d)| client_driven(d))
            .map(|(i, _)| i)
            .collect();
        Ok(TokenMetrics {
            client_driven: client_driven_at,
            seen: Arc::new(SeenValues {
                cap: max_label_values,
                hasher: RandomState::new(),
                combinations: Mutex::new(HashSet::new()),
            }),
            prompt: make(
                "sluice_prompt_tokens_total",
                "Prompt tokens of responses that passed the gateway (reported by the backend, or estimated for streams without usage).",
            )?,
            completion: make(
                "sluice_completion_tokens_total",
                "Completion tokens of responses that passed the gateway (reported, or counted from the streamed content).",
            )?,
            total: make(
                "sluice_tokens_total",
                "Total (prompt + completion) tokens of responses that passed the gateway.",
            )?,
            labels,
            handles: Arc::default(),
        })
    }

    /// The label order; values passed to [`TokenMetrics::record`] follow it.
    pub fn labels(&self) -> &[Dimension] {
        &self.labels
    }

    /// Add one response's tokens. `value` gives each label's value (`None`:
    /// the API does not use that dimension, recorded as an empty label).
    pub fn record<'a>(
        &self,
        value: impl Fn(&Dimension) -> Option<Cow<'a, str>>,
        prompt: u64,
        completion: u64,
        total: u64,
    ) {
        let owned: SmallVec<[Cow<'a, str>; 8]> = self
            .labels
            .iter()
            .map(|d| value(d).unwrap_or_default())
            .collect();
        let mut values: SmallVec<[&str; 8]> = owned.iter().map(|v| &**v).collect();
        if !self.client_driven.is_empty() {
            let combination: SmallVec<[&str; 8]> =
                self.client_driven.iter().map(|&i| values[i]).collect();
            if !self.seen.admit(&combination) {
                for &i in self.client_driven.iter() {
                    values[i] = OTHER;
                }
            }
        }
        let Some([p, c, t]) = self.counters(&values) else {
            return;
        };
        p.inc_by(prompt);
        c.inc_by(completion);
        t.inc_by(total);
    }

    /// The prompt, completion and total counters of one label set.
    fn counters(&self, values: &[&str]) -> Option<[IntCounter; 3]> {
        let hash = self.handles.hasher.hash_one(values);
        let mut by_hash = self
            .handles
            .by_hash
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let same = by_hash.entry(hash).or_default();
        if let Some(found) = find_handles(same, values) {
            return Some(found.clone());
        }
        let made = [
            self.prompt.get_metric_with_label_values(values).ok()?,
            self.completion.get_metric_with_label_values(values).ok()?,
            self.total.get_metric_with_label_values(values).ok()?,
        ];
        same.push((values.iter().map(|&v| Box::from(v)).collect(), made.clone()));
        Some(made)
    }
}

/// The counters among `same` (label sets whose values hashed alike) whose
/// values are `values`.
fn find_handles<'h>(same: &'h [LabelSet], values: &[&str]) -> Option<&'h [IntCounter; 3]> {
    same.iter()
        .find(|(labels, _)| labels.iter().map(|l| &**l).eq(values.iter().copied()))
        .map(|(_, counters)| counters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Encoder;

    #[test]
    fn counters_carry_the_union_of_dimensions() {
        let r = Registry::new();
        let m = TokenMetrics::new(
            &r,
            &[
                Dimension::Subscription,
                Dimension::Api,
                Dimension::Subscription,
            ],
            10,
        )
        .unwrap();
        assert_eq!(m.labels().len(), 2);
        m.record(
            |d| match d {
                Dimension::Subscription => Some("team-a".into()),
                _ => None,
            },
            10,
            5,
            15,
        );
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(r#"sluice_prompt_tokens_total{api="",subscription="team-a"} 10"#),
            "{text}"
        );
        assert!(text.contains(r#"sluice_completion_tokens_total{api="",subscription="team-a"} 5"#));
        assert!(text.contains(r#"sluice_tokens_total{api="",subscription="team-a"} 15"#));
    }

    fn text(r: &Registry) -> String {
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&r.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn client_driven_labels_keep_a_bounded_set_of_values() {
        let r = Registry::new();
        let team = Dimension::Header(http::HeaderName::from_static("x-team"));
        let m = TokenMetrics::new(&r, &[Dimension::Subscription, team.clone()], 2).unwrap();
        let record = |sub: &str, t: &str| {
            m.record(
                |d| match d {
                    Dimension::Subscription => Some(sub.to_string().into()),
                    _ => Some(t.to_string().into()),
                },
                1,
                1,
                2,
            )
        };
        record("s", "red");
        record("s", "blue");
        record("s", "green");
        record("s", "white");
        record("s", "red");
        // Subscriptions come from the config: never folded.
        for i in 0..5 {
            record(&format!("sub-{i}"), "red");
        }
        let t = text(&r);
        assert!(
            t.contains(r#"sluice_tokens_total{header_x_team="red",subscription="s"} 4"#),
            "{t}"
        );
        assert!(
            t.contains(r#"sluice_tokens_total{header_x_team="blue",subscription="s"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"sluice_tokens_total{header_x_team="other",subscription="s"} 4"#),
            "{t}"
        );
        assert!(!t.contains("green") && !t.contains("white"), "{t}");
        assert!(
            t.contains(r#"sluice_tokens_total{header_x_team="red",subscription="sub-4"} 2"#),
            "{t}"
        );
    }

    #[test]
    fn handles_are_found_by_every_value_of_the_label_set() {
        let counter = |n: &str| IntCounter::new(n, "h").unwrap();
        let set = |a: &str, b: &str| -> Box<[Box<str>]> { vec![a.into(), b.into()].into() };
        let same = vec![
            (
                set("a", "b"),
                [counter("ab1"), counter("ab2"), counter("ab3")],
            ),
            (
                set("a", "c"),
                [counter("ac1"), counter("ac2"), counter("ac3")],
            ),
        ];
        same[0].1[0].inc_by(1);
        same[1].1[0].inc_by(2);
        let name = |v: &[&str]| find_handles(&same, v).map(|c| c[0].get());
        assert_eq!(name(&["a", "b"]), Some(1));
        assert_eq!(name(&["a", "c"]), Some(2));
        assert_eq!(name(&["a", "d"]), None);
        assert_eq!(name(&["a"]), None);
        assert_eq!(name(&["a", "b", "c"]), None);
    }

    #[test]
    fn one_label_set_is_one_series_however_often_it_is_recorded() {
        let r = Registry::new();
        let m = TokenMetrics::new(&r, &[Dimension::Api, Dimension::Backend], 10).unwrap();
        for (api, backend) in [
            ("x", "b1"),
            ("x", "b2"),
            ("x", "b1"),
            ("y", "b1"),
            ("x", "b1"),
        ] {
            m.record(
                |d| match d {
                    Dimension::Api => Some(api.into()),
                    _ => Some(backend.into()),
                },
                1,
                2,
                3,
            );
        }
        let t = text(&r);
        assert!(
            t.contains(r#"sluice_tokens_total{api="x",backend="b1"} 9"#),
            "{t}"
        );
        assert!(
            t.contains(r#"sluice_prompt_tokens_total{api="x",backend="b2"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"sluice_completion_tokens_total{api="y",backend="b1"} 2"#),
            "{t}"
        );
        assert_eq!(
            m.handles
                .by_hash
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>(),
            3
        );
    }

    #[test]
    fn which_dimensions_are_client_driven() {
        assert!(client_driven(&Dimension::ClientIp));
        assert!(client_driven(&Dimension::Identity));
        assert!(client_driven(&Dimension::Deployment));
        assert!(client_driven(&Dimension::Header(
            http::HeaderName::from_static("x")
        )));
        assert!(!client_driven(&Dimension::Subscription));
        assert!(!client_driven(&Dimension::Api));
        assert!(!client_driven(&Dimension::Backend));
        assert!(!client_driven(&Dimension::BackendRegion));
    }

    #[test]
    fn combinations_of_client_driven_labels_are_bounded_together() {
        let r = Registry::new();
        let team = Dimension::Header(http::HeaderName::from_static("x-team"));
        let m = TokenMetrics::new(&r, &[team, Dimension::ClientIp, Dimension::Api], 3).unwrap();
        for t in 0..10 {
            for ip in 0..10 {
                m.record(
                    |d| match d {
                        Dimension::Api => Some("api".into()),
                        Dimension::ClientIp => Some(format!("10.0.0.{ip}").into()),
                        _ => Some(format!("t{t}").into()),
                    },
                    1,
                    1,
                    2,
                );
            }
        }
        let t = text(&r);
        let series = t
            .lines()
            .filter(|l| l.starts_with("sluice_tokens_total{"))
            .count();
        // Three combinations, then one `other` series: not 100, not 3 x 3.
        assert_eq!(series, 4, "{t}");
        assert!(
            t.contains(
                r#"sluice_tokens_total{api="api",client_ip="other",header_x_team="other"} 194"#
            ),
            "{t}"
        );
    }
}
