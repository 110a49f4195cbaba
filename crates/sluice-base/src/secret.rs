//! A string that must never be printed.

use std::fmt;
use std::sync::Arc;

/// A key, token or password: subscription and backend API keys, client secrets, Entra ID bearer tokens.
///
/// `Debug` and `Display` print `<redacted>`, so a struct holding one can derive `Debug`; the value is only reachable
/// through [`Secret::expose`]. Cloning is cheap (the value is shared behind an [`Arc`]), so a backend's token can be
/// handed to every request. Deliberately not `Serialize` and not `PartialEq`: compare keys in constant time where it
/// matters.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The secret value. Use only where the value is actually needed.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::new(value)
    }
}

impl From<Arc<str>> for Secret {
    fn from(value: Arc<str>) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;
    use std::sync::Arc;

    #[test]
    fn never_prints_value() {
        let s = Secret::new("sk-sentinel-123");
        assert_eq!(format!("{s:?}"), "<redacted>");
        assert_eq!(format!("{s}"), "<redacted>");
        assert_eq!(format!("{s:>20}"), "<redacted>");
        assert_eq!(
            format!("{:#?}", Some(s.clone())),
            "Some(\n    <redacted>,\n)"
        );
        assert_eq!(s.expose(), "sk-sentinel-123");
    }

    #[test]
    fn a_struct_deriving_debug_prints_it_redacted() {
        #[derive(Debug)]
        #[allow(dead_code)]
        struct Backend {
            name: &'static str,
            api_key: Secret,
        }
        let b = Backend {
            name: "eastus",
            api_key: "sk-sentinel-456".into(),
        };
        let printed = format!("{b:?} {b:#?}");
        assert!(!printed.contains("sentinel"), "{printed}");
        assert!(printed.contains("api_key: <redacted>"), "{printed}");
        assert!(printed.contains("eastus"), "{printed}");
    }

    #[test]
    fn every_constructor_keeps_the_value_and_clones_share_it() {
        let shared: Arc<str> = Arc::from("from-arc");
        let from_arc = Secret::from(shared.clone());
        assert!(Arc::ptr_eq(&from_arc.0, &shared), "no copy of the value");
        assert_eq!(Secret::from("from-str").expose(), "from-str");
        assert_eq!(
            Secret::from(String::from("from-string")).expose(),
            "from-string"
        );
        assert_eq!(Secret::new(String::from("new")).expose(), "new");
        let copy = from_arc.clone();
        assert!(
            Arc::ptr_eq(&copy.0, &from_arc.0),
            "a clone shares the value"
        );
        assert_eq!(Secret::new("").expose(), "");
    }
}
