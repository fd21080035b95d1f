//! The broker's main loop: adapters come and go, sockets follow.
//!
//! Each discovery event updates the map of present adapters (keyed by the
//! source's id, as container-hotplug keys by syspath); [`plan`] turns config
//! and adapters into the sockets that should exist, and the loop applies the
//! difference. Order matters to devshim: a machine's index is written before
//! its new sockets appear and after its old ones are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::manifest::{Manifest, CONTROL_SOCKET};

use crate::adapter::Adapter;
use crate::config::Config;
use crate::control::{self, Scope};
use crate::peer::{self, Peer};
use crate::plan::{self, Access, SocketSpec};
use crate::reconcile::{self, Away};
use crate::rundir::{Place, RunDir};
use crate::session;
use crate::source::{Source, SourceEvent};
use crate::state::Shared;
use crate::throttle::Throttle;

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/devbroker";
/// The admin's control socket, relative to the run directory.
pub const ADMIN_SOCKET: &str = "broker.sock";

/// How soon an index that could not be written (a full disk) is tried again.
const INDEX_RETRY: Duration = Duration::from_secs(1);

/// Where the broker keeps its sockets.
#[derive(Debug, Clone)]
pub struct Options {
    pub run_dir: PathBuf,
}

/// A socket being served; dropping it stops accepting and removes the file.
struct Listener {
    dir: Arc<RunDir>,
    place: Place,
    name: String,
    cancel: CancellationToken,
    /// Retired: the file is gone and the sessions end on their own time.
    retired: bool,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if !self.retired {
            self.cancel.cancel();
            self.dir.unbind(&self.place, &self.name);
        }
    }
}

impl Listener {
    /// Withdraws a tty socket whose lease moved on: the file goes at once, so
    /// nobody new connects, but a client already queued is still served, and
    /// its session — like any from this socket — ends after
    /// [`LEASE_END_GRACE`](crate::state::LEASE_END_GRACE): what a job wrote
    /// just before it ended still reaches the board.
    fn retire(mut self) {
        self.dir.unbind(&self.place, &self.name);
        self.retired = true;
        let cancel = self.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(crate::state::LEASE_END_GRACE).await;
            cancel.cancel();
        });
    }
}

/// Raises the soft limit on open descriptors to the hard one: each session
/// holds a port and a socket, each control connection a socket, and
/// systemd's default soft limit (1024) would stop a farm at a few hundred.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => debug!("descriptor limit raised from {soft} to {hard}"),
            Err(e) => warn!("can't raise the descriptor limit from {soft} to {hard}: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("can't read the descriptor limit: {e}"),
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
    let dir = Arc::new(RunDir::prepare(&opts.run_dir, &machines)?);
    let shared = Shared::new(config.clone());
    let mut fixed = Vec::new();
    let mut control = |place: Place, mode: u32, scope: Scope| -> anyhow::Result<()> {
        let name = match place {
            Place::Top => ADMIN_SOCKET,
            _ => CONTROL_SOCKET,
        };
        let l = dir
            .bind(&place, name, mode)
            .with_context(|| format!("can't serve {}", dir.shown(&place, name).display()))?;
        let cancel = shutdown.child_token();
        tokio::spawn(control::serve(l, scope, shared.clone(), cancel.clone()));
        fixed.push(Listener {
            dir: dir.clone(),
            place,
            name: name.to_string(),
            cancel,
            retired: false,
        });
        Ok(())
    };
    control(Place::Host, 0o666, Scope::Host)?;
    let empty = Manifest {
        version: 1,
        ttys: vec![],
    };
    let ready: Vec<String> = dir.machines().cloned().collect();
    // The index each machine has on disk; a machine missing here is written
    // (again) at the next pass.
    let mut manifests: BTreeMap<String, Manifest> = BTreeMap::new();
    for m in &ready {
        match dir.write_index(m, &empty) {
            Ok(()) => {
                manifests.insert(m.clone(), empty.clone());
            }
            Err(e) => warn!(machine = %m, "can't write the index: {e}; trying again"),
        }
        control(Place::Machine(m.clone()), 0o666, Scope::Machine(m.clone()))?;
    }
    // Last: once the admin socket answers, every control socket is there.
    control(Place::Top, 0o600, Scope::Admin)?;

    info!("watching {}", source.describe());
    let mut stream = source.watch().context("can't start the discovery source")?;
    let mut adapters: BTreeMap<String, Adapter> = BTreeMap::new();
    let mut listeners: BTreeMap<PathBuf, Listener> = BTreeMap::new();
    let mut away = Away::default();
    let mut retry_at: Option<tokio::time::Instant> = None;
    info!(run_dir = %opts.run_dir.display(), boards = config.boards.len(), machines = machines.len(), "devbroker ready");
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // Leases moved: re-plan who has which sockets.
            _ = shared.changed.notified() => {}
            // A re-enumeration grace ran out.
            _ = away.expiry() => {}
            // An index could not be written: try again.
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                retry_at = None;
            }
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
        let want: BTreeMap<PathBuf, SocketSpec> = plan::sockets(&config, &present, &has)
            .into_iter()
            .filter(|(_, spec)| match &spec.access {
                Access::Machine(m) => ready.contains(m),
                Access::HostGroups(_) => true,
            })
            .collect();
        let indexes: BTreeMap<String, Manifest> = ready
            .iter()
            .map(|m| (m.clone(), plan::manifest(&config, &present, m, &has)))
            .collect();
        let served: BTreeSet<PathBuf> = listeners.keys().cloned().collect();
        let steps = reconcile::steps(&served, &want, &manifests, &indexes);
        for rel in steps.withdraw {
            if let Some(l) = listeners.remove(&rel) {
                l.retire();
            }
        }
        for (m, man) in steps.write {
            match dir.write_index(&m, &man) {
                Ok(()) => {
                    manifests.insert(m, man);
                }
                Err(e) => {
                    // Not noted as written: tried again, and the machine
                    // gets no new socket meanwhile.
                    if manifests.remove(&m).is_some() || retry_at.is_none() {
                        warn!(machine = %m, "can't write the index: {e}; trying again every {}s", INDEX_RETRY.as_secs());
                    }
                    retry_at = Some(tokio::time::Instant::now() + INDEX_RETRY);
                }
            }
        }
        for (rel, spec) in steps.serve {
            let place = match &spec.access {
                Access::Machine(m) if manifests.get(m) == indexes.get(m) => {
                    Place::Machine(m.clone())
                }
                Access::Machine(_) => continue,
                Access::HostGroups(_) => Place::Host,
            };
            let name = wire::names::socket_name(&spec.tty.board, &spec.tty.tty);
            let shown = dir.shown(&place, &name);
            match dir.bind(&place, &name, 0o666) {
                Ok(l) => {
                    let cancel = shutdown.child_token();
                    info!(socket = %shown.display(), "serving {}", spec.tty);
                    let ctx = Ctx {
                        spec,
                        shared: shared.clone(),
                        sessions: cancel.clone(),
                    };
                    tokio::spawn(accept_loop(l, ctx, cancel.clone()));
                    listeners.insert(
                        rel,
                        Listener {
                            dir: dir.clone(),
                            place,
                            name,
                            cancel,
                            retired: false,
                        },
                    );
                }
                Err(e) => warn!(socket = %shown.display(), "can't serve: {e}"),
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
    for m in &ready {
        dir.remove_index(m);
    }
    result
}

/// What a tty socket's connections need.
#[derive(Clone)]
struct Ctx {
    spec: SocketSpec,
    shared: Shared,
    /// Ends this socket's sessions: cancelled when the socket is withdrawn
    /// (after a grace) or the broker stops.
    sessions: CancellationToken,
}

async fn accept_loop(l: UnixListener, ctx: Ctx, cancel: CancellationToken) {
    let mut failures = Throttle::per_window(1, Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok((sock, _)) => {
                    tokio::spawn(connection(sock, ctx.clone()));
                }
                Err(e) => {
                    if let Some(held) = failures.allow() {
                        warn!("accept on {}: {e}{}", ctx.spec.tty, crate::control::held_back(held));
                    }
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
            let (p, wanted) = (peer.clone(), groups.clone());
            let looked_up = tokio::task::spawn_blocking(move || {
                let name = peer::user_name(p.uid);
                (peer::member_of(&p, &wanted), name)
            })
            .await;
            let Ok((member, name)) = looked_up else {
                return;
            };
            let who = peer::describe(peer.uid, name.as_deref());
            let allowed = peer::check_host_access(peer.uid, &member, groups, &who, &label)
                .and_then(|()| {
                    ctx.shared
                        .host_lease(peer.uid, &ctx.spec.tty.board)
                        .map_err(|r| r.message)
                });
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
            session::refuse(sock, &why.message).await;
        }
    }
}
