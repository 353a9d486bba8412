//! The processes and servers the driver controls: relay and consumer children (killed with
//! SIGKILL), its own tansu broker (in memory, or on durable SQLite storage), and the database
//! servers it restarts. Every guard here puts things back when dropped, failed scenario or not.

use std::fs::OpenOptions;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::BoxError;
use crate::world::BackendKind;

/// A relay or consumer child process.
#[derive(Debug)]
pub(crate) struct RoleProc {
    pub(crate) role: &'static str,
    pub(crate) index: usize,
    child: Child,
    ready: PathBuf,
}

/// How to start role processes of one scenario run.
#[derive(Debug, Clone)]
pub(crate) struct Spawner {
    pub(crate) exe: PathBuf,
    pub(crate) backend: BackendKind,
    pub(crate) url: String,
    pub(crate) brokers: String,
    pub(crate) tag: String,
    pub(crate) dir: PathBuf,
    pub(crate) idempotent: bool,
    /// The consumers' database (the relays' one unless they have their own).
    pub(crate) consumer_backend: BackendKind,
    pub(crate) consumer_url: String,
    /// The consumers have a database of their own (`Dedupe::Inbox`).
    pub(crate) inbox: bool,
    /// The service is relayed from the write-ahead log.
    pub(crate) wal: bool,
}

impl Spawner {
    pub(crate) fn spawn(&self, role: &'static str, index: usize) -> Result<RoleProc, BoxError> {
        let ready = self.dir.join(format!("{}-{role}-{index}.ready", self.tag));
        let _ = std::fs::remove_file(&ready);
        let log_path = self.dir.join(format!("{}-{role}-{index}.log", self.tag));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let (backend, url) = if role == "consumer" {
            (self.consumer_backend, &self.consumer_url)
        } else {
            (self.backend, &self.url)
        };
        let child = Command::new(&self.exe)
            .arg(role)
            .args(["--backend", backend.name()])
            .args(["--database-url", url])
            .args(["--brokers", &self.brokers])
            .args(["--tag", &self.tag])
            .args(["--index", &index.to_string()])
            .arg("--ready-file")
            .arg(&ready)
            .args((!self.idempotent).then_some("--no-idempotence"))
            .args((self.inbox && role == "consumer").then_some("--inbox"))
            .args((self.wal && role == "relay").then_some("--wal"))
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {} {role}: {e}", self.exe.display()))?;
        Ok(RoleProc {
            role,
            index,
            child,
            ready,
        })
    }
}

impl RoleProc {
    /// SIGKILL, as `kill -9`: no shutdown path runs.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.exists()
    }

    /// Exited on its own (a crash): the exit status.
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Closes its standard input (it shuts down and drains) and waits up to `grace`, then kills.
    /// True when it stopped by itself with success.
    pub(crate) async fn stop(mut self, grace: Duration) -> bool {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                self.kill();
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
        let _ = std::fs::remove_file(&self.ready);
    }
}

/// Runs a command, failing with its output when it fails.
fn sh(program: &str, args: &[&str]) -> Result<(), BoxError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

fn quietly(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_until(what: &str, timeout: Duration, mut up: impl FnMut() -> bool) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    while !up() {
        if Instant::now() >= deadline {
            return Err(format!("{what} not reached within {timeout:?}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn postgres_cluster() -> Result<String, BoxError> {
    let mut versions: Vec<String> = std::fs::read_dir("/etc/postgresql")?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions
        .into_iter()
        .next()
        .ok_or_else(|| "no PostgreSQL cluster under /etc/postgresql".into())
}

fn postgres_up() -> bool {
    quietly("pg_isready", &["-h", "127.0.0.1", "-p", "5432", "-q"])
}

fn mariadb_up() -> bool {
    quietly("mysqladmin", &["-h", "127.0.0.1", "-u", "root", "ping"])
}

/// Starts the database server when it is down; an error when it does not come up.
pub(crate) fn ensure_up(kind: BackendKind) -> Result<(), BoxError> {
    match kind {
        BackendKind::Postgres => {
            if !postgres_up() {
                let version = postgres_cluster()?;
                let _ = sh(
                    "pg_ctlcluster",
                    &["--skip-systemctl-redirect", &version, "main", "start"],
                );
            }
            wait_until(
                "PostgreSQL on 127.0.0.1:5432",
                Duration::from_secs(60),
                postgres_up,
            )
        }
        BackendKind::Mysql => {
            if !mariadb_up() {
                sh(
                    "start-stop-daemon",
                    &[
                        "--start",
                        "--oknodo",
                        "--background",
                        "--exec",
                        "/usr/sbin/mariadbd",
                    ],
                )?;
            }
            wait_until(
                "MariaDB on 127.0.0.1:3306",
                Duration::from_secs(60),
                mariadb_up,
            )
        }
    }
}

/// Stops the database server, waits `down`, starts it again. Blocking.
pub(crate) fn restart_database(kind: BackendKind, down: Duration) -> Result<(), BoxError> {
    let _guard = ServerGuard(kind);
    match kind {
        BackendKind::Postgres => {
            let version = postgres_cluster()?;
            sh(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &version,
                    "main",
                    "stop",
                    "-m",
                    "fast",
                ],
            )?;
            std::thread::sleep(down);
            sh(
                "pg_ctlcluster",
                &["--skip-systemctl-redirect", &version, "main", "start"],
            )?;
        }
        BackendKind::Mysql => {
            sh("mysqladmin", &["-h", "127.0.0.1", "-u", "root", "shutdown"])?;
            wait_until("MariaDB shut down", Duration::from_secs(60), || {
                !mariadb_up()
            })?;
            std::thread::sleep(down);
        }
    }
    ensure_up(kind)
}

/// Brings the server back up when dropped, whatever happened.
#[derive(Debug)]
pub(crate) struct ServerGuard(pub(crate) BackendKind);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        if let Err(e) = ensure_up(self.0) {
            eprintln!("chaos: could not bring {} back: {e}", self.0.name());
        }
    }
}

/// The suite's own tansu broker, so that the shared test broker is never disturbed: on SQLite
/// storage that survives its restarts for the outage scenario, in memory for the others (see
/// [`Broker::storage`]).
#[derive(Debug)]
pub(crate) struct Broker {
    port: u16,
    storage: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// On SQLite storage, which survives a restart (the outage scenario); else in memory.
    persistent: bool,
}

impl Broker {
    pub(crate) fn start(port: u16, dir: &Path) -> Result<Self, BoxError> {
        if listening(port) {
            return Err(format!(
                "127.0.0.1:{port} is already in use; the chaos suite runs its own broker there"
            )
            .into());
        }
        let mut broker = Self {
            port,
            storage: dir.join("tansu.db"),
            log: dir.join("tansu.log"),
            child: None,
            persistent: false,
        };
        let _ = std::fs::remove_file(&broker.storage);
        broker.up()?;
        Ok(broker)
    }

    pub(crate) fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A broker on SQLite storage (`persistent`: the outage scenario restarts it) or in memory
    /// (every other scenario). tansu 0.6 on SQLite storage stops answering a consumer group's
    /// requests after its members are killed (fetches, heartbeats and joins time out, from new
    /// clients too, with the broker idle), which its memory storage has not been seen to do:
    /// only the scenario that needs a restart runs on SQLite. Restarts on empty storage when the
    /// kind changes.
    pub(crate) fn storage(&mut self, persistent: bool) -> Result<(), BoxError> {
        if self.persistent != persistent {
            self.persistent = persistent;
            self.reset()?;
        }
        Ok(())
    }

    /// Starts tansu on the same storage.
    pub(crate) fn up(&mut self) -> Result<(), BoxError> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        // tansu reads the path of a `sqlite:///name` URL relative to its working directory.
        let dir = self.storage.parent().unwrap_or(Path::new("."));
        let file = self
            .storage
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let mut child = Command::new("tansu")
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .arg("--storage-engine")
            .arg(if self.persistent {
                format!("sqlite:///{file}")
            } else {
                "memory://tansu/".to_owned()
            })
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start tansu (is it installed?): {e}"))?;
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !listening(port) {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "tansu exited at start ({status}); see {}",
                    self.log.display()
                )
                .into());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("tansu on 127.0.0.1:{port} not reached within 30 s").into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child = Some(child);
        Ok(())
    }

    /// A new broker on empty storage: after an outage, or when the broker stopped answering.
    pub(crate) fn reset(&mut self) -> Result<(), BoxError> {
        self.down();
        let _ = std::fs::remove_file(&self.storage);
        self.up()
    }

    /// Stops tansu with SIGKILL. (tansu 0.6 on SIGTERM cancels its storage first and keeps
    /// serving connections, whose requests then fail until the process is killed anyway.)
    pub(crate) fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_file(&self.storage);
    }
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(300),
    )
    .is_ok()
}
