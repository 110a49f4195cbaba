//! `GET /models` (`{api}/v1/models` and `{api}/models?api-version=...`),
//! answered by the gateway from its configuration: the deployments the API
//! routes, as OpenAI's model list. A backend's own list would name its
//! deployments under its own names and leave out the other regions'.

use bytes::Bytes;
use serde_json::json;

/// One API's model list, built once at start.
#[derive(Debug, Clone)]
pub struct ModelList {
    names: Vec<String>,
    /// When the gateway started (Unix seconds): every model's `created`.
    created: u64,
}

/// What a `GET` on a models path asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelsCall<'a> {
    List,
    One(&'a str),
}

/// Whether `rest` (the path after the API's prefix) is a models path:
/// `/models`, `/v1/models`, or either followed by `/{name}` (a trailing
/// slash is allowed).
pub fn models_call(rest: &str) -> Option<ModelsCall<'_>> {
    let rest = rest.strip_prefix("/v1").unwrap_or(rest);
    let after = rest.strip_prefix("/models")?;
    let after = after.strip_suffix('/').unwrap_or(after);
    if after.is_empty() {
        return Some(ModelsCall::List);
    }
    let name = after.strip_prefix('/')?;
    (!name.is_empty() && !name.contains('/')).then_some(ModelsCall::One(name))
}

impl ModelList {
    pub fn new(names: Vec<String>, created: u64) -> Self {
        ModelList { names, created }
    }

    fn entry(&self, name: &str) -> serde_json::Value {
        json!({
            "id": name,
            "object": "model",
            "created": self.created,
            "created_at": self.created,
            "owned_by": "system",
            "status": "succeeded",
        })
    }

    /// The answer's status and JSON body. A name is percent-decoded before
    /// it is looked up.
    pub fn answer(&self, call: ModelsCall<'_>) -> (u16, Bytes) {
        let value = match call {
            ModelsCall::List => json!({
                "object": "list",
                "data": self.names.iter().map(|n| self.entry(n)).collect::<Vec<_>>(),
            }),
            ModelsCall::One(raw) => {
                let name = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
                match self.names.iter().find(|n| **n == name) {
                    Some(n) => self.entry(n),
                    None => {
                        let body = json!({"error": {
                            "code": "DeploymentNotFound",
                            "message": format!("The API routes no deployment named '{name}'."),
                        }});
                        return (404, Bytes::from(body.to_string()));
                    }
                }
            }
        };
        (200, Bytes::from(value.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_paths() {
        assert_eq!(models_call("/v1/models"), Some(ModelsCall::List));
        assert_eq!(models_call("/models"), Some(ModelsCall::List));
        assert_eq!(models_call("/models/"), Some(ModelsCall::List));
        assert_eq!(
            models_call("/v1/models/gpt-4o"),
            Some(ModelsCall::One("gpt-4o"))
        );
        assert_eq!(
            models_call("/models/gpt-4o/"),
            Some(ModelsCall::One("gpt-4o"))
        );
        for other in [
            "/v1/modelsx",
            "/v1/models/a/b",
            "/v2/models",
            "/deployments/d/models",
            "/v1/chat/completions",
            "",
        ] {
            assert_eq!(models_call(other), None, "{other}");
        }
    }

    #[test]
    fn answers_the_list_and_each_name() {
        let list = ModelList::new(vec!["gpt-4o".into(), "my model".into()], 1_700_000_000);
        let (status, body) = list.answer(ModelsCall::List);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][0]["id"], "gpt-4o");
        assert_eq!(v["data"][1]["id"], "my model");
        assert_eq!(v["data"][0]["object"], "model");
        assert_eq!(v["data"][0]["created"], 1_700_000_000);
        let (status, body) = list.answer(ModelsCall::One("my%20model"));
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "my model");
        let (status, body) = list.answer(ModelsCall::One("nope"));
        assert_eq!(status, 404);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "DeploymentNotFound");
        let empty = ModelList::new(vec![], 1);
        let (_, body) = empty.answer(ModelsCall::List);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"], serde_json::json!([]));
    }
}
