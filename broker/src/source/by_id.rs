//! The by-id directory source: adapters are the links in a directory such as
//! `/dev/serial/by-id`, watched with inotify.
//!
//! udev removes the directory when the last adapter goes and makes it again
//! for the next one, so the source also watches the nearest existing
//! ancestor and re-arms itself whenever the directory comes or goes. Every
//! event triggers a rescan that is diffed against what was reported before:
//! the stream carries changes only.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::mpsc;

use super::{diff, AdapterStream, Source, SourceEvent};
use crate::adapter::{Adapter, UdevIdentity};

/// Default directory of the by-id source.
pub const DEFAULT_DIR: &str = "/dev/serial/by-id";
/// Where udev keeps its device records (`cMAJ:MIN`).
pub const UDEV_DATA: &str = "/run/udev/data";

/// Watches a directory of by-id links.
pub struct ByIdSource {
    dir: PathBuf,
    /// Where udev keeps its device records, for serial, path and VID:PID.
    udev_data: PathBuf,
}

impl ByIdSource {
    pub fn new(dir: impl Into<PathBuf>) -> ByIdSource {
        ByIdSource {
            dir: dir.into(),
            udev_data: PathBuf::from(UDEV_DATA),
        }
    }
}

impl Source for ByIdSource {
    fn describe(&self) -> String {
        format!("by-id directory {}", self.dir.display())
    }

    fn watch(self: Box<Self>) -> io::Result<AdapterStream> {
        let inotify = Inotify::init()?;
        let (tx, rx) = mpsc::channel(64);
        let events = inotify.into_event_stream(vec![0u8; 4096])?;
        tokio::spawn(run(*self, events, tx));
        Ok(Box::pin(super::ChannelStream(rx)))
    }
}

async fn run(
    src: ByIdSource,
    mut events: inotify::EventStream<Vec<u8>>,
    tx: mpsc::Sender<io::Result<SourceEvent>>,
) {
    let mut watches = events.watches();
    let mut armed: Vec<WatchDescriptor> = Vec::new();
    let mut known: BTreeMap<String, Adapter> = BTreeMap::new();
    let mut settled = false;
    loop {
        if let Err(e) = arm(&mut watches, &mut armed, &src.dir) {
            let _ = tx.send(Err(e)).await;
            return;
        }
        let now = scan(&src.dir, &src.udev_data);
        for ev in diff(&known, &now) {
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
        known = now;
        if !settled {
            settled = true;
            if tx.send(Ok(SourceEvent::Settled)).await.is_err() {
                return;
            }
        }
        match events.next().await {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            None => return,
        }
    }
}

/// Watches the directory (if it exists) and its nearest existing ancestor.
/// Adding a watch that exists returns the same descriptor, so only watches no
/// longer wanted are removed: removing one queues an `IN_IGNORED` event, and
/// removing all each time would wake this loop forever.
fn arm(watches: &mut Watches, armed: &mut Vec<WatchDescriptor>, dir: &Path) -> io::Result<()> {
    let entry_mask = WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR;
    let mut now = Vec::new();
    if let Ok(wd) = watches.add(dir, entry_mask) {
        now.push(wd);
    }
    let mut anc = dir.parent();
    let mut found = false;
    while let Some(a) = anc {
        let p = if a.as_os_str().is_empty() {
            Path::new(".")
        } else {
            a
        };
        if let Ok(wd) = watches.add(p, entry_mask) {
            now.push(wd);
            found = true;
            break;
        }
        anc = a.parent();
    }
    for wd in armed.drain(..) {
        if !now.contains(&wd) {
            let _ = watches.remove(wd);
        }
    }
    *armed = now;
    if !found {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no ancestor of {} can be watched", dir.display()),
        ));
    }
    Ok(())
}

/// Lists the adapters whose links are in `dir` now. Dangling links are left
/// out: there is nothing to open behind them.
pub fn scan(dir: &Path, udev_data: &Path) -> BTreeMap<String, Adapter> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in rd.flatten() {
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if wire::names::check_link_name(&name).is_err() {
            continue;
        }
        let link = entry.path();
        let Ok(meta) = std::fs::metadata(&link) else {
            continue;
        };
        if !meta.file_type().is_char_device() {
            continue;
        }
        let rdev = meta.rdev();
        let record = udev_data.join(format!("c{}:{}", libc::major(rdev), libc::minor(rdev)));
        let ident = std::fs::read_to_string(record)
            .map(|t| UdevIdentity::parse(&t))
            .unwrap_or_default();
        let id = link.to_string_lossy().into_owned();
        out.insert(
            id.clone(),
            Adapter {
                id,
                device: link,
                by_id: Some(name),
                serial: ident.serial,
                path: ident.path,
                usb: ident.usb,
            },
        );
    }
    out
}
