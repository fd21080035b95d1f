//! `devshim serve`: keeps one tty actor per socket the broker offers.
//!
//! The machine directory is watched with inotify. devshim also holds a
//! connection to the directory's control socket: while it is up the broker is
//! alive and the index (`ttys.json`) is trusted. When it closes — the broker
//! restarts, is upgraded or was killed — the ttys stay as they are for the
//! broker grace: tools keep their ptys open, and devshim reconnects as soon
//! as the control socket is back (on its inotify event, or within a second).
//! Each tty then resumes its session with the settings its tool had set
//! ([`crate::tty`]). A tty the returned broker doesn't offer again within
//! the grace, or every tty if the broker stays away, is taken down: tools
//! read `EIO`, links go.
//!
//! Each tty is also served as RFC 2217 on a `127.0.0.1` port of its own
//! ([`crate::endpoint`]), for as long as its actor runs; the ports are listed
//! in the state file ([`crate::ports`]), rewritten before a new tty's links
//! appear and after a withdrawn tty's endpoint is closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use inotify::WatchMask;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wire::control::{request_line, Reply, Request, VERSION};
use wire::manifest::{Entry, Manifest, CONTROL_SOCKET, FILE as MANIFEST};

use crate::ports::{self, PortEntry};
use crate::tty::{self, TtySpec};
use crate::users::User;
use crate::watch::Watcher;
use crate::{endpoint, publish};

/// Where devshim reads sockets and publishes links.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub link_root: PathBuf,
    pub user: User,
    /// Where the state file of the RFC 2217 endpoints is kept.
    pub state_dir: PathBuf,
    /// How long ttys are kept while the broker is away.
    pub broker_grace: Duration,
}

/// The default broker grace: a restart or an upgrade of the broker.
pub const DEFAULT_BROKER_GRACE: Duration = Duration::from_secs(10);

/// Whether devshim is connected to the broker, as tty actors see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerState {
    pub up: bool,
    /// Counts the connections made, so an actor can tell a broker that came
    /// back from the one that left.
    pub epoch: u64,
}

struct Actor {
    entry: Entry,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    /// The RFC 2217 endpoint's port and task; `None` while it could not be
    /// bound (retried every second).
    endpoint: Option<(u16, JoinHandle<()>)>,
}

impl Actor {
    async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
        if let Some((_, t)) = self.endpoint {
            let _ = t.await;
        }
    }
}

/// Starts a tty's endpoint, or says why it can't.
fn start_endpoint(
    opts: &Options,
    entry: &Entry,
    cancel: &CancellationToken,
) -> Option<(u16, JoinHandle<()>)> {
    match endpoint::bind() {
        Ok((listener, port)) => {
            info!(tty = %entry.short_name(), "RFC 2217 on {}", ports::url(port));
            let task = tokio::spawn(endpoint::run(
                listener,
                opts.dir.join(entry.socket()),
                entry.short_name(),
                opts.user.clone(),
                cancel.clone(),
            ));
            Some((port, task))
        }
        Err(e) => {
            warn!(tty = %entry.short_name(), "can't listen on 127.0.0.1: {e}; trying again in a second");
            None
        }
    }
}

/// A tty's line in the state file.
fn port_entry(opts: &Options, entry: &Entry, port: u16) -> PortEntry {
    PortEntry {
        board: entry.board.clone(),
        tty: entry.tty.clone(),
        by_id: entry.by_id.clone(),
        link: publish::guest_path(&opts.link_root, entry.by_id.as_deref(), &entry.short_name()),
        port,
        pid: std::process::id(),
        line: Some(crate::linesock::path(&opts.state_dir, std::process::id())),
    }
}

/// Rewrites this devshim's entries in the state file; a failure is logged
/// (loudly the first time).
fn write_state(opts: &Options, mine: &[PortEntry], warned: &mut bool) {
    match ports::publish(&opts.state_dir, &opts.link_root, mine) {
        Ok(()) => {
            *warned = false;
            tracing::debug!(
                "{} updated ({} ttys)",
                ports::path(&opts.state_dir).display(),
                mine.len()
            )
        }
        Err(e) if !*warned => {
            *warned = true;
            warn!(
                "can't write {}: {e}; `devshim list` and `devshim lease` won't see the RFC 2217 ports",
                ports::path(&opts.state_dir).display()
            )
        }
        Err(e) => tracing::debug!(
            "can't write {}: {e}",
            ports::path(&opts.state_dir).display()
        ),
    }
}

/// Which actors to stop and which entries to start, from what runs now and
/// what should. A changed entry (say, a new by-id name) is stopped and
/// started again.
pub fn actor_changes(
    running: &BTreeMap<String, Entry>,
    wanted: &BTreeMap<String, Entry>,
) -> (Vec<String>, Vec<Entry>) {
    let stop = running
        .iter()
        .filter(|(k, e)| wanted.get(*k) != Some(e))
        .map(|(k, _)| k.clone())
        .collect();
    let start = wanted
        .iter()
        .filter(|(k, e)| running.get(*k) != Some(e))
        .map(|(_, e)| e.clone())
        .collect();
    (stop, start)
}

/// The ttys to serve now: those in the index whose socket exists.
pub fn wanted(dir: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let bytes = match std::fs::read(dir.join(MANIFEST)) {
        Ok(b) => b,
        Err(_) => return out,
    };
    let manifest = match Manifest::parse(&bytes) {
        Ok(m) => m,
        Err(e) => {
            warn!("ignoring {}: {e}", dir.join(MANIFEST).display());
            return out;
        }
    };
    let mut by_ids = std::collections::BTreeSet::new();
    for mut e in manifest.ttys {
        if !dir.join(e.socket()).exists() {
            continue;
        }
        if let Some(b) = &e.by_id {
            if !by_ids.insert(b.clone()) {
                warn!(
                    "{}: by-id name {b} is taken by another tty; publishing /dev/devbroker/{} only",
                    e.short_name(),
                    e.short_name()
                );
                e.by_id = None;
            }
        }
        out.insert(e.socket(), e);
    }
    out
}

/// Connects to the control socket and says hello.
pub(crate) async fn connect_control(path: &Path) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(path).await?;
    s.write_all(&request_line(&Request::Hello {
        version: VERSION,
        client: format!("devshim {}", env!("CARGO_PKG_VERSION")),
    }))
    .await?;
    let mut line = String::new();
    let mut r = BufReader::new(&mut s);
    tokio::time::timeout(Duration::from_secs(2), r.read_line(&mut line))
        .await
        .context("no answer")??;
    match serde_json::from_str::<Reply>(&line)? {
        Reply::Hello { .. } => Ok(s),
        other => anyhow::bail!("unexpected reply {other:?}"),
    }
}

async fn wait_closed(s: &mut Option<UnixStream>) {
    match s {
        Some(s) => {
            let mut b = [0u8; 256];
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }
        None => std::future::pending().await,
    }
}

/// Serves until `shutdown`; then takes every tty down and removes its links.
pub async fn serve(opts: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    while !opts.dir.is_dir() {
        warn!(
            "{} does not exist yet: is the machine's directory bound there? waiting",
            opts.dir.display()
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    // One inotify instance for the directory and every pty (crate::watch).
    let watcher = Watcher::new().context("inotify")?;
    let mut events = watcher
        .watch(
            &opts.dir,
            WatchMask::CREATE
                | WatchMask::DELETE
                | WatchMask::MOVED_TO
                | WatchMask::MOVED_FROM
                | WatchMask::CLOSE_WRITE
                | WatchMask::ATTRIB,
        )
        .with_context(|| format!("can't watch {}", opts.dir.display()))?;
    let mut control: Option<UnixStream> = None;
    let (broker_tx, broker_rx) = tokio::sync::watch::channel(BrokerState::default());
    // When the broker left, while its grace runs.
    let mut lost_at: Option<tokio::time::Instant> = None;
    let mut actors: BTreeMap<String, Actor> = BTreeMap::new();
    let control_path = opts.dir.join(CONTROL_SOCKET);
    info!(dir = %opts.dir.display(), links = %opts.link_root.display(), user = %opts.user.name, state = %opts.state_dir.display(), "devshim serving");
    // Entries a previous devshim on these links left behind are stale.
    let mut state_warned = false;
    let mut published: Vec<PortEntry> = Vec::new();
    write_state(&opts, &published, &mut state_warned);
    // The line socket, for tools run under `devshim run`.
    let registry = crate::linesock::Registry::default();
    let line_path = crate::linesock::path(&opts.state_dir, std::process::id());
    remove_stale_line_sockets(&opts.state_dir);
    let line_task = match crate::linesock::listen_at(&line_path) {
        Ok(l) => Some(tokio::spawn(crate::linesock::serve(
            l,
            registry.clone(),
            shutdown.child_token(),
        ))),
        Err(e) => {
            warn!(
                "can't listen on {}: {e}; tools under `devshim run` get ENOTTY for DTR/RTS and break",
                line_path.display()
            );
            None
        }
    };
    loop {
        if control.is_none() && control_path.exists() {
            match connect_control(&control_path).await {
                Ok(s) => {
                    info!("connected to the broker");
                    control = Some(s);
                    broker_tx.send_modify(|b| {
                        b.up = true;
                        b.epoch += 1;
                    });
                }
                Err(e) => {
                    tracing::debug!("broker not answering at {}: {e}", control_path.display())
                }
            }
        }
        let now = tokio::time::Instant::now();
        let protect_until = lost_at.map(|t| t + opts.broker_grace).filter(|t| *t > now);
        if lost_at.is_some() && protect_until.is_none() {
            lost_at = None;
            if control.is_none() {
                warn!(
                    "the broker did not come back within {}; taking the ttys down",
                    humantime::format_duration(opts.broker_grace)
                );
            }
        }
        let running: BTreeMap<String, Entry> = actors
            .iter()
            .map(|(k, a)| (k.clone(), a.entry.clone()))
            .collect();
        let want = if control.is_some() {
            wanted(&opts.dir)
        } else if protect_until.is_some() {
            running.clone()
        } else {
            BTreeMap::new()
        };
        let (mut stop, start) = actor_changes(&running, &want);
        if protect_until.is_some() {
            // A broker just back may not offer a tty again yet: keep it
            // for the rest of the grace.
            stop.retain(|k| want.contains_key(k));
        }
        for k in stop {
            if let Some(a) = actors.remove(&k) {
                a.stop().await;
            }
        }
        for a in actors.values_mut().filter(|a| a.endpoint.is_none()) {
            a.endpoint = start_endpoint(&opts, &a.entry, &a.cancel);
        }
        // The endpoints of new ttys listen, and are in the state file, before
        // their links appear: whoever sees a link finds its port.
        let mut starting = Vec::new();
        for entry in start {
            let cancel = shutdown.child_token();
            let endpoint = start_endpoint(&opts, &entry, &cancel);
            starting.push((entry, cancel, endpoint));
        }
        let mut mine: Vec<PortEntry> = actors
            .values()
            .map(|a| (&a.entry, &a.endpoint))
            .chain(starting.iter().map(|(e, _, ep)| (e, ep)))
            .filter_map(|(e, ep)| Some(port_entry(&opts, e, ep.as_ref()?.0)))
            .collect();
        mine.sort();
        if mine != published {
            write_state(&opts, &mine, &mut state_warned);
            published = mine;
        }
        for (entry, cancel, endpoint) in starting {
            let spec = TtySpec {
                socket: opts.dir.join(entry.socket()),
                control: control_path.clone(),
                entry: entry.clone(),
                link_root: opts.link_root.clone(),
                uid: opts.user.uid,
                gid: opts.user.gid,
                broker: broker_rx.clone(),
                registry: registry.clone(),
                watcher: watcher.clone(),
            };
            let task = tokio::spawn(tty::run(spec, cancel.clone()));
            actors.insert(
                entry.socket(),
                Actor {
                    entry,
                    cancel,
                    task,
                    endpoint,
                },
            );
        }
        let unbound = actors.values().any(|a| a.endpoint.is_none());
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.next() => if ev.is_none() {
                anyhow::bail!("the watch of {} ended: was the directory removed?", opts.dir.display());
            },
            _ = wait_closed(&mut control) => {
                info!("the broker went away; keeping the ttys for {} while it restarts", humantime::format_duration(opts.broker_grace));
                control = None;
                lost_at = Some(tokio::time::Instant::now());
                broker_tx.send_modify(|b| b.up = false);
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if control.is_none() || unbound => {}
            _ = tokio::time::sleep_until(protect_until.unwrap_or(now)), if protect_until.is_some() => {}
        }
    }
    for (_, a) in actors {
        a.stop().await;
    }
    write_state(&opts, &[], &mut state_warned);
    if let Some(t) = line_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&line_path);
    Ok(())
}

/// Removes the line sockets of devshims that are gone (killed: they could
/// not remove their own).
fn remove_stale_line_sockets(state_dir: &Path) {
    for e in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("line."))
            .and_then(|n| n.strip_suffix(".sock"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !crate::ports::alive(pid) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(board: &str, by_id: &str) -> Entry {
        Entry {
            board: board.into(),
            tty: "t".into(),
            by_id: Some(by_id.into()),
            rate: 115200,
        }
    }

    #[test]
    fn plan_diffs() {
        let running: BTreeMap<_, _> = [
            ("a.t.sock".to_string(), e("a", "x")),
            ("b.t.sock".to_string(), e("b", "y")),
        ]
        .into();
        let wanted: BTreeMap<_, _> = [
            ("b.t.sock".to_string(), e("b", "y2")),
            ("c.t.sock".to_string(), e("c", "z")),
        ]
        .into();
        let (stop, start) = actor_changes(&running, &wanted);
        assert_eq!(stop, ["a.t.sock", "b.t.sock"]);
        assert_eq!(start, [e("b", "y2"), e("c", "z")]);
        let (stop, start) = actor_changes(&wanted, &wanted);
        assert!(stop.is_empty() && start.is_empty());
    }
}
