//! Sluice's data plane on pingora. This is the only crate that touches
//! pingora's `Session` and `ProxyHttp`; everything it decides comes from
//! `sluice-policy`, which knows nothing of pingora.

mod bare;
mod gateway;
mod heads;
mod management;
mod models;
mod realtime;
mod relay;
mod server;
mod state;
mod traces;

pub use bare::run_bare_proxy;
pub use gateway::Gateway;
pub use server::{
    HeldAddr, Listeners, ShutdownTrigger, Tuning, hold_listen_addr, run_blocking, spawn_in_thread,
    wait_listening,
};
pub use state::{BuildError, GatewayState};
