//! `devbroker boards [--suggest]`: the adapters plugged in now, what the
//! config makes of each, and a ready `[[board]]` entry for each one it does
//! not name.
//!
//! [`report`] is pure: adapters (as a discovery source lists them) and a
//! config in, a [`Survey`] out. A suggested entry gets a board name derived
//! from the adapter's by-id name (or serial number) and one tty, `console`,
//! whose `match` picks this adapter and no other one present, and that
//! [`config::parse`](crate::config::parse) accepts next to the config and the
//! other suggestions: it may not overlap any match there. The keys tried, in
//! order: `usb` + `serial`; `usb` + `path` when there is no serial number;
//! the `by-id` name; then more keys together (`usb` + `serial` + `path` for
//! clones sharing a serial number, the by-id name with the rest).
//!
//! [`present_udev`] and [`present_by_id`] list the adapters present now, once
//! (no monitor), as the two sources of `devbroker run` see them.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use wire::names::{check_link_name, check_name, socket_name, suggest_name, MAX_NAME};

use crate::adapter::Adapter;
use crate::config::{could_match_same, is_match_value, Config, Match, DEFAULT_RATE};
use crate::plan::{self, TtyKey};

/// The tty a suggested board gets.
pub const SUGGESTED_TTY: &str = "console";

/// What the config makes of the adapters present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// Each adapter present, by id.
    pub adapters: Vec<AdapterReport>,
    /// Configured ttys no adapter present is assigned to.
    pub missing: Vec<TtyKey>,
}

/// One adapter present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterReport {
    pub adapter: Adapter,
    /// Configured ttys whose match this adapter satisfies.
    pub matches: Vec<TtyKey>,
    /// The ttys the broker would serve through this adapter (for the others
    /// in `matches`, another adapter that matches too is used).
    pub serves: Vec<TtyKey>,
    /// For an adapter no configured tty matches: an entry to add.
    pub suggestion: Option<Suggestion>,
    /// Why an unconfigured adapter got no suggestion, or what to fix about a
    /// configured one.
    pub note: Option<String>,
}

/// A `[[board]]` entry for one unconfigured adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    pub board: String,
    pub tty: String,
    pub matcher: Match,
    /// The entry as TOML, ready to append to the config.
    pub toml: String,
}

/// Lists `adapters` against `config` and suggests an entry for each adapter
/// the config does not name.
pub fn survey(adapters: &[Adapter], config: &Config) -> Survey {
    let by_id: BTreeMap<String, Adapter> =
        adapters.iter().map(|a| (a.id.clone(), a.clone())).collect();
    let (assigned, _warnings) = plan::assign(config, &by_id);

    let mut configured: Vec<(TtyKey, Match)> = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut sockets: BTreeSet<String> = BTreeSet::new();
    for b in &config.boards {
        names.insert(b.name.clone());
        for t in &b.ttys {
            sockets.insert(socket_name(&b.name, &t.name));
            configured.push((
                TtyKey {
                    board: b.name.clone(),
                    tty: t.name.clone(),
                },
                t.matcher.clone(),
            ));
        }
    }

    let mut suggested: Vec<Match> = Vec::new();
    let mut out = Vec::new();
    for a in by_id.values() {
        let matches: Vec<TtyKey> = configured
            .iter()
            .filter(|(_, m)| m.matches(a))
            .map(|(k, _)| k.clone())
            .collect();
        let serves: Vec<TtyKey> = assigned
            .iter()
            .filter(|(_, x)| x.id == a.id)
            .map(|(k, _)| k.clone())
            .collect();
        let mut rep = AdapterReport {
            adapter: a.clone(),
            matches,
            serves,
            suggestion: None,
            note: None,
        };
        if !rep.matches.is_empty() {
            let shadowed: Vec<String> = rep
                .matches
                .iter()
                .filter(|k| !rep.serves.contains(k))
                .map(|k| {
                    format!(
                        "{k} matches it too, but uses {}",
                        assigned.get(k).map_or("another adapter", |x| x.id.as_str())
                    )
                })
                .collect();
            if !shadowed.is_empty() {
                rep.note = Some(format!(
                    "{}: add serial or path to the match to tell the adapters apart",
                    shadowed.join("; ")
                ));
            }
            out.push(rep);
            continue;
        }
        let others: Vec<&Adapter> = by_id.values().filter(|o| o.id != a.id).collect();
        match pick_match(a, &others, &configured, &suggested) {
            Ok(m) => {
                let board = board_name(a, &names, &sockets);
                names.insert(board.clone());
                sockets.insert(socket_name(&board, SUGGESTED_TTY));
                suggested.push(m.clone());
                rep.suggestion = Some(Suggestion {
                    toml: snippet(a, &board, &m),
                    board,
                    tty: SUGGESTED_TTY.into(),
                    matcher: m,
                });
            }
            Err(why) => rep.note = Some(why),
        }
        out.push(rep);
    }

    let missing = configured
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| !assigned.contains_key(k))
        .collect();
    Survey {
        adapters: out,
        missing,
    }
}

/// A config value `config::parse` accepts for `serial` and `path`.
fn usable(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| is_match_value(s))
}

/// The matches worth trying for `a`, best first.
pub fn candidates(a: &Adapter) -> Vec<Match> {
    let serial = usable(&a.serial);
    let path = usable(&a.path);
    let by_id = a.by_id.clone().filter(|b| check_link_name(b).is_ok());
    let usb = a.usb;
    let mut out = Vec::new();
    if serial.is_some() {
        out.push(Match {
            usb,
            serial: serial.clone(),
            ..Match::default()
        });
    } else if path.is_some() {
        out.push(Match {
            usb,
            path: path.clone(),
            ..Match::default()
        });
    }
    if by_id.is_some() {
        out.push(Match {
            by_id: by_id.clone(),
            ..Match::default()
        });
    }
    // Clones sharing a serial number: the port path tells them apart.
    out.push(Match {
        usb,
        serial: serial.clone(),
        path: path.clone(),
        ..Match::default()
    });
    out.push(Match {
        by_id,
        usb,
        serial,
        path,
    });
    out.push(Match {
        usb,
        ..Match::default()
    });
    let mut seen = Vec::new();
    out.retain(|m| {
        if *m == Match::default() || seen.contains(m) {
            return false;
        }
        seen.push(m.clone());
        true
    });
    out
}

/// The first candidate that matches `a`, no other adapter present, and
/// overlaps neither a configured tty's match nor an earlier suggestion; or
/// why there is none.
fn pick_match(
    a: &Adapter,
    others: &[&Adapter],
    configured: &[(TtyKey, Match)],
    suggested: &[Match],
) -> Result<Match, String> {
    let mut first_why = None;
    for m in candidates(a) {
        let why = if !m.matches(a) {
            Some("it does not match itself".to_string())
        } else if let Some(o) = others.iter().find(|o| m.matches(o)) {
            Some(format!(
                "{} would match adapter {} too",
                match_toml(&m),
                o.id
            ))
        } else if let Some((k, _)) = configured.iter().find(|(_, c)| could_match_same(&m, c)) {
            Some(format!(
                "{} could match the same adapter as {k}",
                match_toml(&m)
            ))
        } else if suggested.iter().any(|s| could_match_same(&m, s)) {
            Some(format!(
                "{} could match the same adapter as another suggestion",
                match_toml(&m)
            ))
        } else {
            None
        };
        match why {
            None => return Ok(m),
            Some(w) => {
                first_why.get_or_insert(w);
            }
        }
    }
    Err(format!(
        "no match tells this adapter apart: {}",
        first_why.unwrap_or_else(|| "it has no by-id name, serial, path or usb id".into())
    ))
}

/// `usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0` → `FTDI_FT232R_USB_UART_A1B2C3`.
fn by_id_stem(link: &str) -> &str {
    let s = link.strip_prefix("usb-").unwrap_or(link);
    let Some(i) = s.rfind("-if") else { return s };
    let rest = &s[i + 3..];
    let (iface, tail) = rest.split_at(rest.len().min(2));
    let port_ok = tail.is_empty()
        || tail
            .strip_prefix("-port")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if i > 0 && iface.len() == 2 && iface.bytes().all(|b| b.is_ascii_hexdigit()) && port_ok {
        &s[..i]
    } else {
        s
    }
}

/// A board name for `a` that no board in `names` has and whose
/// `<name>.console.sock` no tty in `sockets` needs.
fn board_name(a: &Adapter, names: &BTreeSet<String>, sockets: &BTreeSet<String>) -> String {
    let raw = if let Some(b) = &a.by_id {
        by_id_stem(b).to_string()
    } else if let Some(s) = &a.serial {
        format!("board-{s}")
    } else if let Some(p) = &a.path {
        format!("board-{p}")
    } else {
        "board".to_string()
    };
    let tidy = |s: &str| s.trim_end_matches(['-', '.']).to_string();
    let mut base = tidy(&suggest_name(&raw));
    if base.is_empty() {
        base = "board".into();
    }
    for n in 1u32.. {
        let name = if n == 1 {
            base.clone()
        } else {
            let suffix = format!("-{n}");
            let mut b = base.clone();
            b.truncate(MAX_NAME - suffix.len());
            format!("{}{suffix}", tidy(&b))
        };
        if check_name(&name).is_ok()
            && !names.contains(&name)
            && !sockets.contains(&socket_name(&name, SUGGESTED_TTY))
        {
            return name;
        }
    }
    unreachable!("some suffix is free")
}

/// A TOML string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A match as an inline TOML table, keys in the order docs/admin.md gives them.
pub fn match_toml(m: &Match) -> String {
    let mut parts = Vec::new();
    if let Some(u) = &m.usb {
        parts.push(format!("usb = {}", quote(&u.to_string())));
    }
    if let Some(s) = &m.serial {
        parts.push(format!("serial = {}", quote(s)));
    }
    if let Some(p) = &m.path {
        parts.push(format!("path = {}", quote(p)));
    }
    if let Some(b) = &m.by_id {
        parts.push(format!("by-id = {}", quote(b)));
    }
    format!("{{ {} }}", parts.join(", "))
}

fn snippet(a: &Adapter, board: &str, m: &Match) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# {}", describe(a));
    let _ = writeln!(s, "[[board]]");
    let _ = writeln!(s, "name = {}", quote(board));
    let _ = writeln!(
        s,
        "# compatible = [\"esp32\"]          # types, as in Sai's device conf"
    );
    let _ = writeln!(
        s,
        "# machines = [\"sai-builder-1\"]    # containers that may use it"
    );
    let _ = writeln!(
        s,
        "# host-groups = [\"dialout\"]       # host groups that may use it"
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "[[board.tty]]");
    let _ = writeln!(s, "name = {}", quote(SUGGESTED_TTY));
    let _ = writeln!(s, "rate = {DEFAULT_RATE}");
    let _ = writeln!(s, "match = {}", match_toml(m));
    s
}

/// The adapter's device, and its by-id name when the device is not its link.
fn describe(a: &Adapter) -> String {
    let dev = a.device.display().to_string();
    match &a.by_id {
        Some(b) if a.device.file_name() != Some(OsStr::new(b)) => format!("{dev} ({b})"),
        _ => dev,
    }
}

impl Survey {
    /// Every suggested entry, each after a blank line.
    pub fn snippets(&self) -> String {
        let mut s = String::new();
        for r in &self.adapters {
            if let Some(sg) = &r.suggestion {
                s.push('\n');
                s.push_str(&sg.toml);
            }
        }
        s
    }

    /// The listing; with `suggest`, as TOML comments followed by the
    /// suggested entries, so the whole output can be appended to the config.
    /// The listing as JSON (`boards --json`), for scripts: each adapter
    /// with its identities, the ttys it matches and serves, and the entry
    /// suggested for it; the configured ttys no adapter serves.
    pub fn to_json(&self) -> serde_json::Value {
        let key = |k: &TtyKey| k.to_string();
        serde_json::json!({
            "version": 1,
            "adapters": self.adapters.iter().map(|r| serde_json::json!({
                "device": r.adapter.device.display().to_string(),
                "by_id": r.adapter.by_id,
                "serial": r.adapter.serial,
                "path": r.adapter.path,
                "usb": r.adapter.usb.map(|u| u.to_string()),
                "matches": r.matches.iter().map(key).collect::<Vec<_>>(),
                "serves": r.serves.iter().map(key).collect::<Vec<_>>(),
                "suggestion": r.suggestion.as_ref().map(|s| s.toml.clone()),
                "note": r.note,
            })).collect::<Vec<_>>(),
            "missing": self.missing.iter().map(key).collect::<Vec<_>>(),
        })
    }

    pub fn render(&self, suggest: bool) -> String {
        let mut l: Vec<String> = Vec::new();
        match self.adapters.len() {
            0 => l.push("no USB serial adapter is plugged in".into()),
            1 => l.push("1 adapter plugged in:".into()),
            n => l.push(format!("{n} adapters plugged in:")),
        }
        for r in &self.adapters {
            let a = &r.adapter;
            l.push(String::new());
            l.push(a.device.display().to_string());
            let none = || "-".to_string();
            l.push(format!(
                "  by-id   {}",
                a.by_id.clone().unwrap_or_else(none)
            ));
            l.push(format!(
                "  serial  {}",
                a.serial.clone().unwrap_or_else(none)
            ));
            l.push(format!("  path    {}", a.path.clone().unwrap_or_else(none)));
            l.push(format!(
                "  usb     {}",
                a.usb.map(|u| u.to_string()).unwrap_or_else(none)
            ));
            if !r.serves.is_empty() {
                for k in &r.serves {
                    l.push(format!("  config  board {} tty {}", k.board, k.tty));
                }
            } else if !r.matches.is_empty() {
                let ks: Vec<String> = r.matches.iter().map(ToString::to_string).collect();
                l.push(format!("  config  matches {} (not used)", ks.join(", ")));
            } else if let Some(sg) = &r.suggestion {
                if suggest {
                    l.push(format!(
                        "  config  none; suggested below as board {} tty {}",
                        sg.board, sg.tty
                    ));
                } else {
                    l.push(format!(
                        "  config  none (--suggest writes an entry: board {})",
                        sg.board
                    ));
                }
            } else {
                l.push("  config  none".into());
            }
            if let Some(n) = &r.note {
                l.push(format!("  note    {n}"));
            }
        }
        if !self.missing.is_empty() {
            l.push(String::new());
            let ks: Vec<String> = self.missing.iter().map(ToString::to_string).collect();
            l.push(format!("configured but not plugged in: {}", ks.join(", ")));
        }
        let mut s = String::new();
        for line in l {
            if suggest {
                s.push('#');
                if !line.is_empty() {
                    s.push(' ');
                }
            }
            s.push_str(&line);
            s.push('\n');
        }
        if suggest {
            let snippets = self.snippets();
            if snippets.is_empty() {
                s.push_str("#\n# every adapter is in the config: nothing to suggest\n");
            } else {
                s.push_str("#\n# Entries for the adapters the config does not name: append them to the\n# config and give each machines or host-groups.\n");
                s.push_str(&snippets);
            }
        }
        s
    }
}

/// `text` with the suggested entries appended.
pub fn append_to(text: &str, report: &Survey) -> String {
    let mut s = text.to_string();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(&report.snippets());
    s
}

/// The adapters in a by-id directory now, as `devbroker run --source by-id`
/// sees them (identities from udev's records in `/run/udev/data` when there
/// are any).
pub fn present_by_id(dir: &Path) -> Vec<Adapter> {
    present_by_id_with(dir, Path::new(crate::source::by_id::UDEV_DATA))
}

/// [`present_by_id`] with udev's records read from `udev_data`.
pub fn present_by_id_with(dir: &Path, udev_data: &Path) -> Vec<Adapter> {
    crate::source::by_id::scan(dir, udev_data)
        .into_values()
        .collect()
}

/// The USB serial adapters udev knows now (enumerated once; no monitor), as
/// `devbroker run --source udev` sees them.
pub fn present_udev() -> io::Result<Vec<Adapter>> {
    Ok(crate::source::udev::scan()?.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, UsbId};
    use std::path::PathBuf;

    fn ad(
        id: &str,
        by_id: Option<&str>,
        serial: Option<&str>,
        path: Option<&str>,
        usb: &str,
    ) -> Adapter {
        Adapter {
            id: id.into(),
            device: by_id
                .map(|b| PathBuf::from("/dev/serial/by-id").join(b))
                .unwrap_or_else(|| PathBuf::from(format!("/dev/{id}"))),
            by_id: by_id.map(Into::into),
            serial: serial.map(Into::into),
            path: path.map(Into::into),
            usb: UsbId::parse(usb),
        }
    }

    fn ftdi(id: &str, serial: &str, port: u32) -> Adapter {
        ad(
            id,
            Some(&format!("usb-FTDI_FT232R_USB_UART_{serial}-if00-port0")),
            Some(serial),
            Some(&format!("pci-0000:00:14.0-usb-0:{port}:1.0")),
            "0403:6001",
        )
    }

    fn ch340(id: &str, port: u32) -> Adapter {
        ad(
            id,
            Some("usb-1a86_USB_Serial-if00-port0"),
            None,
            Some(&format!("pci-0000:00:14.0-usb-0:{port}:1.0")),
            "1a86:7523",
        )
    }

    fn cfg(text: &str) -> Config {
        parse(Path::new("t.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// The config with every suggestion appended must parse, and then name
    /// every adapter present, each by one tty.
    fn check_appended(text: &str, adapters: &[Adapter]) -> Survey {
        let rep = survey(adapters, &cfg(text));
        let all = append_to(text, &rep);
        let c = parse(Path::new("t.toml"), &all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        let again = survey(adapters, &c);
        for r in &again.adapters {
            assert_eq!(r.serves.len(), 1, "{r:?}\n{all}");
            assert!(r.suggestion.is_none());
        }
        // The rendered --suggest output is valid to append as a whole.
        let rendered = rep.render(true);
        let mut whole = text.to_string();
        whole.push_str(&rendered);
        parse(Path::new("t.toml"), &whole).unwrap_or_else(|e| panic!("{e}\n{whole}"));
        rep
    }

    const ESP1: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0" }
"#;

    #[test]
    fn usb_and_serial_first() {
        let a = ftdi("/sys/a", "A1B2C3", 2);
        let b = ftdi("/sys/b", "FT100001", 3);
        let rep = check_appended(ESP1, &[a.clone(), b.clone()]);
        assert_eq!(rep.adapters[0].serves[0].to_string(), "esp1.console");
        assert!(rep.adapters[0].suggestion.is_none());
        let sg = rep.adapters[1].suggestion.as_ref().unwrap();
        assert_eq!(sg.board, "ftdi-ft232r-usb-uart-ft100001");
        assert_eq!(
            sg.matcher,
            Match {
                usb: UsbId::parse("0403:6001"),
                serial: Some("FT100001".into()),
                ..Match::default()
            }
        );
        assert!(sg
            .toml
            .contains("match = { usb = \"0403:6001\", serial = \"FT100001\" }"));
        assert!(rep.missing.is_empty());
    }

    #[test]
    fn without_serial_usb_and_path() {
        let rep = check_appended("", &[ch340("/sys/a", 3), ch340("/sys/b", 4)]);
        let m: Vec<_> = rep
            .adapters
            .iter()
            .map(|r| r.suggestion.as_ref().unwrap())
            .collect();
        assert_eq!(
            m[0].matcher.path.as_deref(),
            Some("pci-0000:00:14.0-usb-0:3:1.0")
        );
        assert_eq!(m[0].matcher.usb, UsbId::parse("1a86:7523"));
        assert_eq!(m[0].matcher.by_id, None);
        // Same by-id stem: the second board gets a suffix.
        assert_eq!(m[0].board, "1a86-usb-serial");
        assert_eq!(m[1].board, "1a86-usb-serial-2");
    }

    #[test]
    fn by_id_when_there_is_nothing_else() {
        let a = ad(
            "/x/usb-SEGGER_J-Link_000683-if00",
            Some("usb-SEGGER_J-Link_000683-if00"),
            None,
            None,
            "",
        );
        let rep = check_appended(ESP1, &[a]);
        let sg = rep.adapters[0].suggestion.as_ref().unwrap();
        assert_eq!(sg.board, "segger-j-link-000683");
        assert_eq!(
            sg.matcher.by_id.as_deref(),
            Some("usb-SEGGER_J-Link_000683-if00")
        );
        assert_eq!(rep.missing.len(), 1, "esp1 is not plugged in");
    }

    #[test]
    fn clones_sharing_a_serial_need_the_path() {
        let rep = check_appended(
            "",
            &[ftdi("/sys/a", "A50285BI", 3), ftdi("/sys/b", "A50285BI", 4)],
        );
        for r in &rep.adapters {
            let m = &r.suggestion.as_ref().unwrap().matcher;
            assert!(m.serial.is_some() && m.path.is_some(), "{m:?}");
        }
    }

    #[test]
    fn a_suggestion_never_overlaps_the_config() {
        // The config names an absent FTDI by by-id; a present adapter whose
        // serial is in that name can't use usb + serial (the config check
        // would call them overlapping), nor usb + path: it gets its by-id.
        let a = ad(
            "/sys/a",
            Some("usb-Other_Maker_A1B2C3-if00"),
            Some("A1B2C3"),
            Some("pci-0:1"),
            "1234:5678",
        );
        let rep = check_appended(ESP1, &[a]);
        let m = &rep.adapters[0].suggestion.as_ref().unwrap().matcher;
        assert_eq!(m.by_id.as_deref(), Some("usb-Other_Maker_A1B2C3-if00"));
    }

    #[test]
    fn board_and_socket_names_are_free() {
        let text = r#"
[[board]]
name = "ftdi-ft232r-usb-uart-ft100001"
[[board.tty]]
name = "x"
match = { serial = "Z9" }

[[board]]
name = "ftdi-ft232r-usb-uart-ft100001-2"
[[board.tty]]
name = "y"
match = { serial = "Z8" }

[[board]]
name = "ftdi-ft232r-usb-uart-ft100001-3.console"
[[board.tty]]
name = "other"
match = { serial = "Z7" }

[[board]]
name = "ftdi-ft232r-usb-uart-ft100001-3"
[[board.tty]]
name = "z"
match = { serial = "Z6" }
"#;
        let rep = check_appended(text, &[ftdi("/sys/a", "FT100001", 2)]);
        assert_eq!(
            rep.adapters[0].suggestion.as_ref().unwrap().board,
            "ftdi-ft232r-usb-uart-ft100001-4"
        );
        // A socket clash: a name with a '.' can need the socket of another
        // board's tty ("pico" + "e66.console" and "pico.e66" + "console").
        let text = "[[board]]\nname = \"pico\"\n[[board.tty]]\nname = \"e66.console\"\nmatch = { serial = \"Q\" }\n";
        let a = ad("/sys/p", Some("usb-Pico.E66-if00"), None, None, "");
        let rep = check_appended(text, &[a]);
        assert_eq!(
            rep.adapters[0].suggestion.as_ref().unwrap().board,
            "pico.e66-2"
        );
    }

    #[test]
    fn long_names_and_odd_characters() {
        let long = format!("usb-{}_SER-if00-port0", "Vendor_".repeat(20));
        let a = ad("/sys/l", Some(&long), Some("SER"), None, "0403:6001");
        let b = ad(
            "/sys/m",
            Some(&long.replace("SER", "SES")),
            Some("SES"),
            None,
            "0403:6001",
        );
        let rep = check_appended("", &[a, b]);
        for r in &rep.adapters {
            let n = &r.suggestion.as_ref().unwrap().board;
            assert!(check_name(n).is_ok() && n.len() <= MAX_NAME, "{n}");
        }
        assert_ne!(
            rep.adapters[0].suggestion.as_ref().unwrap().board,
            rep.adapters[1].suggestion.as_ref().unwrap().board
        );
        // Quotes and backslashes in a by-id name are escaped in the TOML.
        let odd = ad("/sys/o", Some("usb-We\"ird\\Co_1-if00"), None, None, "");
        let rep = check_appended("", &[odd]);
        assert_eq!(
            rep.adapters[0]
                .suggestion
                .as_ref()
                .unwrap()
                .matcher
                .by_id
                .as_deref(),
            Some("usb-We\"ird\\Co_1-if00")
        );
        // A serial with white space is not usable as a config value.
        let sp = ad("/sys/s", None, Some("A B"), Some("pci-1"), "0403:6001");
        let rep = check_appended("", &[sp]);
        let m = &rep.adapters[0].suggestion.as_ref().unwrap().matcher;
        assert_eq!(
            (m.serial.as_deref(), m.path.as_deref()),
            (None, Some("pci-1"))
        );
    }

    #[test]
    fn shadowed_and_indistinguishable_adapters_get_a_note() {
        // A broad match: both adapters satisfy it, the first by id is used.
        let text = "[[board]]\nname = \"any\"\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"1a86:7523\" }\n";
        let rep = survey(&[ch340("/sys/a", 3), ch340("/sys/b", 4)], &cfg(text));
        assert_eq!(rep.adapters[0].serves.len(), 1);
        assert!(rep.adapters[1].serves.is_empty());
        assert!(rep.adapters[1].suggestion.is_none());
        assert!(rep.adapters[1]
            .note
            .as_ref()
            .unwrap()
            .contains("any.c matches it too"));
        // Two adapters with nothing to tell them apart.
        let twin = |id: &str| ad(id, Some("usb-Twin-if00"), None, None, "");
        let rep = survey(&[twin("/x/1"), twin("/x/2")], &Config::default());
        for r in &rep.adapters {
            assert!(r.suggestion.is_none());
            assert!(r.note.as_ref().unwrap().contains("no match tells"), "{r:?}");
        }
    }

    #[test]
    fn stems() {
        assert_eq!(
            by_id_stem("usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0"),
            "FTDI_FT232R_USB_UART_A1B2C3"
        );
        assert_eq!(
            by_id_stem("usb-Raspberry_Pi_Pico_E66-if00"),
            "Raspberry_Pi_Pico_E66"
        );
        assert_eq!(by_id_stem("usb-Foo-ifxx"), "Foo-ifxx");
        assert_eq!(by_id_stem("plain"), "plain");
        assert_eq!(by_id_stem("-if00"), "-if00");
    }

    #[test]
    fn render_lists_identities_and_config() {
        let a = ftdi("/sys/a", "A1B2C3", 2);
        let b = ftdi("/sys/b", "FT100001", 3);
        let rep = survey(&[a, b], &cfg(ESP1));
        let plain = rep.render(false);
        assert!(plain.starts_with("2 adapters plugged in:\n"), "{plain}");
        assert!(plain.contains("  serial  A1B2C3\n"), "{plain}");
        assert!(plain.contains("  usb     0403:6001\n"), "{plain}");
        assert!(
            plain.contains("  config  board esp1 tty console\n"),
            "{plain}"
        );
        assert!(
            plain.contains("--suggest writes an entry: board ftdi-ft232r-usb-uart-ft100001"),
            "{plain}"
        );
        assert!(!plain.contains("[[board]]"));
        let s = rep.render(true);
        assert!(
            s.lines()
                .take_while(|l| !l.starts_with("[["))
                .all(|l| l.is_empty() || l.starts_with('#')),
            "{s}"
        );
        assert!(
            s.contains("[[board]]\nname = \"ftdi-ft232r-usb-uart-ft100001\"\n"),
            "{s}"
        );
        let none = survey(&[], &cfg(ESP1)).render(false);
        assert!(none.contains("no USB serial adapter"), "{none}");
        assert!(
            none.contains("configured but not plugged in: esp1.console"),
            "{none}"
        );
    }
}
