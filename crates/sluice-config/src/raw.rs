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
    pub apis: Option<Vec<Option<RawApi>>>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RawServer {
    pub listen: Option<String>,
    pub threads: Option<u64>,
    pub max_request_body_bytes: Option<u64>,
    pub timeouts: Option<RawTimeouts>,
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
}

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
    pub max_request_body_bytes: Option<u64>,
    pub subscription: Option<RawApiSubscription>,
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
        assert_eq!(fields_of::<RawSecretFields>(), &["env", "file"]);
        assert_eq!(fields_of::<RawConfig>().len(), 6);
    }
}
