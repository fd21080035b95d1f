//! `devbroker machine check`: leftovers of binding devices into containers
//! by hand, which devbroker makes unnecessary (and which keep containers
//! from starting when a board is unplugged).

use std::fs;
use std::path::{Path, PathBuf};

use super::tree::Tree;

/// One leftover line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: PathBuf,
    /// 0-based line index.
    pub line: usize,
    pub text: String,
    pub why: &'static str,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}\n  {}",
            self.file.display(),
            self.line + 1,
            self.text.trim(),
            self.why
        )
    }
}

/// Where to look.
#[derive(Debug, Clone)]
pub struct Places {
    pub machine: String,
    /// `/etc/systemd/system` (for `systemd-nspawn@NAME.service.d/`).
    pub systemd_dir: PathBuf,
    /// Directories with `.nspawn` files.
    pub nspawn_dirs: Vec<PathBuf>,
    /// `/etc/udev/rules.d`.
    pub udev_dir: PathBuf,
}

/// Finds leftovers in one file's text: `what` says which kind of file it is.
pub fn scan_text(file: &Path, text: &str, what: FileKind) -> Vec<Finding> {
    let mut v = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('#') || t.starts_with(';') {
            continue;
        }
        let why = match what {
            FileKind::Dropin if t.starts_with("DeviceAllow=") => {
                Some("DeviceAllow= grants the container device nodes; devbroker serves boards over sockets instead")
            }
            FileKind::Nspawn if (t.starts_with("Bind=") || t.starts_with("BindReadOnly=")) && {
                let src = t.split_once('=').map(|x| x.1.trim().trim_start_matches(['+', '-'])).unwrap_or("");
                src.starts_with("/dev/tty") || src.starts_with("/dev/serial")
            } =>
            {
                Some("a bound device node must exist when the container starts and is lost on replug; devbroker's directory bind replaces it")
            }
            FileKind::UdevRules
                if (t.contains("MODE=\"0666\"") || t.contains("MODE:=\"0666\"")) && (t.contains("ttyUSB") || t.contains("ttyACM")) =>
            {
                Some("MODE=\"0666\" lets every local user at the boards; devbroker's rules use a group and 0660")
            }
            _ => None,
        };
        if let Some(why) = why {
            v.push(Finding {
                file: file.to_owned(),
                line: i,
                text: line.to_string(),
                why,
            });
        }
    }
    v
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dropin,
    Nspawn,
    UdevRules,
}

/// All leftovers for a machine.
pub fn scan(p: &Places) -> Vec<Finding> {
    let mut files: Vec<(PathBuf, FileKind)> = Vec::new();
    let dropins = p
        .systemd_dir
        .join(format!("systemd-nspawn@{}.service.d", p.machine));
    files.extend(
        conf_files(&dropins, ".conf")
            .into_iter()
            .map(|f| (f, FileKind::Dropin)),
    );
    for d in &p.nspawn_dirs {
        let f = d.join(format!("{}.nspawn", p.machine));
        if f.exists() {
            files.push((f, FileKind::Nspawn));
        }
    }
    files.extend(
        conf_files(&p.udev_dir, ".rules")
            .into_iter()
            .map(|f| (f, FileKind::UdevRules)),
    );
    let Ok(host) = Tree::host() else {
        return Vec::new();
    };
    files
        .into_iter()
        .flat_map(|(f, k)| {
            config_text(&host, &f)
                .map(|t| scan_text(&f, &t, k))
                .unwrap_or_default()
        })
        .collect()
}

/// A host configuration file's text, if it is (or links to) a regular
/// file: a link to a tty is never opened, a FIFO never waited on. A link
/// is read, so that its findings are reported ([`fix`] then refuses to
/// write through it and says so).
fn config_text(host: &Tree, file: &Path) -> Option<String> {
    let abs = std::path::absolute(file).ok()?;
    let rel = abs.strip_prefix("/").unwrap_or(&abs);
    let (bytes, _) = host.read_through_links(rel).ok()??;
    String::from_utf8(bytes).ok()
}

fn conf_files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What [`fix`] did.
#[derive(Debug, Default)]
pub struct Fixed {
    /// The backup of each file it changed.
    pub backups: Vec<PathBuf>,
    /// Files it would not or could not change, and why.
    pub refused: Vec<String>,
}

/// Removes the findings' lines, keeping a backup of each changed file
/// (`FILE.devbroker-bak`, numbered if one exists).
///
/// Files are edited as setup edits a tree's: the last component is never
/// followed (a link is refused, naming its target), the backup is created
/// with `O_EXCL|O_NOFOLLOW`, and the edited file is written to a temporary
/// file and renamed into place with the owner, group and mode it had.
pub fn fix(findings: &[Finding]) -> anyhow::Result<Fixed> {
    let mut files: Vec<&PathBuf> = findings.iter().map(|f| &f.file).collect();
    files.sort();
    files.dedup();
    let host = Tree::host()?;
    let mut done = Fixed::default();
    for file in files {
        let lines: Vec<usize> = findings
            .iter()
            .filter(|f| &f.file == file)
            .map(|f| f.line)
            .collect();
        match fix_file(&host, file, &lines) {
            Ok(b) => done.backups.push(b),
            Err(e) => done.refused.push(format!("{e:#}")),
        }
    }
    Ok(done)
}

/// Removes the lines at `drop` from `file`; returns its backup.
fn fix_file(host: &Tree, file: &Path, drop: &[usize]) -> anyhow::Result<PathBuf> {
    let abs = std::path::absolute(file)?;
    let rel = abs.strip_prefix("/").unwrap_or(&abs);
    let (bytes, meta) = host
        .read(rel)?
        .ok_or_else(|| anyhow::anyhow!("{} went away", file.display()))?;
    let kept: String = String::from_utf8_lossy(&bytes)
        .lines()
        .enumerate()
        .filter(|(i, _)| !drop.contains(i))
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let mut n = 0;
    let backup = loop {
        let b = PathBuf::from(match n {
            0 => format!("{}.devbroker-bak", abs.display()),
            n => format!("{}.devbroker-bak.{n}", abs.display()),
        });
        if host.create_new(b.strip_prefix("/").unwrap_or(&b), &bytes, meta)? {
            break b;
        }
        n += 1;
    };
    host.write_atomic(rel, kept.as_bytes(), meta)?;
    Ok(backup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_old_way() {
        let f = Path::new("x");
        assert_eq!(
            scan_text(
                f,
                "[Service]\nDeviceAllow=char-ttyUSB rwm\n# DeviceAllow=x\n",
                FileKind::Dropin
            )
            .len(),
            1
        );
        let n = scan_text(
            f,
            "[Files]\nBind=/dev/ttyUSB0\nBind=/srv\nBindReadOnly=/dev/serial/by-id\n",
            FileKind::Nspawn,
        );
        assert_eq!(n.iter().map(|x| x.line).collect::<Vec<_>>(), [1, 3]);
        let u = scan_text(f, "SUBSYSTEM==\"tty\", KERNEL==\"ttyUSB[0-9]*\", MODE=\"0666\"\nKERNEL==\"ttyS0\", MODE=\"0666\"\n", FileKind::UdevRules);
        assert_eq!(u.len(), 1);
    }

    #[test]
    fn only_regular_files_are_read() {
        let d = tempfile::tempdir().unwrap();
        let udev = d.path().join("rules.d");
        fs::create_dir(&udev).unwrap();
        let line = "KERNEL==\"ttyUSB[0-9]*\", MODE=\"0666\"\n";
        fs::write(udev.join("50-boards.rules"), line).unwrap();
        let elsewhere = d.path().join("elsewhere.rules");
        fs::write(&elsewhere, line).unwrap();
        std::os::unix::fs::symlink(&elsewhere, udev.join("60-link.rules")).unwrap();
        // A link to a regular file is read (and reported); a link to a
        // device is never opened, a FIFO never waited on.
        std::os::unix::fs::symlink("/dev/null", udev.join("70-null.rules")).unwrap();
        nix::unistd::mkfifo(
            &udev.join("80-fifo.rules"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let found = scan(&Places {
            machine: "ci".into(),
            systemd_dir: d.path().join("systemd"),
            nspawn_dirs: vec![],
            udev_dir: udev.clone(),
        });
        assert_eq!(
            found.iter().map(|f| f.file.clone()).collect::<Vec<_>>(),
            [udev.join("50-boards.rules"), udev.join("60-link.rules")]
        );
    }
}
