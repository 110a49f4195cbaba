//! Token metrics (APIM's azure-openai-emit-token-metric) as Prometheus
//! counters: prompt, completion and total tokens, labelled by the dimensions
//! each API configures.

use prometheus::{IntCounterVec, Opts, Registry};
use sluice_config::Dimension;

/// The three token counters. Their label set is the union of every API's
/// dimensions (Prometheus needs one label set per metric name); an API that
/// does not use a dimension leaves that label empty.
#[derive(Debug, Clone)]
pub struct TokenMetrics {
    labels: Vec<Dimension>,
    prompt: IntCounterVec,
    completion: IntCounterVec,
    total: IntCounterVec,
}

impl TokenMetrics {
    /// Register the counters in `registry` with labels for `dimensions`
    /// (duplicates are ignored; order is kept).
    pub fn new(registry: &Registry, dimensions: &[Dimension]) -> prometheus::Result<Self> {
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
        Ok(TokenMetrics {
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
        })
    }

    /// The label order; values passed to [`TokenMetrics::record`] follow it.
    pub fn labels(&self) -> &[Dimension] {
        &self.labels
    }

    /// Add one response's tokens. `value` gives each label's value (`None`:
    /// the API does not use that dimension, recorded as an empty label).
    pub fn record(
        &self,
        value: impl Fn(&Dimension) -> Option<String>,
        prompt: u64,
        completion: u64,
        total: u64,
    ) {
        let values: Vec<String> = self
            .labels
            .iter()
            .map(|d| value(d).unwrap_or_default())
            .collect();

        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        if let Ok(c) = self.prompt.get_metric_with_label_values(&values) {
            c.inc_by(prompt);
        }
        if let Ok(c) = self.completion.get_metric_with_label_values(&values) {
            c.inc_by(completion);
        }
        if let Ok(c) = self.total.get_metric_with_label_values(&values) {
            c.inc_by(total);
        }
    }
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
}
