//! Minimal, lossless editing of systemd unit-style files (`.nspawn`).
//!
//! The admin's file is kept as lines: comments, order and every setting we
//! don't own stay as they were. Edits only add or change the lines devbroker
//! owns, and removal takes back exactly those lines.

/// Sets `key=value` in `[section]`: replaces the first `key=` line there (if
/// its value differs), else appends one, creating the section if needed.
pub fn set(text: &str, section: &str, key: &str, value: &str) -> String {
    edit(text, section, key, value, false)
}

/// Adds `key=value` to `[section]` unless that exact line is there: for
/// keys that may repeat, such as `Bind=`.
pub fn add(text: &str, section: &str, key: &str, value: &str) -> String {
    edit(text, section, key, value, true)
}

fn edit(text: &str, section: &str, key: &str, value: &str, repeatable: bool) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let header = format!("[{section}]");
    let want = format!("{key}={value}");
    let mut in_section = false;
    let mut section_end = None;
    let mut found_section = false;
    for i in 0..lines.len() {
        let t = lines[i].trim();
        if t.starts_with('[') {
            if in_section {
                section_end = Some(i);
            }
            in_section = t == header;
            found_section |= in_section;
            continue;
        }
        if !in_section {
            continue;
        }
        if let Some((k, v)) = t.split_once('=') {
            if k.trim() == key {
                if v.trim() == value {
                    return text.to_string();
                }
                if !repeatable {
                    lines[i] = want;
                    return join(lines);
                }
            }
        }
    }
    if found_section {
        let mut at = section_end.unwrap_or(lines.len());
        // Insert after the section's last non-blank line.
        while at > 0 && lines[at - 1].trim().is_empty() {
            at -= 1;
        }
        lines.insert(at, want);
    } else {
        if lines.last().is_some_and(|l| !l.trim().is_empty()) {
            lines.push(String::new());
        }
        lines.push(header);
        lines.push(want);
    }
    join(lines)
}

/// Removes `key=value` lines of `[section]` (only those), and the section
/// header if nothing is left in it.
pub fn remove(text: &str, section: &str, key: &str, value: &str) -> String {
    let header = format!("[{section}]");
    let mut out: Vec<String> = Vec::new();
    let mut in_section = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t == header;
        } else if in_section {
            if let Some((k, v)) = t.split_once('=') {
                if k.trim() == key && v.trim() == value {
                    continue;
                }
            }
        }
        out.push(line.to_string());
    }
    // Drop sections left empty.
    let mut cleaned: Vec<String> = Vec::new();
    let mut i = 0;
    while i < out.len() {
        let t = out[i].trim();
        if t.starts_with('[') {
            let mut j = i + 1;
            while j < out.len() && out[j].trim().is_empty() {
                j += 1;
            }
            if j == out.len() || out[j].trim().starts_with('[') {
                i = j;
                continue;
            }
        }
        cleaned.push(out[i].clone());
        i += 1;
    }
    while cleaned.last().is_some_and(|l| l.trim().is_empty()) {
        cleaned.pop();
    }
    join(cleaned)
}

/// Lines of `[section]` whose key is `key`, as `(index, value)`.
pub fn values(text: &str, section: &str, key: &str) -> Vec<(usize, String)> {
    let header = format!("[{section}]");
    let mut in_section = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t == header;
        } else if in_section {
            if let Some((k, v)) = t.split_once('=') {
                if k.trim() == key {
                    out.push((i, v.trim().to_string()));
                }
            }
        }
    }
    out
}

fn join(lines: Vec<String>) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_admins_settings() {
        let admin = "# mine\n[Exec]\nPrivateUsers=pick\n\n[Files]\nBind=/srv/cache\n";
        let t = set(admin, "Exec", "Boot", "yes");
        let t = set(&t, "Network", "VirtualEthernet", "yes");
        let t = add(
            &t,
            "Files",
            "Bind",
            "/run/devbroker/machines/a:/run/devbroker",
        );
        assert_eq!(
            t,
            "# mine\n[Exec]\nPrivateUsers=pick\nBoot=yes\n\n[Files]\nBind=/srv/cache\nBind=/run/devbroker/machines/a:/run/devbroker\n\n[Network]\nVirtualEthernet=yes\n"
        );
        assert_eq!(set(&t, "Exec", "Boot", "yes"), t, "idempotent");
        assert_eq!(
            add(
                &t,
                "Files",
                "Bind",
                "/run/devbroker/machines/a:/run/devbroker"
            ),
            t
        );
        let back = remove(
            &t,
            "Files",
            "Bind",
            "/run/devbroker/machines/a:/run/devbroker",
        );
        let back = remove(&back, "Network", "VirtualEthernet", "yes");
        let back = remove(&back, "Exec", "Boot", "yes");
        assert_eq!(back, admin);
    }

    #[test]
    fn changes_a_value_in_place() {
        assert_eq!(
            set("[Exec]\nBoot=no\nX=1\n", "Exec", "Boot", "yes"),
            "[Exec]\nBoot=yes\nX=1\n"
        );
        assert_eq!(set("", "Exec", "Boot", "yes"), "[Exec]\nBoot=yes\n");
        assert_eq!(
            values("[Files]\nBind=/dev/ttyUSB0\nBind=/x\n", "Files", "Bind"),
            vec![(1, "/dev/ttyUSB0".into()), (2, "/x".into())]
        );
    }
}
