//! The file schema as written, before validation. Every field is optional so
//! that missing required keys are reported by validation (all at once) rather
//! than by serde (one at a time); list entries are optional so a broken entry
//! can be blanked out without shifting the indices of the others.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawConfig {
    pub service_name: Option<String>,
    pub server: Option<RawServer>,
    pub simulators: Option<Vec<Option<RawSimulator>>>,
    pub backends: Option<Vec<Option<RawBackend>>>,
    pub subscriptions: Option<Vec<Option<RawSubscription>>>,
    pub pools: Option<Vec<Option<RawPool>>>,
    pub apis: Option<Vec<Option<RawApi>>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawServer {
    pub listen: Option<String>,
    pub threads: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub timeouts: Option<RawTimeouts>,
    #[serde(default, deserialize_with = "present")]
    pub management: Option<RawManagement>,
    pub trusted_proxies: Option<Vec<Option<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub counters: Option<RawCounters>,
    #[serde(default, deserialize_with = "present")]
    pub affinity: Option<RawAffinity>,
    pub shutdown_timeout_seconds: Option<u64>,
    pub body_buffer_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawManagement {
    pub listen: Option<String>,
    pub max_label_values: Option<u64>,
    pub operator_tokens: Option<Vec<Option<RawSecret>>>,
    pub debug_signing_key: Option<RawSecret>,
    #[serde(default, deserialize_with = "present")]
    pub entra_id: Option<RawValidateJwt>,
    #[serde(default, deserialize_with = "present")]
    pub tracing: Option<RawTracing>,
}

/// `server.management.tracing`: the trace store and the request summaries.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTracing {
    pub max_traces: Option<u64>,
    pub max_bytes: Option<u64>,
    pub ttl_seconds: Option<u64>,
    pub body_bytes: Option<u64>,
    pub redact_headers: Option<Vec<Option<String>>>,
    pub summaries: Option<u64>,
}

/// `server.affinity`: which backend owns each object clients created.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAffinity {
    pub max_ids: Option<u64>,
    pub ttl_seconds: Option<u64>,
}

/// `server.counters`: the in-memory counter store.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawCounters {
    pub max_keys: Option<u64>,
    pub purge_interval_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTimeouts {
    pub connect_ms: Option<u64>,
    pub read_ms: Option<u64>,
    pub write_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSimulator {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub region: Option<String>,
    pub api_key: Option<RawSecret>,
    pub time_to_first_token_ms: Option<u64>,
    pub per_token_ms: Option<u64>,
    pub embeddings_ms: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub embedding_dimensions: Option<u64>,
    pub deployments: Option<BTreeMap<String, Option<RawSimDeployment>>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSimDeployment {
    pub model: Option<String>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawBackend {
    pub name: Option<String>,
    pub url: Option<String>,
    pub simulator: Option<String>,
    pub api_key: Option<RawSecret>,
    pub deployments: Option<BTreeMap<String, String>>,
    pub timeouts: Option<RawTimeouts>,
    #[serde(default, deserialize_with = "present")]
    pub auth: Option<RawBackendAuth>,
    pub region: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub circuit_breaker: Option<RawCircuitBreaker>,
}

/// `backends[].circuit_breaker`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawCircuitBreaker {
    pub rules: Option<Vec<Option<RawBreakerRule>>>,
}

/// One `backends[].circuit_breaker.rules` entry.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawBreakerRule {
    pub name: Option<String>,
    pub status_codes: Option<Vec<Option<RawStatusRange>>>,
    pub errors: Option<Vec<Option<String>>>,
    pub count: Option<u64>,
    pub interval_seconds: Option<u64>,
    pub trip_duration_seconds: Option<u64>,
    pub accept_retry_after: Option<bool>,
    pub max_retry_after_seconds: Option<u64>,
}

/// A status code (`429`) or an inclusive range written as text (`500-599`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawStatusRange {
    Code(u64),
    Text(String),
}

/// `pools[]`: backends grouped by priority, weighted within a group.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawPool {
    pub name: Option<String>,
    pub backends: Option<Vec<Option<RawPoolMember>>>,
    pub steering: Option<bool>,
    pub headroom_max_age_seconds: Option<u64>,
}

/// `pools[].backends[]`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawPoolMember {
    pub backend: Option<String>,
    pub priority: Option<u64>,
    pub weight: Option<u64>,
}

/// `apis[].failover`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawFailover {
    pub max_attempts: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub when_exhausted: Option<u64>,
}

/// `backends[].auth`: one credential key plus an optional scope. The
/// credential keys may be written without a value (`azure_cli:`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawBackendAuth {
    #[serde(default, deserialize_with = "present")]
    pub managed_identity: Option<RawManagedIdentity>,
    #[serde(default, deserialize_with = "present")]
    pub workload_identity: Option<RawWorkloadIdentity>,
    #[serde(default, deserialize_with = "present")]
    pub client_secret: Option<RawClientSecret>,
    #[serde(default, deserialize_with = "present")]
    pub azure_cli: Option<RawAzureCli>,
    pub scope: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawManagedIdentity {
    pub client_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawWorkloadIdentity {
    pub client_id: Option<String>,
    pub tenant_id: Option<String>,
    pub token_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawClientSecret {
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub secret: Option<RawSecret>,
    pub authority_host: Option<String>,
}

/// `azure_cli: {}` takes no settings; any key inside is unknown.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawAzureCli {}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawSubscription {
    pub name: Option<String>,
    pub primary_key: Option<RawSecret>,
    pub secondary_key: Option<RawSecret>,
    pub state: Option<String>,
    pub apis: Option<Vec<Option<String>>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawApi {
    pub name: Option<String>,
    pub path: Option<String>,
    pub backends: Option<Vec<Option<String>>>,
    pub pool: Option<String>,
    pub deployment_pools: Option<BTreeMap<String, String>>,
    pub models: Option<Vec<Option<String>>>,
    #[serde(default, deserialize_with = "present")]
    pub failover: Option<RawFailover>,
    pub max_request_body_bytes: Option<u64>,
    pub websocket_idle_seconds: Option<u64>,
    pub subscription: Option<RawApiSubscription>,
    pub auth: Option<String>,
    pub policies: Option<Vec<Option<RawPolicy>>>,
}

/// One `apis[].policies` entry: a mapping that should hold exactly one of
/// these keys (checked by validation, so that an entry with two or none is
/// reported at the entry's own path).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawPolicy {
    #[serde(default, deserialize_with = "present")]
    pub validate_jwt: Option<RawValidateJwt>,
    #[serde(default, deserialize_with = "present")]
    pub rate_limit: Option<RawCallLimit>,
    #[serde(default, deserialize_with = "present")]
    pub quota: Option<RawCallLimit>,
    #[serde(default, deserialize_with = "present")]
    pub token_limit: Option<RawTokenLimit>,
    #[serde(default, deserialize_with = "present")]
    pub emit_token_metric: Option<RawEmitTokenMetric>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawValidateJwt {
    pub openid_config_url: Option<String>,
    pub jwks_url: Option<String>,
    pub issuers: Option<Vec<Option<String>>>,
    pub audiences: Option<Vec<Option<String>>>,
    pub client_application_ids: Option<Vec<Option<String>>>,
    pub required_roles: Option<Vec<Option<String>>>,
    pub clock_skew_seconds: Option<u64>,
}

/// `rate_limit` and `quota`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawCallLimit {
    pub calls: Option<u64>,
    pub renewal_period_seconds: Option<u64>,
    pub counter_key: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawTokenLimit {
    pub counter_key: Option<String>,
    pub tokens_per_minute: Option<u64>,
    pub token_quota: Option<u64>,
    pub token_quota_period: Option<String>,
    pub estimate_prompt_tokens: Option<bool>,
    pub default_completion_tokens: Option<u64>,
    pub retry_after_header_name: Option<String>,
    pub remaining_tokens_header_name: Option<String>,
    pub remaining_quota_tokens_header_name: Option<String>,
    pub tokens_consumed_header_name: Option<String>,
    /// The 2024 spelling of `tokens_consumed_header_name`.
    pub consumed_tokens_header_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawEmitTokenMetric {
    pub dimensions: Option<Vec<Option<String>>>,
}

/// For mappings whose key alone means something (`azure_cli:`,
/// `emit_token_metric:`): a present key with a null value deserializes to the
/// default settings instead of `None`. Used with `#[serde(default)]`, so an
/// absent key is still `None`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Some(
        Option::<T>::deserialize(deserializer)?.unwrap_or_default(),
    ))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawApiSubscription {
    pub required: Option<bool>,
    pub header_names: Option<Vec<Option<String>>>,
    pub query_name: Option<String>,
}

/// `{env: NAME}` or `{file: PATH}`. Both/neither is left to validation.
#[derive(Debug, Default)]
pub(crate) struct RawSecret {
    pub env: Option<String>,
    pub file: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct RawSecretFields {
    env: Option<String>,
    file: Option<String>,
}

pub(crate) const SECRET_SHAPE: &str =
    "a secret must be a mapping {env: VARIABLE} or {file: PATH}, not a plain value";

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SecretVisitor)
    }
}

struct SecretVisitor;

// Every non-mapping input is refused with the same message, which never
// repeats the value: a plain value here is most likely the secret itself.
impl<'de> Visitor<'de> for SecretVisitor {
    type Value = RawSecret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping {env: VARIABLE} or {file: PATH}")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSecret, A::Error> {
        let fields = RawSecretFields::deserialize(de::value::MapAccessDeserializer::new(map))?;
        Ok(RawSecret {
            env: fields.env,
            file: fields.file,
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<RawSecret, E> {
        Err(E::custom(SECRET_SHAPE))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<RawSecret, A::Error> {
        Err(de::Error::custom(SECRET_SHAPE))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<RawSecret, A::Error> {
        Err(de::Error::custom(SECRET_SHAPE))
    }
}

/// The field names serde expects for `T`, captured from its derived
/// `Deserialize` impl so the unknown-key hints cannot drift from the schema.
pub(crate) fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    match T::deserialize(FieldCapture) {
        Err(Captured(Some(fields))) => fields,
        _ => &[],
    }
}

struct FieldCapture;

#[derive(Debug)]
struct Captured(Option<&'static [&'static str]>);

impl fmt::Display for Captured {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("field capture")
    }
}

impl std::error::Error for Captured {}

impl de::Error for Captured {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Captured(None)
    }
}

impl<'de> Deserializer<'de> for FieldCapture {
    type Error = Captured;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Captured> {
        Err(Captured(None))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Captured> {
        Err(Captured(Some(fields)))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_field_names() {
        assert_eq!(
            fields_of::<RawTimeouts>(),
            &["connect_ms", "read_ms", "write_ms"]
        );
        assert_eq!(
            fields_of::<RawCounters>(),
            &["max_keys", "purge_interval_seconds"]
        );
        assert_eq!(fields_of::<RawSecretFields>(), &["env", "file"]);
        assert_eq!(fields_of::<RawConfig>().len(), 7);
        assert_eq!(
            fields_of::<RawPolicy>(),
            &[
                "validate_jwt",
                "rate_limit",
                "quota",
                "token_limit",
                "emit_token_metric"
            ]
        );
        assert!(fields_of::<RawAzureCli>().is_empty());
    }
}
