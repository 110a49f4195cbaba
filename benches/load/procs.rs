//! Child processes (simulator, Sluice, nginx), the temp directory they share, and the
//! `/proc` readings (CPU ticks, peak RSS) taken around a measured phase.

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// How a child is asked to stop before it is killed.
#[derive(Clone, Copy, Debug)]
pub enum StopSignal {
    /// SIGINT (Sluice: pingora's fast shutdown).
    Int,
    /// SIGTERM (simulator, nginx master: fast shutdown of master and workers).
    Term,
}

/// A running child process, stopped (signal, then SIGKILL after 5 s) on drop.
#[derive(Debug)]
pub struct Proc {
    name: &'static str,
    child: Child,
    stop: StopSignal,
    stderr_path: PathBuf,
}

impl Proc {
    /// Spawn `cmd` with stdout piped (read by a background thread and handed over line by
    /// line) and stderr sent to `<dir>/<name>.stderr`.
    fn spawn(
        name: &'static str,
        mut cmd: Command,
        dir: &Path,
        stop: StopSignal,
    ) -> Result<(Proc, mpsc::Receiver<String>)> {
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stderr = fs::File::create(&stderr_path)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{name}: no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                // Keep draining after the receiver is gone so the child never blocks on a full pipe.
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(t) = &tx
                        && t.send(line).is_err()
                    {
                        tx = None;
                    }
                }
            })?;
        Ok((
            Proc {
                name,
                child,
                stop,
                stderr_path,
            },
            rx,
        ))
    }

    /// Spawn and wait (at most `timeout`) for a stdout line containing `marker` followed by
    /// `http://HOST:PORT`; returns the address.
    pub fn spawn_until_line(
        name: &'static str,
        cmd: Command,
        dir: &Path,
        stop: StopSignal,
        marker: &str,
        timeout: Duration,
    ) -> Result<(Proc, SocketAddr)> {
        let (mut proc, rx) = Proc::spawn(name, cmd, dir, stop)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split(marker).nth(1)
                        && let Some(addr) = parse_http_addr(rest)
                    {
                        return Ok((proc, addr));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "{name} printed no '{marker} http://...' line within {timeout:?}{}",
                        proc.stderr_tail()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = proc.wait_exit(Duration::from_secs(2));
                    bail!(
                        "{name} closed its stdout before it was ready (exit: {}){}",
                        status.map_or_else(|| "still running".to_string(), |s| s.to_string()),
                        proc.stderr_tail()
                    );
                }
            }
        }
    }

    /// Spawn (stdout ignored) and wait until `addr` accepts TCP connections.
    pub fn spawn_until_listening(
        name: &'static str,
        cmd: Command,
        dir: &Path,
        stop: StopSignal,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Proc> {
        let (mut proc, _rx) = Proc::spawn(name, cmd, dir, stop)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = proc.child.try_wait()? {
                bail!(
                    "{name} exited before listening ({status}){}",
                    proc.stderr_tail()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(proc);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} did not accept connections on {addr} within {timeout:?}{}",
                    proc.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// Last lines of the child's stderr, formatted for an error message.
    pub fn stderr_tail(&self) -> String {
        let text = read_tail(&self.stderr_path, 2000);
        let text = text.trim();
        if text.is_empty() {
            String::new()
        } else {
            format!("\n--- {} stderr (tail) ---\n{text}", self.name)
        }
    }

    /// Number of stderr lines the child wrote (warnings while under load are worth a note).
    pub fn stderr_lines(&self) -> usize {
        fs::read_to_string(&self.stderr_path)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    /// Ask the child to stop, wait up to 5 s, then SIGKILL it.
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let sig = match self.stop {
            StopSignal::Int => "-INT",
            StopSignal::Term => "-TERM",
        };
        let sent = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if sent && self.wait_exit(Duration::from_secs(5)).is_some() {
            return;
        }
        eprintln!(
            "sluice-load: {} (pid {}) did not stop; killing it",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// `http://127.0.0.1:8080/...` (possibly after other text) → `127.0.0.1:8080`.
fn parse_http_addr(s: &str) -> Option<SocketAddr> {
    let rest = &s[s.find("http://")? + "http://".len()..];
    let end = rest
        .find(|c: char| c == '/' || c.is_whitespace())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A free 127.0.0.1 port for a server that binds it itself (nginx), and
/// the socket that holds it meanwhile: bound with `SO_REUSEADDR` and not
/// listening, so no other port-0 bind is handed the port, nothing connects
/// to it, and a server setting `SO_REUSEADDR` (nginx does) binds and listens
/// beside it. Drop the socket once the server listens.
pub fn held_port() -> Result<(u16, socket2::Socket)> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    let port = socket
        .local_addr()?
        .as_socket()
        .map(|a| a.port())
        .context("a port-0 bind gave no IP address")?;
    Ok((port, socket))
}

/// Wait until `addr` accepts a TCP connection.
pub fn wait_connectable(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() >= deadline {
            bail!("{addr} did not accept connections within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The processes whose CPU and memory are charged to a proxy target.
#[derive(Clone, Copy, Debug)]
pub struct ProcGroup {
    pub root: u32,
    /// Also count the root's child processes (nginx workers).
    pub with_children: bool,
}

impl ProcGroup {
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.root];
        if self.with_children {
            pids.extend(children(self.root));
        }
        pids
    }

    /// utime + stime over the group, in clock ticks.
    pub fn cpu_ticks(&self) -> u64 {
        self.pids().into_iter().filter_map(cpu_ticks).sum()
    }

    /// Sum of VmHWM over the group, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(vm_hwm_kib).sum()
    }

    /// Sum of VmRSS (resident now) over the group, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(vm_rss_kib).sum()
    }
}

/// `VmRSS` of `/proc/<pid>/status`, KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Fields 14 (utime) and 15 (stime) of `/proc/<pid>/stat`.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it start at 3 (state).
    let (_, after) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Direct children of `pid`: `/proc/<pid>/task/*/children`, else a scan of `/proc/*/stat`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    if out.is_empty()
        && let Ok(entries) = fs::read_dir("/proc")
    {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, a)| a.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Clock ticks per second (`getconf CLK_TCK`, else the usual 100).
pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The model name of the first CPU in `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_port_refuses_connections_and_lets_a_reuseaddr_listener_bind() {
        let (port, held) = held_port().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        assert_ne!(port, 0);
        assert!(TcpStream::connect(addr).is_err(), "nothing listens yet");
        // std's listener sets SO_REUSEADDR, as nginx's do.
        let listener = std::net::TcpListener::bind(addr).expect("binds beside the hold");
        drop(held);
        let _client = TcpStream::connect(addr).expect("the listener answers");
        listener.accept().expect("accepted");
    }

    #[test]
    fn parses_banner_addresses() {
        assert_eq!(
            parse_http_addr(" region loadtest listening on http://127.0.0.1:4321"),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(
            parse_http_addr("http://127.0.0.1:80/openai x"),
            Some("127.0.0.1:80".parse().unwrap())
        );
        assert_eq!(parse_http_addr("no address"), None);
    }

    #[test]
    fn reads_own_cpu_and_rss() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(vm_hwm_kib(me).unwrap() > 0);
    }
}
