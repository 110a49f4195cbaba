//! AzureCli with a fake `az` script first on PATH. PATH is process-wide, so this binary holds exactly one test and
//! changes it before any runtime (and so any other thread) exists.

mod common;

use common::manual_clock;
use sluice_identity::{CredentialConfig, ProviderOptions, TokenProvider};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

#[allow(unsafe_code)]
fn set_env(name: &str, value: &str) {
    // SAFETY: called by this binary's only test before it creates a runtime: no other thread touches the environment.
    unsafe { std::env::set_var(name, value) }
}

/// A fake `az`: logs its arguments, fails like a logged-out CLI for scopes on failing.example, and otherwise prints
/// `az account get-access-token -o json` output with a 1-hour token numbered by call.
fn install_fake_az(dir: &Path) {
    let log = dir.join("calls");
    let script = format!(
        r#"#!/bin/sh
echo "$@" >> '{log}'
case "$*" in
  *failing.example*) echo "ERROR: Please run 'az login' to setup account." >&2; exit 1 ;;
esac
n=$(wc -l < '{log}' | tr -d ' ')
expires=$(( $(date +%s) + 3600 ))
printf '{{"accessToken":"cli-token-%s","expiresOn":"ignored","expires_on":%s,"subscription":"sub","tenant":"t","tokenType":"Bearer"}}\n' "$n" "$expires"
"#,
        log = log.display()
    );
    let path = dir.join("az");
    std::fs::write(&path, script).expect("write az");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod az");
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn azure_cli_with_a_fake_az_on_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    install_fake_az(dir.path());
    let path = std::env::var("PATH").unwrap_or_default();
    set_env("PATH", &format!("{}:{path}", dir.path().display()));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Success, cached, and refreshed before expiry.
        let clock = manual_clock();
        let provider = TokenProvider::with_clock(CredentialConfig::AzureCli, ProviderOptions::default(), clock.clone())
            .expect("provider");
        assert_eq!(provider.kind(), "azure_cli");
        assert_eq!(provider.token().await.expect("token").expose(), "cli-token-1");
        assert_eq!(provider.token().await.expect("token").expose(), "cli-token-1");
        let logged = calls(dir.path());
        assert_eq!(logged.len(), 1, "cached: {logged:?}");
        assert!(
            logged[0].contains("account get-access-token -o json --scope https://cognitiveservices.azure.com/.default"),
            "{logged:?}"
        );
        // Past the refresh point (6 minutes before expiry) a refresh runs `az` again; in the token's last 30
        // seconds the caller waits for it.
        clock.advance(Duration::from_secs(55 * 60));
        provider.token().await.expect("token");
        clock.advance(Duration::from_secs(4 * 60 + 40));
        assert_eq!(provider.token().await.expect("token").expose(), "cli-token-2");
        assert_eq!(provider.fetch_count(), 2);

        // A failing `az`.
        let options = ProviderOptions {
            scope: "https://failing.example/.default".into(),
            transport: None,
        };
        let failing = TokenProvider::new(CredentialConfig::AzureCli, options).expect("provider");
        let error = failing.token().await.expect_err("az fails");
        assert_eq!(error.kind, "azure_cli");
        let text = error.to_string();
        assert!(text.starts_with("could not obtain an Entra ID token with azure_cli: "), "{text}");
        assert!(text.contains("az login"), "az's reason is kept: {text}");
    });
}
