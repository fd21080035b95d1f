//! `devbroker machine check`: leftovers of binding devices into containers
//! by hand, which devbroker makes unnecessary (and which keep containers
//! from starting when a board is unplugged).

use std::fs;
use std::path::{Path, PathBuf};

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
    files
        .into_iter()
        .flat_map(|(f, k)| {
            fs::read_to_string(&f)
                .map(|t| scan_text(&f, &t, k))
                .unwrap_or_default()
        })
        .collect()
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

/// Removes the findings' lines, keeping a backup of each changed file
/// (`FILE.devbroker-bak`, numbered if one exists). Returns the backups.
pub fn fix(findings: &[Finding]) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<&PathBuf> = findings.iter().map(|f| &f.file).collect();
    files.sort();
    files.dedup();
    let mut backups = Vec::new();
    for file in files {
        let text = fs::read_to_string(file)?;
        let drop: Vec<usize> = findings
            .iter()
            .filter(|f| &f.file == file)
            .map(|f| f.line)
            .collect();
        let kept: String = text
            .lines()
            .enumerate()
            .filter(|(i, _)| !drop.contains(i))
            .map(|(_, l)| format!("{l}\n"))
            .collect();
        let mut backup = PathBuf::from(format!("{}.devbroker-bak", file.display()));
        let mut n = 1;
        while backup.exists() {
            backup = PathBuf::from(format!("{}.devbroker-bak.{n}", file.display()));
            n += 1;
        }
        fs::copy(file, &backup)?;
        let tmp = PathBuf::from(format!("{}.devbroker-tmp", file.display()));
        fs::write(&tmp, kept)?;
        fs::set_permissions(&tmp, fs::metadata(file)?.permissions())?;
        fs::rename(&tmp, file)?;
        backups.push(backup);
    }
    Ok(backups)
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
}
