//! The status of the boards as the state has them, for the control plane.

use std::sync::atomic::Ordering;

use wire::control::{BoardStatus, Holder, Status, TtyStatus};

use super::Shared;

impl Shared {
    /// Status of the boards `visible` lets through.
    pub fn status(&self, visible: impl Fn(&crate::config::Board) -> bool) -> Status {
        let inner = self.inner.lock().unwrap();
        let mut boards = Vec::new();
        for b in inner.config.boards.iter().filter(|b| visible(b)) {
            let ttys = b
                .ttys
                .iter()
                .map(|t| {
                    let st = inner.tty(&b.name, &t.name);
                    let adapter = st.adapter();
                    TtyStatus {
                        name: t.name.clone(),
                        present: adapter.is_some(),
                        by_id: st.by_id(t),
                        device: adapter.map(|a| a.device.display().to_string()),
                        holder: st.session.as_ref().map(|s| Holder {
                            who: s.who.clone(),
                            pid: s.pid,
                            since: humantime::format_rfc3339_seconds(s.since).to_string(),
                        }),
                        bytes_to_board: st.counters.to_board.load(Ordering::Relaxed),
                        bytes_from_board: st.counters.from_board.load(Ordering::Relaxed),
                    }
                })
                .collect();
            boards.push(BoardStatus {
                name: b.name.clone(),
                compatible: b.compatible.clone(),
                machines: b.machines.clone(),
                host_groups: b.host_groups.clone(),
                ttys,
            });
        }
        Status { boards }
    }
}
