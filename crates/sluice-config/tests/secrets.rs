//! Secret handling: resolution problems and never leaking values.

use std::path::Path;

use sluice_config::{ConfigErrors, Secret, load_str_with_env};

const SENTINEL: &str = "sk-SENTINEL-7f3a9c";

fn errors_with(text: &str, env: &dyn Fn(&str) -> Option<String>, base: &Path) -> ConfigErrors {
    load_str_with_env(text, "gateway.yaml", base, env).expect_err("expected problems")
}

#[test]
fn secret_debug_and_display_are_redacted() {
    let secret = Secret::new(SENTINEL.to_string());
    assert!(!format!("{secret:?}").contains("SENTINEL"));
    assert!(!format!("{secret}").contains("SENTINEL"));
    assert_eq!(secret.expose(), SENTINEL);
}

#[test]
fn missing_secrets_are_named_and_values_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.key"), format!("{SENTINEL}-file\n")).unwrap();
    std::fs::write(dir.path().join("empty.key"), "  \n").unwrap();
    let text = "\
backends:
  - name: b
    url: https://b.example
    api_key: {env: SECRETS_TEST_GOOD}
  - name: c
    url: https://c.example
    api_key: {env: SECRETS_TEST_MISSING}
  - name: d
    url: https://d.example
    api_key: {file: missing.key}
  - name: e
    url: https://e.example
    api_key: {file: empty.key}
  - name: f
    url: https://f.example
    api_key: sk-SENTINEL-7f3a9c-plain
  - name: g
    url: https://g.example
    api_key: {env: SECRETS_TEST_GOOD, file: good.key}
  - name: h
    url: https://h.example
    api_key: {}
subscriptions:
  - name: s1
    primary_key: {file: good.key}
  - name: s2
    primary_key: {env: SECRETS_TEST_GOOD}
    secondary_key: {file: good.key}
apis:
  - {name: a, path: /openai, backends: [b, nope]}
";
    let env = |name: &str| (name == "SECRETS_TEST_GOOD").then(|| SENTINEL.to_string());
    let errors = errors_with(text, &env, dir.path());
    let out = errors.to_string();
    let debug = format!("{errors:?}");
    assert!(!out.contains("SENTINEL"), "{out}");
    assert!(!debug.contains("SENTINEL"), "{debug}");

    let message = |path: &str| {
        errors
            .problems
            .iter()
            .find(|p| p.path == path)
            .unwrap_or_else(|| panic!("no problem at {path}:\n{out}"))
            .message
            .clone()
    };
    assert_eq!(
        message("backends[1].api_key.env"),
        "environment variable 'SECRETS_TEST_MISSING' is not set"
    );
    assert!(message("backends[2].api_key.file").contains("missing.key"));
    assert_eq!(
        message("backends[3].api_key.file"),
        "secret file 'empty.key' is empty"
    );
    assert!(message("backends[4].api_key").contains("{env: VARIABLE} or {file: PATH}"));
    assert!(message("backends[5].api_key").contains("not both"));
    assert!(message("backends[6].api_key").contains("needs one of"));
    assert!(
        message("subscriptions[1].secondary_key")
            .contains("subscriptions[0].primary_key (subscription 's1')")
    );
    assert!(message("apis[0].backends[1]").contains("unknown backend 'nope'"));
    // Each problem on its own line, with file name and line number.
    assert!(out.lines().all(|l| l.starts_with("gateway.yaml:")));
    assert!(out.contains("gateway.yaml:7: backends[1].api_key.env: environment variable"));
}
