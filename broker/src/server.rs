//! The broker's main loop: adapters come and go, sockets follow.
//!
//! Each discovery event updates the map of present adapters (keyed by the
//! source's id, as container-hotplug keys by syspath); [`plan`] turns config
//! and adapters into the sockets that should exist, and the loop applies the
//! difference. Order matters to devshim: a machine's index is written before
//! its new sockets appear and after its old ones are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use futures_util::StreamExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::manifest::{Manifest, CONTROL_SOCKET, FILE as MANIFEST};

use crate::adapter::Adapter;
use crate::config::Config;
use crate::control::{self, Scope};
use crate::peer::{check_host_access, Peer};
use crate::plan::{self, Access, SocketSpec, TtyKey};
use crate::session;
use crate::source::{Source, SourceEvent};
use crate::state::Shared;

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/devbroker";
/// The admin's control socket, relative to the run directory.
pub const ADMIN_SOCKET: &str = "broker.sock";

/// Where the broker keeps its sockets, and where it reads users from.
#[derive(Debug, Clone)]
pub struct Options {
    pub run_dir: PathBuf,
    /// Directory holding `passwd` and `group` (normally `/etc`).
    pub etc: PathBuf,
}

/// A socket being served; dropping it stops accepting and removes the file.
struct Listener {
    path: PathBuf,
    cancel: CancellationToken,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.cancel.cancel();
        let _ = fs::remove_file(&self.path);
    }
}

impl Listener {
    /// Withdraws a tty socket whose lease moved on: the file goes at once, so
    /// nobody new connects, but a client already queued is still served, and
    /// its session — like any from this socket — ends after
    /// [`LEASE_END_GRACE`](crate::state::LEASE_END_GRACE): what a job wrote
    /// just before it ended still reaches the board.
    fn retire(self) {
        let _ = fs::remove_file(&self.path);
        let cancel = self.cancel.clone();
        std::mem::forget(self);
        tokio::spawn(async move {
            tokio::time::sleep(crate::state::LEASE_END_GRACE).await;
            cancel.cancel();
        });
    }
}

/// Runs the broker until `shutdown` is cancelled, then removes what it made
/// (sockets and indexes; machine directories stay, as containers bind them).
pub async fn run(
    config: Config,
    opts: Options,
    source: Box<dyn Source>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let machines = plan::machines(&config);
    let _lock = prepare_run_dir(&opts.run_dir, &machines)?;
    let shared = Shared::new(config.clone());
    let mut fixed = Vec::new();
    let mut control = |path: PathBuf, mode: u32, scope: Scope| -> anyhow::Result<()> {
        let l = bind(&path, mode).with_context(|| format!("can't serve {}", path.display()))?;
        let cancel = shutdown.child_token();
        tokio::spawn(control::serve(l, scope, shared.clone(), cancel.clone()));
        fixed.push(Listener { path, cancel });
        Ok(())
    };
    control(
        opts.run_dir.join("host").join(CONTROL_SOCKET),
        0o666,
        Scope::Host,
    )?;
    let empty = Manifest {
        version: 1,
        ttys: vec![],
    };
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    for m in &machines {
        let dir = opts.run_dir.join("machines").join(m);
        write_manifest(&dir, &empty)?;
        manifests.insert(m.clone(), empty.clone());
        control(dir.join(CONTROL_SOCKET), 0o666, Scope::Machine(m.clone()))?;
    }
    // Last: once the admin socket answers, every control socket is there.
    control(opts.run_dir.join(ADMIN_SOCKET), 0o600, Scope::Admin)?;

    info!("watching {}", source.describe());
    let mut stream = source.watch().context("can't start the discovery source")?;
    let mut adapters: BTreeMap<String, Adapter> = BTreeMap::new();
    let mut listeners: BTreeMap<PathBuf, Listener> = BTreeMap::new();
    let mut away = Away::default();
    info!(run_dir = %opts.run_dir.display(), boards = config.boards.len(), machines = machines.len(), "devbroker ready");
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // Leases moved: re-plan who has which sockets.
            _ = shared.changed.notified() => {}
            // A re-enumeration grace ran out.
            _ = away.expiry() => {}
            ev = stream.next() => match ev {
                Some(Ok(SourceEvent::Added(a))) => {
                    debug!(adapter = %a.id, "added");
                    adapters.insert(a.id.clone(), a);
                }
                Some(Ok(SourceEvent::Removed(id))) => {
                    debug!(adapter = %id, "removed");
                    adapters.remove(&id);
                }
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("the discovery source failed")),
                None => break Err(anyhow::anyhow!("the discovery source stopped")),
            },
        }
        let (present, warnings) = plan::assign(&config, &adapters);
        for w in warnings {
            warn!("{w}");
        }
        // A tty whose adapter is away within its grace keeps its sockets
        // and its session; it is planned as if still present.
        let away_keys = away.update(&config, &present, tokio::time::Instant::now());
        shared.set_present(&present, &away_keys);
        let present = away.with_away(&present);
        // Consoles captured `always`: keep their ports open between sessions.
        for (key, device, rate, capture) in shared.drains_needed() {
            match crate::port::open(&device, rate) {
                Ok(p) => {
                    info!("capturing the console of {key}");
                    shared.start_drain(key, p, capture);
                }
                Err(e) => warn!("can't open {} to capture {key}: {e}", device.display()),
            }
        }
        let has = |m: &str, b: &str| shared.machine_has(m, b);
        let want = plan::sockets(&config, &present, &has);
        let gone: Vec<PathBuf> = listeners
            .keys()
            .filter(|rel| !want.contains_key(*rel))
            .cloned()
            .collect();
        for rel in gone {
            if let Some(l) = listeners.remove(&rel) {
                l.retire();
            }
        }
        for m in &machines {
            let man = plan::manifest(&config, &present, m, &has);
            if manifests.get(m) != Some(&man) {
                if let Err(e) = write_manifest(&opts.run_dir.join("machines").join(m), &man) {
                    warn!(machine = %m, "can't write the index: {e}");
                }
                manifests.insert(m.clone(), man);
            }
        }
        for (rel, spec) in want {
            if listeners.contains_key(&rel) {
                continue;
            }
            let path = opts.run_dir.join(&rel);
            match bind(&path, 0o666) {
                Ok(l) => {
                    let cancel = shutdown.child_token();
                    info!(socket = %path.display(), "serving {}", spec.tty);
                    let ctx = Ctx {
                        spec,
                        shared: shared.clone(),
                        etc: opts.etc.clone(),
                        sessions: cancel.clone(),
                    };
                    tokio::spawn(accept_loop(l, ctx, cancel.clone()));
                    listeners.insert(rel, Listener { path, cancel });
                }
                Err(e) => warn!(socket = %path.display(), "can't serve: {e}"),
            }
        }
    };
    // Control sockets first: devshim sees the broker leave before its
    // sessions end, and keeps the tools' ptys for the broker's return.
    drop(fixed);
    // Shutdown cancelled every connection at once: let the control
    // connections close before the tty sockets go.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(listeners);
    for m in &machines {
        let _ = fs::remove_file(opts.run_dir.join("machines").join(m).join(MANIFEST));
    }
    result
}

/// Ttys whose adapter went away within their board's re-enumeration grace.
#[derive(Default)]
struct Away {
    /// The adapters present after the last update.
    last: BTreeMap<TtyKey, Adapter>,
    /// Away ttys: the adapter they had, and when their grace runs out.
    ttys: BTreeMap<TtyKey, (Adapter, tokio::time::Instant)>,
}

impl Away {
    /// Takes the adapters present now; returns the ttys that are away.
    fn update(
        &mut self,
        config: &Config,
        present: &BTreeMap<TtyKey, Adapter>,
        now: tokio::time::Instant,
    ) -> BTreeSet<TtyKey> {
        for (key, a) in &self.last {
            if present.contains_key(key) || self.ttys.contains_key(key) {
                continue;
            }
            let grace = config
                .boards
                .iter()
                .find(|b| b.name == key.board)
                .map_or(std::time::Duration::ZERO, |b| b.reenumerate_grace);
            if !grace.is_zero() {
                info!("{key}: adapter {} went away; keeping its sockets and session for {} in case it re-enumerates", a.id, humantime::format_duration(grace));
                self.ttys.insert(key.clone(), (a.clone(), now + grace));
            }
        }
        self.ttys.retain(|key, (_, until)| {
            if present.contains_key(key) {
                info!("{key}: adapter is back");
                false
            } else if *until <= now {
                info!(
                    "{key}: adapter did not come back within the re-enumeration grace: unplugged"
                );
                false
            } else {
                true
            }
        });
        self.last = present.clone();
        self.ttys.keys().cloned().collect()
    }

    /// The present adapters plus those of away ttys, for planning sockets.
    fn with_away(&self, present: &BTreeMap<TtyKey, Adapter>) -> BTreeMap<TtyKey, Adapter> {
        let mut all = present.clone();
        for (key, (a, _)) in &self.ttys {
            all.entry(key.clone()).or_insert_with(|| a.clone());
        }
        all
    }

    /// Resolves when the first grace runs out; never while none runs.
    async fn expiry(&self) {
        match self.ttys.values().map(|(_, until)| *until).min() {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

/// What a tty socket's connections need.
#[derive(Clone)]
struct Ctx {
    spec: SocketSpec,
    shared: Shared,
    etc: PathBuf,
    /// Ends this socket's sessions: cancelled when the socket is withdrawn
    /// (after a grace) or the broker stops.
    sessions: CancellationToken,
}

async fn accept_loop(l: UnixListener, ctx: Ctx, cancel: CancellationToken) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok((sock, _)) => {
                    tokio::spawn(connection(sock, ctx.clone()));
                }
                Err(e) => {
                    warn!("accept on {}: {e}", ctx.spec.tty);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn connection(sock: UnixStream, ctx: Ctx) {
    let label = ctx.spec.tty.to_string();
    let peer = match Peer::of(&sock) {
        Ok(p) => p,
        Err(e) => {
            return session::refuse(sock, &format!("can't read the peer's credentials: {e}")).await
        }
    };
    let who = match &ctx.spec.access {
        Access::Machine(m) => format!("machine {m}"),
        Access::HostGroups(groups) => {
            let who = peer.describe(&ctx.etc);
            let group_file = fs::read_to_string(ctx.etc.join("group")).unwrap_or_default();
            let allowed = check_host_access(&peer, groups, &group_file, &who, &label)
                .and_then(|()| ctx.shared.host_lease(peer.uid, &ctx.spec.tty.board));
            if let Err(why) = allowed {
                info!(tty = %label, "refused {who}: {why}");
                return session::refuse(sock, &why).await;
            }
            who
        }
    };
    match ctx
        .shared
        .acquire(&ctx.spec.tty, who, peer.pid, &ctx.sessions)
    {
        Ok(guard) => {
            session::run(sock, guard, label).await;
        }
        Err(why) => {
            info!(tty = %label, "refused: {why}");
            session::refuse(sock, &why).await;
        }
    }
}

/// Binds a unix socket at `path` with `mode`, replacing a stale one.
fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Writes a machine's index atomically.
fn write_manifest(dir: &Path, m: &Manifest) -> io::Result<()> {
    let tmp = dir.join(format!(".{MANIFEST}.tmp"));
    fs::write(&tmp, m.to_bytes())?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
    fs::rename(&tmp, dir.join(MANIFEST))
}

/// Makes the run directory and each machine's directory, removes what a
/// killed broker left, and takes the run directory's lock so two brokers
/// can't fight over it. Machine directories are never removed: a running
/// container has them bind-mounted, and a new directory would not be seen.
fn prepare_run_dir(
    run: &Path,
    machines: &BTreeSet<String>,
) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let mkdir = |p: &Path, mode: u32| -> anyhow::Result<()> {
        fs::create_dir_all(p).with_context(|| format!("can't create {}", p.display()))?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .with_context(|| format!("can't set the mode of {}", p.display()))?;
        Ok(())
    };
    mkdir(run, 0o755)?;
    let lock_path = run.join("broker.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("can't open {}", lock_path.display()))?;
    let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!("another devbroker is running with run directory {}; stop it or pass another --run-dir", run.display())
        }
        Err((_, e)) => bail!("can't lock {}: {e}", lock_path.display()),
    };
    // Host users reach only host/; machine directories are for their containers.
    mkdir(&run.join("machines"), 0o700)?;
    mkdir(&run.join("host"), 0o755)?;
    clean_sockets(&run.join("host"));
    if let Ok(rd) = fs::read_dir(run.join("machines")) {
        for e in rd.flatten() {
            clean_sockets(&e.path());
        }
    }
    for m in machines {
        mkdir(&run.join("machines").join(m), 0o755)?;
    }
    Ok(lock)
}

fn clean_sockets(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".sock") || name == MANIFEST {
            let _ = fs::remove_file(e.path());
        }
    }
}
