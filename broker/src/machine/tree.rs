//! Paths under a root that may be hostile, resolved and changed through
//! descriptors only.
//!
//! A container's root owns its tree and can race anything `machine setup`,
//! `machine remove` and `machine check --fix` touch there: swap a file for a
//! link to a host file, a directory for a link to a host directory, plant a
//! FIFO where setup reads or a link where it writes its temporary file. So
//! nothing here opens or changes a path by name from the host's point of
//! view:
//!
//! - every path is resolved beneath the root's descriptor with `openat2`
//!   `RESOLVE_IN_ROOT`: a link inside the tree (absolute or with `..`) stays
//!   inside it, as it does for the running container, and can never name a
//!   host file;
//! - the last component is never followed: it is opened with `O_NOFOLLOW`
//!   relative to its parent's descriptor, and a link there (or a FIFO, a
//!   device, a directory where a file belongs) is refused with a message that
//!   names the path;
//! - files are read only when `fstat` says they are regular (opened with
//!   `O_NONBLOCK`, after an `O_PATH` look, so a FIFO can't hang setup and a
//!   device is never opened);
//! - files are written to a temporary file made with
//!   `O_CREAT|O_EXCL|O_NOFOLLOW` in the same parent directory, chowned,
//!   chmodded and synced through its descriptor, then renamed over the
//!   target relative to the same directory descriptor.
//!
//! Host directories (the `.nspawn` directory, the run directory) go through
//! the same code with the root at `/`: links there are the admin's, but the
//! last component is still never written through.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Uid, CWD};
use serde::{Deserialize, Serialize};

/// The largest file setup reads from a tree (what it compares, edits or
/// backs up): a sparse terabyte where `/etc/passwd` should be must not make
/// setup read a terabyte.
pub const READ_LIMIT: u64 = 256 << 20;

/// Owner, group and permission bits of a file or directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (`& 0o7777`).
    pub mode: u32,
}

impl Meta {
    pub fn new(owner: (u32, u32), mode: u32) -> Meta {
        Meta {
            uid: owner.0,
            gid: owner.1,
            mode: mode & 0o7777,
        }
    }

    fn of(st: &Stat) -> Meta {
        Meta {
            uid: st.st_uid,
            gid: st.st_gid,
            mode: st.st_mode & 0o7777,
        }
    }
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} mode {:04o}", self.uid, self.gid, self.mode)
    }
}

/// What is at a path, its last component not followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Missing,
    File(Meta),
    Dir(Meta),
    /// A symbolic link, with its target and owner.
    Link(PathBuf, Meta),
    /// Anything else: a FIFO, a socket, a device.
    Other(&'static str),
}

impl Found {
    /// Owner and mode of what is there, if anything.
    pub fn meta(&self) -> Option<Meta> {
        match self {
            Found::File(m) | Found::Dir(m) | Found::Link(_, m) => Some(*m),
            Found::Missing | Found::Other(_) => None,
        }
    }
}

/// What a directory removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    Done,
    Missing,
    NotEmpty,
    NotADirectory,
}

/// A root directory, held open, beneath which paths are resolved.
pub struct Tree {
    root: OwnedFd,
    path: PathBuf,
    /// Whose tree it is, for messages: a container's or the host's.
    hostile: bool,
}

fn err(e: rustix::io::Errno) -> io::Error {
    io::Error::from(e)
}

fn kind_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symbolic link",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of an unknown type",
    }
}

impl Tree {
    /// Opens a container's tree: `path` itself is the admin's (a link in
    /// `/var/lib/machines` is followed), everything beneath it is not.
    pub fn container(path: &Path) -> io::Result<Tree> {
        Self::open(path, true)
    }

    /// The host's root, for host paths (the `.nspawn` file, the run
    /// directory): intermediate links are the admin's and followed as usual;
    /// the last component still never is.
    pub fn host() -> io::Result<Tree> {
        Self::open(Path::new("/"), false)
    }

    fn open(path: &Path, hostile: bool) -> io::Result<Tree> {
        let root = rustix::fs::openat(
            CWD,
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(err)?;
        Ok(Tree {
            root,
            path: path.to_path_buf(),
            hostile,
        })
    }

    /// The root's own owner and mode.
    pub fn root_meta(&self) -> io::Result<Meta> {
        Ok(Meta::of(&rustix::fs::fstat(&self.root).map_err(err)?))
    }

    /// The root's device and inode, to tell two trees apart.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let st = rustix::fs::fstat(&self.root).map_err(err)?;
        Ok((st.st_dev, st.st_ino))
    }

    /// `rel` as the host sees it, for messages and records.
    pub fn display(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    /// The path of `abs` below this root, if it is below it.
    pub fn rel<'a>(&self, abs: &'a Path) -> Option<&'a Path> {
        abs.strip_prefix(&self.path).ok()
    }

    fn never_through_links(&self) -> &'static str {
        if self.hostile {
            "setup never writes through links in a container's tree"
        } else {
            "devbroker never writes through links"
        }
    }

    fn refuse(&self, rel: &Path, what: impl fmt::Display) -> io::Error {
        io::Error::other(format!("{} {what}", self.display(rel).display()))
    }

    /// The message for a link where setup must create or edit something.
    pub fn link_in_the_way(&self, rel: &Path, target: &Path) -> io::Error {
        let what_to_do = if self.hostile {
            "remove it".to_string()
        } else {
            format!(
                "edit {} by hand, or put the file itself in the link's place",
                target.display()
            )
        };
        self.refuse(
            rel,
            format_args!(
                "is a symbolic link (to {}); {}: {what_to_do}",
                target.display(),
                self.never_through_links()
            ),
        )
    }

    /// Checks that `rel` is a plain relative path: names only, no `..`,
    /// no `.`, not empty.
    fn check_rel(&self, rel: &Path) -> io::Result<()> {
        let plain = !rel.as_os_str().is_empty()
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if plain {
            Ok(())
        } else {
            Err(self.refuse(
                rel,
                "is not a plain path below the root (it has `..`, `.` or no name)",
            ))
        }
    }

    /// Resolves `dir` (relative, possibly empty for the root) inside the
    /// root: links on the way resolve as they would for the container.
    fn resolve_dir(&self, dir: &Path) -> io::Result<OwnedFd> {
        let dir: &Path = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let mut tries = 0;
        loop {
            match rustix::fs::openat2(
                &self.root,
                dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            ) {
                // A rename elsewhere raced the lookup: the kernel asks to retry.
                Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
                r => return r.map_err(err),
            }
        }
    }

    /// The descriptor of `rel`'s parent and `rel`'s last name.
    fn parent<'a>(&self, rel: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        self.check_rel(rel)?;
        let name = rel.file_name().expect("checked: ends in a name");
        let dir = rel.parent().unwrap_or(Path::new(""));
        let fd = self.resolve_dir(dir).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTDIR) => self.refuse(
                dir,
                "is not a directory (or a link to one inside the tree); setup needs one there",
            ),
            _ => e,
        })?;
        Ok((fd, name))
    }

    /// What is at `rel`, its last component not followed. A missing parent
    /// means a missing path.
    pub fn lstat(&self, rel: &Path) -> io::Result<Found> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
            Err(e) => return Err(e),
        };
        lstat_at(&dir, name)
    }

    /// Whether `rel` is a directory, links on the way (and at its end)
    /// resolved inside the root.
    pub fn is_dir(&self, rel: &Path) -> bool {
        self.check_rel(rel).is_ok() && self.resolve_dir(rel).is_ok()
    }

    /// Whether `rel` is a regular file, links resolved inside the root (for
    /// finding unit files, which distributions install through links).
    pub fn is_file(&self, rel: &Path) -> bool {
        self.check_rel(rel).is_ok()
            && rustix::fs::openat2(
                &self.root,
                rel,
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            )
            .and_then(rustix::fs::fstat)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
    }

    /// Reads the regular file at `rel`, with its owner and mode; `None` when
    /// nothing is there. A link, a FIFO, a device or a directory there is
    /// refused (and never opened for reading).
    pub fn read(&self, rel: &Path) -> io::Result<Option<(Vec<u8>, Meta)>> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        // Look before opening: O_PATH opens nothing, so a device's open
        // never runs and a FIFO can't block.
        let look = match rustix::fs::openat(
            &dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.refuse(rel, format_args!("can't be opened: {e}"))),
        };
        let st = rustix::fs::fstat(&look).map_err(err)?;
        self.regular(rel, &dir, name, &st)?;
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.refuse(rel, format_args!("can't be opened: {e}")))?;
        let now = rustix::fs::fstat(&fd).map_err(err)?;
        self.regular(rel, &dir, name, &now)?;
        self.read_looked(rel, fd, &st, &now).map(Some)
    }

    /// Reads the regular file `rel` resolves to, links on the way and at
    /// its end followed inside the root (as [`Tree::is_file`] does): for
    /// host configuration an admin may keep elsewhere through a link.
    /// Anything but a regular file (a link to a tty, a FIFO) is refused
    /// and never opened for reading; `None` when nothing is there.
    pub fn read_through_links(&self, rel: &Path) -> io::Result<Option<(Vec<u8>, Meta)>> {
        self.check_rel(rel)?;
        let look = match rustix::fs::openat2(
            &self.root,
            rel,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(self.refuse(rel, format_args!("can't be opened: {e}"))),
        };
        let st = rustix::fs::fstat(&look).map_err(err)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            other => {
                return Err(self.refuse(
                    rel,
                    format_args!("is a {}, not a regular file", kind_name(other)),
                ))
            }
        }
        // Reopened through the descriptor: the same file, whatever its
        // path leads to by now.
        let fd = rustix::fs::open(
            format!("/proc/self/fd/{}", look.as_raw_fd()),
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| self.refuse(rel, format_args!("can't be opened: {e}")))?;
        let now = rustix::fs::fstat(&fd).map_err(err)?;
        self.read_looked(rel, fd, &st, &now).map(Some)
    }

    /// Reads `fd` (`now`), opened for reading after an `O_PATH` look found
    /// the regular file `st` at `rel`, up to [`READ_LIMIT`].
    fn read_looked(
        &self,
        rel: &Path,
        fd: OwnedFd,
        st: &Stat,
        now: &Stat,
    ) -> io::Result<(Vec<u8>, Meta)> {
        if FileType::from_raw_mode(now.st_mode) != FileType::RegularFile
            || (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino)
        {
            return Err(self.refuse(
                rel,
                "changed while setup read it: something in the container is racing setup; stop the container and try again",
            ));
        }
        let mut bytes = Vec::new();
        File::from(fd)
            .take(READ_LIMIT + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.refuse(rel, format_args!("can't be read: {e}")))?;
        if bytes.len() as u64 > READ_LIMIT {
            return Err(self.refuse(
                rel,
                format_args!(
                    "is larger than {} MiB, more than setup reads: remove it or make it what it should be",
                    READ_LIMIT >> 20
                ),
            ));
        }
        Ok((bytes, Meta::of(now)))
    }

    /// Refuses anything but a regular file at `name` (described by `st`).
    fn regular(&self, rel: &Path, dir: &OwnedFd, name: &OsStr, st: &Stat) -> io::Result<()> {
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(()),
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, name, Vec::new())
                    .map(|t| PathBuf::from(OsStr::from_bytes(t.as_bytes())))
                    .unwrap_or_default();
                Err(self.link_in_the_way(rel, &target))
            }
            other => Err(self.refuse(
                rel,
                format_args!(
                    "is a {}, not a regular file; setup only reads and writes regular files there: remove it",
                    kind_name(other)
                ),
            )),
        }
    }

    /// The temporary name setup writes `name` under, in the same directory.
    fn temp_name(name: &OsStr) -> OsString {
        let mut t = OsString::from(".");
        t.push(name);
        t.push(".devbroker-tmp");
        t
    }

    /// Whether what is at `rel`'s temporary name `tmp` in `dir` is a stale
    /// temporary file an interrupted run left (a regular file, or a link
    /// when `link_ok`); false when nothing is there. Anything else there is
    /// not setup's and is refused.
    fn stale_temp(
        &self,
        rel: &Path,
        dir: &OwnedFd,
        tmp: &OsStr,
        link_ok: bool,
    ) -> io::Result<bool> {
        let trel = || rel.with_file_name(tmp);
        match lstat_at(dir, tmp)? {
            Found::Missing => Ok(false),
            Found::File(_) => Ok(true),
            Found::Link(..) if link_ok => Ok(true),
            Found::Link(t, _) => Err(self.link_in_the_way(&trel(), &t)),
            Found::Dir(_) => Err(self.refuse(
                &trel(),
                "is a directory where setup writes its temporary file: remove it",
            )),
            Found::Other(k) => Err(self.refuse(
                &trel(),
                format_args!("is a {k} where setup writes its temporary file: remove it"),
            )),
        }
    }

    /// Clears the way for `rel`'s temporary file: a stale one is unlinked
    /// (unlinking never follows anything); anything else is refused.
    fn clear_temp(&self, rel: &Path, dir: &OwnedFd, tmp: &OsStr, link_ok: bool) -> io::Result<()> {
        if self.stale_temp(rel, dir, tmp, link_ok)? {
            unlink_at(dir, tmp, AtFlags::empty())?;
        }
        Ok(())
    }

    /// Whether `rel` could be written now: its temporary file's place is
    /// clear or holds a stale temporary file. For refusing before anything
    /// is written.
    pub fn check_temp(&self, rel: &Path, link: bool) -> io::Result<()> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stale_temp(rel, &dir, &Self::temp_name(name), link)
            .map(drop)
    }

    /// Refuses to replace `found`, what is at `rel`, with a file (or, with
    /// `link_ok`, a link) when it is a directory, anything not regular, or
    /// (for files) a link.
    pub fn check_replaceable(&self, rel: &Path, found: &Found, link_ok: bool) -> io::Result<()> {
        let what = if link_ok { "a link" } else { "a file" };
        match found {
            Found::Missing | Found::File(_) => Ok(()),
            Found::Link(..) if link_ok => Ok(()),
            Found::Link(t, _) => Err(self.link_in_the_way(rel, t)),
            Found::Dir(_) => Err(self.refuse(
                rel,
                format_args!("is a directory where setup puts {what}: remove it"),
            )),
            Found::Other(k) => Err(self.refuse(
                rel,
                format_args!("is a {k}, not a regular file; setup never opens those: remove it"),
            )),
        }
    }

    /// [`Tree::check_replaceable`] for what is at `name` in `dir` now.
    fn replaceable(
        &self,
        rel: &Path,
        dir: &OwnedFd,
        name: &OsStr,
        link_ok: bool,
    ) -> io::Result<()> {
        self.check_replaceable(rel, &lstat_at(dir, name)?, link_ok)
    }

    /// Replaces (or creates) the regular file at `rel` with `bytes`, owned
    /// and moded as `meta`, atomically: a temporary file in the same
    /// directory, made with `O_EXCL|O_NOFOLLOW`, chowned, chmodded and
    /// synced through its descriptor, renamed over `rel`. The parent must
    /// exist (see [`Tree::make_parents`]).
    pub fn write_atomic(&self, rel: &Path, bytes: &[u8], meta: Meta) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        self.replaceable(rel, &dir, name, false)?;
        let tmp = Self::temp_name(name);
        self.clear_temp(rel, &dir, &tmp, false)?;
        let made = match create_file_at(&dir, &tmp, bytes, meta.mode, Some((meta.uid, meta.gid))) {
            Ok(f) => Ok(f),
            Err(CreateFault::Create(e)) => return Err(self.raced(&rel.with_file_name(&tmp), e)),
            Err(CreateFault::Write(e)) => Err(e),
        };
        let written = made.and_then(|f| {
            f.sync_all()?;
            self.replaceable(rel, &dir, name, false)?;
            rustix::fs::renameat(&dir, &tmp, &dir, name).map_err(err)
        });
        if let Err(e) = written {
            let _ = rustix::fs::unlinkat(&dir, &tmp, AtFlags::empty());
            return Err(io::Error::new(
                e.kind(),
                format!("can't write {}: {e}", self.display(rel).display()),
            ));
        }
        Ok(())
    }

    /// Creates the regular file `rel` with `bytes`, owned and moded as
    /// `meta`, only if nothing is there (`O_EXCL|O_NOFOLLOW`: not even a
    /// link); false when something is.
    pub fn create_new(&self, rel: &Path, bytes: &[u8], meta: Meta) -> io::Result<bool> {
        let (dir, name) = self.parent(rel)?;
        let done = match create_file_at(&dir, name, bytes, meta.mode, Some((meta.uid, meta.gid))) {
            Ok(f) => f.sync_all(),
            Err(CreateFault::Create(rustix::io::Errno::EXIST)) => return Ok(false),
            Err(CreateFault::Create(e)) => {
                return Err(self.refuse(rel, format_args!("can't be created: {e}")))
            }
            Err(CreateFault::Write(e)) => Err(e),
        };
        if let Err(e) = done {
            let _ = rustix::fs::unlinkat(&dir, name, AtFlags::empty());
            return Err(self.refuse(rel, format_args!("can't be written: {e}")));
        }
        Ok(true)
    }

    /// Makes `rel` a symbolic link to `target` owned by `owner`, atomically
    /// (a temporary link renamed over it). An existing link or file is
    /// replaced; a directory is refused.
    pub fn symlink_atomic(&self, rel: &Path, target: &Path, owner: (u32, u32)) -> io::Result<()> {
        let (dir, name) = self.parent(rel)?;
        self.replaceable(rel, &dir, name, true)?;
        let tmp = Self::temp_name(name);
        self.clear_temp(rel, &dir, &tmp, true)?;
        let trel = rel.with_file_name(&tmp);
        rustix::fs::symlinkat(target, &dir, &tmp).map_err(|e| self.raced(&trel, e))?;
        let done = (|| -> io::Result<()> {
            // The link itself, held by a descriptor: chowned through that,
            // never by a name someone could swap in between.
            let fd = rustix::fs::openat(
                &dir,
                &tmp,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(err)?;
            let st = rustix::fs::fstat(&fd).map_err(err)?;
            let ours = FileType::from_raw_mode(st.st_mode) == FileType::Symlink
                && rustix::fs::readlinkat(&fd, "", Vec::new())
                    .is_ok_and(|t| t.as_bytes() == target.as_os_str().as_bytes());
            if !ours {
                return Err(self.refuse(
                    &trel,
                    "is not the link setup made there: something in the container is racing setup; stop the container and try again",
                ));
            }
            rustix::fs::chownat(
                &fd,
                "",
                Some(uid(owner.0)),
                Some(gid(owner.1)),
                AtFlags::EMPTY_PATH,
            )
            .map_err(err)?;
            rustix::fs::renameat(&dir, &tmp, &dir, name).map_err(err)
        })();
        if let Err(e) = done {
            let _ = rustix::fs::unlinkat(&dir, &tmp, AtFlags::empty());
            return Err(self.refuse(rel, format_args!("can't be made a link: {e}")));
        }
        Ok(())
    }

    /// Makes the directory `rel` if it is missing (returning true), and
    /// gives it `meta` through its own descriptor. A link there is refused:
    /// a chown through it would give a host directory away.
    pub fn dir(&self, rel: &Path, meta: Meta) -> io::Result<bool> {
        let (dir, name) = self.parent(rel)?;
        own_dir_at(&dir, name, meta, true)
            .map(|(_, made)| made)
            .map_err(|f| self.dir_fault(rel, &dir, name, f))
    }

    /// Gives the existing directory `rel` `meta`, if it is still a
    /// directory; false when it is gone or no longer one.
    pub fn set_dir_meta(&self, rel: &Path, meta: Meta) -> io::Result<bool> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if !matches!(lstat_at(&dir, name)?, Found::Dir(_)) {
            return Ok(false);
        }
        own_dir_at(&dir, name, meta, false)
            .map(|_| true)
            .map_err(|f| self.dir_fault(rel, &dir, name, f))
    }

    /// The message for what kept [`own_dir_at`] from `name` in `dir`.
    fn dir_fault(&self, rel: &Path, dir: &OwnedFd, name: &OsStr, fault: DirFault) -> io::Error {
        match fault {
            DirFault::Make(e) => self.refuse(rel, format_args!("can't be made: {e}")),
            DirFault::NotADirectory => match lstat_at(dir, name) {
                Ok(Found::Link(t, _)) => self.refuse(
                    rel,
                    format_args!(
                        "is a symbolic link (to {}); setup never changes the owner or mode of what a link in {} points to: remove it",
                        t.display(),
                        if self.hostile { "a container's tree" } else { "a host directory" }
                    ),
                ),
                Ok(_) => self.refuse(rel, "is not a directory: remove it"),
                Err(e) => e,
            },
            DirFault::Open(e) => self.refuse(rel, format_args!("can't be opened: {e}")),
            DirFault::Owner(e) | DirFault::Mode(e) => err(e),
        }
    }

    /// Makes `rel`'s missing parent directories, each owned and moded as
    /// `meta`; returns the ones made, outermost first. A link on the way
    /// that leads to no directory inside the root is refused: setup never
    /// makes directories through links.
    pub fn make_parents(&self, rel: &Path, meta: Meta) -> io::Result<Vec<PathBuf>> {
        let mut made = Vec::new();
        self.walk_parents(rel, |here| {
            self.dir(here, meta)?;
            made.push(here.to_path_buf());
            Ok(true)
        })?;
        Ok(made)
    }

    /// Refuses, as [`Tree::make_parents`] would, a parent of `rel` that is
    /// a link to nowhere or not a directory; makes nothing.
    pub fn check_parents(&self, rel: &Path) -> io::Result<()> {
        self.walk_parents(rel, |_| Ok(false))
    }

    /// Walks `rel`'s parents from the root; `missing` is called for the
    /// first one that is missing (and, while it returns true, the next).
    fn walk_parents(
        &self,
        rel: &Path,
        mut missing: impl FnMut(&Path) -> io::Result<bool>,
    ) -> io::Result<()> {
        self.check_rel(rel)?;
        let mut prefix = PathBuf::new();
        let parent = rel.parent().unwrap_or(Path::new(""));
        for c in parent.components() {
            let here = prefix.join(c);
            match self.resolve_dir(&here) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // Its parent resolved (the previous round), so the
                    // name itself is what is missing — or a link to nowhere.
                    let (dir, name) = self.parent(&here)?;
                    match lstat_at(&dir, name)? {
                        Found::Missing => {
                            if !missing(&here)? {
                                return Ok(());
                            }
                        }
                        Found::Link(t, _) => {
                            return Err(self.refuse(
                                &here,
                                format_args!(
                                    "is a symbolic link to {}, which is no directory inside the tree; setup never makes directories through links: remove it, or make it point to a directory in the tree",
                                    t.display()
                                ),
                            ))
                        }
                        _ => return Err(self.refuse(&here, "is not a directory: remove it")),
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                    return Err(self.refuse(&here, "is not a directory: remove it"))
                }
                Err(e) => return Err(self.refuse(&here, format_args!("can't be opened: {e}"))),
            }
            prefix = here;
        }
        Ok(())
    }

    /// Unlinks the file or link at `rel` (never what a link points to);
    /// false when nothing was there.
    pub fn remove_file(&self, rel: &Path) -> io::Result<bool> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(self.refuse(rel, format_args!("can't be removed: {e}"))),
        }
    }

    /// Removes the empty directory `rel`.
    pub fn remove_dir(&self, rel: &Path) -> io::Result<Removed> {
        let (dir, name) = match self.parent(rel) {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Removed::Missing),
            Err(e) => return Err(e),
        };
        match rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR) {
            Ok(()) => Ok(Removed::Done),
            Err(rustix::io::Errno::NOENT) => Ok(Removed::Missing),
            Err(rustix::io::Errno::NOTEMPTY | rustix::io::Errno::EXIST) => Ok(Removed::NotEmpty),
            Err(rustix::io::Errno::NOTDIR) => Ok(Removed::NotADirectory),
            Err(e) => Err(self.refuse(rel, format_args!("can't be removed: {e}"))),
        }
    }

    /// The error for a temporary name that someone filled between setup
    /// clearing it and creating it.
    fn raced(&self, trel: &Path, e: rustix::io::Errno) -> io::Error {
        if e == rustix::io::Errno::EXIST {
            self.refuse(
                trel,
                "appeared while setup was writing: something in the container is racing setup; stop the container and run setup again",
            )
        } else {
            self.refuse(trel, format_args!("can't be created: {e}"))
        }
    }
}

/// What kept [`own_dir_at`] from a directory.
#[derive(Debug)]
pub(crate) enum DirFault {
    /// `mkdirat` failed (with something else than `EEXIST`).
    Make(rustix::io::Errno),
    /// A link, a file or anything else but a directory is there.
    NotADirectory,
    Open(rustix::io::Errno),
    Owner(rustix::io::Errno),
    Mode(rustix::io::Errno),
}

/// Opens the directory `name` in `parent` with `O_DIRECTORY|O_NOFOLLOW`
/// (never through a link), making it (0700) first if it is missing and
/// `make`, and gives it `meta` through that descriptor, changing only what
/// differs. Returns the descriptor and whether the directory was made.
pub(crate) fn own_dir_at(
    parent: impl AsFd,
    name: &OsStr,
    meta: Meta,
    make: bool,
) -> Result<(OwnedFd, bool), DirFault> {
    let open = || {
        rustix::fs::openat(
            &parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
    };
    let mut made = false;
    let opened = match open() {
        Err(rustix::io::Errno::NOENT) if make => {
            match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => made = true,
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(DirFault::Make(e)),
            }
            open()
        }
        r => r,
    };
    let fd = match opened {
        Ok(fd) => fd,
        // With O_DIRECTORY a link gives ENOTDIR, without it ELOOP.
        Err(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR) => {
            return Err(DirFault::NotADirectory)
        }
        Err(e) => return Err(DirFault::Open(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(DirFault::Open)?;
    let chowned = (st.st_uid, st.st_gid) != (meta.uid, meta.gid);
    if chowned {
        rustix::fs::fchown(&fd, Some(uid(meta.uid)), Some(gid(meta.gid)))
            .map_err(DirFault::Owner)?;
    }
    if chowned || st.st_mode & 0o7777 != meta.mode {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(meta.mode)).map_err(DirFault::Mode)?;
    }
    Ok((fd, made))
}

/// What kept [`create_file_at`] from a file.
#[derive(Debug)]
pub(crate) enum CreateFault {
    /// Nothing was created (`EEXIST`: something has that name).
    Create(rustix::io::Errno),
    /// The file was created but could not be written, owned or moded: it
    /// is still there, for the caller to unlink.
    Write(io::Error),
}

/// Creates the regular file `name` in `dir` only if nothing has that name
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`: never through a link, never into a FIFO),
/// mode 0600 until it is written, then gives it `owner` (if any) and `mode`
/// through its descriptor.
pub(crate) fn create_file_at(
    dir: impl AsFd,
    name: &OsStr,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<File, CreateFault> {
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(CreateFault::Create)?;
    let mut f = File::from(fd);
    f.write_all(bytes).map_err(CreateFault::Write)?;
    // chown first: it clears set-id bits a chmod would have set.
    if let Some((u, g)) = owner {
        rustix::fs::fchown(&f, Some(uid(u)), Some(gid(g)))
            .map_err(|e| CreateFault::Write(err(e)))?;
    }
    rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).map_err(|e| CreateFault::Write(err(e)))?;
    Ok(f)
}

/// What is at `name` in `dir`, not followed.
fn lstat_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Found> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(Found::Missing),
        Err(e) => return Err(err(e)),
    };
    let meta = Meta::of(&st);
    Ok(match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => Found::File(meta),
        FileType::Directory => Found::Dir(meta),
        FileType::Symlink => {
            let t = rustix::fs::readlinkat(dir.as_fd(), name, Vec::new()).map_err(err)?;
            Found::Link(PathBuf::from(OsStr::from_bytes(t.as_bytes())), meta)
        }
        other => Found::Other(kind_name(other)),
    })
}

fn unlink_at(dir: &OwnedFd, name: &OsStr, flags: AtFlags) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, flags) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

fn uid(u: u32) -> Uid {
    Uid::from_raw(u)
}

fn gid(g: u32) -> Gid {
    Gid::from_raw(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt};

    fn me() -> (u32, u32) {
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        )
    }

    fn tree() -> (tempfile::TempDir, Tree) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("t/etc")).unwrap();
        let t = Tree::container(&d.path().join("t")).unwrap();
        (d, t)
    }

    #[test]
    fn links_resolve_inside_the_root() {
        let (d, t) = tree();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "host\n").unwrap();
        // An absolute link and a `..` link, both aiming at the host's dir.
        symlink(&outside, d.path().join("t/abs")).unwrap();
        symlink("../../../../../../../../outside", d.path().join("t/rel")).unwrap();
        for l in ["abs/secret", "rel/secret"] {
            assert_eq!(t.read(Path::new(l)).unwrap(), None, "{l} left the tree");
        }
        // The same path inside the tree is where they lead.
        let inner = d.path().join("t").join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::write(inner.join("secret"), "tree\n").unwrap();
        let (bytes, _) = t.read(Path::new("abs/secret")).unwrap().unwrap();
        assert_eq!(bytes, b"tree\n");
    }

    #[test]
    fn reads_refuse_links_and_fifos() {
        let (d, t) = tree();
        symlink("/etc/hostname", d.path().join("t/etc/passwd")).unwrap();
        let e = t.read(Path::new("etc/passwd")).unwrap_err().to_string();
        assert!(
            e.ends_with("etc/passwd is a symbolic link (to /etc/hostname); setup never writes through links in a container's tree: remove it"),
            "{e}"
        );
        nix::unistd::mkfifo(
            &d.path().join("t/etc/group"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let e = t.read(Path::new("etc/group")).unwrap_err().to_string();
        assert!(e.contains("etc/group is a FIFO, not a regular file"), "{e}");
        assert!(t.read(Path::new("etc/missing")).unwrap().is_none());
        assert!(t.read(Path::new("nodir/missing")).unwrap().is_none());
        assert!(t.read(Path::new("../etc/passwd")).is_err());
    }

    #[test]
    fn writes_replace_files_and_keep_away_from_links() {
        let (d, t) = tree();
        let rel = Path::new("etc/hostname");
        t.write_atomic(rel, b"one\n", Meta::new(me(), 0o640))
            .unwrap();
        let m = std::fs::symlink_metadata(d.path().join("t/etc/hostname")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::read(d.path().join("t/etc/hostname")).unwrap(),
            b"one\n"
        );
        // A stale temporary file is cleared; a link in its place is refused.
        std::fs::write(d.path().join("t/etc/.hostname.devbroker-tmp"), "stale").unwrap();
        t.write_atomic(rel, b"two\n", Meta::new(me(), 0o644))
            .unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "host\n").unwrap();
        symlink(&victim, d.path().join("t/etc/.hostname.devbroker-tmp")).unwrap();
        let e = t
            .write_atomic(rel, b"three\n", Meta::new(me(), 0o644))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains(".hostname.devbroker-tmp is a symbolic link"),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"host\n");
        assert!(t.check_temp(rel, false).is_err());
        assert!(t.check_temp(rel, true).is_ok());
        // A link at the target itself is refused too.
        std::fs::remove_file(d.path().join("t/etc/.hostname.devbroker-tmp")).unwrap();
        symlink(&victim, d.path().join("t/etc/motd")).unwrap();
        assert!(t
            .write_atomic(Path::new("etc/motd"), b"x", Meta::new(me(), 0o644))
            .is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"host\n");
    }

    #[test]
    fn parents_are_made_and_links_to_nowhere_refused() {
        let (d, t) = tree();
        let made = t
            .make_parents(Path::new("usr/local/bin/devshim"), Meta::new(me(), 0o755))
            .unwrap();
        assert_eq!(
            made,
            [
                Path::new("usr"),
                Path::new("usr/local"),
                Path::new("usr/local/bin")
            ]
        );
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        symlink(&outside, d.path().join("t/etc/systemd")).unwrap();
        let e = t
            .make_parents(Path::new("etc/systemd/network/x"), Meta::new(me(), 0o755))
            .unwrap_err();
        assert!(
            e.to_string().contains("etc/systemd is a symbolic link to"),
            "{e}"
        );
        assert!(std::fs::read_dir(&outside).unwrap().next().is_none());
        assert_eq!(
            t.remove_dir(Path::new("usr/local/bin")).unwrap(),
            Removed::Done
        );
        assert_eq!(t.remove_dir(Path::new("usr")).unwrap(), Removed::NotEmpty);
    }

    #[test]
    fn directories_are_never_chowned_through_links() {
        let (d, t) = tree();
        let outside = d.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::set_permissions(
            &outside,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::create_dir(d.path().join("t/home")).unwrap();
        symlink(&outside, d.path().join("t/home/sai")).unwrap();
        let e = t
            .dir(Path::new("home/sai"), Meta::new(me(), 0o750))
            .unwrap_err();
        assert!(e.to_string().contains("home/sai is a symbolic link"), "{e}");
        assert_eq!(std::fs::metadata(&outside).unwrap().mode() & 0o7777, 0o700);
        assert!(t
            .dir(Path::new("home/bob"), Meta::new(me(), 0o750))
            .unwrap());
        assert!(!t
            .dir(Path::new("home/bob"), Meta::new(me(), 0o750))
            .unwrap());
    }

    #[test]
    fn links_are_chowned_through_their_descriptor() {
        let (d, t) = tree();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "host\n").unwrap();
        let before = std::fs::metadata(&victim).unwrap();
        // Root hands a link to the tree's (shifted) root; others their own.
        let owner = if nix::unistd::geteuid().is_root() {
            (100_000, 100_001)
        } else {
            me()
        };
        let rel = Path::new("etc/localtime");
        t.symlink_atomic(rel, &victim, owner).unwrap();
        let l = std::fs::symlink_metadata(d.path().join("t/etc/localtime")).unwrap();
        assert!(l.file_type().is_symlink());
        assert_eq!((l.uid(), l.gid()), owner);
        assert_eq!(
            std::fs::read_link(d.path().join("t/etc/localtime")).unwrap(),
            victim
        );
        let after = std::fs::metadata(&victim).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), after.mode()),
            (before.uid(), before.gid(), before.mode()),
            "the link's target is untouched"
        );
        assert!(!d.path().join("t/etc/.localtime.devbroker-tmp").exists());
        // Replacing it, over a stale temporary link, works the same way.
        symlink(&victim, d.path().join("t/etc/.localtime.devbroker-tmp")).unwrap();
        t.symlink_atomic(rel, Path::new("/usr/share/zoneinfo/UTC"), owner)
            .unwrap();
        assert_eq!(
            t.lstat(rel).unwrap(),
            Found::Link("/usr/share/zoneinfo/UTC".into(), Meta::new(owner, 0o777))
        );
    }

    #[test]
    fn stale_temporary_files_are_judged_alike_before_and_while_writing() {
        let (d, t) = tree();
        let rel = Path::new("etc/hostname");
        let tmp = d.path().join("t/etc/.hostname.devbroker-tmp");
        std::fs::create_dir(&tmp).unwrap();
        let before = t.check_temp(rel, false).unwrap_err().to_string();
        let during = t
            .write_atomic(rel, b"x\n", Meta::new(me(), 0o644))
            .unwrap_err()
            .to_string();
        assert!(
            before.ends_with(
                "etc/.hostname.devbroker-tmp is a directory where setup writes its temporary file: remove it"
            ),
            "{before}"
        );
        assert_eq!(before, during);
        std::fs::remove_dir(&tmp).unwrap();
        nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = t.check_temp(rel, true).unwrap_err().to_string();
        assert!(
            e.contains("is a FIFO where setup writes its temporary file"),
            "{e}"
        );
        std::fs::remove_file(&tmp).unwrap();
        std::fs::write(&tmp, "stale").unwrap();
        t.check_temp(rel, false).unwrap();
        t.write_atomic(rel, b"x\n", Meta::new(me(), 0o644)).unwrap();
        assert!(!tmp.exists());
    }

    #[test]
    fn replacing_refuses_directories_and_devices_with_one_message() {
        let (d, t) = tree();
        std::fs::create_dir(d.path().join("t/etc/motd")).unwrap();
        let rel = Path::new("etc/motd");
        let found = t.lstat(rel).unwrap();
        let judged = t.check_replaceable(rel, &found, false).unwrap_err();
        let written = t
            .write_atomic(rel, b"x", Meta::new(me(), 0o644))
            .unwrap_err();
        assert!(
            judged
                .to_string()
                .ends_with("etc/motd is a directory where setup puts a file: remove it"),
            "{judged}"
        );
        assert!(
            written.to_string().ends_with(&judged.to_string()),
            "{written}"
        );
        assert!(t
            .check_replaceable(rel, &Found::Other("FIFO"), true)
            .unwrap_err()
            .to_string()
            .ends_with(
                "etc/motd is a FIFO, not a regular file; setup never opens those: remove it"
            ));
        assert!(t.check_replaceable(rel, &Found::Missing, false).is_ok());
    }

    /// A directory of the test, opened as the functions take it.
    fn dir_fd(p: &Path) -> OwnedFd {
        rustix::fs::open(
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    #[test]
    fn own_dir_at_makes_fixes_and_refuses() {
        let d = tempfile::tempdir().unwrap();
        let top = dir_fd(d.path());
        let name = OsStr::new("x");
        let (_, made) = own_dir_at(&top, name, Meta::new(me(), 0o750), true).unwrap();
        assert!(made);
        let m = std::fs::metadata(d.path().join("x")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o750);
        let (_, made) = own_dir_at(&top, name, Meta::new(me(), 0o700), true).unwrap();
        assert!(!made, "an existing directory is taken as it is");
        let m = std::fs::metadata(d.path().join("x")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o700, "and given its mode");
        assert!(matches!(
            own_dir_at(&top, OsStr::new("y"), Meta::new(me(), 0o700), false),
            Err(DirFault::Open(rustix::io::Errno::NOENT))
        ));
        assert!(!d.path().join("y").exists(), "made only when asked");
        symlink(d.path().join("x"), d.path().join("l")).unwrap();
        assert!(matches!(
            own_dir_at(&top, OsStr::new("l"), Meta::new(me(), 0o755), true),
            Err(DirFault::NotADirectory)
        ));
        assert_eq!(
            std::fs::metadata(d.path().join("x")).unwrap().mode() & 0o7777,
            0o700,
            "never through the link"
        );
    }

    #[test]
    fn create_file_at_never_goes_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let top = dir_fd(d.path());
        let f = create_file_at(&top, OsStr::new("a"), b"secret", 0o600, Some(me())).unwrap();
        drop(f);
        let m = std::fs::symlink_metadata(d.path().join("a")).unwrap();
        assert_eq!((m.is_file(), m.mode() & 0o7777), (true, 0o600));
        create_file_at(&top, OsStr::new("b"), b"", 0o644, None).unwrap();
        let m = std::fs::symlink_metadata(d.path().join("b")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o644, "the mode, not the umask's");
        symlink(d.path().join("missing"), d.path().join("l")).unwrap();
        assert!(matches!(
            create_file_at(&top, OsStr::new("l"), b"x", 0o600, None),
            Err(CreateFault::Create(rustix::io::Errno::EXIST))
        ));
        assert!(!d.path().join("missing").exists());
    }

    #[test]
    fn reads_through_links_open_only_regular_files() {
        let (d, t) = tree();
        std::fs::write(d.path().join("t/etc/real"), "tree\n").unwrap();
        symlink("/etc/real", d.path().join("t/etc/linked")).unwrap();
        nix::unistd::mkfifo(
            &d.path().join("t/etc/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        symlink("fifo", d.path().join("t/etc/to-fifo")).unwrap();
        let (bytes, _) = t
            .read_through_links(Path::new("etc/linked"))
            .unwrap()
            .unwrap();
        assert_eq!(bytes, b"tree\n");
        assert!(
            t.read(Path::new("etc/linked")).is_err(),
            "read never follows"
        );
        let e = t
            .read_through_links(Path::new("etc/to-fifo"))
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("etc/to-fifo is a FIFO, not a regular file"),
            "{e}"
        );
        assert!(t
            .read_through_links(Path::new("etc/none"))
            .unwrap()
            .is_none());
        assert!(t.read_through_links(Path::new("../etc/real")).is_err());
    }
}
