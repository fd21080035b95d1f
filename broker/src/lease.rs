//! Host-wide leases: who has which board, and who waits, first come first
//! served across machines and host users.
//!
//! Plain data: the control plane calls [`Leases::request`],
//! [`Leases::release`], [`Leases::withdraw`] and [`Leases::drop_connection`],
//! then [`Leases::grant`] for the boards that may have become free, and acts
//! on the grants it returns. A lease belongs to the control connection that
//! took it, so a job that ends, crashes or is killed releases its board when
//! its connection closes.
//!
//! The queue is kept per board: each waiter is filed under the boards it
//! could be given (its *candidates*: the boards its request names or whose
//! types match, that its client may use), in arrival order. A board that
//! becomes free goes to the earliest waiter filed under it. Every grant,
//! release and withdrawal costs O(k log n) for a waiter with k candidates
//! among n waiters (telling a new waiter its place counts those before it,
//! once), so thousands of waiters cost the broker nothing it would notice,
//! and one machine's type request never stands in front of another
//! machine's own boards.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use wire::control::ErrorCode;

use crate::config::Config;
use crate::refusal::Refusal;

/// Who asks: a machine (any job in it) or a host user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tenant {
    Machine(String),
    /// A host user, with the configured host groups it belongs to (found at
    /// connect time from the socket's credentials and NSS).
    HostUser {
        uid: u32,
        name: String,
        groups: Vec<String>,
    },
}

impl Tenant {
    pub fn describe(&self) -> String {
        match self {
            Tenant::Machine(m) => format!("machine {m}"),
            Tenant::HostUser { uid, name, .. } => format!("host user {name} (uid {uid})"),
        }
    }

    /// What per-client limits are counted by: the machine, or the host uid.
    pub fn key(&self) -> TenantKey {
        match self {
            Tenant::Machine(m) => TenantKey::Machine(m.clone()),
            Tenant::HostUser { uid, .. } => TenantKey::HostUid(*uid),
        }
    }
}

/// The unit limits are counted by.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TenantKey {
    Machine(String),
    HostUid(u32),
    Admin,
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
    /// Unique for the broker's life: tells one lease of a board from the
    /// next, even by the same client.
    pub id: u64,
    pub conn: u64,
    pub client: Tenant,
    pub since: SystemTime,
}

#[derive(Debug, Clone)]
struct Waiter {
    conn: u64,
    client: Tenant,
    want: Want,
    /// When it got in line.
    since: SystemTime,
    /// The boards it may be given, in config order.
    candidates: Vec<String>,
}

/// A board handed to a waiting connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub conn: u64,
    pub board: String,
    /// How long it waited.
    pub waited: std::time::Duration,
}

/// What a new config did to the leases.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconfigured {
    /// Boards whose lease ended: gone, or their holder may no longer use them.
    pub freed: Vec<String>,
    /// Requests no board fits any more, by connection, and why.
    pub refused: Vec<(u64, String)>,
}

/// The host's leases and queue.
#[derive(Debug, Default)]
pub struct Leases {
    held: BTreeMap<String, Lease>,
    /// Boards each connection holds.
    holding: BTreeMap<u64, BTreeSet<String>>,
    /// Waiters by arrival number.
    waiters: BTreeMap<u64, Waiter>,
    /// Each connection's waiter (one at a time).
    waiting: BTreeMap<u64, u64>,
    /// Each board's waiters, in arrival order.
    queues: BTreeMap<String, BTreeSet<u64>>,
    /// Waiters per client, for the limit.
    per_client: BTreeMap<TenantKey, usize>,
    next: u64,
}

/// Where a waiting request stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// 1 = next: the best place it has in the line of any board it may get.
    pub place: usize,
    /// Holders of the boards it could get, with since when.
    pub holders: Vec<(String, String, SystemTime)>,
}

/// Whether `client` may use `board` at all, by the config. A host user may
/// use a board shared with a host group it is in; root may use any board
/// shared with host groups.
pub fn allowed(config: &Config, board: &str, client: &Tenant) -> bool {
    let Some(b) = config.board(board) else {
        return false;
    };
    match client {
        Tenant::Machine(m) => b.machines.iter().any(|x| x == m),
        Tenant::HostUser { uid, groups, .. } => {
            !b.host_groups.is_empty()
                && (*uid == 0 || b.host_groups.iter().any(|g| groups.contains(g)))
        }
    }
}

/// The boards a request could be given, in config order.
pub fn candidates(config: &Config, want: &Want, client: &Tenant) -> Vec<String> {
    config
        .boards
        .iter()
        .filter(|b| match want {
            Want::Board(n) => &b.name == n,
            Want::Type(t) => b.compatible.iter().any(|c| c == t),
        })
        .filter(|b| allowed(config, &b.name, client))
        .map(|b| b.name.clone())
        .collect()
}

/// The refusal for a request no board the client may use fits.
pub fn not_available(want: &Want, client: &Tenant) -> String {
    match want {
        Want::Board(b) => format!("board {b} is not available to {}", client.describe()),
        Want::Type(t) => format!("no board of type {t} is available to {}", client.describe()),
    }
}

impl Leases {
    /// Asks for a board. `present` says which boards are plugged in now;
    /// `max_waiting` caps the client's waiting requests. Returns the board
    /// granted at once, `Ok(None)` if queued, or why not.
    pub fn request(
        &mut self,
        config: &Config,
        conn: u64,
        client: Tenant,
        want: Want,
        present: &dyn Fn(&str) -> bool,
        max_waiting: usize,
    ) -> Result<Option<String>, Refusal> {
        if self.waiting.contains_key(&conn) {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                "this connection is already waiting for a board; one request at a time",
            ));
        }
        let cands = candidates(config, &want, &client);
        if cands.is_empty() {
            return Err(Refusal::new(
                ErrorCode::NotAvailable,
                not_available(&want, &client),
            ));
        }
        if let Some(b) = cands
            .iter()
            .find(|b| self.held.get(*b).is_some_and(|l| l.conn == conn))
        {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!("this connection already holds {b}"),
            ));
        }
        // A free, present board nobody waits for is granted at once. (A free
        // present board with waiters does not last: every change that frees
        // or brings a board is followed by `grant`.)
        if let Some(b) = cands.iter().find(|b| {
            !self.held.contains_key(*b)
                && present(b)
                && self.queues.get(*b).is_none_or(BTreeSet::is_empty)
        }) {
            let b = b.clone();
            self.hold(&b, conn, client);
            return Ok(Some(b));
        }
        let key = client.key();
        let n = self.per_client.get(&key).copied().unwrap_or(0);
        if n >= max_waiting {
            return Err(Refusal::new(ErrorCode::Limit, format!(
                "{} already has {n} lease requests waiting (the limit); wait for one to be granted or give it up",
                client.describe()
            )));
        }
        self.next += 1;
        let seq = self.next;
        for b in &cands {
            self.queues.entry(b.clone()).or_default().insert(seq);
        }
        *self.per_client.entry(key).or_default() += 1;
        self.waiting.insert(conn, seq);
        self.waiters.insert(
            seq,
            Waiter {
                conn,
                client,
                want,
                since: SystemTime::now(),
                candidates: cands,
            },
        );
        Ok(None)
    }

    /// Ends the lease on `board`, if any.
    fn unhold(&mut self, board: &str) -> Option<Lease> {
        let l = self.held.remove(board)?;
        if let Some(h) = self.holding.get_mut(&l.conn) {
            h.remove(board);
            if h.is_empty() {
                self.holding.remove(&l.conn);
            }
        }
        Some(l)
    }

    fn hold(&mut self, board: &str, conn: u64, client: Tenant) {
        self.next += 1;
        self.held.insert(
            board.to_string(),
            Lease {
                id: self.next,
                conn,
                client,
                since: SystemTime::now(),
            },
        );
        self.holding
            .entry(conn)
            .or_default()
            .insert(board.to_string());
    }

    /// Takes a waiter out of every queue it is filed in.
    fn unqueue(&mut self, seq: u64) -> Option<Waiter> {
        let w = self.waiters.remove(&seq)?;
        self.waiting.remove(&w.conn);
        for b in &w.candidates {
            if let Some(q) = self.queues.get_mut(b) {
                q.remove(&seq);
                if q.is_empty() {
                    self.queues.remove(b);
                }
            }
        }
        let key = w.client.key();
        if let Some(n) = self.per_client.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&key);
            }
        }
        Some(w)
    }

    /// Where a queued connection stands.
    pub fn position(&self, conn: u64) -> Option<Position> {
        let seq = *self.waiting.get(&conn)?;
        let me = &self.waiters[&seq];
        let place = me
            .candidates
            .iter()
            .filter_map(|b| self.queues.get(b))
            .map(|q| 1 + q.range(..seq).count())
            .min()
            .unwrap_or(1);
        let holders = me
            .candidates
            .iter()
            .filter_map(|b| {
                self.held
                    .get(b)
                    .map(|l| (b.clone(), l.client.describe(), l.since))
            })
            .collect();
        Some(Position { place, holders })
    }

    /// Releases one board held by `conn`; the caller then grants it anew.
    pub fn release(&mut self, conn: u64, board: &str) -> Result<(), Refusal> {
        match self.held.get(board) {
            Some(l) if l.conn == conn => {
                self.unhold(board);
                Ok(())
            }
            _ => Err(Refusal::new(
                ErrorCode::NotHeld,
                format!("{board} is not leased by this connection"),
            )),
        }
    }

    /// Gives up `conn`'s waiting request and nothing else: the boards it
    /// already holds stay its own. False if it was not waiting (it was just
    /// granted, say).
    pub fn withdraw(&mut self, conn: u64) -> bool {
        match self.waiting.get(&conn) {
            Some(&seq) => self.unqueue(seq).is_some(),
            None => false,
        }
    }

    /// Forgets everything of a closed connection: its leases and its place
    /// in the queue. Returns the boards it held, to be granted anew.
    pub fn drop_connection(&mut self, conn: u64) -> Vec<String> {
        self.withdraw(conn);
        let boards: Vec<String> = self
            .holding
            .remove(&conn)
            .map(|h| h.into_iter().collect())
            .unwrap_or_default();
        for b in &boards {
            self.held.remove(b);
        }
        boards
    }

    /// Hands each of `boards` that is free and present to its earliest waiter.
    pub fn grant<'a>(
        &mut self,
        boards: impl IntoIterator<Item = &'a str>,
        present: &dyn Fn(&str) -> bool,
    ) -> Vec<Grant> {
        let mut grants = Vec::new();
        for b in boards {
            if self.held.contains_key(b) || !present(b) {
                continue;
            }
            let Some(&seq) = self.queues.get(b).and_then(|q| q.first()) else {
                continue;
            };
            let w = self.unqueue(seq).expect("queued waiters exist");
            self.hold(b, w.conn, w.client);
            grants.push(Grant {
                conn: w.conn,
                board: b.to_string(),
                waited: w.since.elapsed().unwrap_or_default(),
            });
        }
        grants
    }

    /// Takes a new config: leases on boards that are gone, or that their
    /// holder may no longer use, end; waiting requests are filed anew under
    /// the boards the config now gives them (keeping their place), and a
    /// request no board fits any more is refused.
    pub fn reconfigure(&mut self, config: &Config) -> Reconfigured {
        let freed: Vec<String> = self
            .held
            .iter()
            .filter(|(b, l)| !allowed(config, b, &l.client))
            .map(|(b, _)| b.clone())
            .collect();
        for b in &freed {
            self.unhold(b);
        }
        self.queues.clear();
        let mut fit_none = Vec::new();
        for (seq, w) in self.waiters.iter_mut() {
            w.candidates = candidates(config, &w.want, &w.client);
            if w.candidates.is_empty() {
                fit_none.push(*seq);
            }
            for b in &w.candidates {
                self.queues.entry(b.clone()).or_default().insert(*seq);
            }
        }
        let refused = fit_none
            .into_iter()
            .filter_map(|seq| self.unqueue(seq))
            .map(|w| (w.conn, not_available(&w.want, &w.client)))
            .collect();
        Reconfigured { freed, refused }
    }

    /// Boards someone waits for: what to try granting when adapters change.
    pub fn wanted_boards(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    /// How many queued requests could take this board.
    pub fn waiting_for(&self, board: &str) -> usize {
        self.queues.get(board).map_or(0, BTreeSet::len)
    }

    /// How many of those are `client`'s own.
    pub fn waiting_for_by(&self, board: &str, client: &TenantKey) -> usize {
        self.queues.get(board).map_or(0, |q| {
            q.iter()
                .filter(|s| self.waiters[*s].client.key() == *client)
                .count()
        })
    }

    /// The lease on a board, if any.
    pub fn holder(&self, board: &str) -> Option<&Lease> {
        self.held.get(board)
    }

    /// Every lease, by board.
    pub fn leases(&self) -> impl Iterator<Item = (&String, &Lease)> {
        self.held.iter()
    }

    /// Waiting requests, in arrival order: who, since when, and the boards
    /// each may get.
    pub fn queued(&self) -> impl Iterator<Item = (&Tenant, SystemTime, &[String])> {
        self.waiters
            .values()
            .map(|w| (&w.client, w.since, w.candidates.as_slice()))
    }

    /// Whether a machine holds the lease on a board.
    pub fn machine_holds(&self, machine: &str, board: &str) -> bool {
        matches!(self.held.get(board), Some(Lease { client: Tenant::Machine(m), .. }) if m == machine)
    }

    /// Whether a host uid holds the lease on the board.
    pub fn host_uid_holds(&self, uid: u32, board: &str) -> bool {
        matches!(self.held.get(board), Some(Lease { client: Tenant::HostUser { uid: u, .. }, .. }) if *u == uid)
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

    const ALL: &dyn Fn(&str) -> bool = &|_| true;
    const MAX: usize = 100;

    fn grants(g: Vec<Grant>) -> Vec<(u64, String)> {
        g.into_iter().map(|g| (g.conn, g.board)).collect()
    }

    fn m(s: &str) -> Tenant {
        Tenant::Machine(s.into())
    }

    fn board(b: &str) -> Want {
        Want::Board(b.into())
    }

    #[test]
    fn first_come_first_served() {
        let c = cfg();
        let mut l = Leases::default();
        let host = Tenant::HostUser {
            uid: 1000,
            name: "ann".into(),
            groups: vec!["hil".into()],
        };
        assert_eq!(
            l.request(&c, 1, m("ci1"), board("esp-a"), ALL, MAX),
            Ok(Some("esp-a".into()))
        );
        assert_eq!(
            l.request(&c, 2, m("ci2"), board("esp-a"), ALL, MAX),
            Ok(None)
        );
        assert_eq!(l.request(&c, 3, host, board("esp-a"), ALL, MAX), Ok(None));
        assert_eq!(
            l.request(&c, 4, m("ci1"), board("esp-a"), ALL, MAX),
            Ok(None)
        );
        let p = l.position(3).unwrap();
        assert_eq!(p.place, 2);
        assert_eq!(p.holders[0].1, "machine ci1");
        assert_eq!(l.waiting_for("esp-a"), 3);
        let freed = l.drop_connection(1);
        assert_eq!(
            grants(l.grant(freed.iter().map(String::as_str), ALL)),
            [(2, "esp-a".to_string())]
        );
        l.release(2, "esp-a").unwrap();
        assert_eq!(grants(l.grant(["esp-a"], ALL)), [(3, "esp-a".to_string())]);
        assert!(l.host_uid_holds(1000, "esp-a"));
        let freed = l.drop_connection(3);
        assert_eq!(
            grants(l.grant(freed.iter().map(String::as_str), ALL)),
            [(4, "esp-a".to_string())]
        );
        assert_eq!(l.waiting_for("esp-a"), 0);
    }

    #[test]
    fn a_reload_ends_leases_and_refuses_waits_it_no_longer_allows() {
        let c = cfg();
        let mut l = Leases::default();
        // ci1 holds esp-a and ci2 waits for it; ci2 takes esp-b by type.
        assert!(l.request(&c, 1, m("ci1"), board("esp-a"), ALL, MAX).is_ok());
        assert_eq!(
            l.request(&c, 2, m("ci2"), board("esp-a"), ALL, MAX),
            Ok(None)
        );
        assert_eq!(
            l.request(&c, 3, m("ci2"), Want::Type("esp32".into()), ALL, MAX),
            Ok(Some("esp-b".into()))
        );
        // esp-a is gone from the new config.
        let without_a = crate::config::parse(
            std::path::Path::new("t"),
            &CONF[CONF.find("[[board]]\nname = \"esp-b\"").unwrap()..],
        )
        .unwrap();
        let r = l.reconfigure(&without_a);
        assert_eq!(r.freed, ["esp-a"]);
        assert_eq!(
            r.refused,
            [(2, "board esp-a is not available to machine ci2".to_string())]
        );
        assert!(l.position(2).is_none(), "a refused request no longer waits");
        assert!(l.machine_holds("ci2", "esp-b"), "other leases stay");
        assert_eq!(l.waiting_for("esp-a"), 0);
    }

    #[test]
    fn by_type_takes_any_free_compatible_board() {
        let c = cfg();
        let mut l = Leases::default();
        let t = || Want::Type("esp32".into());
        assert_eq!(
            l.request(&c, 1, m("ci2"), t(), ALL, MAX),
            Ok(Some("esp-a".into()))
        );
        assert_eq!(
            l.request(&c, 2, m("ci2"), t(), ALL, MAX),
            Ok(Some("esp-b".into()))
        );
        // ci1 may only use esp-a: it waits.
        assert_eq!(l.request(&c, 3, m("ci1"), t(), ALL, MAX), Ok(None));
        // esp-b coming free is not ci1's.
        l.release(2, "esp-b").unwrap();
        assert!(l.grant(["esp-b"], ALL).is_empty());
        // An absent board is not handed out.
        let mut l2 = Leases::default();
        assert_eq!(
            l2.request(&c, 1, m("ci2"), t(), &|b| b == "esp-b", MAX),
            Ok(Some("esp-b".into()))
        );
    }

    /// A type request filed under boards its client may not use would stand
    /// in front of the machine those boards belong to.
    #[test]
    fn a_type_request_does_not_block_another_machines_own_board() {
        let c = cfg();
        let mut l = Leases::default();
        // esp-a held by ci2; ci1 waits for any esp32 (only esp-a is its).
        assert_eq!(
            l.request(&c, 1, m("ci2"), board("esp-a"), ALL, MAX),
            Ok(Some("esp-a".into()))
        );
        assert_eq!(
            l.request(&c, 2, m("ci1"), Want::Type("esp32".into()), ALL, MAX),
            Ok(None)
        );
        // ci2 asks for its own free esp-b: granted at once.
        assert_eq!(
            l.request(&c, 3, m("ci2"), board("esp-b"), ALL, MAX),
            Ok(Some("esp-b".into()))
        );
    }

    #[test]
    fn withdrawing_keeps_what_is_held() {
        let c = cfg();
        let mut l = Leases::default();
        assert_eq!(
            l.request(&c, 1, m("ci2"), board("esp-b"), ALL, MAX),
            Ok(Some("esp-b".into()))
        );
        assert_eq!(
            l.request(&c, 2, m("ci1"), board("esp-a"), ALL, MAX),
            Ok(Some("esp-a".into()))
        );
        // conn 1 waits for esp-a too, then gives up: esp-b stays its own.
        assert_eq!(
            l.request(&c, 1, m("ci2"), board("esp-a"), ALL, MAX),
            Ok(None)
        );
        assert!(l.withdraw(1));
        assert!(!l.withdraw(1), "withdrawn once");
        assert!(l.machine_holds("ci2", "esp-b"));
        assert_eq!(l.waiting_for("esp-a"), 0);
    }

    #[test]
    fn refusals_say_why_and_no_more() {
        let c = cfg();
        let mut l = Leases::default();
        let not_mine = l
            .request(&c, 1, m("ci1"), board("esp-b"), ALL, MAX)
            .unwrap_err();
        let nowhere = l
            .request(&c, 1, m("ci1"), board("nope"), ALL, MAX)
            .unwrap_err();
        assert_eq!(
            not_mine.to_string(),
            "board esp-b is not available to machine ci1"
        );
        assert_eq!(
            nowhere.to_string(),
            "board nope is not available to machine ci1",
            "a board of somebody else's reads as one that does not exist"
        );
        let e = l
            .request(&c, 1, m("ci1"), Want::Type("nrf52".into()), ALL, MAX)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no board of type nrf52 is available to machine ci1"
        );
        let outsider = Tenant::HostUser {
            uid: 1001,
            name: "bob".into(),
            groups: vec![],
        };
        assert!(l
            .request(&c, 2, outsider, board("esp-a"), ALL, MAX)
            .is_err());
        assert!(l
            .release(5, "esp-a")
            .unwrap_err()
            .message
            .contains("not leased by this connection"));
    }

    #[test]
    fn waiting_requests_are_limited_per_client() {
        let c = cfg();
        let mut l = Leases::default();
        l.request(&c, 1, m("ci2"), board("esp-a"), ALL, 2).unwrap();
        assert_eq!(l.request(&c, 2, m("ci1"), board("esp-a"), ALL, 2), Ok(None));
        assert_eq!(l.request(&c, 3, m("ci1"), board("esp-a"), ALL, 2), Ok(None));
        let e = l
            .request(&c, 4, m("ci1"), board("esp-a"), ALL, 2)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Limit, "{e}");
        // Another machine still gets in line.
        assert_eq!(l.request(&c, 5, m("ci2"), board("esp-a"), ALL, 2), Ok(None));
        l.drop_connection(2);
        assert_eq!(l.request(&c, 4, m("ci1"), board("esp-a"), ALL, 2), Ok(None));
    }

    /// Thousands of waiters leave in any order and nothing of them stays.
    #[test]
    fn a_long_queue_empties() {
        let c = cfg();
        let mut l = Leases::default();
        l.request(&c, 0, m("ci2"), board("esp-a"), ALL, usize::MAX)
            .unwrap();
        for conn in 1..=10_000 {
            let who = if conn % 2 == 0 { "ci1" } else { "ci2" };
            l.request(&c, conn, m(who), board("esp-a"), ALL, usize::MAX)
                .unwrap();
        }
        for conn in (1..=10_000).rev() {
            l.drop_connection(conn);
        }
        let freed = l.drop_connection(0);
        assert!(l.grant(freed.iter().map(String::as_str), ALL).is_empty());
        assert_eq!(l.waiting_for("esp-a"), 0);
        assert!(l.waiters.is_empty() && l.waiting.is_empty() && l.queues.is_empty());
        assert!(l.per_client.is_empty() && l.holding.is_empty());
    }
}
