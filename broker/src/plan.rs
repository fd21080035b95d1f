//! Config + present adapters → the sockets that should exist. Pure functions:
//! the server applies the difference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use wire::manifest::{Entry, Manifest};
use wire::names::socket_name;

use crate::adapter::Adapter;
use crate::config::Config;

/// A board's tty, by names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TtyKey {
    pub board: String,
    pub tty: String,
}

impl std::fmt::Display for TtyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.board, self.tty)
    }
}

/// Who may connect to a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anyone who can reach the socket: the machine directory is bound into
    /// that machine only.
    Machine(String),
    /// Host users in one of these groups (checked with `SO_PEERCRED`).
    HostGroups(Vec<String>),
}

/// One socket that should exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketSpec {
    pub tty: TtyKey,
    pub access: Access,
}

/// Which adapter each tty gets. An adapter matching no tty is ignored; a tty
/// matched by several adapters takes the first by id (the config check
/// prevents one adapter from matching two ttys), and the others are
/// returned as warnings.
pub fn assign(
    config: &Config,
    adapters: &BTreeMap<String, Adapter>,
) -> (BTreeMap<TtyKey, Adapter>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut warnings = Vec::new();
    for board in &config.boards {
        for tty in &board.ttys {
            let key = TtyKey {
                board: board.name.clone(),
                tty: tty.name.clone(),
            };
            let mut found = adapters.values().filter(|a| tty.matcher.matches(a));
            if let Some(first) = found.next() {
                for extra in found {
                    warnings.push(format!(
                        "{key}: adapter {} also matches; using {} (add serial or path to the match)",
                        extra.id, first.id
                    ));
                }
                out.insert(key, first.clone());
            }
        }
    }
    (out, warnings)
}

/// Every machine the config names, whose directory the broker keeps.
pub fn machines(config: &Config) -> BTreeSet<String> {
    let from_boards = config
        .boards
        .iter()
        .flat_map(|b| b.machines.iter().cloned());
    from_boards
        .chain(config.machines.iter().map(|m| m.name.clone()))
        .collect()
}

/// The sockets that should exist, by path relative to the run directory. A
/// machine gets a board's sockets when `has(machine, board)`: always for a
/// board dedicated to it, else while it holds the lease.
pub fn sockets(
    config: &Config,
    present: &BTreeMap<TtyKey, Adapter>,
    has: &dyn Fn(&str, &str) -> bool,
) -> BTreeMap<PathBuf, SocketSpec> {
    let mut out = BTreeMap::new();
    for board in &config.boards {
        for tty in &board.ttys {
            let key = TtyKey {
                board: board.name.clone(),
                tty: tty.name.clone(),
            };
            if !present.contains_key(&key) {
                continue;
            }
            let file = socket_name(&board.name, &tty.name);
            for m in board.machines.iter().filter(|m| has(m, &board.name)) {
                out.insert(
                    PathBuf::from("machines").join(m).join(&file),
                    SocketSpec {
                        tty: key.clone(),
                        access: Access::Machine(m.clone()),
                    },
                );
            }
            if !board.host_groups.is_empty() {
                out.insert(
                    PathBuf::from("host").join(&file),
                    SocketSpec {
                        tty: key.clone(),
                        access: Access::HostGroups(board.host_groups.clone()),
                    },
                );
            }
        }
    }
    out
}

/// The index of one machine's directory.
pub fn manifest(
    config: &Config,
    present: &BTreeMap<TtyKey, Adapter>,
    machine: &str,
    has: &dyn Fn(&str, &str) -> bool,
) -> Manifest {
    let mut ttys = Vec::new();
    for board in config
        .boards
        .iter()
        .filter(|b| b.machines.iter().any(|m| m == machine) && has(machine, &b.name))
    {
        for tty in &board.ttys {
            let key = TtyKey {
                board: board.name.clone(),
                tty: tty.name.clone(),
            };
            if let Some(a) = present.get(&key) {
                ttys.push(Entry {
                    board: board.name.clone(),
                    tty: tty.name.clone(),
                    by_id: a.by_id.clone(),
                    rate: tty.rate,
                });
            }
        }
    }
    Manifest { version: 1, ttys }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CONF: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1", "ci2"]
host-groups = ["dialout"]
[[board.tty]]
name = "console"
match = { by-id = "usb-A" }

[[board]]
name = "nrf"
machines = ["ci2"]
[[board.tty]]
name = "uart"
rate = 9600
match = { serial = "S2" }
"#;

    fn adapter(id: &str, by_id: &str, serial: Option<&str>) -> Adapter {
        Adapter {
            id: id.into(),
            device: format!("/dev/{id}").into(),
            by_id: Some(by_id.into()),
            serial: serial.map(Into::into),
            path: None,
            usb: None,
        }
    }

    #[test]
    fn sockets_follow_policy_and_presence() {
        let config = crate::config::parse(Path::new("t"), CONF).unwrap();
        let adapters: BTreeMap<_, _> = [("x".to_string(), adapter("x", "usb-A", None))].into();
        let (present, warnings) = assign(&config, &adapters);
        assert!(warnings.is_empty());
        let s = sockets(&config, &present, &|_, _| true);
        let paths: Vec<_> = s.keys().map(|p| p.to_str().unwrap().to_string()).collect();
        assert_eq!(
            paths,
            [
                "host/esp1.console.sock",
                "machines/ci1/esp1.console.sock",
                "machines/ci2/esp1.console.sock"
            ]
        );
        assert_eq!(
            manifest(&config, &present, "ci2", &|_, _| true).ttys.len(),
            1
        );
        assert_eq!(
            machines(&config).into_iter().collect::<Vec<_>>(),
            ["ci1", "ci2"]
        );

        let adapters: BTreeMap<_, _> =
            [("y".to_string(), adapter("y", "usb-other", Some("S2")))].into();
        let (present, _) = assign(&config, &adapters);
        let s = sockets(&config, &present, &|_, _| true);
        assert_eq!(s.len(), 1);
        assert!(s.contains_key(Path::new("machines/ci2/nrf.uart.sock")));
        assert!(
            !s.keys().any(|p| p.starts_with("machines/ci1")),
            "ci1 may not use nrf"
        );
        assert_eq!(
            manifest(&config, &present, "ci2", &|_, _| true).ttys[0].rate,
            9600
        );
    }
}
