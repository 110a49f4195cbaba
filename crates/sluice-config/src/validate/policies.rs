//! `apis[].auth` and `apis[].policies`: each policy's settings, and the
//! rules that depend on the API's authentication and on the order of the
//! policies (a limit can only count by what an earlier step established).

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderName;

use super::{Cx, check_http_url};
use crate::lines::{index_path, key_path};
use crate::raw::{RawCallLimit, RawEmitTokenMetric, RawPolicy, RawTokenLimit, RawValidateJwt};
use crate::{
    ApiAuth, CallLimit, CounterKey, Dimension, EmitTokenMetric, JwtKeys, Policy, QuotaPeriod,
    SubscriptionSettings, TokenLimit, ValidateJwt,
};

pub(crate) const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;
pub(crate) const MAX_CLOCK_SKEW_SECONDS: u64 = 600;
/// APIM's limit for the sliding window of rate-limit-by-key.
pub(crate) const MAX_RATE_LIMIT_PERIOD_SECONDS: u64 = 300;
pub(crate) const MIN_QUOTA_PERIOD_SECONDS: u64 = 60;
pub(crate) const MAX_DIMENSIONS: usize = 10;
pub(crate) const DEFAULT_RETRY_AFTER_HEADER: &str = "Retry-After";
/// Default of `token_limit.default_completion_tokens`.
pub(crate) const DEFAULT_RESERVED_COMPLETION_TOKENS: u64 = 1024;

const POLICY_KEYS: &str = "validate_jwt, rate_limit, quota, token_limit, emit_token_metric";
const COUNTER_KEYS: &str = "subscription, identity, client_ip, header:<name> or claim:<name>";
const DIMENSIONS: &str =
    "subscription, api, deployment, backend, backend_region, client_ip, identity or header:<name>";

/// What the order checks need to know about the API.
struct ApiContext<'a> {
    api_path: &'a str,
    auth: ApiAuth,
    subscription_required: bool,
    /// Index of the first `validate_jwt` entry, if any.
    first_jwt: Option<usize>,
}

impl ApiContext<'_> {
    fn jwt_before(&self, index: usize) -> bool {
        self.first_jwt.is_some_and(|at| at < index)
    }

    fn keyed_by_subscription(&self) -> bool {
        self.auth == ApiAuth::Key && self.subscription_required
    }
}

fn auth_name(auth: ApiAuth) -> &'static str {
    match auth {
        ApiAuth::Key => "key",
        ApiAuth::Jwt => "jwt",
        ApiAuth::KeyOrJwt => "key_or_jwt",
    }
}

impl Cx<'_, '_> {
    /// `apis[].auth`: `key` (default), `jwt` or `key_or_jwt`.
    pub(super) fn api_auth(&mut self, raw: Option<String>, path: &str) -> ApiAuth {
        match raw.as_deref() {
            None | Some("key") => ApiAuth::Key,
            Some("jwt") => ApiAuth::Jwt,
            Some("key_or_jwt") => ApiAuth::KeyOrJwt,
            Some(other) => {
                self.err(
                    path,
                    format!("'{other}' is not an authentication mode; use key, jwt or key_or_jwt"),
                );
                ApiAuth::Key
            }
        }
    }

    /// `apis[].policies`, in order, plus the checks that tie them to the
    /// API's `auth` and `subscription` settings.
    pub(super) fn policies(
        &mut self,
        list: Option<Vec<Option<RawPolicy>>>,
        api_path: &str,
        auth: ApiAuth,
        subscription: &SubscriptionSettings,
    ) -> Vec<Policy> {
        let list_path = key_path(api_path, "policies");
        let first_jwt = list.as_ref().and_then(|entries| {
            entries
                .iter()
                .position(|entry| entry.as_ref().is_some_and(|p| p.validate_jwt.is_some()))
        });
        let cx = ApiContext {
            api_path,
            auth,
            subscription_required: subscription.required,
            first_jwt,
        };
        if auth != ApiAuth::Key && first_jwt.is_none() {
            self.err(
                key_path(api_path, "auth"),
                format!(
                    "auth: {} needs a validate_jwt entry in policies (it says how tokens are checked)",
                    auth_name(auth)
                ),
            );
        }

        let mut out = Vec::new();
        let mut jwt_seen: Option<String> = None;
        let mut metric_seen: Option<String> = None;
        for (j, entry_path, raw) in self.entries(list, &list_path) {
            let mut built = Vec::new();
            if let Some(raw) = raw.validate_jwt {
                let path = key_path(&entry_path, "validate_jwt");
                built.push((
                    "validate_jwt",
                    Policy::ValidateJwt(self.validate_jwt(raw, &path)),
                ));
                if let Some(first) = &jwt_seen {
                    self.err(
                        &entry_path,
                        format!("validate_jwt may appear only once per API (first at {first})"),
                    );
                } else {
                    jwt_seen = Some(entry_path.clone());
                }
            }
            if let Some(raw) = raw.rate_limit {
                let path = key_path(&entry_path, "rate_limit");
                let limit = self.call_limit(raw, &path, j, &cx, 1, MAX_RATE_LIMIT_PERIOD_SECONDS);
                built.push(("rate_limit", Policy::RateLimit(limit)));
            }
            if let Some(raw) = raw.quota {
                let path = key_path(&entry_path, "quota");
                let limit = self.call_limit(raw, &path, j, &cx, MIN_QUOTA_PERIOD_SECONDS, u64::MAX);
                built.push(("quota", Policy::Quota(limit)));
            }
            if let Some(raw) = raw.token_limit {
                let path = key_path(&entry_path, "token_limit");
                built.push((
                    "token_limit",
                    Policy::TokenLimit(self.token_limit(raw, &path, j, &cx)),
                ));
            }
            if let Some(raw) = raw.emit_token_metric {
                let path = key_path(&entry_path, "emit_token_metric");
                built.push((
                    "emit_token_metric",
                    Policy::EmitTokenMetric(self.emit_token_metric(raw, &path)),
                ));
                if let Some(first) = &metric_seen {
                    self.err(
                        &entry_path,
                        format!(
                            "emit_token_metric may appear only once per API (first at {first})"
                        ),
                    );
                } else {
                    metric_seen = Some(entry_path.clone());
                }
            }
            match built.len() {
                1 => out.extend(built.into_iter().map(|(_, policy)| policy)),
                0 => {
                    // A policy whose value had a type error was removed and
                    // already reported.
                    let cut = [
                        "validate_jwt",
                        "rate_limit",
                        "quota",
                        "token_limit",
                        "emit_token_metric",
                    ]
                    .iter()
                    .any(|key| self.poisoned.contains(&key_path(&entry_path, key)));
                    if !cut {
                        self.err(
                            &entry_path,
                            format!("a policy entry needs exactly one of: {POLICY_KEYS}"),
                        );
                    }
                }
                _ => {
                    let names: Vec<&str> = built.iter().map(|(name, _)| *name).collect();
                    self.err(
                        &entry_path,
                        format!(
                            "a policy entry must hold exactly one policy, found {}; \
                             write each as its own list item (- {}: ...)",
                            names.join(" and "),
                            names[0]
                        ),
                    );
                }
            }
        }
        out
    }

    pub(super) fn validate_jwt(&mut self, raw: RawValidateJwt, path: &str) -> ValidateJwt {
        let openid_path = key_path(path, "openid_config_url");
        let jwks_path = key_path(path, "jwks_url");
        let placeholder = JwtKeys::Jwks(String::new());
        let keys = match (raw.openid_config_url, raw.jwks_url) {
            (Some(_), Some(_)) => {
                self.err(
                    path,
                    "set exactly one of 'openid_config_url' or 'jwks_url', not both",
                );
                placeholder
            }
            (None, None) => {
                if !self.poisoned.contains(&openid_path) && !self.poisoned.contains(&jwks_path) {
                    self.err(path, "one of 'openid_config_url' or 'jwks_url' is required");
                }
                placeholder
            }
            (Some(url), None) => {
                if let Err(message) = check_http_url(&url, true) {
                    self.err(&openid_path, message);
                }
                JwtKeys::OpenIdConfiguration(url)
            }
            (None, Some(url)) => {
                if let Err(message) = check_http_url(&url, true) {
                    self.err(&jwks_path, message);
                }
                JwtKeys::Jwks(url)
            }
        };
        let issuers = self.string_list(raw.issuers, &key_path(path, "issuers"), true);
        let audiences = self.string_list(raw.audiences, &key_path(path, "audiences"), true);
        let client_application_ids = self.string_list(
            raw.client_application_ids,
            &key_path(path, "client_application_ids"),
            false,
        );
        let required_roles =
            self.string_list(raw.required_roles, &key_path(path, "required_roles"), false);
        let skew = self.in_range(
            raw.clock_skew_seconds,
            &key_path(path, "clock_skew_seconds"),
            0,
            MAX_CLOCK_SKEW_SECONDS,
            DEFAULT_CLOCK_SKEW_SECONDS,
        );
        ValidateJwt {
            keys,
            issuers,
            audiences,
            client_application_ids,
            required_roles,
            clock_skew: Duration::from_secs(skew),
        }
    }

    /// A list of non-empty strings, each listed once. `required` lists must
    /// be present and non-empty.
    pub(super) fn string_list(
        &mut self,
        raw: Option<Vec<Option<String>>>,
        path: &str,
        required: bool,
    ) -> Vec<String> {
        match &raw {
            None if required => {
                self.required(None::<()>, path);
            }
            Some(list) if required && list.is_empty() => {
                self.err(path, "must list at least one value");
            }
            _ => {}
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut out = Vec::new();
        for (j, item_path, value) in self.entries(raw, path) {
            if value.trim().is_empty() {
                self.err(&item_path, "must not be empty");
            } else if value.trim() != value {
                self.err(&item_path, "must not start or end with spaces");
            } else if let Some(first) = seen.get(&value) {
                self.err(
                    &item_path,
                    format!("'{value}' is listed twice (also at {path}[{first}])"),
                );
            } else {
                seen.insert(value.clone(), j);
            }
            out.push(value);
        }
        out
    }

    /// `rate_limit` (period `1..=300`) and `quota` (period at least 60).
    fn call_limit(
        &mut self,
        raw: RawCallLimit,
        path: &str,
        index: usize,
        cx: &ApiContext<'_>,
        min_period: u64,
        max_period: u64,
    ) -> CallLimit {
        let calls_path = key_path(path, "calls");
        let calls = self.required(raw.calls, &calls_path).map_or(1, |calls| {
            self.in_range(Some(calls), &calls_path, 1, u64::MAX, 1)
        });
        let period_path = key_path(path, "renewal_period_seconds");
        let period = self
            .required(raw.renewal_period_seconds, &period_path)
            .map_or(min_period, |period| {
                self.in_range(
                    Some(period),
                    &period_path,
                    min_period,
                    max_period,
                    min_period,
                )
            });
        let counter_key = self.counter_key(raw.counter_key, path, index, cx);
        CallLimit {
            calls,
            renewal_period: Duration::from_secs(period),
            counter_key,
        }
    }

    fn token_limit(
        &mut self,
        raw: RawTokenLimit,
        path: &str,
        index: usize,
        cx: &ApiContext<'_>,
    ) -> TokenLimit {
        let counter_key = self.counter_key(raw.counter_key, path, index, cx);
        let tpm_path = key_path(path, "tokens_per_minute");
        let tokens_per_minute = raw
            .tokens_per_minute
            .map(|tpm| self.in_range(Some(tpm), &tpm_path, 1, u64::MAX, 1));
        let quota_path = key_path(path, "token_quota");
        let period_path = key_path(path, "token_quota_period");
        let quota = raw
            .token_quota
            .map(|quota| self.in_range(Some(quota), &quota_path, 1, u64::MAX, 1));
        let period = raw.token_quota_period.map(|period| match period.as_str() {
            "hourly" => QuotaPeriod::Hourly,
            "daily" => QuotaPeriod::Daily,
            "weekly" => QuotaPeriod::Weekly,
            "monthly" => QuotaPeriod::Monthly,
            "yearly" => QuotaPeriod::Yearly,
            other => {
                self.err(
                    &period_path,
                    format!(
                        "'{other}' is not a quota period; use hourly, daily, weekly, monthly or yearly"
                    ),
                );
                QuotaPeriod::Daily
            }
        });
        let token_quota = match (quota, period) {
            (Some(quota), Some(period)) => Some((quota, period)),
            (Some(_), None) => {
                if !self.poisoned.contains(&period_path) {
                    self.err(&period_path, "is required when token_quota is set");
                }
                None
            }
            (None, Some(_)) => {
                if !self.poisoned.contains(&quota_path) {
                    self.err(&quota_path, "is required when token_quota_period is set");
                }
                None
            }
            (None, None) => None,
        };
        let nothing_set = tokens_per_minute.is_none() && quota.is_none() && period.is_none();
        let cut = [&tpm_path, &quota_path, &period_path]
            .iter()
            .any(|p| self.poisoned.contains(p.as_str()));
        if nothing_set && !cut {
            self.err(
                path,
                "needs tokens_per_minute, token_quota with token_quota_period, or both",
            );
        }

        // Response headers: each valid, and no two the same.
        let mut used: HashMap<HeaderName, &'static str> = HashMap::new();
        let mut header = |cx: &mut Self, value: Option<String>, key: &'static str| {
            let value = value?;
            let name = cx.header_name(&value, &key_path(path, key))?;
            if let Some(first) = used.get(&name) {
                cx.err(
                    key_path(path, key),
                    format!("'{value}' is already used by {first}; each header must differ"),
                );
            } else {
                used.insert(name.clone(), key);
            }
            Some(name)
        };
        let retry_after_header_name = header(
            self,
            Some(
                raw.retry_after_header_name
                    .unwrap_or_else(|| DEFAULT_RETRY_AFTER_HEADER.to_string()),
            ),
            "retry_after_header_name",
        )
        .unwrap_or(http::header::RETRY_AFTER);
        let remaining_tokens_header_name = header(
            self,
            raw.remaining_tokens_header_name,
            "remaining_tokens_header_name",
        );
        let remaining_quota_tokens_header_name = header(
            self,
            raw.remaining_quota_tokens_header_name,
            "remaining_quota_tokens_header_name",
        );
        let consumed = match (
            raw.tokens_consumed_header_name,
            raw.consumed_tokens_header_name,
        ) {
            (Some(_), Some(_)) => {
                self.err(
                    key_path(path, "consumed_tokens_header_name"),
                    "set tokens_consumed_header_name or its older spelling \
                     consumed_tokens_header_name, not both",
                );
                None
            }
            (Some(name), None) => Some((name, "tokens_consumed_header_name")),
            (None, Some(name)) => Some((name, "consumed_tokens_header_name")),
            (None, None) => None,
        };
        let tokens_consumed_header_name =
            consumed.and_then(|(name, key)| header(self, Some(name), key));
        TokenLimit {
            counter_key,
            tokens_per_minute,
            token_quota,
            estimate_prompt_tokens: raw.estimate_prompt_tokens.unwrap_or(true),
            default_completion_tokens: raw
                .default_completion_tokens
                .unwrap_or(DEFAULT_RESERVED_COMPLETION_TOKENS),
            retry_after_header_name,
            remaining_tokens_header_name,
            remaining_quota_tokens_header_name,
            tokens_consumed_header_name,
        }
    }

    fn emit_token_metric(&mut self, raw: RawEmitTokenMetric, path: &str) -> EmitTokenMetric {
        let Some(list) = raw.dimensions else {
            return EmitTokenMetric {
                dimensions: vec![
                    Dimension::Subscription,
                    Dimension::Api,
                    Dimension::Deployment,
                    Dimension::BackendRegion,
                ],
            };
        };
        let list_path = key_path(path, "dimensions");
        if list.len() > MAX_DIMENSIONS {
            self.err(
                &list_path,
                format!(
                    "at most {MAX_DIMENSIONS} dimensions are allowed, found {}",
                    list.len()
                ),
            );
        }
        let mut labels: HashMap<String, usize> = HashMap::new();
        let mut dimensions = Vec::new();
        for (j, item_path, text) in self.entries(Some(list), &list_path) {
            let dimension = match text.as_str() {
                "subscription" => Dimension::Subscription,
                "api" => Dimension::Api,
                "deployment" => Dimension::Deployment,
                "backend" => Dimension::Backend,
                "backend_region" => Dimension::BackendRegion,
                "client_ip" => Dimension::ClientIp,
                "identity" => Dimension::Identity,
                other => match other.strip_prefix("header:") {
                    Some(name) => match self.header_name(name, &item_path) {
                        Some(name) => {
                            if self.is_credential(&name, &item_path, "a metric label") {
                                continue;
                            }
                            Dimension::Header(name)
                        }
                        None => continue,
                    },
                    None => {
                        self.err(
                            &item_path,
                            format!("'{other}' is not a dimension; use {DIMENSIONS}"),
                        );
                        continue;
                    }
                },
            };
            let label = dimension.label();
            if let Some(first) = labels.get(&label) {
                self.err(
                    &item_path,
                    format!(
                        "'{text}' repeats {} (both give the label '{label}')",
                        index_path(&list_path, *first)
                    ),
                );
            } else {
                labels.insert(label, j);
                dimensions.push(dimension);
            }
        }
        EmitTokenMetric { dimensions }
    }

    /// The required `counter_key` of the limit at `path`, checked against
    /// what the API establishes about the caller before entry `index`.
    fn counter_key(
        &mut self,
        raw: Option<String>,
        path: &str,
        index: usize,
        cx: &ApiContext<'_>,
    ) -> CounterKey {
        let key_path_ = key_path(path, "counter_key");
        let placeholder = CounterKey::ClientIp;
        let Some(text) = self.required(raw, &key_path_) else {
            return placeholder;
        };
        let key = match text.as_str() {
            "subscription" => CounterKey::Subscription,
            "identity" => CounterKey::Identity,
            "client_ip" => CounterKey::ClientIp,
            other => {
                if let Some(name) = other.strip_prefix("header:") {
                    match self.header_name(name, &key_path_) {
                        Some(name) if self.is_credential(&name, &key_path_, "a counter key") => {
                            return placeholder;
                        }
                        Some(name) => CounterKey::Header(name),
                        None => return placeholder,
                    }
                } else if let Some(claim) = other.strip_prefix("claim:") {
                    if claim.is_empty() || claim.trim() != claim {
                        self.err(
                            &key_path_,
                            "claim: needs a claim name without surrounding spaces, e.g. claim:oid",
                        );
                        return placeholder;
                    }
                    CounterKey::Claim(claim.to_string())
                } else {
                    self.err(
                        &key_path_,
                        format!("'{other}' is not a counter key; use {COUNTER_KEYS}"),
                    );
                    return placeholder;
                }
            }
        };
        let policies = key_path(cx.api_path, "policies");
        match &key {
            CounterKey::Subscription if !cx.keyed_by_subscription() => self.err(
                &key_path_,
                format!(
                    "a limit keyed by subscription needs callers to present a subscription key: \
                     use auth: key (the default) with subscription.required: true \
                     (this API has auth: {}, subscription.required: {})",
                    auth_name(cx.auth),
                    cx.subscription_required
                ),
            ),
            CounterKey::Claim(claim) if !cx.jwt_before(index) => {
                let message = match cx.first_jwt {
                    Some(at) => format!(
                        "counter_key 'claim:{claim}' reads the validated token, so validate_jwt \
                         must come before this entry, but it is at {} and this entry is at {}; \
                         move validate_jwt earlier",
                        index_path(&policies, at),
                        index_path(&policies, index)
                    ),
                    None => format!(
                        "counter_key 'claim:{claim}' reads the validated token: add a validate_jwt \
                         entry earlier in {policies}"
                    ),
                };
                self.err(&key_path_, message);
            }
            CounterKey::Claim(claim) if cx.auth == ApiAuth::KeyOrJwt => self.err(
                &key_path_,
                format!(
                    "counter_key 'claim:{claim}' cannot be used with auth: key_or_jwt: callers \
                     with a key have no token, so they would all share one counter; use identity"
                ),
            ),
            CounterKey::Identity
                if !((cx.auth == ApiAuth::Key && cx.keyed_by_subscription())
                    || cx.jwt_before(index)) =>
            {
                self.err(
                    &key_path_,
                    format!(
                        "counter_key 'identity' needs callers identified before this entry: use \
                         auth: key with subscription.required: true, or put a validate_jwt entry \
                         earlier in {policies} (with auth: jwt or key_or_jwt, token callers are \
                         only known after validate_jwt)"
                    ),
                );
            }
            _ => {}
        }
        key
    }

    /// Reports (at `path`) and returns true when `name` carries a credential:
    /// its value must never become `what` (a counter key is kept in memory
    /// and may be logged; a metric label is published on `/metrics`).
    fn is_credential(&mut self, name: &HeaderName, path: &str, what: &str) -> bool {
        let Some(source) = self.credentials.get(name) else {
            return false;
        };
        let origin = match source {
            Some(at) if at.starts_with("server.") => {
                format!(" (it is redacted from traces, see {at})")
            }
            Some(at) => format!(" (it is a subscription key header, see {at})"),
            None => String::new(),
        };
        self.err(
            path,
            format!(
                "header '{name}' carries a credential{origin} and must not be used as {what}; \
                 use subscription or identity to tell callers apart"
            ),
        );
        true
    }

    /// A valid HTTP header name, or a problem at `path`.
    pub(super) fn header_name(&mut self, name: &str, path: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                self.err(path, format!("'{name}' is not a valid HTTP header name"));
                None
            }
        }
    }
}
