//! `devbroker machine setup` and `machine remove`: what an admin did by hand
//! for each Sai container, minus the device binding, done idempotently.
//!
//! Setup is planned first — a list of [`Step`]s, each a path and what should
//! be there — then compared with what is there. Only differences are written
//! (atomically: a temporary file renamed into place), recorded for `remove`,
//! and, with `--dry-run`, printed as a unified diff instead.
//!
//! The container's tree is hostile ground: every path in it is resolved
//! inside it and changed through descriptors ([`super::tree`]), so a link
//! planted by the container's root can't make setup or remove read, write,
//! chown or remove anything of the host's.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::accounts::{append, remove_line, user_lines};
use super::ini;
use super::name;
use super::record::{fingerprint, Edit, Entry, Kind, Record};
use super::tree::{Found, Meta, Removed, Tree};

/// Everything `machine setup` needs.
#[derive(Debug, Clone)]
pub struct SetupOptions {
    pub name: String,
    /// The container's root directory.
    pub tree: PathBuf,
    /// Where the `.nspawn` file goes.
    pub nspawn_dir: PathBuf,
    /// The broker's run directory (`/run/devbroker`).
    pub run_dir: PathBuf,
    /// The job user and uid inside the container.
    pub user: String,
    pub uid: u32,
    /// The static devshim to install.
    pub devshim: PathBuf,
    /// Where setup records what it changed.
    pub state_dir: PathBuf,
    /// Where other machines' trees are, to find a free subnet.
    pub machines_dir: PathBuf,
    /// Names of the other machines this host has.
    pub other_machines: Vec<String>,
    pub dry_run: bool,
}

/// What should be at a path.
#[derive(Debug, Clone)]
enum Content {
    /// A file with this content, owner and mode.
    File {
        content: Vec<u8>,
        mode: u32,
    },
    /// A text file changed by line edits. An existing file keeps its owner,
    /// group and mode; a missing one is created with the step's.
    Edited {
        edits: Vec<Edit>,
        mode: u32,
    },
    Symlink {
        target: PathBuf,
    },
    Dir {
        mode: u32,
    },
}

/// One path and what should be there, owned by `owner`.
#[derive(Debug, Clone)]
struct Step {
    path: PathBuf,
    content: Content,
    owner: (u32, u32),
}

/// What setup did or would do.
#[derive(Debug, Default)]
pub struct SetupReport {
    pub changed: Vec<String>,
    pub subnet: u8,
    pub uid_shift: u32,
    pub diff: String,
}

/// The roots paths are resolved beneath: the container's tree for paths in
/// it, the host's `/` for the rest (the `.nspawn` file, the run directory).
struct Roots {
    tree: Option<Tree>,
    host: Tree,
}

impl Roots {
    fn new(tree: Option<Tree>) -> anyhow::Result<Roots> {
        Ok(Roots {
            tree,
            host: Tree::host().context("can't open /")?,
        })
    }

    /// The root `abs` is resolved beneath, and its path there.
    fn at<'a>(&'a self, abs: &'a Path) -> (&'a Tree, &'a Path) {
        if let Some(t) = &self.tree {
            if let Some(rel) = t.rel(abs) {
                return (t, rel);
            }
        }
        (&self.host, abs.strip_prefix("/").unwrap_or(abs))
    }

    fn in_tree(&self, abs: &Path) -> bool {
        self.tree.as_ref().is_some_and(|t| t.rel(abs).is_some())
    }
}

const HOST0: &str = "etc/systemd/network/50-host0.network";

/// The `192.168.N.9/24` in a host0 network file.
fn subnet_of(text: &str) -> Option<u8> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("Address=")?;
        let rest = v.strip_prefix("192.168.")?;
        rest.split('.').next()?.parse().ok()
    })
}

/// A `192.168.N.0/24` no other machine uses: this tree's own if it has one.
/// Other trees are read under the same rules as this one: a link or a FIFO
/// in another container's tree is skipped, never followed or opened.
fn pick_subnet(tree: &Tree, machines_dir: &Path) -> anyhow::Result<u8> {
    if let Some((own, _)) = tree.read(Path::new(HOST0))? {
        if let Some(n) = subnet_of(&String::from_utf8_lossy(&own)) {
            return Ok(n);
        }
    }
    let me = tree.identity()?;
    let mut used = Vec::new();
    if let Ok(rd) = fs::read_dir(machines_dir) {
        for e in rd.flatten() {
            let Ok(other) = Tree::container(&e.path()) else {
                continue;
            };
            if other.identity().ok() == Some(me) {
                continue;
            }
            if let Some(n) = other
                .read(Path::new(HOST0))
                .ok()
                .flatten()
                .and_then(|(b, _)| subnet_of(&String::from_utf8_lossy(&b)))
            {
                used.push(n);
            }
        }
    }
    (100..=254u8)
        .find(|n| !used.contains(n))
        .context("every 192.168.100-254.0/24 is taken by another machine")
}

/// Where a unit lives in the tree, as the path a wants link points to.
fn unit_in_tree(tree: &Tree, unit: &str) -> Option<PathBuf> {
    ["lib/systemd/system", "usr/lib/systemd/system"]
        .iter()
        .map(|d| Path::new(d).join(unit))
        .find(|p| tree.is_file(p))
        .map(|p| Path::new("/").join(p))
}

/// A home directory from the tree's passwd, as a path in the tree: only a
/// plain absolute path (no `..`, `.` or empty parts, not `/`) is taken.
fn home_in_tree(home: &str, user: &str, tree: &Path) -> anyhow::Result<PathBuf> {
    let parts: Vec<&str> = home.strip_prefix('/').unwrap_or("").split('/').collect();
    let plain = home.starts_with('/')
        && !parts.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != ".." && !p.contains('\0'));
    if !plain {
        bail!(
            "the home directory of {user} in {}/etc/passwd is {home:?}; setup makes a home only at a plain absolute path (no `..`, `.` or empty parts, not `/`): fix that line of the tree's /etc/passwd",
            tree.display()
        );
    }
    Ok(parts.iter().collect())
}

/// The unit that runs devshim in the container.
pub fn devshim_unit(user: &str) -> String {
    format!(
        "# Installed by devbroker machine setup.\n\
         [Unit]\n\
         Description=devbroker guest shim: board ttys under /dev/serial/by-id\n\
         After=local-fs.target\n\
         \n\
         [Service]\n\
         ExecStart=/usr/local/bin/devshim serve --dir /run/devbroker --link-root /dev --user {user}\n\
         Restart=always\n\
         RestartSec=1\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// True for an ELF executable without an interpreter (statically linked).
pub fn is_static_elf(bytes: &[u8]) -> bool {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= bytes.len() && u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) != 3
        // PT_INTERP
    })
}

fn steps_for(opts: &SetupOptions, roots: &Roots) -> anyhow::Result<(Vec<Step>, u8, u32)> {
    let tree = roots.tree.as_ref().expect("setup opens the tree");
    // A tree used with private users (-U) is owned by its shifted root.
    let shift = tree
        .root_meta()
        .with_context(|| format!("can't look at {}", opts.tree.display()))?
        .uid;
    let root = (shift, shift);
    let shim = fs::read(&opts.devshim).with_context(|| {
        format!(
            "can't read devshim at {}; pass --devshim",
            opts.devshim.display()
        )
    })?;
    if !is_static_elf(&shim) {
        bail!("{} is not a static executable; containers need the static devshim (see docs/admin.md, \"Building devshim\"; the Debian package installs it as /usr/bin/devshim)", opts.devshim.display());
    }
    let n = pick_subnet(tree, &opts.machines_dir)?;
    let t = |p: &str| opts.tree.join(p.trim_start_matches('/'));
    let mut steps = vec![
        Step { path: t("/etc/hostname"), content: Content::File { content: format!("{}\n", opts.name).into_bytes(), mode: 0o644 }, owner: root },
        Step {
            path: t(HOST0),
            content: Content::File {
                content: format!(
                    "# Written by devbroker machine setup.\n[Match]\nName=host0\n\n[Network]\nAddress=192.168.{n}.9/24\nGateway=192.168.{n}.1\nDNS=192.168.{n}.1\n"
                )
                .into_bytes(),
                mode: 0o644,
            },
            owner: root,
        },
    ];
    let mut enable = vec![
        ("multi-user.target.wants", "systemd-networkd.service"),
        ("sockets.target.wants", "systemd-networkd.socket"),
    ];
    if unit_in_tree(tree, "systemd-resolved.service").is_some() {
        enable.push(("multi-user.target.wants", "systemd-resolved.service"));
    }
    for (wants, unit) in enable {
        let target = unit_in_tree(tree, unit).with_context(|| {
            format!(
                "{} has no {unit}: install systemd in the tree",
                opts.tree.display()
            )
        })?;
        steps.push(Step {
            path: t(&format!("/etc/systemd/system/{wants}/{unit}")),
            content: Content::Symlink { target },
            owner: root,
        });
    }
    steps.push(Step {
        path: t("/usr/local/bin/devshim"),
        content: Content::File {
            content: shim,
            mode: 0o755,
        },
        owner: root,
    });
    steps.push(Step {
        path: t("/etc/systemd/system/devshim.service"),
        content: Content::File {
            content: devshim_unit(&opts.user).into_bytes(),
            mode: 0o644,
        },
        owner: root,
    });
    steps.push(Step {
        path: t("/etc/systemd/system/multi-user.target.wants/devshim.service"),
        content: Content::Symlink {
            target: PathBuf::from("/etc/systemd/system/devshim.service"),
        },
        owner: root,
    });
    let text = |rel: &str| -> anyhow::Result<String> {
        Ok(tree
            .read(Path::new(rel))?
            .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    };
    let passwd = text("etc/passwd")?;
    let group = text("etc/group")?;
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0);
    let lines =
        user_lines(&passwd, &group, &opts.user, opts.uid, days).map_err(anyhow::Error::msg)?;
    for (file, line, mode) in [
        ("/etc/passwd", &lines.passwd, 0o644),
        ("/etc/group", &lines.group, 0o644),
        ("/etc/shadow", &lines.shadow, 0o640),
        ("/etc/gshadow", &lines.gshadow, 0o640),
    ] {
        if let Some(line) = line {
            steps.push(Step {
                path: t(file),
                content: Content::Edited {
                    edits: vec![Edit::AppendLine { line: line.clone() }],
                    mode,
                },
                owner: root,
            });
        }
    }
    let job = (shift + opts.uid, shift + opts.uid);
    let home = wire::accounts::find_user(&passwd, &opts.user)
        .filter(|u| u.name == opts.user)
        .map_or(format!("/home/{}", opts.user), |u| u.home);
    steps.push(Step {
        path: opts.tree.join(home_in_tree(&home, &opts.user, &opts.tree)?),
        content: Content::Dir { mode: 0o750 },
        owner: job,
    });
    let bind = format!(
        "{}:/run/devbroker",
        opts.run_dir.join("machines").join(&opts.name).display()
    );
    let nspawn_file = opts.nspawn_dir.join(format!("{}.nspawn", opts.name));
    let mut edits = vec![
        Edit::IniSet {
            section: "Exec".into(),
            key: "Boot".into(),
            value: "yes".into(),
        },
        Edit::IniSet {
            section: "Network".into(),
            key: "VirtualEthernet".into(),
            value: "yes".into(),
        },
    ];
    // Read-only: connecting to a socket needs no write access, and even a
    // container root that is root on the host (no -U) can't put anything in
    // the broker's directory. An earlier setup's writable bind is replaced.
    // Read as every other file setup edits: never through a link, never
    // from a FIFO or a device.
    let earlier = {
        let (t, rel) = roots.at(&nspawn_file);
        t.read(rel)?
            .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    if ini::values(&earlier, "Files", "Bind")
        .iter()
        .any(|(_, v)| *v == bind)
    {
        edits.push(Edit::IniDrop {
            section: "Files".into(),
            key: "Bind".into(),
            value: bind.clone(),
        });
    }
    edits.push(Edit::IniAdd {
        section: "Files".into(),
        key: "BindReadOnly".into(),
        value: bind,
    });
    steps.push(Step {
        path: nspawn_file,
        content: Content::Edited { edits, mode: 0o644 },
        owner: (0, 0),
    });
    steps.push(Step {
        path: opts.run_dir.join("machines"),
        content: Content::Dir { mode: 0o700 },
        owner: (0, 0),
    });
    // The host's, not the container's: the container reads it and connects
    // to the sockets in it (0666), but its root can't put anything there.
    steps.push(Step {
        path: opts.run_dir.join("machines").join(&opts.name),
        content: Content::Dir { mode: 0o755 },
        owner: (0, 0),
    });
    Ok((steps, n, shift))
}

/// Checks the machine name and the tree before anything is looked at.
fn check_names(opts: &SetupOptions) -> anyhow::Result<()> {
    name::check(&opts.name).map_err(anyhow::Error::msg)?;
    wire::names::check_name(&opts.name).map_err(|why| {
        anyhow::anyhow!(
            "machine name {:?} can't name a broker directory: {why}",
            opts.name
        )
    })?;
    let clashes = name::veth_clashes(&opts.name, opts.other_machines.iter().map(String::as_str));
    if !clashes.is_empty() {
        bail!(
            "machine {:?} would share its host veth {} with {}: the first {} characters of machine names must differ",
            opts.name,
            name::veth(&opts.name),
            clashes.join(", "),
            name::VETH_CHARS
        );
    }
    wire::names::check_name(&opts.user)
        .map_err(|why| anyhow::anyhow!("job user {:?} refused: {why}", opts.user))?;
    Ok(())
}

/// Opens the container's tree.
fn open_tree(path: &Path) -> anyhow::Result<Tree> {
    let tree = Tree::container(path).with_context(|| {
        format!(
            "the tree {} is not there: make one (debootstrap, machinectl pull-tar) or pass --tree",
            path.display()
        )
    })?;
    if !tree.is_dir(Path::new("etc")) {
        bail!(
            "{} has no etc/: is it a container's root directory?",
            path.display()
        );
    }
    Ok(tree)
}

fn apply_edit(text: &str, e: &Edit) -> String {
    match e {
        Edit::AppendLine { line } => {
            if text.lines().any(|l| l == line) {
                text.to_string()
            } else {
                append(text, line)
            }
        }
        Edit::IniSet {
            section,
            key,
            value,
        } => ini::set(text, section, key, value),
        Edit::IniAdd {
            section,
            key,
            value,
        } => ini::add(text, section, key, value),
        Edit::IniDrop {
            section,
            key,
            value,
        } => ini::remove(text, section, key, value),
    }
}

fn undo_edit(text: &str, e: &Edit) -> String {
    match e {
        Edit::AppendLine { line } => remove_line(text, line),
        Edit::IniSet {
            section,
            key,
            value,
        }
        | Edit::IniAdd {
            section,
            key,
            value,
        } => ini::remove(text, section, key, value),
        Edit::IniDrop {
            section,
            key,
            value,
        } => ini::add(text, section, key, value),
    }
}

/// What is at a step's path now, read under the tree's rules.
struct Now {
    found: Found,
    /// The file's content, for file steps.
    content: Option<Vec<u8>>,
}

/// Looks at what is at a step's path, refusing what setup must not write
/// through or over: a link where a file or directory goes, a FIFO or
/// device, a directory where a file goes, or something not setup's where
/// its temporary file goes.
fn look(roots: &Roots, step: &Step) -> anyhow::Result<Now> {
    let (t, rel) = roots.at(&step.path);
    let p = step.path.display();
    let found = t.lstat(rel)?;
    let mut content = None;
    match (&step.content, &found) {
        // Refused as writing it would refuse it.
        (Content::File { .. } | Content::Edited { .. }, _) => {
            t.check_replaceable(rel, &found, false)?;
            if let Found::File(_) = found {
                content = t.read(rel)?.map(|(b, _)| b);
            }
        }
        (Content::Symlink { .. }, _) => t.check_replaceable(rel, &found, true)?,
        (Content::Dir { .. }, Found::Link(target, _)) => {
            return Err(t.link_in_the_way(rel, target).into());
        }
        (Content::Dir { .. }, Found::File(_)) => {
            bail!("{p} is a file where setup makes a directory: remove it")
        }
        (Content::Dir { .. }, Found::Other(k)) => {
            bail!("{p} is a {k}, not a directory; setup never opens those: remove it")
        }
        (Content::Dir { .. }, Found::Missing | Found::Dir(_)) => {}
    }
    Ok(Now { found, content })
}

/// The content a file step leaves, given what is there now.
fn after_bytes(step: &Step, now: &Now) -> Option<Vec<u8>> {
    match &step.content {
        Content::File { content, .. } => Some(content.clone()),
        Content::Edited { edits, .. } => {
            let mut text =
                String::from_utf8_lossy(now.content.as_deref().unwrap_or_default()).into_owned();
            for e in edits {
                text = apply_edit(&text, e);
            }
            Some(text.into_bytes())
        }
        _ => None,
    }
}

/// The owner and mode a file or directory step leaves: an edited file
/// keeps its own, everything else gets the step's.
fn after_meta(step: &Step, now: &Now) -> Meta {
    match (&step.content, &now.found) {
        (Content::Edited { .. }, Found::File(m)) => *m,
        (Content::File { mode, .. } | Content::Edited { mode, .. } | Content::Dir { mode }, _) => {
            Meta::new(step.owner, *mode)
        }
        (Content::Symlink { .. }, _) => Meta::new(step.owner, 0o777),
    }
}

/// Whether the path already holds what the step wants (owner and mode
/// included).
fn satisfied(step: &Step, now: &Now) -> bool {
    match (&step.content, &now.found) {
        (Content::File { .. } | Content::Edited { .. }, Found::File(m)) => {
            *m == after_meta(step, now) && now.content == after_bytes(step, now)
        }
        (Content::Symlink { target }, Found::Link(t, _)) => t == target,
        (Content::Dir { .. }, Found::Dir(m)) => *m == after_meta(step, now),
        _ => false,
    }
}

fn describe(step: &Step, now: &Now, diff: &mut String) {
    let p = step.path.display().to_string();
    match &step.content {
        Content::Symlink { target } => diff.push_str(&format!(
            "--- {p}: link to {} would be made\n",
            target.display()
        )),
        Content::Dir { mode } => diff.push_str(&format!(
            "--- {p}: directory (mode {mode:o}, owner {}:{}) would be made or fixed\n",
            step.owner.0, step.owner.1
        )),
        Content::File { .. } | Content::Edited { .. } => {
            let after = after_bytes(step, now).unwrap_or_default();
            match String::from_utf8(after) {
                Ok(after) => {
                    let before =
                        String::from_utf8_lossy(now.content.as_deref().unwrap_or_default());
                    let from = if now.found == Found::Missing {
                        "/dev/null".into()
                    } else {
                        p.clone()
                    };
                    let u = similar::TextDiff::from_lines(before.as_ref(), &after)
                        .unified_diff()
                        .header(&from, &p)
                        .to_string();
                    if u.is_empty() {
                        diff.push_str(&format!("--- {p}: mode or owner would change\n"));
                    }
                    diff.push_str(&u);
                }
                Err(e) => diff.push_str(&format!(
                    "--- {p}: binary file ({} bytes) would be installed\n",
                    e.as_bytes().len()
                )),
            }
        }
    }
}

/// Runs setup (or, with `dry_run`, says what it would do).
pub fn setup(opts: &SetupOptions) -> anyhow::Result<SetupReport> {
    check_names(opts)?;
    let roots = Roots::new(Some(open_tree(&opts.tree)?))?;
    let (steps, subnet, shift) = steps_for(opts, &roots)?;
    let mut report = SetupReport {
        subnet,
        uid_shift: shift,
        ..Default::default()
    };
    // Compare everything before writing anything: a refusal leaves the
    // tree as it was.
    let mut todo = Vec::new();
    for s in steps {
        let now = look(&roots, &s)?;
        if !satisfied(&s, &now) {
            let (t, rel) = roots.at(&s.path);
            t.check_parents(rel)?;
            if !matches!(s.content, Content::Dir { .. }) {
                t.check_temp(rel, matches!(s.content, Content::Symlink { .. }))?;
            }
            todo.push((s, now));
        }
    }
    if opts.dry_run {
        for (s, now) in &todo {
            describe(s, now, &mut report.diff);
            report.changed.push(s.path.display().to_string());
        }
        return Ok(report);
    }
    if todo.is_empty() {
        return Ok(report);
    }
    let mut record = Record::load(&opts.state_dir, &opts.name)?.unwrap_or(Record {
        version: 1,
        machine: opts.name.clone(),
        tree: None,
        entries: vec![],
    });
    record.tree = Some(opts.tree.clone());
    let backups = backup_dir(&roots.host, &opts.state_dir, &opts.name)?;
    for (step, now) in &todo {
        let (t, rel) = roots.at(&step.path);
        let parent_owner = if roots.in_tree(&step.path) {
            (shift, shift)
        } else {
            (0, 0)
        };
        for d in t.make_parents(rel, Meta::new(parent_owner, 0o755))? {
            record.entries.push(Entry {
                path: t.display(&d),
                kind: Kind::Dir,
                backup: None,
                after: 0,
                edits: vec![],
                before: None,
            });
        }
        save(&record, &opts.state_dir)?;
        let prior = record.find(&step.path).cloned();
        let (backup, before) = match (&prior, &now.found, &step.content) {
            (Some(e), _, _) => (e.backup.clone(), e.before),
            (None, Found::Missing, _) => (None, None),
            // Existed: never removed, only given its owner and mode back.
            (None, found, Content::Dir { .. }) => (Some(PathBuf::new()), found.meta()),
            (None, found, _) => {
                let b = backups.join(format!("{}", record.entries.len()));
                keep_backup(&roots.host, found, now.content.as_deref(), &b)
                    .with_context(|| format!("can't keep a backup of {}", step.path.display()))?;
                (Some(b), found.meta())
            }
        };
        let kind = write_step(t, rel, step, now)?;
        let after = fingerprint_now(t, rel, &kind)?.unwrap_or(0);
        let mut edits = prior.as_ref().map(|e| e.edits.clone()).unwrap_or_default();
        if let Content::Edited { edits: new, .. } = &step.content {
            for e in new {
                if !edits.contains(e) {
                    edits.push(e.clone());
                }
            }
        }
        record.entries.retain(|e| e.path != step.path);
        record.entries.push(Entry {
            path: step.path.clone(),
            kind,
            backup,
            after,
            edits,
            before,
        });
        report.changed.push(step.path.display().to_string());
        // Saved after every step: if a later one fails, remove still knows
        // everything done so far.
        save(&record, &opts.state_dir)?;
    }
    Ok(report)
}

fn save(record: &Record, state_dir: &Path) -> anyhow::Result<()> {
    let path = Record::path(state_dir, &record.machine);
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(record)?)?;
    fs::rename(&tmp, &path)?;
    Ok(())
}

/// Who runs setup (root), as the owner of what it keeps for itself.
fn me() -> (u32, u32) {
    (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    )
}

/// `abs` below the host's root, as [`Tree::host`] resolves it.
fn host_rel(abs: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(abs)?;
    Ok(abs.strip_prefix("/").unwrap_or(&abs).to_path_buf())
}

/// Makes the machine's backup directory, or takes an existing one back:
/// setup's own and 0700, through its descriptor (never through a link),
/// as it holds copies of the tree's `/etc/shadow` and `/etc/gshadow`.
fn backup_dir(host: &Tree, state_dir: &Path, machine: &str) -> anyhow::Result<PathBuf> {
    let backups = Record::backup_dir(state_dir, machine);
    let shown = || format!("can't create {}", backups.display());
    if let Some(up) = backups.parent() {
        fs::create_dir_all(up).with_context(shown)?;
    }
    host.dir(&host_rel(&backups)?, Meta::new(me(), 0o700))
        .with_context(shown)?;
    Ok(backups)
}

/// Keeps a copy of what was there (a file's content or a link) in the
/// backup directory: a file is created afresh (whatever had its name is
/// unlinked first), never through a link, readable by setup's user only.
fn keep_backup(host: &Tree, found: &Found, content: Option<&[u8]>, to: &Path) -> io::Result<()> {
    let rel = host_rel(to)?;
    host.remove_file(&rel)?;
    match found {
        Found::Link(target, _) => host.symlink_atomic(&rel, target, me()),
        _ => {
            if host.create_new(&rel, content.unwrap_or_default(), Meta::new(me(), 0o600))? {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "{} appeared while setup was writing it",
                    to.display()
                )))
            }
        }
    }
}

/// The fingerprint of what is at `rel` now, if anything.
fn fingerprint_now(t: &Tree, rel: &Path, kind: &Kind) -> io::Result<Option<u64>> {
    Ok(match kind {
        Kind::File => t.read(rel)?.map(|(b, _)| fingerprint(&b)),
        Kind::Symlink => match t.lstat(rel)? {
            Found::Link(target, _) => Some(fingerprint(target.as_os_str().as_encoded_bytes())),
            Found::Missing => None,
            // Something else took its place: not what setup left.
            _ => Some(!0),
        },
        Kind::Dir => match t.lstat(rel)? {
            Found::Dir(_) => Some(0),
            Found::Missing => None,
            _ => Some(!0),
        },
    })
}

/// Writes one step; returns what kind of thing it made.
fn write_step(t: &Tree, rel: &Path, step: &Step, now: &Now) -> anyhow::Result<Kind> {
    match &step.content {
        Content::Dir { .. } => {
            t.dir(rel, after_meta(step, now))?;
            Ok(Kind::Dir)
        }
        Content::Symlink { target } => {
            t.symlink_atomic(rel, target, step.owner)?;
            Ok(Kind::Symlink)
        }
        Content::File { .. } | Content::Edited { .. } => {
            let bytes = after_bytes(step, now).expect("a file step");
            t.write_atomic(rel, &bytes, after_meta(step, now))?;
            Ok(Kind::File)
        }
    }
}

/// What `remove` did.
#[derive(Debug, Default)]
pub struct RemoveReport {
    pub undone: Vec<String>,
    pub kept: Vec<String>,
}

/// Takes back what setup recorded, newest first, under the same rules as
/// setup: paths in the tree are resolved inside it, nothing is written
/// through a link, and restored files get their owner and mode back.
pub fn remove(machine: &str, state_dir: &Path) -> anyhow::Result<RemoveReport> {
    let record = Record::load(state_dir, machine)?.with_context(|| {
        format!(
            "no record of a setup of {machine:?} in {}: nothing to remove",
            state_dir.join("machines").display()
        )
    })?;
    let tree_path = record.tree_root();
    // A tree that is gone has nothing left to take back.
    let tree = tree_path.as_deref().and_then(|p| Tree::container(p).ok());
    let tree_gone = tree.is_none();
    let roots = Roots::new(tree)?;
    let mut rep = RemoveReport::default();
    for e in record.entries.iter().rev() {
        let p = e.path.display().to_string();
        if tree_gone && tree_path.as_ref().is_some_and(|t| e.path.starts_with(t)) {
            continue;
        }
        let (t, rel) = roots.at(&e.path);
        if let Err(err) = undo_entry(t, rel, e, &mut rep) {
            let msg = format!("{err:#}");
            match msg.strip_prefix(p.as_str()) {
                Some(why) => rep.kept.push(format!("{p}: it{why}")),
                None => rep.kept.push(format!("{p}: {msg}")),
            }
        }
    }
    let _ = fs::remove_dir_all(Record::backup_dir(state_dir, machine));
    fs::remove_file(Record::path(state_dir, machine))?;
    Ok(rep)
}

/// Takes back one entry.
fn undo_entry(t: &Tree, rel: &Path, e: &Entry, rep: &mut RemoveReport) -> anyhow::Result<()> {
    let p = e.path.display().to_string();
    let now = fingerprint_now(t, rel, &e.kind)?;
    let unchanged = now == Some(e.after);
    match (&e.kind, &e.backup, unchanged) {
        (Kind::Dir, Some(_), true) => {
            if let Some(m) = e.before {
                if t.set_dir_meta(rel, m)? {
                    rep.undone
                        .push(format!("gave {p} back its owner and mode ({m})"));
                }
            }
        }
        (Kind::Dir, Some(_), false) => {}
        (Kind::Dir, None, _) => match t.remove_dir(rel)? {
            Removed::Done => rep.undone.push(format!("removed {p}")),
            Removed::Missing => {}
            Removed::NotEmpty => rep.kept.push(format!("{p}: not empty, left in place")),
            Removed::NotADirectory => rep
                .kept
                .push(format!("{p}: no longer a directory, left as it is")),
        },
        (_, None, true) => {
            t.remove_file(rel)?;
            rep.undone.push(format!("removed {p}"));
        }
        (_, Some(b), true) => {
            restore(t, rel, b, e.before)?;
            rep.undone.push(format!("restored {p}"));
        }
        (Kind::File, _, false) if !e.edits.is_empty() && now.is_some() => {
            let (bytes, meta) = t.read(rel)?.context("it went away")?;
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            for ed in e.edits.iter().rev() {
                text = undo_edit(&text, ed);
            }
            if text.trim().is_empty() && e.backup.is_none() {
                t.remove_file(rel)?;
            } else {
                t.write_atomic(rel, text.as_bytes(), meta)?;
            }
            rep.undone
                .push(format!("took devbroker's lines out of {p}"));
        }
        (_, _, false) if now.is_none() => {}
        _ => rep
            .kept
            .push(format!("{p}: changed since setup, left as it is")),
    }
    Ok(())
}

/// Puts the backup `b` (a file, or a link) back at `rel`, with the owner
/// and mode it had (`before`; records without them: the owner and mode
/// setup left, and the backup's mode).
fn restore(t: &Tree, rel: &Path, b: &Path, before: Option<Meta>) -> anyhow::Result<()> {
    let bm = fs::symlink_metadata(b).with_context(|| format!("backup {}", b.display()))?;
    if bm.file_type().is_symlink() {
        let target = fs::read_link(b)?;
        let owner = match (before, t.lstat(rel)?.meta()) {
            (Some(m), _) | (None, Some(m)) => (m.uid, m.gid),
            (None, None) => (0, 0),
        };
        t.symlink_atomic(rel, &target, owner)?;
    } else {
        let bytes = fs::read(b).with_context(|| format!("backup {}", b.display()))?;
        let meta = match before {
            Some(m) => m,
            None => {
                use std::os::unix::fs::MetadataExt;
                let (uid, gid) = t
                    .lstat(rel)?
                    .meta()
                    .map(|m| (m.uid, m.gid))
                    .unwrap_or((0, 0));
                Meta::new((uid, gid), bm.mode())
            }
        };
        t.write_atomic(rel, &bytes, meta)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    /// A container tree with just what setup needs, and options that keep
    /// everything setup touches below `d`.
    fn fake_machine(d: &Path) -> SetupOptions {
        let tree = d.join("machines/ci");
        for dir in ["etc", "lib/systemd/system"] {
            fs::create_dir_all(tree.join(dir)).unwrap();
        }
        for (file, text, mode) in [
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n", 0o644),
            ("etc/group", "root:x:0:\n", 0o644),
            (
                "etc/shadow",
                "root:$6$salt$hash:19000:0:99999:7:::\n",
                0o640,
            ),
            ("etc/gshadow", "root:*::\n", 0o640),
            ("lib/systemd/system/systemd-networkd.service", "", 0o644),
            ("lib/systemd/system/systemd-networkd.socket", "", 0o644),
        ] {
            fs::write(tree.join(file), text).unwrap();
            fs::set_permissions(tree.join(file), fs::Permissions::from_mode(mode)).unwrap();
        }
        // The smallest static ELF is_static_elf takes: no program headers.
        let mut shim = b"\x7fELF\x02".to_vec();
        shim.resize(64, 0);
        fs::write(d.join("devshim"), shim).unwrap();
        fs::create_dir_all(d.join("nspawn")).unwrap();
        SetupOptions {
            name: "ci".into(),
            tree,
            nspawn_dir: d.join("nspawn"),
            run_dir: d.join("run"),
            user: "sai".into(),
            uid: 883,
            devshim: d.join("devshim"),
            state_dir: d.join("state"),
            machines_dir: d.join("machines"),
            other_machines: vec![],
            dry_run: false,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn backups_are_setups_alone() {
        let d = tempfile::tempdir().unwrap();
        let host = Tree::host().unwrap();
        let state = d.path().join("state");
        // An earlier setup's directory, readable by everyone.
        let old = Record::backup_dir(&state, "ci");
        fs::create_dir_all(&old).unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(old.join("3"), "stale").unwrap();
        fs::set_permissions(old.join("3"), fs::Permissions::from_mode(0o644)).unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, "host\n").unwrap();
        symlink(&victim, old.join("4")).unwrap();

        let backups = backup_dir(&host, &state, "ci").unwrap();
        assert_eq!(backups, old);
        assert_eq!(mode(&backups), 0o700);
        let shadow = Found::File(Meta::new((0, 0), 0o640));
        for n in ["3", "4", "5"] {
            keep_backup(
                &host,
                &shadow,
                Some(b"root:$6$x:1::::::\n"),
                &backups.join(n),
            )
            .unwrap();
            let m = fs::symlink_metadata(backups.join(n)).unwrap();
            assert!(m.is_file(), "{n}");
            assert_eq!(m.mode() & 0o7777, 0o600, "{n}");
            assert_eq!(fs::read(backups.join(n)).unwrap(), b"root:$6$x:1::::::\n");
        }
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"host\n",
            "never through the link"
        );
        let link = Found::Link("/usr/share/zoneinfo/UTC".into(), Meta::new(me(), 0o777));
        keep_backup(&host, &link, None, &backups.join("3")).unwrap();
        assert_eq!(
            fs::read_link(backups.join("3")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        // A link where the directory goes is refused, its target untouched.
        let elsewhere = d.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o755)).unwrap();
        symlink(&elsewhere, Record::backup_dir(&state, "ci2")).unwrap();
        assert!(backup_dir(&host, &state, "ci2").is_err());
        assert_eq!(mode(&elsewhere), 0o755);
    }

    #[test]
    fn setup_keeps_shadow_backups_from_other_users() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: setup gives files to the container's users, which needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let opts = fake_machine(d.path());
        // An earlier setup's backup directory, as it used to be made.
        let backups = Record::backup_dir(&opts.state_dir, "ci");
        fs::create_dir_all(&backups).unwrap();
        fs::set_permissions(&backups, fs::Permissions::from_mode(0o755)).unwrap();
        setup(&opts).unwrap();
        assert_eq!(mode(&backups), 0o700);
        let record = Record::load(&opts.state_dir, "ci").unwrap().unwrap();
        for (file, was) in [
            ("etc/shadow", "root:$6$salt$hash:19000:0:99999:7:::\n"),
            ("etc/gshadow", "root:*::\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
        ] {
            let e = record.find(&opts.tree.join(file)).unwrap();
            let b = e.backup.as_ref().unwrap();
            assert!(b.starts_with(&backups), "{}", b.display());
            assert_eq!(mode(b), 0o600, "{file}");
            assert_eq!(fs::read_to_string(b).unwrap(), was);
        }
        // The tree's files keep their own modes.
        assert_eq!(mode(&opts.tree.join("etc/shadow")), 0o640);
        remove("ci", &opts.state_dir).unwrap();
        assert_eq!(
            fs::read_to_string(opts.tree.join("etc/shadow")).unwrap(),
            "root:$6$salt$hash:19000:0:99999:7:::\n"
        );
    }

    #[test]
    fn a_fifo_for_the_nspawn_file_is_refused_not_read() {
        let d = tempfile::tempdir().unwrap();
        let opts = SetupOptions {
            dry_run: true,
            ..fake_machine(d.path())
        };
        let nspawn = opts.nspawn_dir.join("ci.nspawn");
        nix::unistd::mkfifo(&nspawn, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = format!("{:#}", setup(&opts).unwrap_err());
        assert!(e.contains("ci.nspawn is a FIFO, not a regular file"), "{e}");
        fs::remove_file(&nspawn).unwrap();
        symlink(d.path().join("devshim"), &nspawn).unwrap();
        let e = format!("{:#}", setup(&opts).unwrap_err());
        assert!(e.contains("ci.nspawn is a symbolic link"), "{e}");
        fs::remove_file(&nspawn).unwrap();
        let rep = setup(&opts).unwrap();
        assert!(
            rep.changed.iter().any(|p| p.ends_with("ci.nspawn")),
            "{rep:?}"
        );
    }

    #[test]
    fn subnets() {
        assert_eq!(
            subnet_of("[Network]\nAddress=192.168.101.9/24\n"),
            Some(101)
        );
        assert_eq!(subnet_of("Address=10.0.0.1/8"), None);
    }

    #[test]
    fn homes_are_plain_paths_in_the_tree() {
        let t = Path::new("/m/ci");
        assert_eq!(
            home_in_tree("/home/sai", "sai", t).unwrap(),
            Path::new("home/sai")
        );
        for bad in [
            "/../../etc",
            "/home/../..",
            "home/sai",
            "/",
            "",
            "/home//sai",
            "/home/./sai",
        ] {
            let e = home_in_tree(bad, "sai", t).unwrap_err().to_string();
            assert!(
                e.contains("setup makes a home only at a plain absolute path"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me), "test binaries are dynamic");
    }
}
