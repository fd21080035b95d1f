//! `devbroker machine setup` and `machine remove`: what an admin did by hand
//! for each Sai container, minus the device binding, done idempotently.
//!
//! Setup is planned first — a list of [`Step`]s, each a path and what should
//! be there — then compared with what is there. Only differences are written
//! (atomically: a temporary file renamed into place), recorded for `remove`,
//! and, with `--dry-run`, printed as a unified diff instead.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::accounts::{append, remove_line, user_lines};
use super::ini;
use super::name;
use super::record::{current, Edit, Entry, Kind, Record};

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
enum Want {
    File {
        content: Vec<u8>,
        mode: u32,
    },
    /// A text file changed by line edits (created empty if missing).
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
    want: Want,
    owner: (u32, u32),
}

/// What setup did or would do.
#[derive(Debug, Default)]
pub struct Report {
    pub changed: Vec<String>,
    pub subnet: u8,
    pub uid_shift: u32,
    pub diff: String,
}

fn in_tree(tree: &Path, p: &str) -> PathBuf {
    tree.join(p.trim_start_matches('/'))
}

/// The `192.168.N.9/24` in a host0 network file.
fn subnet_of(text: &str) -> Option<u8> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("Address=")?;
        let rest = v.strip_prefix("192.168.")?;
        rest.split('.').next()?.parse().ok()
    })
}

/// A `192.168.N.0/24` no other machine uses: this tree's own if it has one.
fn pick_subnet(tree: &Path, machines_dir: &Path) -> anyhow::Result<u8> {
    let own = fs::read_to_string(in_tree(tree, "/etc/systemd/network/50-host0.network")).ok();
    if let Some(n) = own.as_deref().and_then(subnet_of) {
        return Ok(n);
    }
    let mut used = Vec::new();
    if let Ok(rd) = fs::read_dir(machines_dir) {
        for e in rd.flatten() {
            let other = e.path();
            if fs::canonicalize(&other).ok() == fs::canonicalize(tree).ok() {
                continue;
            }
            if let Some(n) =
                fs::read_to_string(in_tree(&other, "/etc/systemd/network/50-host0.network"))
                    .ok()
                    .as_deref()
                    .and_then(subnet_of)
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
fn unit_in_tree(tree: &Path, unit: &str) -> Option<PathBuf> {
    ["/lib/systemd/system", "/usr/lib/systemd/system"]
        .iter()
        .map(|d| PathBuf::from(d).join(unit))
        .find(|p| in_tree(tree, p.to_str().unwrap()).exists())
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

fn plan(opts: &SetupOptions) -> anyhow::Result<(Vec<Step>, u8, u32)> {
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
    let meta = fs::metadata(&opts.tree).with_context(|| {
        format!(
            "the tree {} is not there: make one (debootstrap, machinectl pull-tar) or pass --tree",
            opts.tree.display()
        )
    })?;
    if !opts.tree.join("etc").is_dir() {
        bail!(
            "{} has no etc/: is it a container's root directory?",
            opts.tree.display()
        );
    }
    // A tree used with private users (-U) is owned by its shifted root.
    let shift = meta.uid();
    let root = (shift, shift);
    let shim = fs::read(&opts.devshim).with_context(|| {
        format!(
            "can't read devshim at {}; pass --devshim",
            opts.devshim.display()
        )
    })?;
    if !is_static_elf(&shim) {
        bail!("{} is not a static executable; containers need the static devshim (see README, \"Building devshim\")", opts.devshim.display());
    }
    let n = pick_subnet(&opts.tree, &opts.machines_dir)?;
    let t = |p: &str| in_tree(&opts.tree, p);
    let mut steps = vec![
        Step { path: t("/etc/hostname"), want: Want::File { content: format!("{}\n", opts.name).into_bytes(), mode: 0o644 }, owner: root },
        Step {
            path: t("/etc/systemd/network/50-host0.network"),
            want: Want::File {
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
    if unit_in_tree(&opts.tree, "systemd-resolved.service").is_some() {
        enable.push(("multi-user.target.wants", "systemd-resolved.service"));
    }
    for (wants, unit) in enable {
        let target = unit_in_tree(&opts.tree, unit).with_context(|| {
            format!(
                "{} has no {unit}: install systemd in the tree",
                opts.tree.display()
            )
        })?;
        steps.push(Step {
            path: t(&format!("/etc/systemd/system/{wants}/{unit}")),
            want: Want::Symlink { target },
            owner: root,
        });
    }
    steps.push(Step {
        path: t("/usr/local/bin/devshim"),
        want: Want::File {
            content: shim,
            mode: 0o755,
        },
        owner: root,
    });
    steps.push(Step {
        path: t("/etc/systemd/system/devshim.service"),
        want: Want::File {
            content: devshim_unit(&opts.user).into_bytes(),
            mode: 0o644,
        },
        owner: root,
    });
    steps.push(Step {
        path: t("/etc/systemd/system/multi-user.target.wants/devshim.service"),
        want: Want::Symlink {
            target: PathBuf::from("/etc/systemd/system/devshim.service"),
        },
        owner: root,
    });
    let passwd = fs::read_to_string(t("/etc/passwd")).unwrap_or_default();
    let group = fs::read_to_string(t("/etc/group")).unwrap_or_default();
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
                want: Want::Edited {
                    edits: vec![Edit::AppendLine { line: line.clone() }],
                    mode,
                },
                owner: root,
            });
        }
    }
    let job = (shift + opts.uid, shift + opts.uid);
    let home = passwd
        .lines()
        .find(|l| l.starts_with(&format!("{}:", opts.user)))
        .and_then(|l| l.split(':').nth(5))
        .map(str::to_owned)
        .unwrap_or(format!("/home/{}", opts.user));
    steps.push(Step {
        path: t(&home),
        want: Want::Dir { mode: 0o750 },
        owner: job,
    });
    let bind = format!(
        "{}:/run/devbroker",
        opts.run_dir.join("machines").join(&opts.name).display()
    );
    steps.push(Step {
        path: opts.nspawn_dir.join(format!("{}.nspawn", opts.name)),
        want: Want::Edited {
            edits: vec![
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
                Edit::IniAdd {
                    section: "Files".into(),
                    key: "Bind".into(),
                    value: bind,
                },
            ],
            mode: 0o644,
        },
        owner: (0, 0),
    });
    steps.push(Step {
        path: opts.run_dir.join("machines"),
        want: Want::Dir { mode: 0o700 },
        owner: (0, 0),
    });
    steps.push(Step {
        path: opts.run_dir.join("machines").join(&opts.name),
        want: Want::Dir { mode: 0o755 },
        owner: root,
    });
    Ok((steps, n, shift))
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
    }
}

/// The content a step leaves, given what is there now.
fn after_bytes(step: &Step) -> Option<Vec<u8>> {
    match &step.want {
        Want::File { content, .. } => Some(content.clone()),
        Want::Edited { edits, .. } => {
            let mut text = fs::read_to_string(&step.path).unwrap_or_default();
            for e in edits {
                text = apply_edit(&text, e);
            }
            Some(text.into_bytes())
        }
        _ => None,
    }
}

/// Whether the path already holds what the step wants (ownership included).
fn satisfied(step: &Step) -> bool {
    let owned = |m: &fs::Metadata| (m.uid(), m.gid()) == step.owner;
    match &step.want {
        Want::File { mode, .. } | Want::Edited { mode, .. } => {
            let Ok(m) = fs::symlink_metadata(&step.path) else {
                return false;
            };
            m.is_file()
                && owned(&m)
                && m.mode() & 0o7777 == *mode
                && fs::read(&step.path).ok() == after_bytes(step)
        }
        Want::Symlink { target } => fs::read_link(&step.path).ok().as_ref() == Some(target),
        Want::Dir { mode } => fs::metadata(&step.path)
            .is_ok_and(|m| m.is_dir() && owned(&m) && m.mode() & 0o7777 == *mode),
    }
}

fn describe(step: &Step, diff: &mut String) {
    let p = step.path.display().to_string();
    match &step.want {
        Want::Symlink { target } => diff.push_str(&format!(
            "--- {p}: link to {} would be made\n",
            target.display()
        )),
        Want::Dir { mode } => diff.push_str(&format!(
            "--- {p}: directory (mode {mode:o}, owner {}:{}) would be made or fixed\n",
            step.owner.0, step.owner.1
        )),
        Want::File { .. } | Want::Edited { .. } => {
            let after = after_bytes(step).unwrap_or_default();
            match String::from_utf8(after) {
                Ok(after) => {
                    let before = fs::read_to_string(&step.path).unwrap_or_default();
                    let from = if step.path.exists() {
                        p.clone()
                    } else {
                        "/dev/null".into()
                    };
                    let u = similar::TextDiff::from_lines(&before, &after)
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
pub fn setup(opts: &SetupOptions) -> anyhow::Result<Report> {
    let (steps, subnet, shift) = plan(opts)?;
    let mut report = Report {
        subnet,
        uid_shift: shift,
        ..Default::default()
    };
    let todo: Vec<Step> = steps.into_iter().filter(|s| !satisfied(s)).collect();
    if opts.dry_run {
        for s in &todo {
            describe(s, &mut report.diff);
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
        entries: vec![],
    });
    let backups = Record::backup_dir(&opts.state_dir, &opts.name);
    fs::create_dir_all(&backups).with_context(|| format!("can't create {}", backups.display()))?;
    for step in &todo {
        let parent_owner = if step.path.starts_with(&opts.tree) {
            (shift, shift)
        } else {
            (0, 0)
        };
        make_parents(&step.path, parent_owner, &mut record)?;
        save(&record, &opts.state_dir)?;
        let existed = fs::symlink_metadata(&step.path).is_ok();
        let prior = record.find(&step.path).cloned();
        let backup = match (&prior, existed, &step.want) {
            (Some(e), _, _) => e.backup.clone(),
            (None, true, Want::Dir { .. }) => Some(PathBuf::new()), // existed: never remove it
            (None, true, _) => {
                let b = backups.join(format!("{}", record.entries.len()));
                copy_any(&step.path, &b)?;
                Some(b)
            }
            (None, false, _) => None,
        };
        let kind = write_step(step)?;
        let after = current(&step.path, &kind).unwrap_or(0);
        let mut edits = prior.as_ref().map(|e| e.edits.clone()).unwrap_or_default();
        if let Want::Edited { edits: new, .. } = &step.want {
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

/// Makes missing parent directories, recording each so remove can take it back.
fn make_parents(path: &Path, owner: (u32, u32), record: &mut Record) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    let mut p = path.parent();
    while let Some(d) = p {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_path_buf());
        p = d.parent();
    }
    for d in missing.into_iter().rev() {
        fs::create_dir(&d).with_context(|| format!("can't create {}", d.display()))?;
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755))?;
        std::os::unix::fs::chown(&d, Some(owner.0), Some(owner.1))?;
        record.entries.push(Entry {
            path: d,
            kind: Kind::Dir,
            backup: None,
            after: 0,
            edits: vec![],
        });
    }
    Ok(())
}

fn copy_any(from: &Path, to: &Path) -> io::Result<()> {
    let m = fs::symlink_metadata(from)?;
    let _ = fs::remove_file(to);
    if m.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else {
        fs::copy(from, to).map(|_| ())
    }
}

/// Writes one step atomically; returns what kind of thing it made.
fn write_step(step: &Step) -> anyhow::Result<Kind> {
    let p = &step.path;
    let tmp = p.with_file_name(format!(
        ".{}.devbroker-tmp",
        p.file_name().unwrap().to_string_lossy()
    ));
    let ctx = || format!("can't write {}", p.display());
    match &step.want {
        Want::Dir { mode } => {
            if !p.is_dir() {
                fs::create_dir(p).with_context(ctx)?;
            }
            fs::set_permissions(p, fs::Permissions::from_mode(*mode)).with_context(ctx)?;
            std::os::unix::fs::chown(p, Some(step.owner.0), Some(step.owner.1))
                .with_context(ctx)?;
            Ok(Kind::Dir)
        }
        Want::Symlink { target } => {
            let _ = fs::remove_file(&tmp);
            std::os::unix::fs::symlink(target, &tmp).with_context(ctx)?;
            std::os::unix::fs::lchown(&tmp, Some(step.owner.0), Some(step.owner.1))
                .with_context(ctx)?;
            fs::rename(&tmp, p).with_context(ctx)?;
            Ok(Kind::Symlink)
        }
        Want::File { mode, .. } | Want::Edited { mode, .. } => {
            let bytes = after_bytes(step).unwrap();
            fs::write(&tmp, &bytes).with_context(ctx)?;
            fs::set_permissions(&tmp, fs::Permissions::from_mode(*mode)).with_context(ctx)?;
            std::os::unix::fs::chown(&tmp, Some(step.owner.0), Some(step.owner.1))
                .with_context(ctx)?;
            fs::rename(&tmp, p).with_context(ctx)?;
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

/// Takes back what setup recorded, newest first.
pub fn remove(machine: &str, state_dir: &Path) -> anyhow::Result<RemoveReport> {
    let record = Record::load(state_dir, machine)?.with_context(|| {
        format!(
            "no record of a setup of {machine:?} in {}: nothing to remove",
            state_dir.join("machines").display()
        )
    })?;
    let mut rep = RemoveReport::default();
    for e in record.entries.iter().rev() {
        let p = e.path.display().to_string();
        let now = current(&e.path, &e.kind);
        let unchanged = now == Some(e.after);
        match (&e.kind, &e.backup, unchanged) {
            (Kind::Dir, Some(_), _) => {}
            (Kind::Dir, None, _) => match fs::remove_dir(&e.path) {
                Ok(()) => rep.undone.push(format!("removed {p}")),
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(_) => rep.kept.push(format!("{p}: not empty, left in place")),
            },
            (_, None, true) => {
                fs::remove_file(&e.path)?;
                rep.undone.push(format!("removed {p}"));
            }
            (_, Some(b), true) => {
                copy_any(b, &e.path)?;
                rep.undone.push(format!("restored {p}"));
            }
            (Kind::File, _, false) if !e.edits.is_empty() && now.is_some() => {
                let mut text = fs::read_to_string(&e.path)?;
                for ed in e.edits.iter().rev() {
                    text = undo_edit(&text, ed);
                }
                if text.trim().is_empty() && e.backup.is_none() {
                    fs::remove_file(&e.path)?;
                } else {
                    fs::write(&e.path, text)?;
                }
                rep.undone
                    .push(format!("took devbroker's lines out of {p}"));
            }
            (_, _, false) if now.is_none() => {}
            _ => rep
                .kept
                .push(format!("{p}: changed since setup, left as it is")),
        }
    }
    let _ = fs::remove_dir_all(Record::backup_dir(state_dir, machine));
    fs::remove_file(Record::path(state_dir, machine))?;
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        assert_eq!(
            subnet_of("[Network]\nAddress=192.168.101.9/24\n"),
            Some(101)
        );
        assert_eq!(subnet_of("Address=10.0.0.1/8"), None);
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me), "test binaries are dynamic");
    }
}
