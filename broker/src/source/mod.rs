//! Discovery sources: where the broker learns which adapters are plugged in.
//!
//! A source is one small trait: it turns into a stream of [`SourceEvent`]s,
//! starting with an `Added` for every adapter present when it starts, then
//! one `Settled`. The rest
//! of the broker sees only this stream, so a new source (udev) slots in
//! without touching it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::pin::Pin;

use futures_util::Stream;

use crate::adapter::Adapter;

pub mod by_id;
pub mod udev;

/// A change in the set of present adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    Added(Adapter),
    /// The adapter with this [`Adapter::id`] is gone.
    Removed(String),
    /// Every adapter present at the start has been reported (sent once):
    /// the broker is ready when it has served them.
    Settled,
}

/// The stream a source turns into. It ends only when the source fails for
/// good; the error says why.
pub type AdapterStream = Pin<Box<dyn Stream<Item = std::io::Result<SourceEvent>> + Send>>;

/// Something that watches for adapters.
pub trait Source: Send {
    /// A short description for logs, e.g. `by-id directory /dev/serial/by-id`.
    fn describe(&self) -> String;
    /// Starts watching.
    fn watch(self: Box<Self>) -> std::io::Result<AdapterStream>;
}

/// A stream over a channel's receiving end, so a source can run as a task.
pub(crate) struct ChannelStream<T>(pub tokio::sync::mpsc::Receiver<T>);

impl<T> Stream for ChannelStream<T> {
    type Item = T;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// The events that turn `old` into `new`, both keyed by [`Adapter::id`]. A
/// changed adapter (a link that now points elsewhere, another identity) is a
/// removal and an addition.
pub fn diff(old: &BTreeMap<String, Adapter>, new: &BTreeMap<String, Adapter>) -> Vec<SourceEvent> {
    let mut evs = Vec::new();
    for (id, a) in old {
        if new.get(id) != Some(a) {
            evs.push(SourceEvent::Removed(id.clone()));
        }
    }
    for (id, a) in new {
        if old.get(id) != Some(a) {
            evs.push(SourceEvent::Added(a.clone()));
        }
    }
    evs
}

/// Which source the command line asks for.
impl crate::cli::SourceArgs {
    fn kind(&self) -> anyhow::Result<crate::cli::SourceKind> {
        let kind = self
            .source
            .unwrap_or(if self.by_id_dir.is_some() || !udev::udev_running() {
                crate::cli::SourceKind::ById
            } else {
                crate::cli::SourceKind::Udev
            });
        if kind == crate::cli::SourceKind::Udev && self.by_id_dir.is_some() {
            anyhow::bail!("--by-id-dir applies to --source by-id only");
        }
        Ok(kind)
    }

    fn dir(&self) -> PathBuf {
        self.by_id_dir
            .clone()
            .unwrap_or_else(|| by_id::DEFAULT_DIR.into())
    }

    /// The source `run` watches.
    pub fn source(&self) -> anyhow::Result<Box<dyn Source>> {
        Ok(match self.kind()? {
            crate::cli::SourceKind::Udev => Box::new(udev::UdevSource::new()),
            crate::cli::SourceKind::ById => Box::new(by_id::ByIdSource::new(self.dir())),
        })
    }

    /// The adapters present now, for `boards`.
    pub fn present(&self) -> anyhow::Result<Vec<crate::adapter::Adapter>> {
        Ok(match self.kind()? {
            crate::cli::SourceKind::Udev => crate::suggest::present_udev()
                .map_err(|e| anyhow::anyhow!("can't list udev's tty devices: {e}"))?,
            crate::cli::SourceKind::ById => crate::suggest::present_by_id(&self.dir()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ad(id: &str, dev: &str) -> Adapter {
        Adapter {
            id: id.into(),
            device: dev.into(),
            by_id: None,
            serial: None,
            path: None,
            usb: None,
        }
    }

    #[test]
    fn diff_reports_changes_only() {
        let old: BTreeMap<_, _> = [
            ("a".to_string(), ad("a", "1")),
            ("b".to_string(), ad("b", "2")),
        ]
        .into();
        let new: BTreeMap<_, _> = [
            ("b".to_string(), ad("b", "3")),
            ("c".to_string(), ad("c", "4")),
        ]
        .into();
        assert_eq!(
            diff(&old, &new),
            vec![
                SourceEvent::Removed("a".into()),
                SourceEvent::Removed("b".into()),
                SourceEvent::Added(ad("b", "3")),
                SourceEvent::Added(ad("c", "4"))
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }
}
