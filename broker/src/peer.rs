//! Who is on the other end of a host socket, and may they use a board.
//!
//! The kernel records a unix socket peer's credentials when it connects:
//! `SO_PEERCRED` gives its uid, gid and pid, `SO_PEERGROUPS` its
//! supplementary groups. Both are read from the socket, never from
//! `/proc/PID` (a pid can be reused by then). Group and user names are
//! looked up through NSS (`getgrnam_r`, `getpwuid_r`), so groups from LDAP or
//! SSSD match `host-groups` as local ones do. NSS can block (a directory
//! server), so callers run the lookups off the async threads and never while
//! holding the broker's state lock.

use std::os::fd::AsFd;

/// The host pid of the process that is `ns_pid` in the pid namespace of
/// host process `client` (a machine's devshim naming its tool). Only
/// processes of that namespace are considered, so a machine can name no
/// process outside its own. Scans `/proc`: call it off the async threads.
/// For display only (`status` names the tool): unlike credentials, what
/// `/proc` says may be stale by the time it is shown, and no decision rests
/// on it.
pub fn host_pid(client: i32, ns_pid: i32) -> Option<i32> {
    let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok();
    let ns = ns_of(&client.to_string())?;
    if ns_of("self").as_ref() == Some(&ns) {
        return std::path::Path::new(&format!("/proc/{ns_pid}"))
            .exists()
            .then_some(ns_pid);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let name = e.file_name();
        let pid = name.to_str()?;
        let host: i32 = pid.parse().ok()?;
        if ns_of(pid).as_ref() != Some(&ns) {
            return None;
        }
        // `NSpid: HOST ... INNERMOST`: the last is its pid in `ns`.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
        (line.split_whitespace().last()?.parse::<i32>().ok()? == ns_pid).then_some(host)
    })
}

/// A connected peer's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Primary and supplementary groups, as they were at connect time.
    pub groups: Vec<u32>,
}

impl Peer {
    /// Reads the credentials of a connected unix socket's peer.
    pub fn of(sock: &impl AsFd) -> std::io::Result<Peer> {
        let cred = nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(std::io::Error::from)?;
        let mut groups = peer_groups(sock)?;
        groups.push(cred.gid());
        groups.sort_unstable();
        groups.dedup();
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: (cred.pid() > 0).then_some(cred.pid()),
            groups,
        })
    }
}

/// The peer's supplementary groups (`SO_PEERGROUPS`, Linux 4.13).
fn peer_groups(sock: &impl AsFd) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_fd().as_raw_fd();
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: the buffer is `len` bytes of gid_t; the kernel writes at
        // most `len` bytes and sets `len` to what it wrote, or to what it
        // needs with ERANGE.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

/// A user's name, through NSS.
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// A group's gid, through NSS.
pub fn group_gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// `host user NAME (uid N)`, or `host uid N` for a uid without a name.
pub fn describe(uid: u32, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("host user {n} (uid {uid})"),
        None => format!("host uid {uid}"),
    }
}

/// Which of the `wanted` group names the peer is in (root is in all of
/// them). Blocking: NSS lookups.
pub fn member_of(peer: &Peer, wanted: &[String]) -> Vec<String> {
    wanted
        .iter()
        .filter(|g| peer.uid == 0 || group_gid(g).is_some_and(|gid| peer.groups.contains(&gid)))
        .cloned()
        .collect()
}

/// Decides whether a host peer may use a board shared with `allowed`
/// groups, given the groups it is in (from [`member_of`]). Root always may.
/// The error is the message the peer gets.
pub fn check_host_access(
    uid: u32,
    member: &[String],
    allowed: &[String],
    who: &str,
    tty: &str,
) -> Result<(), String> {
    if uid == 0 || allowed.iter().any(|g| member.contains(g)) {
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
    fn host_access() {
        let allowed = vec!["dialout".to_string()];
        assert!(check_host_access(1000, &["dialout".into()], &allowed, "u", "b.t").is_ok());
        let e =
            check_host_access(1000, &[], &allowed, "host user bob (uid 1000)", "b.t").unwrap_err();
        assert!(
            e.contains("b.t is for members of dialout; host user bob (uid 1000) is in none"),
            "{e}"
        );
        assert!(check_host_access(0, &[], &allowed, "root", "b.t").is_ok());
    }

    /// The groups come from the socket, as the kernel recorded them at
    /// connect: a socket pair's peer is this very process.
    #[test]
    fn credentials_from_the_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = Peer::of(&a).unwrap();
        assert_eq!(p.uid, nix::unistd::getuid().as_raw());
        assert_eq!(p.pid, Some(std::process::id() as i32));
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        mine.push(nix::unistd::getgid().as_raw());
        mine.sort_unstable();
        mine.dedup();
        assert_eq!(p.groups, mine);
        // NSS knows root's group by name.
        assert_eq!(group_gid("root"), Some(0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
