//! Running the gateway as a pingora server: from the CLI (until a signal) or
//! in a thread (tests, benches).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::Notify;

use crate::gateway::Gateway;
use crate::management::ManagementApp;
use crate::state::GatewayState;

/// A listen address checked and held for pingora, which binds only when the
/// server runs (a failure there cannot be reported cleanly).
///
/// The address is bound at once, with `SO_REUSEADDR` and without listening:
/// a port in use by a listener is refused here, port 0 picks a free port,
/// and the socket keeps that port out of every other port-0 bind (the
/// kernel hands out only ports nothing is bound to) until pingora's own
/// `SO_REUSEADDR` listener is up beside it. A socket that does not listen
/// receives no connections. Releasing the port before pingora binds it
/// instead would let a simulator or another gateway pick the same port in
/// between, and the banner would then name someone else's listener.
#[derive(Debug)]
pub struct HeldAddr {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

impl HeldAddr {
    /// The address, with the port the kernel picked for port 0.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Bind `addr` and hold it; see [`HeldAddr`]. Keep the result until pingora
/// listens (or for the life of the server).
pub fn hold_listen_addr(addr: SocketAddr) -> std::io::Result<HeldAddr> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    let addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an IP address"))?;
    Ok(HeldAddr {
        addr,
        _socket: socket,
    })
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

/// Purges idle limit counters off the request path, every
/// `server.counters.purge_interval`, and keeps the counter metrics current.
struct CounterHousekeeping(Arc<GatewayState>);

#[async_trait]
impl pingora::services::background::BackgroundService for CounterHousekeeping {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut tick = tokio::time::interval(self.0.purge_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let state = self.0.clone();
                    // A full pass over the store: on the blocking pool.
                    let _ = tokio::task::spawn_blocking(move || {
                        state.counters.purge_expired();
                        state.affinity_memory.sweep();
                        state.sync_counter_metrics();
                    })
                    .await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// pingora's runtime and listener settings, shared by the gateway and the
/// bare pingora proxy it is benchmarked against (`sluice bare-proxy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// The read buffer of each accepted connection, in bytes (0: reads go
    /// straight to the socket). pingora's default is 64 KiB, allocated
    /// zero-filled per connection.
    pub read_buffer_bytes: usize,
    /// One work-stealing runtime (true) or one single-threaded runtime per
    /// thread (false).
    pub work_stealing: bool,
    /// Accept tasks per listening socket.
    pub listener_tasks_per_fd: usize,
    /// Bind the data listener with `SO_REUSEPORT`.
    pub reuse_port: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            read_buffer_bytes: pingora::protocols::l4::stream::DEFAULT_L4_READ_BUFFER_SIZE,
            work_stealing: true,
            listener_tasks_per_fd: 1,
            reuse_port: false,
        }
    }
}

impl Tuning {
    /// The defaults, overridden by `SLUICE_TUNE_READ_BUFFER`,
    /// `SLUICE_TUNE_WORK_STEALING` (0/1), `SLUICE_TUNE_LISTENER_TASKS` and
    /// `SLUICE_TUNE_REUSE_PORT` (0/1) where set and valid: for benchmarks.
    pub fn from_env() -> Self {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            std::env::var(name).ok()?.trim().parse().ok()
        }
        let d = Tuning::default();
        Tuning {
            read_buffer_bytes: var("SLUICE_TUNE_READ_BUFFER").unwrap_or(d.read_buffer_bytes),
            work_stealing: var::<u8>("SLUICE_TUNE_WORK_STEALING")
                .map_or(d.work_stealing, |v| v != 0),
            listener_tasks_per_fd: var::<usize>("SLUICE_TUNE_LISTENER_TASKS")
                .filter(|n| *n > 0)
                .unwrap_or(d.listener_tasks_per_fd),
            reuse_port: var::<u8>("SLUICE_TUNE_REUSE_PORT").map_or(d.reuse_port, |v| v != 0),
        }
    }
}

/// The pingora server configuration of the gateway and the bare proxy.
pub(crate) fn server_conf(
    threads: usize,
    grace_seconds: u64,
    max_retries: usize,
    tuning: &Tuning,
) -> ServerConf {
    ServerConf {
        threads: threads.max(1),
        grace_period_seconds: Some(grace_seconds),
        graceful_shutdown_timeout_seconds: Some(1),
        max_retries,
        work_stealing: tuning.work_stealing,
        listener_tasks_per_fd: tuning.listener_tasks_per_fd.max(1),
        ..ServerConf::default()
    }
}

/// Add the data-plane listener on `addr` with the tuning's socket options
/// and read buffer.
pub(crate) fn add_data_listener<A>(
    service: &mut pingora::services::listening::Service<A>,
    addr: SocketAddr,
    tuning: &Tuning,
) {
    use pingora::listeners::{ListenerConfig, TcpSocketOptions};
    use pingora::protocols::l4::stream::L4BufferSettings;
    let mut options = TcpSocketOptions::default();
    if tuning.reuse_port {
        options.so_reuseport = Some(true);
    }
    service.add_listener(
        ListenerConfig::tcp(addr.to_string())
            .tcp_socket_options(options)
            .l4_buffer(L4BufferSettings::default().read(tuning.read_buffer_bytes)),
    );
}

fn build_server(
    state: Arc<GatewayState>,
    listen: Listeners,
    threads: usize,
    shutdown_timeout: Duration,
) -> Server {
    let tuning = state.tuning.clone();
    // On SIGTERM pingora stops its listeners, then sleeps the grace period
    // (in-flight requests, open streams included, go on meanwhile), then
    // stops its runtimes, which cancels whatever is left. The grace period
    // is `server.shutdown_timeout_seconds`; `run_blocking` exits earlier,
    // as soon as nothing is in flight.
    // pingora's own retry loop: room for every attempt the routing allows
    // and every stale pooled connection repeated on the same backend. The
    // routing decides every retry; this only bounds it.
    let max_retries =
        state.selector.max_attempts() * 2 + sluice_policy::selection::MAX_STALE_RETRIES + 1;
    let conf = server_conf(threads, shutdown_timeout.as_secs(), max_retries, &tuning);
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(state.clone()),
        "sluice data plane",
    );
    add_data_listener(&mut proxy, listen.data, &tuning);
    server.add_service(proxy);
    server.add_service(pingora::services::background::background_service(
        "sluice counters",
        CounterHousekeeping(state.clone()),
    ));
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

/// Serve until SIGINT (fast: exit at once) or SIGTERM (graceful: stop
/// accepting, let in-flight requests and open streams finish for up to
/// `shutdown_timeout`, then exit).
pub fn run_blocking(
    state: Arc<GatewayState>,
    listen: Listeners,
    threads: usize,
    shutdown_timeout: Duration,
) {
    let in_flight = state.in_flight.clone();
    let server = build_server(state, listen, threads, shutdown_timeout);
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainOnTerm { in_flight }),
    });
}

/// pingora's own signal handling, plus: once SIGTERM has been received and
/// the listeners have stopped, exit as soon as no request is in flight,
/// rather than sleeping out the whole grace period.
struct DrainOnTerm {
    in_flight: Arc<AtomicUsize>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainOnTerm {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term), Ok(mut quit)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
            signal(SignalKind::quit()),
        ) else {
            // Cannot watch signals: fall back to pingora's own handling.
            return pingora::server::UnixShutdownSignalWatch.recv().await;
        };
        tokio::select! {
            _ = int.recv() => ShutdownSignal::FastShutdown,
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => {
                let in_flight = self.in_flight.clone();
                // pingora sleeps the grace period on the thread that called
                // `run`; watch the requests from another one.
                let _ = std::thread::Builder::new()
                    .name("sluice-drain".into())
                    .spawn(move || {
                        // Let pingora stop the listeners first.
                        std::thread::sleep(Duration::from_millis(100));
                        while in_flight.load(Ordering::Acquire) > 0 {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        tracing::info!("SIGTERM: no request in flight; exiting");
                        std::process::exit(0);
                    });
                ShutdownSignal::GracefulTerminate
            }
        }
    }
}

/// Serve in a background thread until the trigger fires. Returns once the
/// listener accepts connections.
pub fn spawn_in_thread(
    state: Arc<GatewayState>,
    listen: Listeners,
    threads: usize,
) -> std::io::Result<(Listeners, ShutdownTrigger, std::thread::JoinHandle<()>)> {
    let held_data = hold_listen_addr(listen.data)?;
    let held_management = listen.management.map(hold_listen_addr).transpose()?;
    let listen = Listeners {
        data: held_data.addr(),
        management: held_management.as_ref().map(HeldAddr::addr),
    };
    let trigger = ShutdownTrigger::default();
    let notify = trigger.0.clone();
    let server = build_server(state, listen, threads, Duration::from_secs(0));
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
    // pingora's listeners hold the ports now.
    drop((held_data, held_management));
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

#[cfg(test)]
mod tests {
    use super::*;
    use socket2::{Domain, Socket, Type};

    fn bind_plain(addr: SocketAddr) -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.bind(&addr.into())?;
        Ok(s)
    }

    #[test]
    fn a_held_port_is_taken_until_pingora_listens_beside_it() {
        let held = hold_listen_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = held.addr();
        assert_ne!(addr.port(), 0);
        // Nobody else binds it meanwhile...
        let err = bind_plain(addr).expect_err("the held port is taken");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // ...and nothing answers on it: it does not listen.
        assert!(std::net::TcpStream::connect(addr).is_err());
        // A listener with SO_REUSEADDR, as std's and pingora's are, binds
        // and listens beside it (the gateway tests run pingora itself so).
        let listener = std::net::TcpListener::bind(addr).expect("a listener binds beside");
        let _client = std::net::TcpStream::connect(addr).expect("the listener answers");
        let (_conn, _) = listener.accept().unwrap();
        drop(held);
    }

    #[test]
    fn a_dropped_hold_frees_its_port() {
        let held = hold_listen_addr("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = held.addr();
        drop(held);
        bind_plain(addr).expect("free after release");
    }

    #[test]
    fn a_port_with_a_listener_is_refused() {
        let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = hold_listen_addr(busy.local_addr().unwrap()).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
