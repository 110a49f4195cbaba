//! `backends[].auth`: the Entra ID credential a backend uses instead of an
//! `api_key`.

use super::{Cx, check_http_url};
use crate::lines::key_path;
use crate::raw::{RawBackendAuth, RawClientSecret, RawWorkloadIdentity};
use crate::{BackendAuth, Credential, Secret};

pub(crate) const DEFAULT_BACKEND_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

const CREDENTIAL_KEYS: [&str; 4] = [
    "managed_identity",
    "workload_identity",
    "client_secret",
    "azure_cli",
];

impl Cx<'_, '_> {
    /// Validates `auth` of the backend at `backend_path`; `has_api_key` says
    /// whether the backend also sets `api_key` (not allowed together).
    pub(super) fn backend_auth(
        &mut self,
        raw: Option<RawBackendAuth>,
        backend_path: &str,
        has_api_key: bool,
    ) -> Option<BackendAuth> {
        let raw = raw?;
        let path = key_path(backend_path, "auth");
        if has_api_key {
            self.err(
                &path,
                "set either 'auth' or 'api_key', not both (the token replaces the key)",
            );
        }
        let mut found: Vec<(&str, Credential)> = Vec::new();
        if let Some(mi) = raw.managed_identity {
            let cpath = key_path(&path, "managed_identity");
            let client_id = self.optional_id(mi.client_id, &key_path(&cpath, "client_id"));
            found.push((
                "managed_identity",
                Credential::ManagedIdentity { client_id },
            ));
        }
        if let Some(wi) = raw.workload_identity {
            let credential = self.workload_identity(wi, &key_path(&path, "workload_identity"));
            found.push(("workload_identity", credential));
        }
        if let Some(cs) = raw.client_secret {
            let credential = self.client_secret(cs, &key_path(&path, "client_secret"));
            found.push(("client_secret", credential));
        }
        if raw.azure_cli.is_some() {
            found.push(("azure_cli", Credential::AzureCli));
        }
        let scope_path = key_path(&path, "scope");
        let scope = match raw.scope {
            None => DEFAULT_BACKEND_SCOPE.to_string(),
            Some(scope) => {
                if scope.is_empty() || scope.chars().any(char::is_whitespace) {
                    self.err(
                        &scope_path,
                        "must be one non-empty scope without spaces, \
                         e.g. https://cognitiveservices.azure.com/.default",
                    );
                }
                scope
            }
        };
        match found.len() {
            1 => found
                .pop()
                .map(|(_, credential)| BackendAuth { credential, scope }),
            0 => {
                let cut = CREDENTIAL_KEYS
                    .iter()
                    .any(|key| self.poisoned.contains(&key_path(&path, key)));
                if !cut {
                    self.err(
                        &path,
                        format!(
                            "needs exactly one credential: {}",
                            CREDENTIAL_KEYS.join(", ")
                        ),
                    );
                }
                None
            }
            _ => {
                let names: Vec<&str> = found.iter().map(|(name, _)| *name).collect();
                self.err(
                    &path,
                    format!("set exactly one credential, found {}", names.join(" and ")),
                );
                None
            }
        }
    }

    fn workload_identity(&mut self, raw: RawWorkloadIdentity, path: &str) -> Credential {
        let client_id = self.optional_id(raw.client_id, &key_path(path, "client_id"));
        let tenant_id = self.optional_id(raw.tenant_id, &key_path(path, "tenant_id"));
        let token_file = raw.token_file.map(|file| {
            if file.trim().is_empty() {
                self.err(key_path(path, "token_file"), "must name a file");
            }
            // Not read now: the file is mounted and rotated at run time.
            self.base_dir.join(file)
        });
        Credential::WorkloadIdentity {
            client_id,
            tenant_id,
            token_file,
        }
    }

    fn client_secret(&mut self, raw: RawClientSecret, path: &str) -> Credential {
        let tenant_path = key_path(path, "tenant_id");
        let tenant_id = self.required(raw.tenant_id, &tenant_path);
        if let Some(tenant) = &tenant_id {
            self.check_id(tenant, &tenant_path);
        }
        let client_path = key_path(path, "client_id");
        let client_id = self.required(raw.client_id, &client_path);
        if let Some(client) = &client_id {
            self.check_id(client, &client_path);
        }
        let secret_path = key_path(path, "secret");
        let secret = self
            .required(raw.secret, &secret_path)
            .and_then(|raw| self.secret(raw, &secret_path));
        let authority_host = raw.authority_host.inspect(|host| {
            let host_path = key_path(path, "authority_host");
            match check_http_url(host, false) {
                Err(message) => self.err(host_path, message),
                Ok(false) => self.err(
                    host_path,
                    "must be an https:// URL (a token authority is never reached over plain http)",
                ),
                Ok(true) => {}
            }
        });
        Credential::ClientSecret {
            tenant_id: tenant_id.unwrap_or_default(),
            client_id: client_id.unwrap_or_default(),
            secret: secret.unwrap_or_else(|| Secret::new("")),
            authority_host,
        }
    }

    fn optional_id(&mut self, raw: Option<String>, path: &str) -> Option<String> {
        raw.inspect(|id| self.check_id(id, path))
    }

    /// A tenant or client id: a GUID or a name such as
    /// `contoso.onmicrosoft.com`.
    fn check_id(&mut self, id: &str, path: &str) {
        if id.is_empty() {
            self.err(path, "must not be empty");
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        {
            self.err(
                path,
                format!("'{id}' must be a GUID or a name of letters, digits, '-', '.' and '_'"),
            );
        }
    }
}
