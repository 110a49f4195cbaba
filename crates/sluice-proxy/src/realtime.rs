//! The Realtime API's relayed WebSocket session: started when the backend
//! answers the handshake with 101, read frame by frame as pingora relays the
//! backend's bytes to the client (unchanged), charged at each `response.done`,
//! and closed by the gateway at the next response once a token limit is spent.

use bytes::{Bytes, BytesMut};
use sluice_policy::RequestContext;
use sluice_policy::realtime::{CLOSE_POLICY, RealtimeSession, charge_session};
use sluice_tokens::realtime::{RealtimeEvent, close_frame};

use crate::gateway::Gateway;

/// The largest single event the gateway reads whole (`response.done`,
/// whose `output` can carry a long transcript); a larger one is relayed
/// unread.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

impl Gateway {
    /// The backend upgraded the connection: the session starts.
    pub(crate) fn open_realtime(&self, ctx: &mut RequestContext, api: usize) {
        let pipeline = &self.state.apis[api].pipeline;
        let mut session = RealtimeSession::new(MAX_EVENT_BYTES);
        session.counters = pipeline.session_counters(ctx).into();
        ctx.realtime = Some(Box::new(session));
        self.state
            .websockets_open
            .with_label_values(&[self.state.api_names[api].as_str()])
            .inc();
        ctx.trace(sluice_trace::Section::Outbound, "websocket", || {
            "The backend accepted the WebSocket upgrade; frames are relayed both ways from here."
                .into()
        });
    }

    /// A chunk of the backend's frames on its way to the client.
    pub(crate) fn realtime_frames(&self, body: &mut Option<Bytes>, ctx: &mut RequestContext) {
        let Some(api) = ctx.api else { return };
        let Some(rt) = ctx.realtime.as_mut() else {
            return;
        };
        if rt.closed_by_gateway {
            // The client has the gateway's close frame: nothing may follow.
            if body.is_some() {
                *body = Some(Bytes::new());
            }
            return;
        }
        let Some(chunk) = body.as_ref() else { return };
        let mut done: Vec<sluice_tokens::Usage> = Vec::new();
        let mut cut = None;
        let breach = &rt.breach;
        rt.scanner.feed(chunk, |event| match event {
            RealtimeEvent::ResponseDone { usage: Some(u), .. } => done.push(u),
            RealtimeEvent::ResponseCreated { end } if cut.is_none() && breach.get().is_some() => {
                cut = Some(end);
            }
            _ => {}
        });
        for u in &done {
            rt.add(u);
        }
        let counters = rt.counters.clone();
        let breach = rt.breach.clone();
        if let Some(end) = cut {
            // The token limit was spent by an earlier response: the client
            // gets this response's `response.created`, then the close frame,
            // and nothing more of the backend's.
            let reason = breach.reason().unwrap_or_default();
            let close = close_frame(CLOSE_POLICY, &reason, None);
            let end = end.min(chunk.len());
            let mut out = BytesMut::with_capacity(end + close.len());
            out.extend_from_slice(&chunk[..end]);
            out.extend_from_slice(&close);
            *body = Some(out.freeze());
            rt.closed_by_gateway = true;
            ctx.trace(sluice_trace::Section::Outbound, "websocket", || {
                sluice_trace::record::Val::obj([
                    (
                        "message",
                        "The caller's token limit is spent: the session was closed at its next response."
                            .into(),
                    ),
                    ("closeCode", u64::from(CLOSE_POLICY).into()),
                    ("reason", sluice_trace::record::Val::from(reason.clone())),
                ])
            });
        }
        if done.is_empty() {
            return;
        }
        let pipeline = &self.state.apis[api].pipeline;
        let backend = ctx.backend.map(|i| self.state.backends[i].name.clone());
        for u in &done {
            pipeline.record_usage(ctx, &self.state.shared, backend.as_deref(), u);
        }
        let tokens: u64 = done.iter().map(|u| u.total_tokens).sum();
        if !counters.is_empty() {
            // The body filter cannot wait: the charge runs beside the relay,
            // and a spent limit closes the session at its next response.
            let store = self.state.shared.store.clone();
            tokio::spawn(async move {
                charge_session(&*store, &counters, tokens, &breach).await;
            });
        }
        ctx.trace(sluice_trace::Section::Outbound, "llm-token-usage", || {
            sluice_trace::record::Val::obj([
                ("message", "A Realtime response completed.".into()),
                ("totalTokens", tokens.into()),
            ])
        });
    }
}
