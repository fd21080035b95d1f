//! The run directory and everything the broker makes in it, reached only
//! through directory descriptors.
//!
//! ```text
//! RUN/                 root 0755   broker.sock (admin), broker.lock
//! RUN/.staging/        root 0700   sockets are bound here, then moved in
//! RUN/host/            root 0755   host users' sockets and control.sock
//! RUN/machines/        root 0700
//! RUN/machines/NAME/   root 0755   bound into container NAME at /run/devbroker
//! ```
//!
//! A machine directory is seen by a container that is hostile by
//! assumption, so the broker owns it (the container can read it and connect
//! to its sockets, never write there), and still trusts nothing it finds in
//! it: every directory is opened once with `O_NOFOLLOW | O_DIRECTORY` and
//! fixed by descriptor (`fchown`, `fchmod`); files are created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW` beside their final name and renamed over
//! it; sockets get their mode in the root-only staging directory before
//! they are moved in, so no chmod ever goes by a path a container could
//! redirect. A machine directory that is a link (planted by whoever could
//! write `RUN/machines`) is refused, not followed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use tokio::net::UnixListener;
use tracing::warn;
use wire::manifest::{Manifest, FILE as MANIFEST};

use crate::machine::tree::{create_file_at, own_dir_at, CreateFault, DirFault, Meta};

/// Where in the run directory a socket lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Place {
    /// `RUN` itself (the admin socket).
    Top,
    /// `RUN/host`.
    Host,
    /// `RUN/machines/NAME`.
    Machine(String),
}

/// The run directory, held open.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    top: Arc<OwnedFd>,
    staging: OwnedFd,
    host: Arc<OwnedFd>,
    /// `RUN/machines`, for machines a reload adds.
    machines_dir: OwnedFd,
    machines: Mutex<BTreeMap<String, Arc<OwnedFd>>>,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Opens `name` under `parent` as a directory, never through a link,
/// making it if missing, and gives it `mode` and root's ownership by
/// descriptor.
fn own_dir(parent: impl AsFd, name: &str, mode: u32, shown: &Path) -> anyhow::Result<OwnedFd> {
    let shown = shown.display();
    let fail =
        |e: rustix::io::Errno, what: String| anyhow::Error::new(io::Error::from(e)).context(what);
    match own_dir_at(parent, OsStr::new(name), Meta::new((0, 0), mode), true) {
        Ok((fd, _)) => Ok(fd),
        Err(DirFault::NotADirectory) => bail!(
            "{shown} is not a directory (a symbolic link, or a file): the broker never follows links in its run directory; remove it"
        ),
        Err(DirFault::Make(e)) => Err(fail(e, format!("can't create {shown}"))),
        Err(DirFault::Open(e)) => Err(fail(e, format!("can't open {shown}"))),
        Err(DirFault::Owner(e)) => Err(fail(e, format!("can't make {shown} root's"))),
        Err(DirFault::Mode(e)) => Err(fail(e, format!("can't set the mode of {shown}"))),
    }
}

/// Removes what a broker left in a directory: sockets, the index and its
/// temporary file. Entries are unlinked by name; nothing is followed.
fn clean(dir: impl AsFd) {
    let Ok(d) = rustix::fs::Dir::read_from(&dir) else {
        return;
    };
    for e in d.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sock") || name == MANIFEST || name == tmp_name(MANIFEST) {
            let _ = rustix::fs::unlinkat(&dir, name.as_str(), AtFlags::empty());
        }
    }
}

fn tmp_name(file: &str) -> String {
    format!(".{file}.tmp")
}

/// Writes `bytes` as `name` in `dir`, atomically: a new file beside it,
/// created exclusively and never through a link (whatever had that name is
/// unlinked first), renamed over the old one.
pub fn write_file_at(dir: impl AsFd, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = tmp_name(name);
    match rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match create_file_at(&dir, OsStr::new(&tmp), bytes, mode, None) {
        Ok(f) => drop(f),
        Err(CreateFault::Create(e)) => return Err(e.into()),
        Err(CreateFault::Write(e)) => {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
    }
    rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(io::Error::from)
}

impl RunDir {
    /// Makes the run directory and each machine's directory, removes what a
    /// killed broker left, and takes the run directory's lock so two brokers
    /// can't fight over it. Machine directories are never removed: a running
    /// container has them bind-mounted, and a new directory would not be
    /// seen. One that can't be made safe is left out, with an error logged.
    pub fn prepare(run: &Path, machines: &BTreeSet<String>) -> anyhow::Result<RunDir> {
        std::fs::create_dir_all(run).with_context(|| format!("can't create {}", run.display()))?;
        let parent = run
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = run.file_name().context("the run directory needs a name")?;
        let up = rustix::fs::open(
            parent,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .with_context(|| format!("can't open {}", parent.display()))?;
        let top = own_dir(&up, &name.to_string_lossy(), 0o755, run)?;
        let lock_fd = rustix::fs::openat(
            &top,
            "broker.lock",
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io::Error::from)
        .with_context(|| format!("can't open {}", run.join("broker.lock").display()))?;
        let lock = match nix::fcntl::Flock::lock(
            std::fs::File::from(lock_fd),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        ) {
            Ok(l) => l,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                bail!("another devbroker is running with run directory {}; stop it or pass another --run-dir", run.display())
            }
            Err((_, e)) => bail!("can't lock {}: {e}", run.join("broker.lock").display()),
        };
        let staging = own_dir(&top, ".staging", 0o700, &run.join(".staging"))?;
        if let Ok(d) = rustix::fs::Dir::read_from(&staging) {
            for e in d.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n != "." && n != ".." {
                    let _ = rustix::fs::unlinkat(&staging, n.as_str(), AtFlags::empty());
                }
            }
        }
        // Host users reach only host/; machine directories are for their containers.
        let host = own_dir(&top, "host", 0o755, &run.join("host"))?;
        clean(&host);
        clean(&top);
        let machines_fd = own_dir(&top, "machines", 0o700, &run.join("machines"))?;
        let rd = RunDir {
            path: run.to_path_buf(),
            top: Arc::new(top),
            staging,
            host: Arc::new(host),
            machines_dir: machines_fd,
            machines: Mutex::new(BTreeMap::new()),
            _lock: lock,
        };
        for m in machines {
            rd.add_machine(m);
        }
        Ok(rd)
    }

    /// Makes (or takes back) a machine's directory and empties it of what a
    /// broker left; false, with an error logged, if it can't be made safe.
    pub fn add_machine(&self, m: &str) -> bool {
        let shown = self.path.join("machines").join(m);
        match own_dir(&self.machines_dir, m, 0o755, &shown) {
            Ok(fd) => {
                clean(&fd);
                self.machines
                    .lock()
                    .unwrap()
                    .insert(m.to_string(), Arc::new(fd));
                true
            }
            Err(e) => {
                warn!(machine = %m, "{e:#}; machine {m} gets no boards until it is fixed");
                false
            }
        }
    }

    /// Forgets a machine a reload removed: its index goes, its directory
    /// stays (its container may have it bound).
    pub fn remove_machine(&self, m: &str) {
        self.remove_index(m);
        self.machines.lock().unwrap().remove(m);
    }

    /// The run directory's path, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Machines whose directory is ready.
    pub fn machines(&self) -> BTreeSet<String> {
        self.machines.lock().unwrap().keys().cloned().collect()
    }

    fn dir(&self, place: &Place) -> io::Result<Arc<OwnedFd>> {
        match place {
            Place::Top => Ok(self.top.clone()),
            Place::Host => Ok(self.host.clone()),
            Place::Machine(m) => self
                .machines
                .lock()
                .unwrap()
                .get(m)
                .cloned()
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("machine {m} has no usable directory"),
                    )
                }),
        }
    }

    /// The path of a socket, for messages and for clients on the host.
    pub fn shown(&self, place: &Place, name: &str) -> PathBuf {
        match place {
            Place::Top => self.path.join(name),
            Place::Host => self.path.join("host").join(name),
            Place::Machine(m) => self.path.join("machines").join(m).join(name),
        }
    }

    /// Writes a machine's index atomically.
    pub fn write_index(&self, machine: &str, m: &Manifest) -> io::Result<()> {
        write_file_at(
            self.dir(&Place::Machine(machine.to_string()))?,
            MANIFEST,
            &m.to_bytes(),
            0o644,
        )
    }

    /// Removes a machine's index.
    pub fn remove_index(&self, machine: &str) {
        if let Ok(d) = self.dir(&Place::Machine(machine.to_string())) {
            let _ = rustix::fs::unlinkat(&*d, MANIFEST, AtFlags::empty());
        }
    }

    /// Binds a unix socket as `name` in `place` with `mode`, replacing a
    /// stale one: bound in the staging directory, given its mode there, then
    /// renamed into place.
    pub fn bind(&self, place: &Place, name: &str, mode: u32) -> io::Result<UnixListener> {
        self.bind_for(place, name, mode, None)
    }

    /// [`RunDir::bind`], the socket's group set to `group` (the admin
    /// group, say) there too.
    pub fn bind_for(
        &self,
        place: &Place,
        name: &str,
        mode: u32,
        group: Option<u32>,
    ) -> io::Result<UnixListener> {
        let dir = self.dir(place)?;
        let staged = format!("{}.{name}", std::process::id());
        let _ = rustix::fs::unlinkat(&self.staging, staged.as_str(), AtFlags::empty());
        // Through the descriptor: the path can't lead anywhere else.
        let at = PathBuf::from(format!(
            "/proc/self/fd/{}/{staged}",
            self.staging.as_raw_fd()
        ));
        let l = UnixListener::bind(&at)?;
        let placed = group
            .map_or(Ok(()), |g| {
                rustix::fs::chownat(
                    &self.staging,
                    staged.as_str(),
                    None,
                    Some(rustix::fs::Gid::from_raw(g)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
            })
            .and_then(|()| {
                rustix::fs::chmodat(
                    &self.staging,
                    staged.as_str(),
                    Mode::from_raw_mode(mode),
                    AtFlags::empty(),
                )
            })
            .and_then(|()| rustix::fs::renameat(&self.staging, staged.as_str(), &*dir, name));
        if let Err(e) = placed {
            let _ = rustix::fs::unlinkat(&self.staging, staged.as_str(), AtFlags::empty());
            return Err(e.into());
        }
        Ok(l)
    }

    /// Removes a socket by name; whatever has that name goes, nothing is
    /// followed.
    pub fn unbind(&self, place: &Place, name: &str) {
        if let Ok(d) = self.dir(place) {
            match rustix::fs::statat(&*d, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Socket => {
                    let _ = rustix::fs::unlinkat(&*d, name, AtFlags::empty());
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn machines(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A run directory with `names`' machine directories, and a host file
    /// (mode 0600) for links to aim at: the temporary directory, `RUN`,
    /// the victim and the run directory.
    fn run_with_victim(names: &[&str]) -> (tempfile::TempDir, PathBuf, PathBuf, RunDir) {
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        let rd = RunDir::prepare(&run, &machines(names)).unwrap();
        (d, run, victim, rd)
    }

    #[test]
    fn the_index_is_never_written_through_a_link_or_into_a_fifo() {
        let (_d, run, victim, rd) = run_with_victim(&["m1", "m2"]);
        let m1 = run.join("machines/m1");
        std::os::unix::fs::symlink(&victim, m1.join(".ttys.json.tmp")).unwrap();
        let man = Manifest {
            version: 1,
            ttys: vec![],
        };
        rd.write_index("m1", &man).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::metadata(&victim).unwrap().mode() & 0o777, 0o600);
        let meta = std::fs::symlink_metadata(m1.join(MANIFEST)).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o777 == 0o644);
        // A FIFO in the way does not block the broker.
        nix::unistd::mkfifo(
            &run.join("machines/m2/.ttys.json.tmp"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        rd.write_index("m2", &man).unwrap();
        assert!(
            std::fs::symlink_metadata(run.join("machines/m2").join(MANIFEST))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn sockets_get_their_mode_before_they_appear() {
        let (_d, run, victim, rd) = run_with_victim(&["m1"]);
        let sock = run.join("machines/m1/b.t.sock");
        std::os::unix::fs::symlink(&victim, &sock).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let _l = rd
            .bind(&Place::Machine("m1".into()), "b.t.sock", 0o666)
            .unwrap();
        assert_eq!(
            std::fs::metadata(&victim).unwrap().mode() & 0o777,
            0o600,
            "the link's target keeps its mode"
        );
        let meta = std::fs::symlink_metadata(&sock).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o666);
        std::os::unix::net::UnixStream::connect(&sock).expect("the moved socket accepts");
        rd.unbind(&Place::Machine("m1".into()), "b.t.sock");
        assert!(!sock.exists());
    }

    #[test]
    fn machine_directories_are_the_hosts_and_links_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: taking a directory back from a container's root needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let run = d.path().join("run");
        let elsewhere = d.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o751)).unwrap();
        std::fs::create_dir_all(run.join("machines/m1")).unwrap();
        // A directory a container's root owned: taken back.
        std::os::unix::fs::chown(run.join("machines/m1"), Some(100_000), Some(100_000)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, run.join("machines/m3")).unwrap();
        let rd = RunDir::prepare(&run, &machines(&["m1", "m3"])).unwrap();
        let m = std::fs::metadata(run.join("machines/m1")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
        assert_eq!(rd.machines().into_iter().collect::<Vec<_>>(), ["m1"]);
        assert!(std::fs::symlink_metadata(run.join("machines/m3"))
            .unwrap()
            .file_type()
            .is_symlink());
        let e = std::fs::metadata(&elsewhere).unwrap();
        assert_eq!(e.mode() & 0o7777, 0o751, "the link's target is untouched");
        assert!(rd
            .write_index(
                "m3",
                &Manifest {
                    version: 1,
                    ttys: vec![]
                }
            )
            .is_err());
        assert!(std::fs::read_dir(&elsewhere).unwrap().next().is_none());
    }
}
