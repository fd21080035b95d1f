//! devshim's one inotify instance. The machine directory and every pty's
//! `/dev/pts/N` are watched on it, and each event goes to whoever asked for
//! that watch.
//!
//! The kernel limits inotify *instances* per user (128 by default), and all
//! containers without private users share root's budget: an instance per
//! tty would stop a farm at about a hundred ttys. Watches are cheap (8192 a
//! user by default): one instance with a watch per tty has room for all.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;
use tracing::warn;

/// Where each watch's events go.
type Routes = Arc<Mutex<HashMap<WatchDescriptor, mpsc::UnboundedSender<EventMask>>>>;

/// The shared instance; cheap to clone.
#[derive(Clone)]
pub struct Watcher {
    watches: Arc<Mutex<Watches>>,
    routes: Routes,
}

/// One watch: its events, until dropped (which removes it).
pub struct Watch {
    wd: WatchDescriptor,
    events: mpsc::UnboundedReceiver<EventMask>,
    watcher: Watcher,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("watches", &self.routes.lock().unwrap().len())
            .finish()
    }
}

impl Watcher {
    /// Makes the instance and starts the task that hands its events out.
    pub fn new() -> io::Result<Watcher> {
        let ino = Inotify::init()?;
        let watches = ino.watches();
        let stream = ino.into_event_stream(vec![0u8; 16 * 1024])?;
        let routes: Routes = Arc::default();
        tokio::spawn(dispatch(stream, routes.clone()));
        Ok(Watcher {
            watches: Arc::new(Mutex::new(watches)),
            routes,
        })
    }

    /// Watches `path` for `mask`.
    pub fn watch(&self, path: &Path, mask: WatchMask) -> io::Result<Watch> {
        let (tx, rx) = mpsc::unbounded_channel();
        // Routes first: an event can come as soon as the watch is added.
        let mut routes = self.routes.lock().unwrap();
        let wd = self.watches.lock().unwrap().add(path, mask)?;
        routes.insert(wd.clone(), tx);
        Ok(Watch {
            wd,
            events: rx,
            watcher: self.clone(),
        })
    }
}

impl Watch {
    /// The next event's mask; `None` once the watch is gone (the file was
    /// removed, or the instance failed).
    pub async fn next(&mut self) -> Option<EventMask> {
        self.events.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut routes = self.watcher.routes.lock().unwrap();
        routes.remove(&self.wd);
        // Gone already if its file was removed: nothing to undo.
        let _ = self.watcher.watches.lock().unwrap().remove(self.wd.clone());
    }
}

/// Hands each event to its watch's owner; a watch the kernel dropped
/// (`IGNORED`: its file went) ends its stream.
async fn dispatch(mut stream: inotify::EventStream<Vec<u8>>, routes: Routes) {
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                warn!("inotify: {e}");
                break;
            }
        };
        let mut routes = routes.lock().unwrap();
        if ev.mask.contains(EventMask::IGNORED) {
            routes.remove(&ev.wd);
        } else if let Some(tx) = routes.get(&ev.wd) {
            let _ = tx.send(ev.mask);
        }
    }
    // Every watch ends with the instance.
    routes.lock().unwrap().clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many watches on one instance, each getting its own events.
    #[tokio::test(flavor = "current_thread")]
    async fn one_instance_routes_each_watch_its_events() {
        let d = tempfile::tempdir().unwrap();
        let w = Watcher::new().unwrap();
        let mut watches = Vec::new();
        for i in 0..300 {
            let p = d.path().join(format!("f{i}"));
            std::fs::write(&p, b"x").unwrap();
            watches.push(
                w.watch(&p, WatchMask::OPEN | WatchMask::CLOSE_NOWRITE)
                    .unwrap(),
            );
        }
        drop(std::fs::File::open(d.path().join("f7")).unwrap());
        let m = watches[7].next().await.unwrap();
        assert!(m.contains(EventMask::OPEN), "{m:?}");
        let m = watches[7].next().await.unwrap();
        assert!(m.contains(EventMask::CLOSE_NOWRITE), "{m:?}");
        // Nothing for the others.
        assert!(watches[8].events.try_recv().is_err());
        // A removed file ends its watch.
        std::fs::remove_file(d.path().join("f9")).unwrap();
        assert!(
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while watches[9].next().await.is_some() {}
            })
            .await
            .is_ok()
        );
    }
}
