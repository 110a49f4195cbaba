//! Running the gateway as a pingora server: from the CLI (until a signal) or
//! in a thread (tests, benches).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::Notify;

use crate::gateway::Gateway;
use crate::management::ManagementApp;
use crate::state::GatewayState;

/// Check a listen address before pingora binds it (it binds only when the
/// server runs, and a failure there cannot be reported cleanly): bind it now
/// and release it. Port 0 picks a free port this way; the window between the
/// release and pingora's bind is tiny. The address is printed in the banner
/// so tests and users learn the port.
pub fn pick_listen_addr(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    l.local_addr()
}

/// Stops a gateway started with [`spawn_in_thread`].
#[derive(Debug, Clone, Default)]
pub struct ShutdownTrigger(Arc<Notify>);

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.notify_one();
    }
}

struct NotifyWatch(Arc<Notify>);

#[async_trait]
impl ShutdownSignalWatch for NotifyWatch {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// Where the gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct Listeners {
    /// The data plane.
    pub data: SocketAddr,
    /// The management listener (`/metrics`, `/health`), if configured.
    pub management: Option<SocketAddr>,
}

fn build_server(state: Arc<GatewayState>, listen: Listeners, threads: usize) -> Server {
    let conf = ServerConf {
        threads: threads.max(1),
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(10),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(state.clone()),
        "sluice data plane",
    );
    proxy.add_tcp(&listen.data.to_string());
    server.add_service(proxy);
    if let Some(addr) = listen.management {
        let mut mgmt = pingora::services::listening::Service::new(
            "sluice management".to_string(),
            pingora::apps::http_app::HttpServer::new_app(ManagementApp::new(state)),
        );
        mgmt.add_tcp(&addr.to_string());
        server.add_service(mgmt);
    }
    server
}

/// Serve until SIGINT (fast) or SIGTERM (graceful: in-flight requests finish).
pub fn run_blocking(state: Arc<GatewayState>, listen: Listeners, threads: usize) {
    build_server(state, listen, threads).run(RunArgs::default());
}

/// Serve in a background thread until the trigger fires. Returns once the
/// listener accepts connections.
pub fn spawn_in_thread(
    state: Arc<GatewayState>,
    listen: Listeners,
    threads: usize,
) -> std::io::Result<(Listeners, ShutdownTrigger, std::thread::JoinHandle<()>)> {
    let listen = Listeners {
        data: pick_listen_addr(listen.data)?,
        management: listen.management.map(pick_listen_addr).transpose()?,
    };
    let trigger = ShutdownTrigger::default();
    let notify = trigger.0.clone();
    let server = build_server(state, listen, threads);
    let handle = std::thread::Builder::new()
        .name("sluice-gateway".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(NotifyWatch(notify)),
            })
        })?;
    wait_listening(listen.data)?;
    if let Some(m) = listen.management {
        wait_listening(m)?;
    }
    Ok((listen, trigger, handle))
}

/// Poll until something accepts on `addr` (at most ~10 s).
pub fn wait_listening(addr: SocketAddr) -> std::io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}
