//! Attempts the gateway runs itself, for request bodies it holds whole
//! beyond pingora's 64 KiB retry buffer (or sent chunked).
//!
//! pingora 0.9 replays a request body on a retry only from its retry buffer,
//! which is fixed at 64 KiB; a larger body read before routing would reach
//! the second backend as nothing at all. For those requests the gateway
//! sends each attempt itself through pingora's connector, from the one copy
//! it read, and relays the chosen answer to the client: head, then every
//! body chunk as it arrives (SSE is not buffered). The policies' response
//! steps run exactly as on pingora's path, through the same hooks. The
//! backend's read and write timeouts apply to every attempt, and a client
//! that leaves while an attempt waits for its answer ends it.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::client::HttpSession;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorType};
use sluice_policy::{After, RequestContext};
use sluice_routing::Outcome;

use crate::gateway::{Gateway, RoutingHeaders, connect_outcome, outcome_of};

/// Hop-by-hop request headers that are not forwarded on a relayed attempt
/// (pingora's own path drops them as well).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
    "http2-settings",
];

/// How one attempt ended before any of it reached the client.
enum Sent {
    /// The backend answered with this head.
    Head(Box<ResponseHeader>),
    /// The attempt failed without an answer.
    Failed(Box<Error>),
}

impl Gateway {
    /// Send the request, with `body`, to backends until one gives an answer
    /// the client should see, and relay that answer. Failures that may fail
    /// over do; the gateway's own error is answered when none is left.
    pub(crate) async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestContext>,
        body: Bytes,
    ) -> Result<()> {
        let selector = &self.state.selector;
        loop {
            let backend = match selector.next_backend(ctx) {
                Ok(b) => b,
                Err(refusal) => {
                    let continued = ctx.continue_sent;
                    return self.refuse(session, ctx, &refusal, continued).await;
                }
            };
            let peer = match self.peer_for(ctx, backend).await {
                Ok(p) => p,
                Err(e) => {
                    let after = selector.after_connect_error(ctx, Outcome::ConnectFailed, true);
                    match self.settle(session, ctx, after, &e).await {
                        Some(done) => return done,
                        None => continue,
                    }
                }
            };
            let (mut up, reused) = match self.state.connector.get_http_session(&*peer).await {
                Ok(s) => s,
                Err(mut e) => {
                    e.as_up();
                    if let Some(b) = self.state.backends.get(backend) {
                        b.connect_failed();
                    }
                    let after = selector.after_connect_error(ctx, connect_outcome(&e), true);
                    match self.settle(session, ctx, after, &e).await {
                        Some(done) => return done,
                        None => continue,
                    }
                }
            };
            // The connector applies no read or write timeout of its own.
            up.set_read_timeout(peer.options.read_timeout);
            up.set_write_timeout(peer.options.write_timeout);
            let mut req = session.req_header().clone();
            self.rewrite_request(session, &mut req, ctx)?;
            strip_hop_by_hop(&mut req);
            req.set_version(http::Version::HTTP_11);
            let attempt_body = match self.edit_for_attempt(ctx) {
                Some(_) => ctx
                    .edit
                    .as_mut()
                    .and_then(|e| e.attempt.take())
                    .unwrap_or_else(|| body.clone()),
                None => body.clone(),
            };
            req.insert_header(http::header::CONTENT_LENGTH, attempt_body.len().to_string())?;
            self.trace_forward(ctx, &req);
            // Waiting for the answer, watch the client: one that leaves ends
            // the attempt (pingora's own path does the same).
            let sent = tokio::select! {
                sent = send(&mut up, req, attempt_body) => sent,
                gone = client_gone(session) => {
                    up.shutdown().await;
                    return Err(gone);
                }
            };
            match sent {
                Sent::Failed(e) => {
                    up.shutdown().await;
                    // A pooled connection the backend had closed while idle.
                    let stale = reused && matches!(e.retry, pingora::RetryType::ReusedOnly);
                    if stale && selector.retry_same(ctx) {
                        continue;
                    }
                    let after = selector.after_error(ctx, outcome_of(&e), true);
                    match self.settle(session, ctx, after, &e).await {
                        Some(done) => return done,
                        None => continue,
                    }
                }
                Sent::Head(mut head) => {
                    self.trace_backend_head(ctx, &head);
                    let status = head.status.as_u16();
                    let decision = {
                        let headers = RoutingHeaders::read(&head.headers);
                        let get = |n: &str| headers.get(n);
                        selector.after_status(ctx, status, get, true)
                    };
                    match decision {
                        After::Retry => {
                            up.shutdown().await;
                            continue;
                        }
                        After::Refuse(r) => {
                            up.shutdown().await;
                            let continued = ctx.continue_sent;
                            return self.refuse(session, ctx, &r, continued).await;
                        }
                        After::Deliver => {}
                    }
                    // This answer goes to the client: the body is not needed
                    // again, and its share of the budget is given back now
                    // rather than when a long stream ends.
                    drop(body);
                    ctx.body_hold = None;
                    ctx.edit = None;
                    self.response_filter(session, &mut head, ctx).await?;
                    let no_body = status == 204 || status == 304;
                    session.write_response_header(head, no_body).await?;
                    if !no_body {
                        self.pipe_body(session, ctx, &mut up).await?;
                    }
                    if up.response_done() {
                        self.state
                            .connector
                            .release_http_session(up, &*peer, peer.idle_timeout())
                            .await;
                    } else {
                        up.shutdown().await;
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Relay the chosen answer's body, chunk by chunk, through the same
    /// body hook as pingora's path (usage scanning).
    async fn pipe_body(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestContext>,
        up: &mut HttpSession,
    ) -> Result<()> {
        loop {
            let chunk = up.read_response_body().await.map_err(|mut e| {
                e.as_up();
                e
            })?;
            let end = chunk.is_none() || up.response_done();
            let mut data = chunk;
            self.response_body_filter(session, &mut data, end, ctx)?;
            session.write_response_body(data, end).await?;
            if end {
                return Ok(());
            }
        }
    }

    /// What a failed attempt (`e`) leads to: `None` to try the next
    /// backend, else the answer given (the gateway's refusal, or `e` as
    /// pingora's path would answer it).
    async fn settle(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        after: After,
        e: &Error,
    ) -> Option<Result<()>> {
        match after {
            After::Retry => None,
            After::Refuse(r) => {
                let continued = ctx.continue_sent;
                Some(self.refuse(session, ctx, &r, continued).await)
            }
            After::Deliver => Some(self.answer_error(session, ctx, e).await),
        }
    }

    /// Answer a failed last attempt as pingora's path would.
    async fn answer_error(
        &self,
        session: &mut Session,
        ctx: &mut RequestContext,
        e: &Error,
    ) -> Result<()> {
        match self.error_for(e, ctx) {
            Some(err) => {
                let continued = ctx.continue_sent;
                self.refuse(session, ctx, &err, continued).await
            }
            None => Err(Error::explain(
                ErrorType::ConnectionClosed,
                "the client went away",
            )),
        }
    }
}

/// Remove the hop-by-hop headers, and those the client's `Connection`
/// header names, from a relayed request.
fn strip_hop_by_hop(req: &mut pingora::http::RequestHeader) {
    let named: Vec<String> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect();
    for h in HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str))
    {
        req.remove_header(h);
    }
}

/// Resolves when the client closes its connection (or breaks it); stays
/// pending otherwise.
async fn client_gone(session: &mut Session) -> Box<Error> {
    match session.downstream_session.read_body_or_idle(true).await {
        Err(e) => e.into_down(),
        Ok(_) => std::future::pending().await,
    }
}

/// Write the request and its body, and read the answer's head.
async fn send(up: &mut HttpSession, req: pingora::http::RequestHeader, body: Bytes) -> Sent {
    let result = async {
        up.write_request_header(Box::new(req)).await?;
        up.write_request_body(body, true).await?;
        up.finish_request_body().await?;
        up.read_response_header().await?;
        Ok::<_, Box<Error>>(())
    }
    .await;
    match result {
        Err(mut e) => {
            e.as_up();
            Sent::Failed(e)
        }
        Ok(()) => match up.response_header() {
            Some(h) => Sent::Head(Box::new(h.clone())),
            None => Sent::Failed(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "no response head from the backend",
            )),
        },
    }
}
