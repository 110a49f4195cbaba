//! Who the caller is, from a valid token.

use serde_json::{Map, Value};

/// Who the caller is, from a token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `sub`: the principal the token is about.
    pub subject: Option<String>,
    /// `appid` (v1 tokens) or, without it, `azp` (v2 tokens): the client application.
    pub app_id: Option<String>,
    /// `oid`: the principal's object id in the tenant.
    pub object_id: Option<String>,
    /// `tid`: the tenant id.
    pub tenant_id: Option<String>,
    /// Every claim of the token, for limits keyed by a claim (`claim:NAME`).
    pub claims: Map<String, Value>,
}

impl Caller {
    /// Builds a caller from verified claims.
    pub(crate) fn from_claims(claims: Map<String, Value>) -> Self {
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_owned);
        Caller {
            subject: text("sub"),
            app_id: text("appid").or_else(|| text("azp")),
            object_id: text("oid"),
            tenant_id: text("tid"),
            claims,
        }
    }

    /// The identity limits and metrics key on: the client application, else the subject.
    pub fn identity(&self) -> Option<&str> {
        self.app_id.as_deref().or(self.subject.as_deref())
    }

    /// A claim as text: a string as is, a number or a boolean written out; `None` when the claim is absent or is
    /// an array, an object or null.
    pub fn claim_str(&self, name: &str) -> Option<String> {
        match self.claims.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Null | Value::Array(_) | Value::Object(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn caller(v: Value) -> Caller {
        match v {
            Value::Object(m) => Caller::from_claims(m),
            _ => unreachable!("test claims are an object"),
        }
    }

    #[test]
    fn v1_token_uses_appid() {
        let c = caller(json!({"sub": "s", "appid": "app1", "azp": "app2", "oid": "o", "tid": "t"}));
        assert_eq!(c.app_id.as_deref(), Some("app1"));
        assert_eq!(c.subject.as_deref(), Some("s"));
        assert_eq!(c.object_id.as_deref(), Some("o"));
        assert_eq!(c.tenant_id.as_deref(), Some("t"));
        assert_eq!(c.identity(), Some("app1"));
    }

    #[test]
    fn v2_token_uses_azp_and_identity_falls_back_to_subject() {
        let c = caller(json!({"sub": "s", "azp": "app2"}));
        assert_eq!(c.app_id.as_deref(), Some("app2"));
        let c = caller(json!({"sub": "s"}));
        assert_eq!(c.identity(), Some("s"));
        let c = caller(json!({"appid": 5}));
        assert_eq!(c.app_id, None);
        assert_eq!(c.identity(), None);
    }

    #[test]
    fn claim_str_writes_scalars_and_skips_the_rest() {
        let c =
            caller(json!({"s": "x", "n": 42, "f": 1.5, "b": true, "a": ["x"], "o": {}, "z": null}));
        assert_eq!(c.claim_str("s").as_deref(), Some("x"));
        assert_eq!(c.claim_str("n").as_deref(), Some("42"));
        assert_eq!(c.claim_str("f").as_deref(), Some("1.5"));
        assert_eq!(c.claim_str("b").as_deref(), Some("true"));
        assert_eq!(c.claim_str("a"), None);
        assert_eq!(c.claim_str("o"), None);
        assert_eq!(c.claim_str("z"), None);
        assert_eq!(c.claim_str("missing"), None);
    }
}
