//! The Realtime API's relayed WebSocket session: started when the backend
//! answers the handshake with 101, read frame by frame as pingora relays the
//! backend's bytes to the client (unchanged), charged at each `response.done`,
//! and closed by the gateway at the next response once a token limit is spent.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora::{Error, ErrorType};
use sluice_policy::RequestContext;
use sluice_policy::realtime::{CLOSE_POLICY, RealtimeSession, charge_session};
use sluice_tokens::realtime::{RealtimeEvent, close_frame};

use crate::gateway::Gateway;

/// The largest single event the gateway reads whole (`response.done`,
/// whose `output` can carry a long transcript); a larger one is relayed
/// unread.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// What a chunk of the backend's frames held, in order.
enum Found {
    Done(sluice_tokens::Usage),
    Created { end: usize },
    Unreadable(&'static str),
}

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

    /// A chunk of the client's frames on its way to the backend: after the
    /// gateway's close, a session that outlives the grace period is cut.
    pub(crate) fn realtime_client_frames(&self, ctx: &RequestContext) -> pingora::Result<()> {
        match ctx.realtime.as_ref() {
            Some(rt) if rt.past_grace(Instant::now()) => Err(closed_error()),
            _ => Ok(()),
        }
    }

    /// A chunk of the backend's frames on its way to the client.
    pub(crate) fn realtime_frames(
        &self,
        body: &mut Option<Bytes>,
        ctx: &mut RequestContext,
    ) -> pingora::Result<()> {
        let Some(api) = ctx.api else { return Ok(()) };
        let Some(rt) = ctx.realtime.as_mut() else {
            return Ok(());
        };
        if rt.past_grace(Instant::now()) {
            return Err(closed_error());
        }
        let mut found: Vec<Found> = Vec::new();
        {
            let Some(chunk) = body.as_ref() else {
                return Ok(());
            };
            rt.scanner.feed(chunk, |event| match event {
                RealtimeEvent::ResponseDone { usage: Some(u), .. } => found.push(Found::Done(u)),
                RealtimeEvent::ResponseCreated { end } => found.push(Found::Created { end }),
                RealtimeEvent::ProtocolError(_) => {
                    found.push(Found::Unreadable("protocol_error"));
                }
                RealtimeEvent::Oversized { .. } => found.push(Found::Unreadable("oversized")),
                _ => {}
            });
        }
        if rt.closed_by_gateway {
            // The client has the gateway's close frame: nothing may follow.
            // What the backend still produces is read and charged all the
            // same (the tokens are spent).
            *body = Some(Bytes::new());
        }
        if found.is_empty() {
            return Ok(());
        }
        let chunk = body.clone().unwrap_or_default();
        let backend = ctx.backend.map(|i| self.state.backends[i].name.clone());
        for event in found {
            match event {
                Found::Done(u) => self.realtime_response_done(ctx, api, backend.as_deref(), &u),
                Found::Created { end } => self.realtime_response_created(body, &chunk, end, ctx),
                Found::Unreadable(kind) => self.realtime_unreadable(ctx, api, kind),
            }
        }
        Ok(())
    }

    /// A response completed: its tokens are measured and charged now.
    fn realtime_response_done(
        &self,
        ctx: &mut RequestContext,
        api: usize,
        backend: Option<&str>,
        u: &sluice_tokens::Usage,
    ) {
        let Some(rt) = ctx.realtime.as_mut() else {
            return;
        };
        rt.add(u);
        let counters = rt.counters.clone();
        let breach = rt.breach.clone();
        let pipeline = &self.state.apis[api].pipeline;
        pipeline.record_usage(ctx, &self.state.shared, backend, u);
        let tokens = u.total_tokens;
        if !counters.is_empty() {
            let store = self.state.shared.store.clone();
            let mut charge: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                charge_session(&*store, &counters, tokens, &breach).await;
            });
            // The body filter cannot wait. A store that answers at once (the
            // in-memory one) is charged here, so a `response.created` later
            // in this same chunk already sees a spent limit; one that has to
            // wait finishes on a task of its own.
            let mut cx = Context::from_waker(Waker::noop());
            if charge.as_mut().poll(&mut cx).is_pending() {
                tokio::spawn(charge);
            }
        }
        ctx.trace(sluice_trace::Section::Outbound, "llm-token-usage", || {
            sluice_trace::record::Val::obj([
                ("message", "A Realtime response completed.".into()),
                ("totalTokens", tokens.into()),
            ])
        });
    }

    /// A response started: if an earlier response spent a token limit (and
    /// its window has not reopened), the client gets this event, then the
    /// gateway's close frame, and nothing more of the backend's.
    fn realtime_response_created(
        &self,
        body: &mut Option<Bytes>,
        chunk: &Bytes,
        end: usize,
        ctx: &mut RequestContext,
    ) {
        let Some(rt) = ctx.realtime.as_mut() else {
            return;
        };
        if rt.closed_by_gateway {
            return;
        }
        let Some(reason) = rt.breach.reason() else {
            return;
        };
        let close = close_frame(CLOSE_POLICY, &reason, None);
        let end = end.min(chunk.len());
        let mut out = BytesMut::with_capacity(end + close.len());
        out.extend_from_slice(&chunk[..end]);
        out.extend_from_slice(&close);
        *body = Some(out.freeze());
        rt.closed_by_gateway = true;
        rt.closed_at = Some(Instant::now());
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

    /// The backend's frames could not be read (compressed despite the
    /// handshake, or an event over [`MAX_EVENT_BYTES`]): the session runs on,
    /// but its usage from here is not seen. Said once per session.
    fn realtime_unreadable(&self, ctx: &mut RequestContext, api: usize, kind: &'static str) {
        let Some(rt) = ctx.realtime.as_mut() else {
            return;
        };
        if kind == "protocol_error" {
            if rt.unreadable {
                return;
            }
            rt.unreadable = true;
        }
        let name = self.state.api_names[api].as_str();
        self.state
            .websocket_unreadable
            .with_label_values(&[name, kind])
            .inc();
        tracing::warn!(
            api = name,
            kind,
            "a Realtime session's frames could not be read: its usage is not counted"
        );
        ctx.trace(sluice_trace::Section::Outbound, "websocket", || {
            sluice_trace::record::Val::obj([
                (
                    "message",
                    "The backend's frames could not be read; usage is not counted from here."
                        .into(),
                ),
                ("kind", kind.into()),
            ])
        });
    }
}

/// The error that ends a session the gateway closed and its peers did not.
fn closed_error() -> Box<Error> {
    Error::explain(
        ErrorType::ConnectionClosed,
        "the Realtime session outlived the gateway's close",
    )
}
