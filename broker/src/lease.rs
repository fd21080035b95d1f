//! Host-wide leases: who has which board, and who waits, first come first
//! served across machines and host users.
//!
//! Plain data: the control plane calls [`Leases::request`] and
//! [`Leases::drop_connection`], and acts on the grants they return. A lease
//! belongs to the control connection that took it, so a job that ends,
//! crashes or is killed releases its board when its connection closes.

use std::collections::{BTreeMap, VecDeque};
use std::time::SystemTime;

use crate::config::Config;

/// Who asks: a machine (any job in it) or a host user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Client {
    Machine(String),
    HostUser {
        uid: u32,
        name: String,
        groups: Vec<u32>,
    },
}

impl Client {
    pub fn describe(&self) -> String {
        match self {
            Client::Machine(m) => format!("machine {m}"),
            Client::HostUser { uid, name, .. } => format!("host user {name} (uid {uid})"),
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    Board(String),
    /// Any free board `compatible` with this type.
    Type(String),
}

impl Want {
    pub fn describe(&self) -> String {
        match self {
            Want::Board(b) => format!("board {b}"),
            Want::Type(t) => format!("a board of type {t}"),
        }
    }
}

/// A granted lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub conn: u64,
    pub client: Client,
    pub since: SystemTime,
}

#[derive(Debug, Clone)]
struct Waiter {
    conn: u64,
    client: Client,
    want: Want,
}

/// A board handed to a waiting connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub conn: u64,
    pub board: String,
}

/// The host's leases and queue.
#[derive(Debug, Default)]
pub struct Leases {
    held: BTreeMap<String, Lease>,
    queue: VecDeque<Waiter>,
}

/// Where a waiting request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// 1 = next.
    pub place: usize,
    /// Holders of the boards it could get, with since when.
    pub holders: Vec<(String, String, SystemTime)>,
}

/// Whether `client` may use `board` at all, by the config.
pub fn allowed(
    config: &Config,
    board: &str,
    client: &Client,
    group_gid: impl Fn(&str) -> Option<u32>,
) -> bool {
    let Some(b) = config.boards.iter().find(|b| b.name == board) else {
        return false;
    };
    match client {
        Client::Machine(m) => b.machines.iter().any(|x| x == m),
        Client::HostUser { uid, groups, .. } => {
            !b.host_groups.is_empty()
                && (*uid == 0
                    || b.host_groups
                        .iter()
                        .filter_map(|g| group_gid(g))
                        .any(|g| groups.contains(&g)))
        }
    }
}

impl Leases {
    /// The boards a request could be given, in config order.
    fn candidates(
        config: &Config,
        want: &Want,
        client: &Client,
        group_gid: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<String> {
        config
            .boards
            .iter()
            .filter(|b| match want {
                Want::Board(n) => &b.name == n,
                Want::Type(t) => b.compatible.iter().any(|c| c == t),
            })
            .filter(|b| allowed(config, &b.name, client, group_gid))
            .map(|b| b.name.clone())
            .collect()
    }

    /// Asks for a board. `present` says which boards are plugged in now.
    /// Returns the board granted at once, `Ok(None)` if queued, or why the
    /// request can never be granted.
    pub fn request(
        &mut self,
        config: &Config,
        conn: u64,
        client: Client,
        want: Want,
        present: &dyn Fn(&str) -> bool,
        group_gid: &dyn Fn(&str) -> Option<u32>,
    ) -> Result<Option<String>, String> {
        if self.queue.iter().any(|w| w.conn == conn) {
            return Err(
                "this connection is already waiting for a board; one request at a time".into(),
            );
        }
        let cands = Self::candidates(config, &want, &client, group_gid);
        if cands.is_empty() {
            let exists = match &want {
                Want::Board(n) => config.boards.iter().any(|b| &b.name == n),
                Want::Type(t) => config
                    .boards
                    .iter()
                    .any(|b| b.compatible.iter().any(|c| c == t)),
            };
            return Err(match (exists, &want) {
                (true, _) => format!("{} may not use {}", client.describe(), want.describe()),
                (false, Want::Board(n)) => format!("board {n} is not in the config"),
                (false, Want::Type(t)) => format!("no board in the config is compatible with {t}"),
            });
        }
        if let Some(b) = cands
            .iter()
            .find(|b| self.held.get(*b).is_some_and(|l| l.conn == conn))
        {
            return Err(format!("this connection already holds {b}"));
        }
        // Earlier waiters go first: grant now only if nobody waits for these boards.
        let contended = self
            .queue
            .iter()
            .any(|w| Self::overlaps(config, &w.want, &want));
        if !contended {
            if let Some(b) = cands
                .iter()
                .find(|b| !self.held.contains_key(*b) && present(b))
            {
                self.held.insert(
                    b.clone(),
                    Lease {
                        conn,
                        client,
                        since: SystemTime::now(),
                    },
                );
                return Ok(Some(b.clone()));
            }
        }
        self.queue.push_back(Waiter { conn, client, want });
        Ok(None)
    }

    fn overlaps(config: &Config, a: &Want, b: &Want) -> bool {
        let boards = |w: &Want| -> Vec<String> {
            config
                .boards
                .iter()
                .filter(|bd| match w {
                    Want::Board(n) => &bd.name == n,
                    Want::Type(t) => bd.compatible.iter().any(|c| c == t),
                })
                .map(|bd| bd.name.clone())
                .collect()
        };
        let (x, y) = (boards(a), boards(b));
        x.iter().any(|n| y.contains(n))
    }

    /// Where a queued connection stands.
    pub fn position(
        &self,
        config: &Config,
        conn: u64,
        group_gid: &dyn Fn(&str) -> Option<u32>,
    ) -> Option<Position> {
        let idx = self.queue.iter().position(|w| w.conn == conn)?;
        let me = &self.queue[idx];
        let place = 1 + self
            .queue
            .iter()
            .take(idx)
            .filter(|w| Self::overlaps(config, &w.want, &me.want))
            .count();
        let holders = Self::candidates(config, &me.want, &me.client, group_gid)
            .into_iter()
            .filter_map(|b| self.held.get(&b).map(|l| (b, l.client.describe(), l.since)))
            .collect();
        Some(Position { place, holders })
    }

    /// Releases one board held by `conn`.
    pub fn release(&mut self, conn: u64, board: &str) -> Result<(), String> {
        match self.held.get(board) {
            Some(l) if l.conn == conn => {
                self.held.remove(board);
                Ok(())
            }
            Some(_) => Err(format!("{board} is leased by another connection")),
            None => Err(format!("{board} is not leased by this connection")),
        }
    }

    /// Forgets everything of a closed connection: its leases and its place
    /// in the queue.
    pub fn drop_connection(&mut self, conn: u64) {
        self.held.retain(|_, l| l.conn != conn);
        self.queue.retain(|w| w.conn != conn);
    }

    /// Hands free, present boards to waiters in queue order.
    pub fn grant_waiting(
        &mut self,
        config: &Config,
        present: &dyn Fn(&str) -> bool,
        group_gid: &dyn Fn(&str) -> Option<u32>,
    ) -> Vec<Grant> {
        let mut grants = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let w = &self.queue[i];
            // A waiter is skipped if an earlier waiter wants the same boards.
            let blocked = self
                .queue
                .iter()
                .take(i)
                .any(|e| Self::overlaps(config, &e.want, &w.want));
            let free = Self::candidates(config, &w.want, &w.client, group_gid)
                .into_iter()
                .find(|b| !self.held.contains_key(b) && present(b));
            match (blocked, free) {
                (false, Some(b)) => {
                    let w = self.queue.remove(i).unwrap();
                    self.held.insert(
                        b.clone(),
                        Lease {
                            conn: w.conn,
                            client: w.client,
                            since: SystemTime::now(),
                        },
                    );
                    grants.push(Grant {
                        conn: w.conn,
                        board: b,
                    });
                }
                _ => i += 1,
            }
        }
        grants
    }

    /// How many queued requests could take this board.
    pub fn waiting_for(&self, config: &Config, board: &str) -> usize {
        self.queue
            .iter()
            .filter(|w| Self::overlaps(config, &w.want, &Want::Board(board.to_string())))
            .count()
    }

    /// The lease on a board, if any.
    pub fn holder(&self, board: &str) -> Option<&Lease> {
        self.held.get(board)
    }

    /// Boards leased to a machine.
    pub fn machine_holds(&self, machine: &str, board: &str) -> bool {
        matches!(self.held.get(board), Some(Lease { client: Client::Machine(m), .. }) if m == machine)
    }

    /// Whether a host uid holds a lease on the board.
    pub fn host_uid_holds(&self, uid: u32, board: &str) -> bool {
        matches!(self.held.get(board), Some(Lease { client: Client::HostUser { uid: u, .. }, .. }) if *u == uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
[[board]]
name = "esp-a"
compatible = ["esp32"]
machines = ["ci1", "ci2"]
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { serial = "A" }

[[board]]
name = "esp-b"
compatible = ["esp32"]
machines = ["ci2"]
[[board.tty]]
name = "console"
match = { serial = "B" }
"#;

    fn cfg() -> Config {
        crate::config::parse(std::path::Path::new("t"), CONF).unwrap()
    }

    fn gid(g: &str) -> Option<u32> {
        (g == "hil").then_some(2000)
    }

    const ALL: &dyn Fn(&str) -> bool = &|_| true;

    #[test]
    fn first_come_first_served() {
        let c = cfg();
        let mut l = Leases::default();
        let m = |s: &str| Client::Machine(s.into());
        let host = Client::HostUser {
            uid: 1000,
            name: "ann".into(),
            groups: vec![2000],
        };
        assert_eq!(
            l.request(&c, 1, m("ci1"), Want::Board("esp-a".into()), ALL, &gid)
                .unwrap(),
            Some("esp-a".into())
        );
        assert_eq!(
            l.request(&c, 2, m("ci2"), Want::Board("esp-a".into()), ALL, &gid)
                .unwrap(),
            None
        );
        assert_eq!(
            l.request(&c, 3, host.clone(), Want::Board("esp-a".into()), ALL, &gid)
                .unwrap(),
            None
        );
        assert_eq!(
            l.request(&c, 4, m("ci1"), Want::Board("esp-a".into()), ALL, &gid)
                .unwrap(),
            None
        );
        let p = l.position(&c, 3, &gid).unwrap();
        assert_eq!(p.place, 2);
        assert_eq!(p.holders[0].1, "machine ci1");
        l.drop_connection(1);
        assert_eq!(
            l.grant_waiting(&c, ALL, &gid),
            vec![Grant {
                conn: 2,
                board: "esp-a".into()
            }]
        );
        l.release(2, "esp-a").unwrap();
        assert_eq!(
            l.grant_waiting(&c, ALL, &gid),
            vec![Grant {
                conn: 3,
                board: "esp-a".into()
            }]
        );
        assert!(l.host_uid_holds(1000, "esp-a"));
        l.drop_connection(3);
        assert_eq!(
            l.grant_waiting(&c, ALL, &gid),
            vec![Grant {
                conn: 4,
                board: "esp-a".into()
            }]
        );
    }

    #[test]
    fn by_type_takes_any_free_compatible_board() {
        let c = cfg();
        let mut l = Leases::default();
        let m = |s: &str| Client::Machine(s.into());
        assert_eq!(
            l.request(&c, 1, m("ci2"), Want::Type("esp32".into()), ALL, &gid)
                .unwrap(),
            Some("esp-a".into())
        );
        assert_eq!(
            l.request(&c, 2, m("ci2"), Want::Type("esp32".into()), ALL, &gid)
                .unwrap(),
            Some("esp-b".into())
        );
        // ci1 may only use esp-a: it waits.
        assert_eq!(
            l.request(&c, 3, m("ci1"), Want::Type("esp32".into()), ALL, &gid)
                .unwrap(),
            None
        );
        // An absent board is not handed out.
        let mut l2 = Leases::default();
        assert_eq!(
            l2.request(
                &c,
                1,
                m("ci2"),
                Want::Type("esp32".into()),
                &|b| b == "esp-b",
                &gid
            )
            .unwrap(),
            Some("esp-b".into())
        );
    }

    #[test]
    fn refusals_say_why() {
        let c = cfg();
        let mut l = Leases::default();
        let e = l
            .request(
                &c,
                1,
                Client::Machine("ci1".into()),
                Want::Board("esp-b".into()),
                ALL,
                &gid,
            )
            .unwrap_err();
        assert_eq!(e, "machine ci1 may not use board esp-b");
        let e = l
            .request(
                &c,
                1,
                Client::Machine("ci1".into()),
                Want::Type("nrf52".into()),
                ALL,
                &gid,
            )
            .unwrap_err();
        assert_eq!(e, "no board in the config is compatible with nrf52");
        let outsider = Client::HostUser {
            uid: 1001,
            name: "bob".into(),
            groups: vec![100],
        };
        assert!(l
            .request(&c, 2, outsider, Want::Board("esp-a".into()), ALL, &gid)
            .is_err());
        assert!(l
            .release(5, "esp-a")
            .unwrap_err()
            .contains("not leased by this connection"));
    }
}
