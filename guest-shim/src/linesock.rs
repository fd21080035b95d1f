//! The line socket: how a `devshim run` supervisor asks `devshim serve` to
//! carry a tool's line call to the real port.
//!
//! A `SOCK_SEQPACKET` unix socket in devshim's state directory
//! (`line.<pid>.sock`, named in `ports.json`), mode 0666. Each request is
//! one packet of JSON ([`Packet`]) with the tool's pty descriptor attached
//! (`SCM_RIGHTS`); the reply is one packet ([`LineReply`]). The descriptor
//! is the credential: serve `fstat`s it and acts only if it is the slave of
//! one of its own ptys, so nobody can drive the line of a pty they can't
//! open, and no uid checks are needed.
//!
//! Where the supervisor can't get the descriptor (systemd-nspawn's seccomp
//! filter denies `pidfd_getfd`), the packet names the tool's process and
//! descriptor instead ([`Target`]); serve checks through `/proc` that the
//! process has the pty open, and that the asker (`SO_PEERCRED`) is root or
//! has that process's uid — who could take over the process anyway — and
//! that it was the same process throughout (a pidfd holds it meanwhile).

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{
    self, accept4, bind, connect, listen, recvmsg, sendmsg, AddressFamily, Backlog, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::linecall::{LineReply, LineRequest, Packet, Target};

/// Largest request or reply packet.
const MAX_PACKET: usize = 4096;

/// The socket of the `devshim serve` with process id `pid`.
pub fn path(state_dir: &Path, pid: u32) -> PathBuf {
    state_dir.join(format!("line.{pid}.sock"))
}

/// A pty's identity: the device inode's `(st_dev, st_ino)`. Two devpts
/// instances (a container's and the host's) may both have a `/dev/pts/3`,
/// so the device number alone would not do.
pub type PtyId = (u64, u64);

/// The identity of the file a descriptor is open on.
pub fn id_of(fd: BorrowedFd<'_>) -> io::Result<PtyId> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())?;
    Ok((st.st_dev, st.st_ino))
}

/// One call for a tty actor, with where its answer goes.
#[derive(Debug)]
pub struct LineCall {
    pub req: LineRequest,
    pub reply: oneshot::Sender<LineReply>,
}

/// The tty actors' current ptys, by identity: serve's line socket routes
/// each request through it.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Mutex<HashMap<PtyId, mpsc::Sender<LineCall>>>>);

impl Registry {
    pub fn insert(&self, id: PtyId, tx: mpsc::Sender<LineCall>) {
        self.0.lock().unwrap().insert(id, tx);
    }

    pub fn remove(&self, id: PtyId) {
        self.0.lock().unwrap().remove(&id);
    }

    fn get(&self, id: PtyId) -> Option<mpsc::Sender<LineCall>> {
        self.0.lock().unwrap().get(&id).cloned()
    }
}

fn seqpacket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if nonblocking {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        flags,
        None,
    )?)
}

/// Sends one packet, with `fd` attached if given.
fn send_packet(sock: RawFd, data: &[u8], fd: Option<RawFd>) -> io::Result<()> {
    let iov = [IoSlice::new(data)];
    let fds = fd.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds
        .as_ref()
        .map(|f| vec![ControlMessage::ScmRights(f)])
        .unwrap_or_default();
    sendmsg::<()>(sock, &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one packet and the descriptor attached to it, if any.
fn recv_packet(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut got = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for f in fds {
                // SAFETY: the kernel just gave us this descriptor.
                let f = unsafe { OwnedFd::from_raw_fd(f) };
                if got.is_none() {
                    got = Some(f);
                }
            }
        }
    }
    Ok((msg.bytes, got))
}

/// The supervisor's side: a blocking connection, made on first use and
/// made again after a failure.
pub struct Client {
    path: PathBuf,
    sock: Option<OwnedFd>,
}

impl Client {
    pub fn new(path: PathBuf) -> Client {
        Client { path, sock: None }
    }

    fn connected(&mut self) -> io::Result<RawFd> {
        if self.sock.is_none() {
            let s = seqpacket(false)?;
            connect(s.as_raw_fd(), &UnixAddr::new(&self.path)?)?;
            self.sock = Some(s);
        }
        Ok(self.sock.as_ref().unwrap().as_raw_fd())
    }

    /// Sends `req` about the tool's pty — its descriptor, or else the
    /// process and descriptor number — and waits for the answer (as long as
    /// the port takes: a break lasts its time).
    pub fn call(
        &mut self,
        pty: Result<BorrowedFd<'_>, Target>,
        req: &LineRequest,
    ) -> io::Result<LineReply> {
        let packet = Packet {
            request: req.clone(),
            target: pty.err(),
        };
        let body = serde_json::to_vec(&packet).map_err(io::Error::other)?;
        let mut last = None;
        // A connection serve closed (it restarted) is made again once.
        for _ in 0..2 {
            let r = self.connected().and_then(|s| {
                send_packet(s, &body, pty.ok().map(|p| p.as_raw_fd()))?;
                let mut buf = vec![0u8; MAX_PACKET];
                let (n, _) = recv_packet(s, &mut buf)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "devshim serve closed the line socket",
                    ));
                }
                serde_json::from_slice(&buf[..n]).map_err(io::Error::other)
            });
            match r {
                Ok(reply) => return Ok(reply),
                Err(e) => {
                    self.sock = None;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap())
    }
}

/// Serve's side: listens at `path` (mode 0666) until `cancel`, handing each
/// request to the actor whose pty came with it.
pub fn listen_at(path: &Path) -> io::Result<AsyncFd<OwnedFd>> {
    let _ = std::fs::remove_file(path);
    let s = seqpacket(true)?;
    bind(s.as_raw_fd(), &UnixAddr::new(path)?)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    listen(&s, Backlog::new(64)?)?;
    // SAFETY: the AsyncFd owns the descriptor for its whole life.
    unsafe { AsyncFd::register(s) }.map_err(|e| e.into_parts().1)
}

/// Accepts supervisors until `cancel`; each connection gets a task.
pub async fn serve(listener: AsyncFd<OwnedFd>, registry: Registry, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.readable() => match r {
                Ok(mut g) => g.try_io(|l| {
                    accept4(l.as_raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC)
                        .map_err(io::Error::from)
                }),
                Err(e) => {
                    warn!("line socket: {e}");
                    return;
                }
            },
        };
        match accepted {
            Ok(Ok(fd)) => {
                // SAFETY: accept4 returned a fresh descriptor.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                // SAFETY: the AsyncFd owns the descriptor for its whole life.
                match unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1) {
                    Ok(conn) => {
                        tokio::spawn(connection(conn, registry.clone(), cancel.clone()));
                    }
                    Err(e) => warn!("line socket: {e}"),
                }
            }
            Ok(Err(e)) => debug!("line socket accept: {e}"),
            Err(_would_block) => {}
        }
    }
}

async fn connection(conn: AsyncFd<OwnedFd>, registry: Registry, cancel: CancellationToken) {
    let mut buf = vec![0u8; MAX_PACKET];
    loop {
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            r = conn.readable() => match r {
                Ok(mut g) => match g.try_io(|c| recv_packet(c.as_raw_fd(), &mut buf)) {
                    Ok(r) => r,
                    Err(_would_block) => continue,
                },
                Err(_) => return,
            },
        };
        let (n, fd) = match got {
            Ok((0, _)) | Err(_) => return,
            Ok(x) => x,
        };
        let reply = answer(&buf[..n], fd, conn.get_ref().as_fd(), &registry).await;
        let body = serde_json::to_vec(&reply).expect("replies serialize");
        if send_packet(conn.get_ref().as_raw_fd(), &body, None).is_err() {
            return;
        }
    }
}

fn refused(errno: i32, why: impl Into<String>) -> LineReply {
    LineReply {
        errno,
        why: Some(why.into()),
        ..LineReply::default()
    }
}

/// The pty a request is about: the descriptor that came with it (opened
/// for reading or writing: an `O_PATH` descriptor proves nothing), or the
/// target process's, checked through `/proc`.
fn pty_of(
    fd: Option<OwnedFd>,
    target: Option<Target>,
    conn: BorrowedFd<'_>,
) -> Result<PtyId, LineReply> {
    if let Some(fd) = fd {
        let fl = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| refused(libc::EBADF, e.to_string()))?;
        if fl & libc::O_PATH != 0 {
            return Err(refused(libc::EBADF, "an O_PATH descriptor"));
        }
        return id_of(fd.as_fd()).map_err(|e| refused(libc::EBADF, e.to_string()));
    }
    let Some(t) = target else {
        return Err(refused(libc::EBADF, "no pty came with the request"));
    };
    let peer = socket::getsockopt(&conn, socket::sockopt::PeerCredentials)
        .map_err(|e| refused(libc::EPERM, e.to_string()))?;
    let gone = |e: &dyn std::fmt::Display| {
        refused(
            libc::EBADF,
            format!("process {} descriptor {}: {e}", t.pid, t.fd),
        )
    };
    // The process is held by its pidfd while /proc is read twice about it
    // (its descriptor, then its uids): if it is still there after both, its
    // pid named it all along, not a process that took the pid over in
    // between. A thread is read about under its process's directory.
    let (pidfd, tgid) = crate::procfs::pidfd_of_thread(t.pid).map_err(|e| gone(&e))?;
    let task = format!("/proc/{tgid}/task/{}", t.pid);
    let st = nix::sys::stat::stat(format!("{task}/fd/{}", t.fd).as_str()).map_err(|e| gone(&e))?;
    let uids = uids_of(&task);
    if crate::procfs::exited(pidfd.as_fd()).unwrap_or(true) {
        return Err(gone(&"the process exited"));
    }
    if peer.uid() != 0 && !uids.contains(&peer.uid()) {
        return Err(refused(
            libc::EPERM,
            format!("uid {} may not act for process {}", peer.uid(), t.pid),
        ));
    }
    Ok((st.st_dev, st.st_ino))
}

/// A task's real and effective uids (`task`: its `/proc` directory).
fn uids_of(task: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("{task}/status"))
        .ok()
        .and_then(|s| {
            crate::procfs::status_field(&s, "Uid").map(|v| {
                v.split_whitespace()
                    .take(2)
                    .filter_map(|u| u.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// One request: checks the pty it is about, and waits for its actor.
async fn answer(
    packet: &[u8],
    fd: Option<OwnedFd>,
    conn: BorrowedFd<'_>,
    registry: &Registry,
) -> LineReply {
    let packet: Packet = match serde_json::from_slice(packet) {
        Ok(r) => r,
        Err(e) => return refused(libc::EINVAL, format!("bad request: {e}")),
    };
    let id = match pty_of(fd, packet.target, conn) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let req = packet.request;
    // A pty serve no longer has (hung up, replaced): what the kernel
    // answers on a hung-up tty.
    let Some(tx) = registry.get(id) else {
        return refused(libc::EIO, "not a pty of this devshim (hung up?)");
    };
    let (reply, rx) = oneshot::channel();
    debug!("line call {req:?}");
    if tx.send(LineCall { req, reply }).await.is_err() {
        return refused(libc::EIO, "the tty is gone");
    }
    rx.await
        .unwrap_or_else(|_| refused(libc::EIO, "the session ended before the port had it"))
}
