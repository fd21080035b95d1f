//! Who is on the other end of a host socket, and may they use a board.
//!
//! `SO_PEERCRED` gives the peer's uid, gid and pid; the supplementary groups
//! come from `/proc/PID/status`, so a user added to a group sees the change
//! at their next login, as with device nodes.

use std::path::Path;

/// A connected peer's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Reads the credentials of a connected unix socket's peer.
    pub fn of(sock: &tokio::net::UnixStream) -> std::io::Result<Peer> {
        let cred = sock.peer_cred()?;
        let mut groups = vec![cred.gid()];
        if let Some(pid) = cred.pid() {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                groups.extend(parse_groups(&status));
            }
        }
        groups.sort_unstable();
        groups.dedup();
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }

    /// The peer's user name, from `ETC/passwd`.
    pub fn user_name(&self, etc: &Path) -> Option<String> {
        let passwd = std::fs::read_to_string(etc.join("passwd")).ok()?;
        devshim::users::user_name(&passwd, self.uid)
    }

    /// `host user NAME (uid N)`.
    pub fn describe(&self, etc: &Path) -> String {
        match self.user_name(etc) {
            Some(n) => format!("host user {n} (uid {})", self.uid),
            None => format!("host uid {}", self.uid),
        }
    }
}

/// The `Groups:` line of `/proc/PID/status`.
pub fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Decides whether a host peer may use a board shared with `allowed` groups.
/// Root always may. The error is the message the peer gets.
pub fn check_host_access(
    peer: &Peer,
    allowed: &[String],
    group_file: &str,
    who: &str,
    tty: &str,
) -> Result<(), String> {
    if peer.uid == 0 {
        return Ok(());
    }
    let gids: Vec<u32> = allowed
        .iter()
        .filter_map(|g| devshim::users::group_gid(group_file, g))
        .collect();
    if peer.groups.iter().any(|g| gids.contains(g)) {
        return Ok(());
    }
    Err(format!(
        "permission denied: {tty} is for members of {}; {who} is in none of them (ask an admin to run `usermod -aG {} USER`, then log in again)",
        allowed.join(", "),
        allowed.first().map(String::as_str).unwrap_or("GROUP")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line() {
        assert_eq!(
            parse_groups("Name:\tx\nGroups:\t20 27 1000 \n"),
            vec![20, 27, 1000]
        );
        assert!(parse_groups("Groups:\n").is_empty());
    }

    #[test]
    fn host_access() {
        let group = "dialout:x:20:\nplugdev:x:46:\n";
        let allowed = vec!["dialout".to_string()];
        let peer = |groups: Vec<u32>| Peer {
            uid: 1000,
            gid: 1000,
            pid: None,
            groups,
        };
        assert!(check_host_access(&peer(vec![1000, 20]), &allowed, group, "u", "b.t").is_ok());
        let e = check_host_access(
            &peer(vec![1000, 46]),
            &allowed,
            group,
            "host user bob (uid 1000)",
            "b.t",
        )
        .unwrap_err();
        assert!(
            e.contains("b.t is for members of dialout; host user bob (uid 1000) is in none"),
            "{e}"
        );
        assert!(check_host_access(
            &Peer {
                uid: 0,
                gid: 0,
                pid: None,
                groups: vec![0]
            },
            &allowed,
            group,
            "root",
            "b.t"
        )
        .is_ok());
    }
}
