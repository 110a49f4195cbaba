//! The floor Sluice is measured against: a pingora reverse proxy with no
//! Sluice logic at all, built from the same pingora, the same allocator and
//! the same server and listener settings as the gateway (`sluice
//! bare-proxy`, used by `sluice-load`'s `pingora` target). Whatever the
//! gateway costs above this proxy is Sluice's own; whatever this proxy costs
//! above nginx is pingora's.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::RunArgs;

use crate::server::{Tuning, add_data_listener, server_conf};

/// Forwards every request unchanged to one upstream over plain HTTP/1.1,
/// with the timeouts the gateway gives a backend by default.
struct BareProxy {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(Duration::from_secs(10));
        peer.options.total_connection_timeout = Some(Duration::from_secs(10));
        peer.options.read_timeout = Some(Duration::from_secs(120));
        peer.options.write_timeout = Some(Duration::from_secs(120));
        peer.options.idle_timeout = Some(Duration::from_secs(90));
        Ok(Box::new(peer))
    }
}

/// Serve `listen`, forwarding to `upstream`, until SIGINT or SIGTERM.
pub fn run_bare_proxy(listen: SocketAddr, upstream: SocketAddr, threads: usize, tuning: Tuning) {
    let mut server = Server::new_with_opt_and_conf(None, server_conf(threads, 0, 1, &tuning));
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        BareProxy { upstream },
        "bare pingora",
    );
    add_data_listener(&mut proxy, listen, &tuning);
    server.add_service(proxy);
    server.run(RunArgs::default());
}
