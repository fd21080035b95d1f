//! From what is to what should be: which sockets to withdraw and to serve,
//! which machine indexes to write, and which ttys count as present while
//! their adapter is away within its re-enumeration grace.
//!
//! Plain data and pure functions: the server loop gathers what is (its
//! listeners, the indexes on disk, the adapters) and what should be (from
//! [`crate::plan`]), asks [`steps`] what to do and does it; [`Away`] is the
//! grace's state machine, fed the present adapters and the time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;
use tracing::info;
use wire::manifest::Manifest;

use crate::adapter::Adapter;
use crate::config::Config;
use crate::plan::{Access, SocketSpec, TtyKey};

/// What the server does to reach the plan, in this order: withdraw sockets,
/// write indexes, serve sockets. A machine's index is written before its new
/// sockets appear and after its old ones are gone (devshim trusts it), so a
/// new socket is served only once its machine's index is written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Steps {
    pub withdraw: Vec<PathBuf>,
    pub write: Vec<(String, Manifest)>,
    pub serve: Vec<(PathBuf, SocketSpec)>,
}

/// The steps from `served` sockets and `written` indexes to `want` and
/// `indexes`. A machine whose index is not written (a write failed) gets no
/// new socket until it is.
pub fn steps(
    served: &BTreeSet<PathBuf>,
    want: &BTreeMap<PathBuf, SocketSpec>,
    written: &BTreeMap<String, Manifest>,
    indexes: &BTreeMap<String, Manifest>,
) -> Steps {
    let withdraw = served
        .iter()
        .filter(|p| !want.contains_key(*p))
        .cloned()
        .collect();
    let write = indexes
        .iter()
        .filter(|(m, man)| written.get(*m) != Some(man))
        .map(|(m, man)| (m.clone(), man.clone()))
        .collect();
    let serve = want
        .iter()
        .filter(|(p, _)| !served.contains(*p))
        .filter(|(_, spec)| match &spec.access {
            Access::Machine(m) => indexes.contains_key(m),
            Access::HostGroups(_) => true,
        })
        .map(|(p, s)| (p.clone(), s.clone()))
        .collect();
    Steps {
        withdraw,
        write,
        serve,
    }
}

/// Ttys whose adapter went away within their board's re-enumeration grace:
/// they keep their sockets and sessions as if still present.
#[derive(Debug, Default)]
pub struct Away {
    /// The adapters present after the last update.
    last: BTreeMap<TtyKey, Adapter>,
    /// Away ttys: the adapter they had, and when their grace runs out.
    ttys: BTreeMap<TtyKey, (Adapter, Instant)>,
}

fn grace_of(config: &Config, key: &TtyKey) -> Duration {
    config
        .board(&key.board)
        .map_or(Duration::ZERO, |b| b.reenumerate_grace)
}

impl Away {
    /// Takes the adapters present `now`; returns the ttys that are away.
    pub fn update(
        &mut self,
        config: &Config,
        present: &BTreeMap<TtyKey, Adapter>,
        now: Instant,
    ) -> BTreeSet<TtyKey> {
        for (key, a) in &self.last {
            if present.contains_key(key) || self.ttys.contains_key(key) {
                continue;
            }
            let grace = grace_of(config, key);
            if !grace.is_zero() {
                info!(
                    "{key}: adapter {} went away; keeping its sockets and session for {} in case it re-enumerates",
                    a.id,
                    humantime::format_duration(grace)
                );
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
    pub fn with_away(&self, present: &BTreeMap<TtyKey, Adapter>) -> BTreeMap<TtyKey, Adapter> {
        let mut all = present.clone();
        for (key, (a, _)) in &self.ttys {
            all.entry(key.clone()).or_insert_with(|| a.clone());
        }
        all
    }

    /// Forgets the ttys of boards a reload removed or changed: they start
    /// over from what is present. Other boards' away ttys keep their grace.
    pub fn forget(&mut self, gone: impl Fn(&str) -> bool) {
        self.last.retain(|k, _| !gone(&k.board));
        self.ttys.retain(|k, _| !gone(&k.board));
    }

    /// When the first grace runs out, if one runs.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.ttys.values().map(|(_, until)| *until).min()
    }

    /// Resolves when the first grace runs out; never while none runs.
    pub async fn expiry(&self) {
        match self.next_expiry() {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &str) -> TtyKey {
        TtyKey {
            board: b.into(),
            tty: "console".into(),
        }
    }

    fn adapter(id: &str) -> Adapter {
        Adapter {
            id: id.into(),
            device: format!("/dev/{id}").into(),
            by_id: Some(id.into()),
            serial: None,
            path: None,
            usb: None,
        }
    }

    fn spec(b: &str, access: Access) -> SocketSpec {
        SocketSpec {
            tty: key(b),
            access,
        }
    }

    fn man(n: usize) -> Manifest {
        Manifest {
            version: 1,
            ttys: (0..n)
                .map(|i| wire::manifest::Entry {
                    board: format!("b{i}"),
                    tty: "console".into(),
                    by_id: None,
                    rate: 115200,
                })
                .collect(),
        }
    }

    #[test]
    fn sockets_follow_the_plan_and_wait_for_their_index() {
        let served: BTreeSet<PathBuf> = ["machines/m1/old.console.sock".into()].into();
        let want: BTreeMap<PathBuf, SocketSpec> = [
            (
                "machines/m1/a.console.sock".into(),
                spec("a", Access::Machine("m1".into())),
            ),
            (
                "machines/m2/b.console.sock".into(),
                spec("b", Access::Machine("m2".into())),
            ),
            (
                "host/c.console.sock".into(),
                spec("c", Access::HostGroups(vec!["hil".into()])),
            ),
        ]
        .into();
        let written: BTreeMap<String, Manifest> = [("m1".into(), man(0))].into();
        // m2's index is not in the plan (its directory is not ready).
        let indexes: BTreeMap<String, Manifest> = [("m1".into(), man(1))].into();
        let s = steps(&served, &want, &written, &indexes);
        assert_eq!(s.withdraw, [PathBuf::from("machines/m1/old.console.sock")]);
        assert_eq!(s.write, [("m1".to_string(), man(1))]);
        let serve: Vec<&PathBuf> = s.serve.iter().map(|(p, _)| p).collect();
        assert_eq!(serve, ["host/c.console.sock", "machines/m1/a.console.sock"]);
        // Once done, nothing is left to do.
        let served: BTreeSet<PathBuf> = [
            "host/c.console.sock".into(),
            "machines/m1/a.console.sock".into(),
        ]
        .into();
        let s = steps(&served, &want, &indexes, &indexes);
        assert_eq!(s, Steps::default());
    }

    fn config(grace: &str) -> Config {
        crate::config::parse(
            std::path::Path::new("t"),
            &format!(
                "[[board]]\nname = \"a\"\nmachines = [\"m\"]\nreenumerate-grace = \"{grace}\"\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"x\" }}\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn an_adapter_away_within_its_grace_is_kept_then_let_go() {
        let c = config("2s");
        let mut away = Away::default();
        let t0 = Instant::now();
        let present: BTreeMap<TtyKey, Adapter> = [(key("a"), adapter("ttyUSB0"))].into();
        assert!(away.update(&c, &present, t0).is_empty());
        assert_eq!(away.next_expiry(), None);
        // Gone: away for 2 s, still planned with its old adapter.
        let none = BTreeMap::new();
        let keys = away.update(&c, &none, t0 + Duration::from_millis(10));
        assert_eq!(keys, [key("a")].into());
        assert_eq!(away.with_away(&none), present);
        assert_eq!(
            away.next_expiry(),
            Some(t0 + Duration::from_millis(10) + Duration::from_secs(2))
        );
        // Back as another node within the grace: present, not away.
        let back: BTreeMap<TtyKey, Adapter> = [(key("a"), adapter("ttyUSB1"))].into();
        assert!(away
            .update(&c, &back, t0 + Duration::from_secs(1))
            .is_empty());
        assert_eq!(away.with_away(&back), back);
        // Gone again, and the grace runs out: unplugged.
        away.update(&c, &none, t0 + Duration::from_secs(2));
        assert_eq!(away.update(&c, &none, t0 + Duration::from_secs(3)).len(), 1);
        assert!(away
            .update(&c, &none, t0 + Duration::from_secs(5))
            .is_empty());
        assert!(away.with_away(&none).is_empty());
        assert_eq!(away.next_expiry(), None);
    }

    #[test]
    fn a_reload_forgets_only_the_boards_it_touched() {
        let c = config("2s");
        let mut away = Away::default();
        let t0 = Instant::now();
        let present: BTreeMap<TtyKey, Adapter> = [
            (key("a"), adapter("ttyUSB0")),
            (key("b"), adapter("ttyUSB1")),
        ]
        .into();
        away.update(&c, &present, t0);
        let none = BTreeMap::new();
        // "b" has no board in this config: no grace, so only "a" is away.
        assert_eq!(away.update(&c, &none, t0), [key("a")].into());
        away.forget(|board| board == "b");
        assert_eq!(away.with_away(&none).len(), 1, "a's grace survives");
        away.forget(|board| board == "a");
        assert!(away.with_away(&none).is_empty());
        assert_eq!(away.next_expiry(), None);
    }

    #[test]
    fn without_a_grace_gone_is_gone() {
        let c = config("0s");
        let mut away = Away::default();
        let t0 = Instant::now();
        let present: BTreeMap<TtyKey, Adapter> = [(key("a"), adapter("ttyUSB0"))].into();
        away.update(&c, &present, t0);
        assert!(away.update(&c, &BTreeMap::new(), t0).is_empty());
        assert!(away.with_away(&BTreeMap::new()).is_empty());
    }
}
