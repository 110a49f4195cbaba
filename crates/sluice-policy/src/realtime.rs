//! The Realtime API's WebSocket handshake and session: which calls are
//! Realtime handshakes, the deployment they name, the query the backend gets,
//! and the state a relayed session keeps (token limit breaches found while it
//! runs).
//!
//! Realtime is `GET /openai/v1/realtime?model=<deployment>` (the v1 API) or
//! `GET /openai/realtime?api-version=...&deployment=<deployment>`, upgraded to
//! a WebSocket. Browsers cannot set headers on a WebSocket, so Azure also
//! takes the key as an `api-key` query parameter; the gateway accepts it
//! there and never forwards it.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::route::query_param;

/// The query parameter Azure reads a key from on a Realtime handshake.
pub const KEY_PARAM: &str = "api-key";

/// A Realtime handshake: the path is the Realtime endpoint and the request
/// asks to upgrade to a WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RealtimeCall {
    /// The v1 form (`/v1/realtime?model=`), else the api-version form
    /// (`/realtime?deployment=`).
    pub v1: bool,
    /// The deployment the query names (`model` on v1, `deployment` else).
    pub deployment: Option<String>,
}

impl RealtimeCall {
    /// The query parameter naming the deployment in this form.
    pub fn deployment_param(&self) -> &'static str {
        if self.v1 { "model" } else { "deployment" }
    }
}

/// Whether `rest` (the path after the API prefix) is the Realtime endpoint,
/// and in which form. A trailing slash is tolerated; the match is exact
/// otherwise (`/v1/realtime/client_secrets` is an ordinary call).
pub fn is_realtime_path(rest: &str) -> Option<bool> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    match rest {
        "/v1/realtime" => Some(true),
        "/realtime" => Some(false),
        _ => None,
    }
}

/// The Realtime handshake `rest` and `query` describe, if it is one.
pub fn realtime_call(rest: &str, query: Option<&str>) -> Option<RealtimeCall> {
    let v1 = is_realtime_path(rest)?;
    let mut call = RealtimeCall {
        v1,
        deployment: None,
    };
    call.deployment = query
        .and_then(|q| query_param(q, call.deployment_param()))
        .and_then(|v| String::from_utf8(v).ok())
        .filter(|v| !v.is_empty());
    Some(call)
}

/// The query the backend gets: without the client's `api-key` parameter (or
/// the API's own subscription-key parameter, `strip`), and with the
/// deployment parameter renamed to the backend's deployment name when
/// `rename` gives one. Other parameters keep their order and spelling.
pub fn upstream_query<'q, 'r>(
    query: &'q str,
    call: &RealtimeCall,
    strip: &str,
    rename: impl Fn(&str) -> Option<&'r str>,
) -> Cow<'q, str> {
    let param = call.deployment_param();
    let mut changed = false;
    let mut seen = false;
    let mut kept: Vec<Cow<'q, str>> = Vec::new();
    for part in query.split('&') {
        if part.is_empty() {
            changed = true;
            continue;
        }
        let name = form_name(part);
        if name.as_deref() == Some(KEY_PARAM) || name.as_deref() == Some(strip) {
            changed = true;
            continue;
        }
        if name.as_deref() == Some(param) && std::mem::replace(&mut seen, true) {
            // The gateway routed by the first; the backend gets only it.
            changed = true;
            continue;
        }
        if name.as_deref() == Some(param)
            && let Some(d) = call.deployment.as_deref()
            && let Some(renamed) = rename(d)
        {
            changed = true;
            let value: String =
                form_urlencoded::byte_serialize(renamed.as_bytes()).collect::<String>();
            kept.push(Cow::Owned(format!("{param}={value}")));
            continue;
        }
        kept.push(Cow::Borrowed(part));
    }
    if !changed {
        return Cow::Borrowed(query);
    }
    Cow::Owned(kept.join("&"))
}

/// The subprotocol a browser client of OpenAI's own service carries its key
/// in (`openai-insecure-api-key.<key>`).
pub const KEY_PROTOCOL_PREFIX: &str = "openai-insecure-api-key.";

/// A `Sec-WebSocket-Protocol` offer without the subprotocols that carry a
/// key: `None` when nothing else is left (the header is then dropped).
pub fn without_key_protocols(offer: &str) -> Option<String> {
    let kept: Vec<&str> = offer
        .split(',')
        .map(str::trim)
        .filter(|p| {
            !p.is_empty()
                && !p
                    .get(..KEY_PROTOCOL_PREFIX.len())
                    .is_some_and(|h| h.eq_ignore_ascii_case(KEY_PROTOCOL_PREFIX))
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join(", "))
}

/// The decoded name of one raw `name=value` query parameter.
fn form_name(part: &str) -> Option<String> {
    form_urlencoded::parse(part.as_bytes())
        .next()
        .map(|(n, _)| n.into_owned())
}

/// Set while a session runs when one of its token counters is spent, until
/// the window admits again: the session is closed at its next response in
/// that time. Shared with the charge of a response's usage, which may run on
/// a task of its own (a store that has to wait).
#[derive(Debug, Default)]
pub struct LimitBreach {
    /// When the spent window admits again, and whether it is a quota
    /// (APIM's 403 wording) rather than a per-minute limit.
    until: Mutex<Option<(Instant, bool)>>,
}

impl LimitBreach {
    /// Note that a counter is spent for `retry_after` (`quota`: the counter
    /// is a token quota). The breach that lasts longest is kept.
    pub fn note(&self, retry_after: Duration, quota: bool) {
        self.note_at(Instant::now(), retry_after, quota);
    }

    /// [`Self::note`] at `now`.
    pub fn note_at(&self, now: Instant, retry_after: Duration, quota: bool) {
        // Whole seconds, as APIM words it (at least one).
        let until = now + Duration::from_secs(sluice_limits::retry_after_secs(retry_after));
        let mut slot = self.until.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none_or(|(t, _)| t < until) {
            *slot = Some((until, quota));
        }
    }

    /// The breach in force, if any: how long its window stays spent, and
    /// whether it is a quota.
    pub fn get(&self) -> Option<(Duration, bool)> {
        self.get_at(Instant::now())
    }

    /// [`Self::get`] at `now`: a breach whose window has reopened is over.
    pub fn get_at(&self, now: Instant) -> Option<(Duration, bool)> {
        let slot = *self.until.lock().unwrap_or_else(|e| e.into_inner());
        let (until, quota) = slot?;
        (until > now).then(|| (until - now, quota))
    }

    /// The close frame's reason for the breach in force: APIM's message for
    /// a token limit or quota, with the time left (the frame builder cuts it
    /// to the 123 bytes a close frame carries).
    pub fn reason(&self) -> Option<String> {
        let (after, quota) = self.get()?;
        Some(if quota {
            sluice_limits::token_quota_message(after)
        } else {
            sluice_limits::token_limit_message(after)
        })
    }
}

/// A token counter a Realtime session's responses are charged to.
#[derive(Debug, Clone)]
pub struct SessionCounter {
    /// The counter's key.
    pub key: String,
    /// Its limit and window.
    pub limit: sluice_limits::Limit,
    /// A token quota (403 wording) rather than a per-minute limit.
    pub quota: bool,
}

/// Charge one response's `tokens` to each of the session's counters (they
/// were consumed: the charge is made whatever the window holds), and note in
/// `breach` a counter the charge leaves spent.
pub async fn charge_session(
    store: &dyn sluice_limits::CounterStore,
    counters: &[SessionCounter],
    tokens: u64,
    breach: &LimitBreach,
) {
    for c in counters {
        let usage = store.charge(&c.key, &c.limit, tokens).await;
        if let Some(after) = usage.retry_after {
            breach.note(after, c.quota);
        }
    }
}

/// How long a session the gateway closed may take to end (the client's
/// close answer, the backend's): after that, the next frame either way ends
/// the connection.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

impl RealtimeSession {
    /// The gateway's close is older than [`CLOSE_GRACE`] at `now`.
    pub fn past_grace(&self, now: Instant) -> bool {
        self.closed_at
            .is_some_and(|t| now.saturating_duration_since(t) > CLOSE_GRACE)
    }
}

/// The WebSocket close code for a session closed by a token limit: 1008,
/// "policy violation".
pub const CLOSE_POLICY: u16 = 1008;

/// What a relayed Realtime session keeps while it runs.
#[derive(Debug)]
pub struct RealtimeSession {
    /// Reads the backend's events (server to client frames).
    pub scanner: sluice_tokens::realtime::RealtimeScanner,
    /// A token counter found spent by a response's charge.
    pub breach: Arc<LimitBreach>,
    /// The counters each response is charged to (the handshake's token
    /// limits).
    pub counters: Arc<[SessionCounter]>,
    /// The gateway sent the client its close frame: nothing more of the
    /// backend's goes to the client.
    pub closed_by_gateway: bool,
    /// When the gateway sent its close frame: a session that goes on past
    /// [`CLOSE_GRACE`] after it (a client ignoring the close) is cut.
    pub closed_at: Option<Instant>,
    /// The scanner could not read the backend's frames (reported once).
    pub unreadable: bool,
    /// Responses completed (`response.done` seen).
    pub responses: u64,
    /// Tokens the session's responses reported, in total.
    pub usage: sluice_tokens::Usage,
}

impl RealtimeSession {
    /// A session whose single events are read up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        RealtimeSession {
            scanner: sluice_tokens::realtime::RealtimeScanner::new(max_message),
            breach: Arc::default(),
            counters: Arc::from(Vec::new()),
            closed_by_gateway: false,
            closed_at: None,
            unreadable: false,
            responses: 0,
            usage: sluice_tokens::Usage::default(),
        }
    }

    /// Add one response's usage to the session's total.
    pub fn add(&mut self, u: &sluice_tokens::Usage) {
        self.responses += 1;
        self.usage.prompt_tokens += u.prompt_tokens;
        self.usage.completion_tokens += u.completion_tokens;
        self.usage.total_tokens += u.total_tokens;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_are_realtime_and_nothing_else_is() {
        assert_eq!(is_realtime_path("/v1/realtime"), Some(true));
        assert_eq!(is_realtime_path("/v1/realtime/"), Some(true));
        assert_eq!(is_realtime_path("/realtime"), Some(false));
        for other in [
            "/v1/realtime/client_secrets",
            "/v1/realtimex",
            "/deployments/x/realtime",
            "/realtime/calls",
            "",
            "/v1/",
        ] {
            assert_eq!(is_realtime_path(other), None, "{other}");
        }
    }

    #[test]
    fn the_deployment_comes_from_the_forms_parameter() {
        let v1 = realtime_call("/v1/realtime", Some("model=gpt-rt&deployment=x")).unwrap();
        assert_eq!(
            v1,
            RealtimeCall {
                v1: true,
                deployment: Some("gpt-rt".into())
            }
        );
        let old = realtime_call(
            "/realtime",
            Some("api-version=2025-04-01-preview&deployment=my%20rt&model=y"),
        )
        .unwrap();
        assert_eq!(old.deployment.as_deref(), Some("my rt"));
        assert!(!old.v1);
        assert_eq!(
            realtime_call("/v1/realtime", None).unwrap().deployment,
            None
        );
        assert_eq!(
            realtime_call("/v1/realtime", Some("model="))
                .unwrap()
                .deployment,
            None
        );
        assert_eq!(realtime_call("/v1/chat/completions", Some("model=a")), None);
    }

    #[test]
    fn the_backend_query_loses_keys_and_gets_its_deployment_name() {
        let call = realtime_call("/v1/realtime", Some("model=rt&api-key=secret&x=1")).unwrap();
        let q = upstream_query(
            "model=rt&api-key=secret&x=1",
            &call,
            "subscription-key",
            |d| (d == "rt").then_some("rt-west"),
        );
        assert_eq!(q, "model=rt-west&x=1");
        // The API's own key parameter goes too, and empty parts.
        let q = upstream_query(
            "subscription-key=s&&model=rt",
            &call,
            "subscription-key",
            |_| None,
        );
        assert_eq!(q, "model=rt");
        // Nothing to change: the same string.
        let q = upstream_query("model=rt&x=1", &call, "subscription-key", |_| None);
        assert!(matches!(q, Cow::Borrowed("model=rt&x=1")));
        // The api-version form renames `deployment`, not `model`.
        let call = realtime_call("/realtime", Some("deployment=rt&model=rt")).unwrap();
        let q = upstream_query(
            "api-version=v&deployment=rt&model=rt",
            &call,
            "subscription-key",
            |_| Some("a b"),
        );
        assert_eq!(q, "api-version=v&deployment=a+b&model=rt");
        // A repeated deployment parameter: only the one routed by goes on.
        let call = realtime_call("/v1/realtime", Some("model=a&model=b")).unwrap();
        assert_eq!(call.deployment.as_deref(), Some("a"));
        let q = upstream_query("model=a&x=1&model=b", &call, "k", |_| None);
        assert_eq!(q, "model=a&x=1");
        let q = upstream_query("model=a&model=b", &call, "k", |_| Some("a-west"));
        assert_eq!(q, "model=a-west");
        let call = realtime_call("/realtime", Some("deployment=rt")).unwrap();
        // An encoded key name is still the key.
        let q = upstream_query("api%2Dkey=s&model=rt", &call, "k", |_| None);
        assert_eq!(q, "model=rt");
    }

    #[test]
    fn subprotocols_carrying_a_key_are_dropped() {
        assert_eq!(
            without_key_protocols(
                "realtime, openai-insecure-api-key.sk-123, openai-beta.realtime-v1"
            ),
            Some("realtime, openai-beta.realtime-v1".into())
        );
        assert_eq!(without_key_protocols("OPENAI-INSECURE-API-KEY.x"), None);
        assert_eq!(without_key_protocols(" realtime "), Some("realtime".into()));
        assert_eq!(without_key_protocols(", ,"), None);
        assert_eq!(
            without_key_protocols("openai-insecure-api-keyx"),
            Some("openai-insecure-api-keyx".into())
        );
    }

    #[test]
    fn a_breach_lasts_until_its_window_reopens_and_is_worded_like_apim() {
        let t0 = Instant::now();
        let b = LimitBreach::default();
        assert_eq!(b.get_at(t0), None);
        assert_eq!(b.reason(), None);
        // 4.2 s reads as 5 whole seconds, as APIM says it.
        b.note_at(t0, Duration::from_millis(4_200), false);
        assert_eq!(b.get_at(t0), Some((Duration::from_secs(5), false)));
        // A shorter breach noted later does not shorten it ...
        b.note_at(t0, Duration::from_secs(2), true);
        assert_eq!(b.get_at(t0), Some((Duration::from_secs(5), false)));
        // ... a longer one replaces it.
        b.note_at(t0, Duration::from_secs(90), true);
        assert_eq!(b.get_at(t0), Some((Duration::from_secs(90), true)));
        assert_eq!(
            b.get_at(t0 + Duration::from_secs(30)),
            Some((Duration::from_secs(60), true))
        );
        // Once the window admits again the session runs on.
        assert_eq!(b.get_at(t0 + Duration::from_secs(90)), None);
        assert_eq!(b.get_at(t0 + Duration::from_secs(91)), None);
        let reason = b.reason().unwrap();
        assert!(reason.starts_with("Token quota is exceeded"), "{reason}");
        let l = LimitBreach::default();
        l.note(Duration::from_millis(4_200), false);
        let reason = l.reason().unwrap();
        assert!(
            reason.starts_with("Token limit is exceeded. Try again in"),
            "{reason}"
        );
        assert!(reason.len() <= 123);
        // APIM never says "0 seconds": at least one.
        let z = LimitBreach::default();
        z.note_at(t0, Duration::ZERO, false);
        assert_eq!(z.get_at(t0), Some((Duration::from_secs(1), false)));
    }

    #[tokio::test]
    async fn charging_a_session_notes_the_counter_it_spends() {
        use sluice_limits::{Limit, ManualClock, MemoryStore, Window};
        let store = MemoryStore::new(Arc::new(ManualClock::from_millis(1_700_000_040_000)));
        let minute = Limit::new(100, Window::Sliding(Duration::from_secs(60)));
        let quota = Limit::new(1_000, Window::Sliding(Duration::from_secs(3_600)));
        let counters = [
            SessionCounter {
                key: "k".into(),
                limit: minute.clone(),
                quota: false,
            },
            SessionCounter {
                key: "k".into(),
                limit: quota.clone(),
                quota: true,
            },
        ];
        let breach = LimitBreach::default();
        charge_session(&store, &counters, 60, &breach).await;
        assert_eq!(breach.get(), None);
        charge_session(&store, &counters, 60, &breach).await;
        // The per-minute limit is spent (120 of 100), the quota is not.
        let (after, is_quota) = breach.get().expect("spent");
        assert!(!is_quota);
        assert!(after > Duration::ZERO && after <= Duration::from_secs(60));
        use sluice_limits::CounterStore;
        assert_eq!(store.peek("k", &minute).await.used, 120);
        assert_eq!(store.peek("k", &quota).await.used, 120);
        // A quota spent alone says so.
        let q = LimitBreach::default();
        charge_session(&store, &counters[1..], 900, &q).await;
        assert_eq!(q.get().map(|(_, quota)| quota), Some(true));
    }

    #[test]
    fn a_session_adds_its_responses() {
        let mut s = RealtimeSession::new(1 << 20);
        let u = |p, c| sluice_tokens::Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
        };
        s.add(&u(10, 5));
        s.add(&u(1, 2));
        assert_eq!(s.responses, 2);
        assert_eq!(
            (
                s.usage.prompt_tokens,
                s.usage.completion_tokens,
                s.usage.total_tokens
            ),
            (11, 7, 18)
        );
        assert!(!s.closed_by_gateway);
        let t0 = Instant::now();
        assert!(!s.past_grace(t0));
        s.closed_at = Some(t0);
        assert!(!s.past_grace(t0 + CLOSE_GRACE));
        assert!(s.past_grace(t0 + CLOSE_GRACE + Duration::from_millis(1)));
    }
}
