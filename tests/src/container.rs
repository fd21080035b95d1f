//! Tier 3 harness: real `systemd-nspawn` containers booting a real Debian
//! bookworm userland, for tests that must see what an admin's machine sees
//! (systemd units, `nobody`, shifted uids, bind mounts of the broker's run
//! directory). Needs root; see [`skip_reason`].
//!
//! What this machine taught us (systemd-container 252, kernel 6.x, PID 1 not
//! systemd, no system bus, hybrid cgroup layout), and therefore how the code
//! below is written:
//!
//! - Every nspawn call carries `--register=no --keep-unit`: there is no
//!   machined and no bus to register with or to create a scope through.
//! - There is no terminal (stdin is `/dev/null`). `--console=read-only` works
//!   without one and copies the container's console (the boot messages) to
//!   nspawn's stdout, which goes to a log file: failure messages then show
//!   how far the boot got. (`--pipe` also works but logs nothing useful.)
//! - `systemctl is-system-running --wait` fails with "Failed to connect to
//!   bus" if called before the container's systemd has its private socket,
//!   so [`Container::boot`] retries it until it blocks properly.
//! - Each nspawn gets its own cgroups (`/sys/fs/cgroup/systemd/ct-X` and
//!   `/sys/fs/cgroup/unified/ct-X`), entered between fork and exec, or two
//!   booted containers share one and stop each other's units.
//! - If nspawn is SIGKILLed the container lives on, so the parent-death
//!   signal is SIGTERM (nspawn then halts the container, ~1-2 s) and Drop
//!   falls back to `cgroup.kill`. nspawn loses a SIGTERM that arrives during
//!   its setup (seen while it chowned a -U tree: the container then ran on
//!   after the test was SIGKILLed), so each container also has a reaper
//!   process waiting on a pipe only the test holds: when the test dies it
//!   stops nspawn, kills the cgroup and removes it (measured: nothing runs
//!   ~3 s after `kill -9` of the test). Mounts and temp dirs of killed tests
//!   are removed by the next run ([`reap_stale`]).
//! - Without `-U` containers boot with `--volatile=overlay` (a tmpfs upper
//!   layer private to that container), so several containers may boot the
//!   same tree, even the cached base tree, at once and never change it.
//!
//! ## `-U` (`private_users`)
//!
//! `-U` is `--private-users=pick --private-users-ownership=auto`, as in
//! `systemd-nspawn@.service`. Measured here:
//!
//! - On ext4 (a plain directory tree, as in a real `/var/lib/machines`)
//!   "auto" uses an **idmapped mount**: the files stay owned by 0 on the
//!   host and the tree root's owner is *not* the shift; only
//!   `/proc/LEADER/uid_map` tells it. Product code that reads the shift from
//!   the owner of the tree root will read 0 on such hosts.
//! - On overlayfs (a [`TreeCopy`]) idmapped mounts are refused ("ID mapped
//!   mounts are apparently not available ... reverting to recursive
//!   chown()ing"), so nspawn chowns the whole tree to the picked range, as
//!   older kernels do. The chown lands in the TreeCopy's upper layer, which
//!   is on a tmpfs and mounted with `metacopy=on`, so only metadata is
//!   copied up (8 MB of RAM): a -U boot takes ~1-1.7 s instead of ~0.4 s.
//!   (Measured alternatives: upper on this disk with metacopy 4-9 s, ~40 MB;
//!   without metacopy 3-8 s and a full 296 MB copy-up.) Afterwards the tree
//!   root, and everything under it, is owned by the shift on the host, which
//!   the smoke test checks against [`Container::uid_shift`] (the shift in
//!   `/proc/LEADER/uid_map`); a later boot of the same tree reuses that
//!   range and does not chown again.
//! - Combined with `--volatile=overlay`, nspawn chowns its own tmpfs layer
//!   instead (fast, ~0.9 s) and the tree on the host keeps uid 0, unlike the
//!   stock unit, which has no `--volatile`. So a `-U` container boots
//!   **without** `--volatile=overlay`, on a tree that belongs to the test:
//!   booting a directory inside the shared cache with `-U` is refused,
//!   because it would chown the cached base tree.
//!
//! `extra_args` come after the harness's own arguments, so e.g.
//! `--private-users-ownership=chown` overrides the ownership part of `-U`.

use anyhow::{anyhow, bail, Context, Result};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Packages of the base tree besides minbase: systemd as init (the broker's
/// peers are systemd machines), dbus for `systemd-run`/`systemctl`, and the
/// serial tools users run against devshim's links.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3-serial",
    "picocom",
];
/// Suite of the base tree.
pub const SUITE: &str = "bookworm";
/// Used when no Debian mirror is configured for apt.
pub const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
/// How long [`Container::boot`] waits for `running`/`degraded`.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Container::exec`] waits for a command before killing it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// Prefix of the cgroups of this harness; the test's pid follows, so stale
/// ones of dead test processes can be told apart from live ones.
const CGROUP_PREFIX: &str = "ct-dbt-";
/// Prefix of TreeCopy temp dirs, followed by the test's pid for the same reason.
const TREE_PREFIX: &str = "devbroker-tree-";
/// Prefix of the temp dirs holding nspawn's log, followed by the test's pid.
const LOG_PREFIX: &str = "devbroker-ct-";

/// Why tier 3 tests cannot run here, or `None` when they can. Tests print
/// it ("skipped: ...") and return, so the suite still passes as non-root.
pub fn skip_reason() -> Option<String> {
    missing(&["systemd-nspawn", "debootstrap", "nsenter"])
}

/// Root, `tools` and a cgroup layout we can use, or what is missing.
fn missing(tools: &[&str]) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root".into());
    }
    for &tool in tools {
        if find_program(tool).is_none() {
            return Some(format!(
                "{tool} not installed (apt-get install systemd-container debootstrap)"
            ));
        }
    }
    if cgroup_layout().is_err() {
        return Some("no writable cgroup hierarchy under /sys/fs/cgroup".into());
    }
    None
}

/// A machine name no other running container of this or another test
/// process uses (nspawn keys `/run/systemd/nspawn/propagate/NAME` by it).
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Looks a program up in PATH and the sbin directories (a `cargo test` run
/// through sudo may lack /usr/sbin, where debootstrap lives).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        )
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Where cached trees live: `$DEVBROKER_TEST_CACHE` or
/// `/var/cache/devbroker-tests` (outside the checkout, so `cargo clean` and
/// other checkouts don't rebuild it).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DEVBROKER_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/devbroker-tests"))
}

/// FNV-1a 64: stable across Rust versions, unlike `DefaultHasher`, so the
/// cache key of a package list never changes under our feet.
fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The Debian mirror apt uses here: the first `URIs:` of a deb822 stanza
/// of `/etc/apt/sources.list.d/*.sources` whose `Suites:` include the plain
/// suite (not -security/-updates), else the first such `deb` line of
/// `/etc/apt/sources.list`, else [`FALLBACK_MIRROR`]. Using the configured
/// mirror keeps the build working where only a local mirror is reachable.
pub fn debian_mirror() -> String {
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        let text = fs::read_to_string(f).unwrap_or_default();
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
            };
            let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
                continue;
            };
            let types = field("Types").unwrap_or_else(|| "deb".into());
            if types.split_whitespace().any(|t| t == "deb")
                && suites.split_whitespace().any(|s| s == SUITE)
            {
                if let Some(u) = uris.split_whitespace().next() {
                    return u.to_string();
                }
            }
        }
    }
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let words: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with('[') && !w.ends_with(']') && !w.contains('='))
                .collect();
            if words.len() >= 3 && words[0] == "deb" && words[2] == SUITE {
                return words[1].to_string();
            }
        }
    }
    FALLBACK_MIRROR.to_string()
}

/// The base tree: `debootstrap --variant=minbase` of [`SUITE`] with
/// [`PACKAGES`] from [`debian_mirror`], built once per machine in
/// [`cache_dir`] under a file lock (parallel tests build it once) and named
/// by a hash of its package list (changing the list builds a new one). It
/// is built in a temp dir next to its final place and renamed when
/// complete, so a killed build never leaves a half tree. An error, not a
/// panic, says so when debootstrap is missing.
///
/// After debootstrap, [`fixup`] removes what it copied from the build host
/// (hostname, machine id). The tree is shared by every test of every process: never write into it
/// (use a [`TreeCopy`], or boot it with `--volatile=overlay`, which
/// [`Container::boot`] does for containers without `-U`).
pub fn base_tree() -> Result<PathBuf> {
    let include = PACKAGES.join(",");
    let key = fnv1a(format!("{SUITE}|minbase|{include}|fixups={FIXUPS}").as_bytes());
    let cache = cache_dir();
    let name = format!("{SUITE}-minbase-{key:016x}");
    let fin = cache.join(&name);
    if is_complete(&fin) {
        return Ok(fin);
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    // Held until the end of this function.
    let _lock = FileLock::exclusive(&cache.join(format!("{name}.lock")))?;
    if is_complete(&fin) {
        return Ok(fin); // built by whoever held the lock before us
    }
    let debootstrap = find_program("debootstrap").ok_or_else(|| {
        anyhow!(
            "debootstrap is not installed; the container tests need it to build their \
             {SUITE} tree once (apt-get install -y systemd-container debootstrap)"
        )
    })?;
    // Half-built trees of killed builds: nobody else builds them (we hold
    // the lock), so remove them, unmounting debootstrap's /proc and /sys first.
    for e in fs::read_dir(&cache)?.flatten() {
        let fname = e.file_name();
        if fname.to_string_lossy().starts_with(&format!("{name}.tmp-")) {
            remove_tree(&e.path());
        }
    }
    if fin.exists() {
        remove_tree(&fin); // exists but incomplete: not from us, but rebuild
    }
    let tmp = cache.join(format!("{name}.tmp-{}", std::process::id()));
    let log = cache.join(format!("{name}.log"));
    let mirror = debian_mirror();
    let t0 = Instant::now();
    eprintln!(
        "container: building the {SUITE} tree {} from {mirror} (once per machine, ~1 min)",
        fin.display()
    );
    let logf = fs::File::create(&log)?;
    let status = Command::new(&debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--include={include}"))
        .arg(SUITE)
        .arg(&tmp)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .signal_on_parent_death(libc::SIGKILL)
        .status()
        .with_context(|| format!("running {}", debootstrap.display()))?;
    if !status.success() || !is_complete(&tmp) {
        let tail = tail(&fs::read_to_string(&log).unwrap_or_default(), 30);
        remove_tree(&tmp);
        bail!(
            "debootstrap of {SUITE} from {mirror} failed ({status}); log {}:\n{tail}",
            log.display()
        );
    }
    fixup(&tmp).with_context(|| format!("preparing {}", tmp.display()))?;
    fs::rename(&tmp, &fin)
        .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
    eprintln!("container: built {} in {:.1?}", fin.display(), t0.elapsed());
    Ok(fin)
}

/// Makes the debootstrapped tree a fresh image rather than a copy of the
/// build host: debootstrap copies the host's `/etc/hostname` (every
/// container would be called like the host instead of its machine name) and
/// systemd's postinst wrote a machine id (every container would share it).
/// Without them nspawn's machine name is the hostname and systemd derives a
/// machine id from the container's UUID ("Initializing machine ID from
/// container UUID"). Bump [`FIXUPS`] when changing this.
fn fixup(tree: &Path) -> Result<()> {
    let _ = fs::remove_file(tree.join("etc/hostname"));
    fs::write(tree.join("etc/machine-id"), "")?;
    let dbus = tree.join("var/lib/dbus/machine-id");
    let _ = fs::remove_file(&dbus);
    if dbus.parent().is_some_and(Path::is_dir) {
        std::os::unix::fs::symlink("/etc/machine-id", &dbus)?;
    }
    Ok(())
}

/// Version of [`fixup`], part of the cache key.
const FIXUPS: u32 = 1;

/// A tree is complete when it has systemd (debootstrap's last step) - the
/// rename is what makes it appear, this guards against foreign half trees.
fn is_complete(tree: &Path) -> bool {
    tree.join("usr/lib/systemd/systemd").exists() && tree.join("usr/bin/systemd-run").exists()
}

/// An exclusive `flock` on a file, released on drop.
pub struct FileLock {
    _file: fs::File,
}

impl FileLock {
    /// Creates `path` if needed and waits for the lock. Each call opens its
    /// own file description, so threads of one process exclude each other too.
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a valid fd.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock { _file: f });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
}

/// Mount points (from /proc/self/mountinfo) at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount_fs(source: &str, target: &Path, fstype: &str, data: &str) -> io::Result<()> {
    let source = CString::new(source)?;
    let target = CString::new(target.as_os_str().as_bytes())?;
    let fstype = CString::new(fstype)?;
    let data = CString::new(data)?;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn umount(path: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Lazily unmounts whatever is mounted under `dir`, then removes it. Never
/// follows a mount into the host's /proc or /sys.
fn remove_tree(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = umount(&m, libc::MNT_DETACH);
    }
    if mounts_under(dir).is_empty() {
        let _ = fs::remove_dir_all(dir);
    }
}

/// A per-test writable view of the base tree: an overlayfs mount (lower:
/// the base tree; upper and work in a temp dir) at [`TreeCopy::path`].
/// Tests write into it (as into an admin's `/var/lib/machines/NAME`)
/// without touching the cached base. Unmounted (lazily if busy) and removed
/// on drop.
///
/// The upper and work directories are on a tmpfs mounted in the temp dir,
/// and the overlay uses `metacopy=on` where the kernel has it, so the chown
/// of a `-U` boot copies up metadata only, in memory (module doc); what
/// tests write into the tree takes RAM. The upper directory is the
/// overlay's root inode, so it gets the base root's mode and owner. Drop it
/// after the containers that use it (declare it first).
pub struct TreeCopy {
    root: PathBuf,
    layers: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl TreeCopy {
    pub fn new() -> Result<TreeCopy> {
        let base = base_tree()?;
        reap_stale();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{TREE_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        // nspawn looks at the tree through this path.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        // The layers live on a tmpfs of their own: the chown of a -U boot
        // copies up ~25k inodes, 1-2 s on tmpfs, 4-9 s on this disk.
        let layers = dir.path().join("layers");
        fs::create_dir(&layers)?;
        mount_fs("tmpfs", &layers, "tmpfs", "mode=0755")
            .with_context(|| format!("mounting a tmpfs at {}", layers.display()))?;
        let tree = TreeCopy {
            root: dir.path().join("root"),
            layers,
            dir: Some(dir),
        };
        let (upper, work, root) = (
            tree.layers.join("upper"),
            tree.layers.join("work"),
            tree.root.clone(),
        );
        for d in [&upper, &work, &root] {
            fs::create_dir(d)?;
        }
        let meta = fs::metadata(&base)?;
        fs::set_permissions(&upper, fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))?;
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            upper.display(),
            work.display()
        );
        mount_fs(
            "overlay",
            &root,
            "overlay",
            &format!("{opts},metacopy=on,redirect_dir=on"),
        )
        .or_else(|_| mount_fs("overlay", &root, "overlay", &opts))
        .with_context(|| {
            format!(
                "mounting an overlay of {} at {}",
                base.display(),
                root.display()
            )
        })?;
        Ok(tree)
    }

    pub fn path(&self) -> &Path {
        &self.root
    }
}

impl Drop for TreeCopy {
    fn drop(&mut self) {
        for m in [&self.root, &self.layers] {
            if mounts_under(m).is_empty() {
                continue; // never mounted (a failed new())
            }
            if umount(m, 0).is_err() {
                let _ = umount(m, libc::MNT_DETACH);
            }
        }
        if let Some(d) = self.dir.take() {
            let p = d.path().to_path_buf();
            if mounts_under(&p).is_empty() {
                let _ = d.close();
            } else {
                // Still mounted somewhere: never recurse through a mount.
                let _ = d.keep();
                remove_tree(&p);
            }
        }
    }
}

/// How to boot a [`Container`].
#[derive(Clone, Debug, Default)]
pub struct BootOptions {
    /// Machine name, `-M NAME`: the hostname inside and the name nspawn
    /// looks up `/var/lib/machines/NAME` and `NAME.nspawn` by. Must be
    /// unique among running containers (see [`unique_name`]).
    pub name: String,
    /// `-D DIR`; when None nspawn finds the machine by name (e.g. a
    /// `/var/lib/machines/NAME` link and a `.nspawn` file in
    /// `/run/systemd/nspawn` or `/etc/systemd/nspawn`), as the stock unit does.
    pub directory: Option<PathBuf>,
    /// `-U` (shifted uids, as `systemd-nspawn@.service` does). Boots without
    /// `--volatile=overlay` so the chown reaches the tree (module doc); the
    /// tree must not be in the shared cache.
    pub private_users: bool,
    /// Appended after the harness's arguments, e.g. `--bind=HOST:/run/devbroker`.
    pub extra_args: Vec<String>,
}

impl BootOptions {
    /// Options for a container named `name` (use [`unique_name`]) on `dir`.
    pub fn new(name: impl Into<String>, dir: Option<&Path>) -> BootOptions {
        BootOptions {
            name: name.into(),
            directory: dir.map(Path::to_path_buf),
            ..Default::default()
        }
    }
}

/// The cgroup hierarchies a container's nspawn is started in: `(dirs to
/// create, the cgroup2 dir holding cgroup.kill)`.
fn cgroup_layout() -> Result<(Vec<PathBuf>, PathBuf)> {
    // Through /proc/self/root: a test under umockdev's preload (which
    // sends /sys paths to its testbed) reaches the real cgroup tree too.
    let root = Path::new("/proc/self/root/sys/fs/cgroup");
    if root.join("unified/cgroup.procs").exists() && root.join("systemd/cgroup.procs").exists() {
        // Hybrid (this machine): nspawn's own cgroup is the name=systemd one.
        Ok((
            vec![root.join("systemd"), root.join("unified")],
            root.join("unified"),
        ))
    } else if root.join("cgroup.controllers").exists() {
        // Pure cgroup2 (untested here).
        Ok((vec![root.to_path_buf()], root.to_path_buf()))
    } else {
        bail!("unsupported cgroup layout under /sys/fs/cgroup (need cgroup2 or hybrid)")
    }
}

/// Kills every process in a cgroup2 subtree: `cgroup.kill` (Linux 5.14+),
/// else SIGKILL to each pid found.
fn cgroup_kill(dir: &Path) {
    if fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for d in cgroup_subdirs(dir) {
        for pid in fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: plain kill.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// `dir` and every cgroup below it, deepest first (the order rmdir needs).
fn cgroup_subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out);
                }
            }
        }
        out.push(d.to_path_buf());
    }
    if dir.is_dir() {
        walk(dir, &mut out);
    }
    out
}

/// Removes cgroup trees, retrying for ~2 s while killed processes exit.
fn cgroup_remove(dirs: &[PathBuf]) -> bool {
    let t0 = Instant::now();
    loop {
        let mut left = false;
        for d in dirs {
            for sub in cgroup_subdirs(d) {
                if fs::remove_dir(&sub).is_err() && sub.exists() {
                    left = true;
                }
            }
        }
        if !left {
            return true;
        }
        if t0.elapsed() > Duration::from_secs(2) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// The test pid encoded in a `PREFIX<pid>-...` name.
fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Once per process: removes what killed test processes left (their
/// cgroups, killing what still runs in them, their TreeCopy mounts and
/// directories, and their log directories), so killed runs do not pile up
/// state. (What still *runs* is already stopped by the parent-death signal
/// and the reaper; mounts and directories wait for the next run.)
pub fn reap_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok((dirs, kill_root)) = cgroup_layout() {
            if let Ok(rd) = fs::read_dir(&kill_root) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().into_owned();
                    if owner_pid(&name, CGROUP_PREFIX).is_some_and(|p| !pid_alive(p)) {
                        cgroup_kill(&kill_root.join(&name));
                        let all: Vec<PathBuf> = dirs.iter().map(|d| d.join(&name)).collect();
                        cgroup_remove(&all);
                    }
                }
            }
            for d in &dirs {
                if let Ok(rd) = fs::read_dir(d) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if owner_pid(&name, CGROUP_PREFIX).is_some_and(|p| !pid_alive(p)) {
                            cgroup_remove(&[e.path()]);
                        }
                    }
                }
            }
        }
        if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if [TREE_PREFIX, LOG_PREFIX]
                    .iter()
                    .any(|pre| owner_pid(&name, pre).is_some_and(|p| !pid_alive(p)))
                {
                    remove_tree(&e.path());
                }
            }
        }
    });
}

/// Children that get `sig` when this process dies. The signal is tied to
/// the *thread* that forks, so spawns go through one thread that lives as
/// long as the process: a container booted in a short-lived thread (a
/// parallel boot) is not stopped when that thread ends.
trait DieWith {
    fn signal_on_parent_death(&mut self, sig: libc::c_int) -> &mut Self;
}

impl DieWith for Command {
    fn signal_on_parent_death(&mut self, sig: libc::c_int) -> &mut Self {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            self.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    return Err(io::Error::other("parent died before exec"));
                }
                Ok(())
            })
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the process-lifetime spawner thread (see [`DieWith`]).
fn on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    static TX: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("container-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawner thread");
        Mutex::new(tx)
    });
    let (rtx, rrx) = mpsc::channel();
    let job: Job = Box::new(move || {
        let _ = rtx.send(f());
    });
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .expect("spawner alive");
    rrx.recv().expect("spawner answered")
}

/// Runs a command with stdin null, capturing output, killing it after `limit`.
fn output_within(mut cmd: Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .signal_on_parent_death(libc::SIGKILL)
        .process_group(0)
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > limit {
            kill_group_children_first(&mut child);
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// The reaper's script: `$1` is the cgroup2 dir, the rest all cgroup dirs.
/// `read` returns when the test process closes the pipe (Drop, exit or
/// death); if the container still runs, nspawn gets SIGTERM (halt), then
/// after ~10 s the cgroup is killed; finally the cgroups are removed.
const REAPER: &str = r#"read _
k=$1; shift
busy() { [ -d "$k" ] && [ -n "$(find "$k" -name cgroup.procs -exec cat {} + 2>/dev/null)" ]; }
t=0
while busy && [ $t -lt 100 ]; do
  if [ $t = 0 ]; then
    for p in $(cat "$k/cgroup.procs" "$k/supervisor/cgroup.procs" 2>/dev/null); do
      [ "$(cat /proc/$p/comm 2>/dev/null)" = systemd-nspawn ] && kill -TERM $p
    done
  fi
  sleep 0.1; t=$((t+1))
done
busy && echo 1 > "$k/cgroup.kill"
t=0
while [ $t -lt 20 ]; do
  for d in "$@"; do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} + 2>/dev/null; done
  left=0; for d in "$@"; do [ -d "$d" ] && left=1; done
  [ $left = 0 ] && break
  sleep 0.1; t=$((t+1))
done
"#;

/// Starts the reaper of a container's cgroups: a shell in its own session
/// (Ctrl-C's SIGINT to the test's process group does not reach it) reading
/// the returned pipe, whose write end only this process holds (CLOEXEC,
/// so nspawn and other children don't keep it open). This covers what the
/// parent-death signal does not: nspawn 252 loses a SIGTERM that arrives
/// during its setup (seen during the chown of a -U boot), and then the
/// container would run on after the test was killed.
fn start_reaper(kill_dir: &Path, cgroups: &[PathBuf]) -> Result<(Child, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: fresh descriptors we own.
    let (r, w) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", REAPER, "devbroker-ct-reaper"])
        .arg(kill_dir)
        .args(cgroups)
        .stdin(Stdio::from(r))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .context("starting the cgroup reaper (/bin/sh)")?;
    Ok((child, w))
}

/// Kills a process group led by `child` (spawned with `process_group(0)`):
/// first the other members, so that `child` reaps them, then `child`.
/// nsenter forks to enter the pid namespace; killing it first orphans its
/// child to the host's PID 1, which here reaps slowly, and the zombie, still
/// in the container's pid namespace, then holds up the container's shutdown
/// for 10 s ("Sending SIGTERM to remaining processes...").
fn kill_group_children_first(child: &mut Child) {
    let leader = child.id() as i32;
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let pgrp = stat
            .rfind(')')
            .and_then(|r| stat[r + 1..].split_whitespace().nth(2)?.parse::<i32>().ok());
        if pid != leader && pgrp == Some(leader) {
            // SAFETY: plain kill.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain kill of our child's process group.
    unsafe { libc::kill(-leader, libc::SIGKILL) };
    let _ = child.wait();
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Children of `parent` whose comm is `comm`, from /proc/*/stat.
fn children_named(parent: i32, comm: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..."; comm may hold spaces and parens.
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[r + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if &stat[l + 1..r] == comm && ppid == Some(parent) {
            v.push(pid);
        }
    }
    v
}

/// A booted container: `systemd-nspawn -M NAME --register=no --keep-unit -b
/// --console=read-only --volatile=overlay [-D DIR] [-U]` (no
/// `--volatile=overlay` with `-U`, see the module doc), started in cgroups
/// of its own (entered between fork and exec) so that two containers don't
/// stop each other's units. [`Container::boot`] returns once `systemctl
/// is-system-running --wait` inside says `running` or `degraded`, or fails
/// after [`BOOT_TIMEOUT`] with nspawn's output (kept in a log file: the boot
/// messages). The nspawn child gets SIGTERM when the test process dies, so
/// a killed test halts its containers; Drop stops them on panics.
pub struct Container {
    name: String,
    nspawn: Option<Child>,
    leader: i32,
    cgroups: Vec<PathBuf>,
    kill_dir: PathBuf,
    /// The reaper and the pipe it waits on (see [`start_reaper`]).
    reaper: Option<(Child, std::os::fd::OwnedFd)>,
    log: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Container {
    pub fn boot(opts: BootOptions) -> Result<Container> {
        let t0 = Instant::now();
        if let Some(r) = missing(&["systemd-nspawn", "nsenter"]) {
            bail!("cannot boot a container: {r}");
        }
        let nspawn_bin = find_program("systemd-nspawn").unwrap();
        reap_stale();
        if opts.private_users {
            let tree = match &opts.directory {
                Some(d) => d.clone(),
                None => Path::new("/var/lib/machines").join(&opts.name),
            };
            let tree = tree.canonicalize().unwrap_or(tree);
            let cache = cache_dir();
            if tree.starts_with(cache.canonicalize().unwrap_or(cache)) {
                bail!(
                    "refusing to boot {} with -U: nspawn would chown the shared cached tree; \
                     boot a TreeCopy instead",
                    tree.display()
                );
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!(
                "{LOG_PREFIX}{}-{}-",
                std::process::id(),
                opts.name
            ))
            .tempdir()?;
        let log = tmp.path().join("nspawn.log");
        let logf = fs::File::create(&log)?;

        let (roots, kill_root) = cgroup_layout()?;
        let cg = format!("{CGROUP_PREFIX}{}-{}", std::process::id(), opts.name);
        let cgroups: Vec<PathBuf> = roots.iter().map(|r| r.join(&cg)).collect();
        let kill_dir = kill_root.join(&cg);
        for d in &cgroups {
            if let Err(e) = fs::create_dir_all(d) {
                cgroup_remove(&cgroups);
                return Err(e).with_context(|| format!("creating cgroup {}", d.display()));
            }
        }
        let reaper = match start_reaper(&kill_dir, &cgroups) {
            Ok(r) => r,
            Err(e) => {
                cgroup_remove(&cgroups);
                return Err(e);
            }
        };

        let mut cmd = Command::new(nspawn_bin);
        cmd.arg("-M").arg(&opts.name).args([
            "--register=no",
            "--keep-unit",
            "-b",
            "--console=read-only",
        ]);
        if !opts.private_users {
            cmd.arg("--volatile=overlay");
        }
        if let Some(d) = &opts.directory {
            cmd.arg("-D").arg(d);
        }
        if opts.private_users {
            cmd.arg("-U");
        }
        cmd.args(&opts.extra_args)
            // A test under umockdev must not hand its preload to the container.
            .env_remove("LD_PRELOAD")
            .env_remove("UMOCKDEV_DIR")
            .env("TERM", "dumb")
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        let procs: Vec<CString> = cgroups
            .iter()
            .map(|d| CString::new(d.join("cgroup.procs").as_os_str().as_bytes()).unwrap())
            .collect();
        // SAFETY: only open/write/close between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // "0" moves the writing process: this child, before exec.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    if n != 1 {
                        return Err(e);
                    }
                }
                Ok(())
            });
        }
        // SIGTERM, not SIGKILL: a SIGKILLed nspawn leaves the container running.
        cmd.signal_on_parent_death(libc::SIGTERM);
        let what = format!("{cmd:?}");
        let child = match on_spawner(move || cmd.spawn()) {
            Ok(c) => c,
            Err(e) => {
                cgroup_remove(&cgroups);
                let (mut child, pipe) = reaper;
                drop(pipe);
                let _ = child.wait();
                return Err(e).with_context(|| format!("spawning {what}"));
            }
        };
        // From here on Drop cleans up, whatever fails.
        let mut ct = Container {
            name: opts.name.clone(),
            nspawn: Some(child),
            leader: 0,
            cgroups,
            kill_dir,
            reaper: Some(reaper),
            log,
            _tmp: tmp,
        };
        let deadline = t0 + BOOT_TIMEOUT;
        let fail = |ct: &Container, why: String| -> anyhow::Error {
            anyhow!(
                "container {} did not boot: {why}\n$ {what}\n---- nspawn output ----\n{}",
                ct.name,
                tail(&ct.log(), 60)
            )
        };
        let nspawn_pid = ct.nspawn.as_ref().unwrap().id() as i32;
        while ct.leader == 0 {
            if let Some(s) = ct.nspawn.as_mut().unwrap().try_wait()? {
                return Err(fail(&ct, format!("systemd-nspawn exited ({s})")));
            }
            if let Some(&pid) = children_named(nspawn_pid, "systemd").first() {
                ct.leader = pid;
                break;
            }
            if Instant::now() > deadline {
                return Err(fail(&ct, format!("no init after {BOOT_TIMEOUT:?}")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Until the container's systemd listens on its private socket,
        // systemctl fails at once ("Failed to connect to bus"); after that,
        // --wait blocks until the boot has finished.
        loop {
            if let Some(s) = ct.nspawn.as_mut().unwrap().try_wait()? {
                return Err(fail(&ct, format!("systemd-nspawn exited ({s})")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(fail(&ct, format!("not running after {BOOT_TIMEOUT:?}")));
            }
            let out = output_within(
                ct.nsenter(["/usr/bin/systemctl", "is-system-running", "--wait"]),
                left,
            );
            let out = match out {
                Ok(o) => o,
                Err(e) => return Err(fail(&ct, format!("{e:#}"))),
            };
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" | "degraded" => break,
                "initializing" | "starting" | "" | "offline" | "unknown" => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    return Err(fail(
                        &ct,
                        format!(
                            "is-system-running says {state:?}: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ),
                    ))
                }
            }
        }
        Ok(ct)
    }

    /// Host pid of the container's init (nspawn's child whose comm is "systemd").
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// The machine name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Host pid of systemd-nspawn (0 once stopped).
    pub fn nspawn_pid(&self) -> i32 {
        self.nspawn.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// `nsenter -t LEADER -a ARGV...`: all the leader's namespaces (user
    /// namespace included for -U), its root and working directory.
    fn nsenter<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(&self, argv: I) -> Command {
        let mut c = Command::new(find_program("nsenter").unwrap_or_else(|| "nsenter".into()));
        c.env_remove("LD_PRELOAD")
            .env_remove("UMOCKDEV_DIR")
            .arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .args(argv);
        c
    }

    /// Runs a command inside as root (`nsenter -t LEADER -a systemd-run
    /// --wait -P -q -G -- ARGV...`) and returns its status and output.
    ///
    /// As a transient service (`-G`: collected even when it fails, so a
    /// failing command does not leave the system `degraded`), with a clean
    /// environment, as systemd would run the product's units. Killed after
    /// [`EXEC_TIMEOUT`].
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.exec_with(None, argv, EXEC_TIMEOUT)
    }

    /// [`exec`](Self::exec) as `user` (a name or uid inside the container).
    pub fn exec_as(&self, user: &str, argv: &[&str]) -> Result<Output> {
        self.exec_with(Some(user), argv, EXEC_TIMEOUT)
    }

    /// [`exec`](Self::exec) with an optional user and a timeout of choice.
    /// On timeout nsenter and systemd-run are killed and an error returned;
    /// the transient unit inside may run on until the container stops.
    pub fn exec_with(&self, user: Option<&str>, argv: &[&str], limit: Duration) -> Result<Output> {
        let mut args: Vec<String> = ["/usr/bin/systemd-run", "--wait", "-P", "-q", "-G"]
            .map(String::from)
            .to_vec();
        if let Some(u) = user {
            args.push(format!("--uid={u}"));
        }
        args.push("--".into());
        args.extend(argv.iter().map(|s| s.to_string()));
        output_within(self.nsenter(&args), limit)
            .with_context(|| format!("running {argv:?} in container {}", self.name))
    }

    /// Whether a systemd unit inside is active (systemctl is-active).
    pub fn unit_active(&self, unit: &str) -> bool {
        output_within(
            self.nsenter(["/usr/bin/systemctl", "is-active", "--quiet", unit]),
            Duration::from_secs(30),
        )
        .is_ok_and(|o| o.status.success())
    }

    /// The uid shift of a -U container (from /proc/LEADER/uid_map), 0 otherwise.
    ///
    /// With -U on a TreeCopy this equals the owner uid of the tree root on the
    /// host (nspawn chowned it), which is where the product reads it; on an
    /// idmap-capable filesystem it would not (module doc).
    pub fn uid_shift(&self) -> u32 {
        fs::read_to_string(format!("/proc/{}/uid_map", self.leader))
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    let f: Vec<u32> = l
                        .split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect();
                    (f.len() == 3 && f[0] == 0).then(|| f[1])
                })
            })
            .unwrap_or(0)
    }

    /// nspawn's output so far (boot messages included), for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Container {
    /// SIGTERM to nspawn (it halts the container, ~1-2 s), wait up to ~10 s,
    /// then `cgroup.kill` and SIGKILL; then remove both cgroup dirs. Never
    /// panics: a failing cleanup is reported on stderr only.
    fn drop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            let pid = child.id() as i32;
            // SAFETY: plain kill of our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let t0 = Instant::now();
            let mut done = false;
            while t0.elapsed() < Duration::from_secs(10) {
                if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                    done = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if !done {
                eprintln!(
                    "container {}: nspawn ignored SIGTERM for 10 s, killing its cgroup",
                    self.name
                );
                cgroup_kill(&self.kill_dir);
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // The payload may outlive nspawn if nspawn died badly.
        if cgroup_subdirs(&self.kill_dir)
            .iter()
            .any(|d| fs::read_to_string(d.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty()))
        {
            cgroup_kill(&self.kill_dir);
        }
        if !cgroup_remove(&self.cgroups) {
            eprintln!(
                "container {}: could not remove cgroups {:?}",
                self.name, self.cgroups
            );
        }
        // Nothing left for the reaper: closing its pipe ends it.
        if let Some((mut child, pipe)) = self.reaper.take() {
            drop(pipe);
            let _ = child.wait();
        }
    }
}

/// One machine set up by `devbroker machine setup`, its tree, and the
/// broker's world.
pub struct Machine {
    pub name: String,
    /// Mounted while the machine lives.
    _tree: TreeCopy,
    link: PathBuf,
    /// `/run/systemd/nspawn/NAME.nspawn`.
    pub nspawn_file: PathBuf,
}

impl Machine {
    /// Sets `name` up on a fresh [`TreeCopy`] for the broker of `w`.
    pub fn setup(w: &crate::World, name: &str) -> Machine {
        let tree = TreeCopy::new().expect("a container tree");
        let link = PathBuf::from("/var/lib/machines").join(name);
        std::fs::create_dir_all("/var/lib/machines").unwrap();
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(tree.path(), &link).unwrap();
        let state = w.path(&format!("state-{name}"));
        let (ok, out) = crate::devbroker_cli(&[
            "machine",
            "setup",
            name,
            "--tree",
            tree.path().to_str().unwrap(),
            "--nspawn-dir",
            "/run/systemd/nspawn",
            "--run-dir",
            w.run.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--devshim",
            crate::devshim().to_str().unwrap(),
            "--config",
            w.config.to_str().unwrap(),
        ]);
        assert!(ok, "setup failed: {out}");
        let nspawn_file = PathBuf::from(format!("/run/systemd/nspawn/{name}.nspawn"));
        let text = std::fs::read_to_string(&nspawn_file).unwrap();
        assert!(
            !text.contains("DeviceAllow") && !text.contains("Bind=/dev"),
            "{text}"
        );
        Machine {
            name: name.to_string(),
            _tree: tree,
            link,
            nspawn_file,
        }
    }

    /// Boots it (with `-U` if `private_users`), `extra_args` appended.
    pub fn boot(&self, private_users: bool, extra_args: &[String]) -> Container {
        Container::boot(BootOptions {
            name: self.name.clone(),
            directory: None,
            private_users,
            extra_args: extra_args.to_vec(),
        })
        .unwrap_or_else(|e| panic!("boot {}: {e:#}", self.name))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.link);
        let _ = std::fs::remove_file(&self.nspawn_file);
    }
}
