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
use tracing::{debug, error, info, warn};
use wire::manifest::{Manifest, CONTROL_SOCKET};

use crate::adapter::Adapter;
use crate::config::{Config, MetricsListen};
use crate::control::{self, Scope};
use crate::peer::{self, Peer};
use crate::plan::{self, Access, SocketSpec};
use crate::reconcile::{self, Away};
use crate::rundir::{Place, RunDir};
use crate::session;
use crate::source::{Source, SourceEvent};
use crate::state::{Reconfigured, Shared};

/// Default run directory.
pub const DEFAULT_RUN_DIR: &str = crate::cli::DEFAULT_RUN_DIR;
/// The admin's control socket, relative to the run directory.
pub const ADMIN_SOCKET: &str = "broker.sock";
/// The group whose members may use the admin socket (`status`, `log`,
/// sequences on any board), besides root.
pub const ADMIN_GROUP: &str = "devbroker-admin";

/// How soon an index that could not be written (a full disk) is tried again.
const INDEX_RETRY: Duration = Duration::from_secs(1);

/// Where the broker keeps its sockets, and the config file a reload reads.
#[derive(Debug, Clone)]
pub struct Options {
    pub run_dir: PathBuf,
    /// Read again on SIGHUP; `None` (the demo): nothing to reload.
    pub config: Option<PathBuf>,
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

/// The broker at work: its config, run directory, sockets and what it
/// knows of adapters. [`run`] drives it.
struct Server {
    config: Config,
    dir: Arc<RunDir>,
    shared: Shared,
    shutdown: CancellationToken,
    /// Control sockets: the admin's, the host's and one per machine.
    control: BTreeMap<Place, Listener>,
    /// Tty sockets, by path relative to the run directory.
    listeners: BTreeMap<PathBuf, Listener>,
    /// The index each machine has on disk; a machine missing here is
    /// written (again) at the next pass.
    manifests: BTreeMap<String, Manifest>,
    adapters: BTreeMap<String, Adapter>,
    away: Away,
    /// When to try writing indexes again after a failure.
    retry_at: Option<tokio::time::Instant>,
    /// The metrics server, if the config asks for one.
    metrics: Option<Metrics>,
}

/// The metrics server at work.
struct Metrics {
    listen: MetricsListen,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves the metrics on `listen`, or nowhere, stopping them where they
    /// were served before (the old socket is closed before the new is bound).
    async fn serve_metrics(&mut self, listen: Option<&MetricsListen>) -> std::io::Result<()> {
        if self.metrics.as_ref().map(|m| &m.listen) == listen {
            return Ok(());
        }
        if let Some(m) = self.metrics.take() {
            m.cancel.cancel();
            let _ = m.task.await;
        }
        let Some(listen) = listen else {
            return Ok(());
        };
        let l = crate::metrics::bind(listen)?;
        match listen {
            MetricsListen::Tcp(addr) => info!("metrics on http://{addr}/metrics"),
            MetricsListen::Unix(_) => info!("metrics on {listen}"),
        }
        let cancel = self.shutdown.child_token();
        let task = tokio::spawn(crate::metrics::serve(
            l,
            self.shared.clone(),
            cancel.clone(),
        ));
        self.metrics = Some(Metrics {
            listen: listen.clone(),
            cancel,
            task,
        });
        Ok(())
    }

    /// Serves a control socket.
    fn serve_control(&mut self, place: Place) -> anyhow::Result<()> {
        let admins = crate::peer::group_gid(ADMIN_GROUP);
        let (name, mode, scope) = match &place {
            // Root's, and the admin group's when the host has one.
            Place::Top => (
                ADMIN_SOCKET,
                if admins.is_some() { 0o660 } else { 0o600 },
                Scope::Admin,
            ),
            Place::Host => (CONTROL_SOCKET, 0o666, Scope::Host),
            Place::Machine(m) => (CONTROL_SOCKET, 0o666, Scope::Machine(m.clone())),
        };
        let group = if place == Place::Top { admins } else { None };
        let l = self
            .dir
            .bind_for(&place, name, mode, group)
            .with_context(|| format!("can't serve {}", self.dir.shown(&place, name).display()))?;
        let cancel = self.shutdown.child_token();
        tokio::spawn(control::serve(
            l,
            scope,
            self.shared.clone(),
            cancel.clone(),
        ));
        self.control.insert(
            place.clone(),
            Listener {
                dir: self.dir.clone(),
                place,
                name: name.to_string(),
                cancel,
                retired: false,
            },
        );
        Ok(())
    }

    /// Starts serving a machine: its directory, an empty index, its
    /// control socket.
    fn add_machine(&mut self, m: &str) -> anyhow::Result<()> {
        if !self.dir.add_machine(m) {
            return Ok(());
        }
        let empty = Manifest {
            version: 1,
            ttys: vec![],
        };
        match self.dir.write_index(m, &empty) {
            Ok(()) => {
                self.manifests.insert(m.to_string(), empty);
            }
            Err(e) => warn!(machine = %m, "can't write the index: {e}; trying again"),
        }
        self.serve_control(Place::Machine(m.to_string()))
    }

    /// Plans from what is known now and does what the plan asks: shares the
    /// adapters with the state, keeps `always` consoles drained, withdraws
    /// and serves tty sockets, writes indexes.
    fn reconcile(&mut self) {
        let (present, warnings) = plan::assign(&self.config, &self.adapters);
        for w in warnings {
            warn!("{w}");
        }
        // A tty whose adapter is away within its grace keeps its sockets
        // and its session; it is planned as if still present.
        let away_keys = self
            .away
            .update(&self.config, &present, tokio::time::Instant::now());
        self.shared.set_present(&present, &away_keys);
        let present = self.away.with_away(&present);
        // Consoles captured `always`: keep their ports open between sessions.
        for (key, device, rate, capture) in self.shared.drains_needed() {
            match crate::port::open(&device, rate) {
                Ok(p) => {
                    info!("capturing the console of {key}");
                    self.shared.start_drain(key, p, capture);
                }
                Err(e) => warn!("can't open {} to capture {key}: {e}", device.display()),
            }
        }
        let ready = self.dir.machines();
        let shared = &self.shared;
        let has = |m: &str, b: &str| shared.machine_has(m, b);
        let want: BTreeMap<PathBuf, SocketSpec> = plan::sockets(&self.config, &present, &has)
            .into_iter()
            .filter(|(_, spec)| match &spec.access {
                Access::Machine(m) => ready.contains(m),
                Access::HostGroups(_) => true,
            })
            .collect();
        let indexes: BTreeMap<String, Manifest> = ready
            .iter()
            .map(|m| (m.clone(), plan::manifest(&self.config, &present, m, &has)))
            .collect();
        let served: BTreeSet<PathBuf> = self.listeners.keys().cloned().collect();
        let steps = reconcile::steps(&served, &want, &self.manifests, &indexes);
        for rel in steps.withdraw {
            if let Some(l) = self.listeners.remove(&rel) {
                l.retire();
            }
        }
        for (m, man) in steps.write {
            match self.dir.write_index(&m, &man) {
                Ok(()) => {
                    self.manifests.insert(m, man);
                }
                Err(e) => {
                    // Not noted as written: tried again, and the machine
                    // gets no new socket meanwhile.
                    if self.manifests.remove(&m).is_some() || self.retry_at.is_none() {
                        warn!(machine = %m, "can't write the index: {e}; trying again every {}s", INDEX_RETRY.as_secs());
                    }
                    self.retry_at = Some(tokio::time::Instant::now() + INDEX_RETRY);
                }
            }
        }
        for (rel, spec) in steps.serve {
            let place = match &spec.access {
                Access::Machine(m) if self.manifests.get(m) == indexes.get(m) => {
                    Place::Machine(m.clone())
                }
                Access::Machine(_) => continue,
                Access::HostGroups(_) => Place::Host,
            };
            let name = wire::names::socket_name(&spec.tty.board, &spec.tty.tty);
            let shown = self.dir.shown(&place, &name);
            match self.dir.bind(&place, &name, 0o666) {
                Ok(l) => {
                    let cancel = self.shutdown.child_token();
                    info!(socket = %shown.display(), "serving {}", spec.tty);
                    let ctx = Ctx {
                        spec,
                        shared: self.shared.clone(),
                        sessions: cancel.clone(),
                    };
                    tokio::spawn(accept_loop(l, ctx, cancel.clone()));
                    self.listeners.insert(
                        rel,
                        Listener {
                            dir: self.dir.clone(),
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
    }

    /// Reloads the config from `path` (SIGHUP): a config with problems is
    /// refused, its problems logged, and the running one kept. Otherwise
    /// boards added, removed or changed take effect — sessions on boards
    /// that did not change go on — and machines come and go.
    async fn reload(&mut self, path: &std::path::Path) -> Result<Reconfigured, String> {
        crate::notify::reloading();
        let new = match crate::config::load(path) {
            Ok(c) => c,
            Err(problems) => {
                for p in &problems.0 {
                    error!("{p}");
                }
                let why = format!(
                    "reload refused: {} has {} problems; still running with the config loaded before",
                    path.display(),
                    problems.0.len()
                );
                error!("{why} (above)");
                crate::notify::ready(&self.shared);
                return Err(format!("{why}:\n{problems}"));
            }
        };
        for w in crate::config::warnings(&new) {
            warn!("{w}");
        }
        if let Err(e) = self.serve_metrics(new.metrics.as_ref()).await {
            let why = format!(
                "reload refused: can't serve metrics on {}: {e}; still running with the config loaded before",
                new.metrics.as_ref().map_or(String::new(), |l| l.to_string())
            );
            error!("{why}");
            let old = self.config.metrics.clone();
            if let Err(e) = self.serve_metrics(old.as_ref()).await {
                error!("metrics are off: can't serve them again where they were: {e}");
            }
            crate::notify::ready(&self.shared);
            return Err(why);
        }
        let before = plan::machines(&self.config);
        let after = plan::machines(&new);
        let r = self.shared.reconfigure(new.clone());
        self.config = new;
        // Ttys of boards that went or changed are not away any more; the
        // others keep their re-enumeration grace.
        self.away
            .forget(|b| r.removed.iter().chain(&r.changed).any(|x| x == b));
        for m in before.difference(&after) {
            self.control.remove(&Place::Machine(m.clone()));
            self.manifests.remove(m);
            self.dir.remove_machine(m);
            info!(machine = %m, "no longer served (its directory stays)");
        }
        for m in after.difference(&before) {
            if let Err(e) = self.add_machine(m) {
                warn!(machine = %m, "{e:#}");
            }
        }
        info!(
            added = ?r.added,
            removed = ?r.removed,
            changed = ?r.changed,
            "config reloaded from {}",
            path.display()
        );
        self.reconcile();
        crate::notify::ready(&self.shared);
        Ok(r)
    }
}

/// Runs the broker until `shutdown` is cancelled, then removes what it made
/// (sockets and indexes; machine directories stay, as containers bind them).
/// SIGHUP reloads the config from `opts.config` (when there is one).
pub async fn run(
    config: Config,
    opts: Options,
    source: Box<dyn Source>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let (reload_tx, mut reloads) = tokio::sync::mpsc::channel(1);
    for w in crate::config::warnings(&config) {
        warn!("{w}");
    }
    let machines = plan::machines(&config);
    let dir = Arc::new(RunDir::prepare(&opts.run_dir, &BTreeSet::new())?);
    let shared = Shared::new(config.clone());
    shared.set_reloader(reload_tx);
    let mut server = Server {
        config,
        dir,
        shared: shared.clone(),
        shutdown: shutdown.clone(),
        control: BTreeMap::new(),
        listeners: BTreeMap::new(),
        manifests: BTreeMap::new(),
        adapters: BTreeMap::new(),
        away: Away::default(),
        retry_at: None,
        metrics: None,
    };
    if let Some(l) = &server.config.metrics.clone() {
        server.serve_metrics(Some(l)).await.with_context(|| {
            format!("can't serve metrics on {l} ([metrics] listen): free it or name another")
        })?;
    }
    server.serve_control(Place::Host)?;
    for m in &machines {
        server.add_machine(m)?;
    }
    // Last: once the admin socket answers, every control socket is there.
    server.serve_control(Place::Top)?;
    tokio::spawn(crate::notify::keep_status(shared.clone()));
    tokio::spawn(crate::notify::watchdog());

    info!("watching {}", source.describe());
    let mut stream = source.watch().context("can't start the discovery source")?;
    // Ready once the adapters present at the start are served.
    let (mut settled, mut ready) = (false, false);
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            // Leases moved: re-plan who has which sockets.
            _ = shared.changed.notified() => {}
            // A re-enumeration grace ran out.
            _ = server.away.expiry() => {}
            // An index could not be written: try again.
            _ = tokio::time::sleep_until(server.retry_at.unwrap_or_else(tokio::time::Instant::now)), if server.retry_at.is_some() => {
                server.retry_at = None;
            }
            _ = hangup.recv() => {
                match &opts.config {
                    Some(path) => {
                        let _ = server.reload(path).await;
                    }
                    None => warn!("SIGHUP: this broker has no config file to reload"),
                }
                continue;
            }
            // `devbroker reload` (systemctl reload), on the admin socket.
            Some(ask) = reloads.recv() => {
                let r = match &opts.config {
                    Some(path) => server.reload(path).await,
                    None => Err("this broker has no config file to reload".into()),
                };
                let _ = ask.send(r);
                continue;
            }
            ev = stream.next() => match ev {
                Some(Ok(SourceEvent::Added(a))) => {
                    debug!(adapter = %a.id, "added");
                    server.adapters.insert(a.id.clone(), a);
                }
                Some(Ok(SourceEvent::Removed(id))) => {
                    debug!(adapter = %id, "removed");
                    server.adapters.remove(&id);
                }
                Some(Ok(SourceEvent::Settled)) => settled = true,
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("the discovery source failed")),
                None => break Err(anyhow::anyhow!("the discovery source stopped")),
            },
        }
        server.reconcile();
        if settled && !ready {
            ready = true;
            crate::notify::ready(&shared);
            info!(
                run_dir = %opts.run_dir.display(),
                boards = server.config.boards.len(),
                machines = server.dir.machines().len(),
                "devbroker ready"
            );
        }
    };
    let Server {
        control,
        listeners,
        dir,
        ..
    } = server;
    // Control sockets first: devshim sees the broker leave before its
    // sessions end, and keeps the tools' ptys for the broker's return.
    drop(control);
    // Shutdown cancelled every connection at once: let the control
    // connections close before the tty sockets go.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(listeners);
    for m in dir.machines() {
        dir.remove_index(&m);
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
    let what = ctx.spec.tty.to_string();
    crate::accept::serve(l, what, cancel, move |sock| {
        tokio::spawn(connection(sock, ctx.clone()));
    })
    .await
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
                ctx.shared.refused(&ctx.spec.tty);
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
            ctx.shared.refused(&ctx.spec.tty);
            session::refuse(sock, &why.message).await;
        }
    }
}
