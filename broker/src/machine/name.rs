//! Machine names as systemd-nspawn takes them.
//!
//! A machine name is a hostname (RFC 1123 labels; systemd refuses `_`), and
//! the host side of its veth is `ve-` plus the name's first 11 characters, so
//! two machines whose names start alike would fight over one interface.

/// Longest machine name systemd accepts.
pub const MAX: usize = 64;
/// Characters of the name that go into the host veth's name.
pub const VETH_CHARS: usize = 11;

/// Checks a machine name; the error says what is wrong and what to write.
pub fn check(name: &str) -> Result<(), String> {
    let hint = "machine names are host names: a-z, 0-9 and '-' (dots between labels), e.g. \"sai-builder-1\"";
    if name.is_empty() {
        return Err(format!("the machine name is empty; {hint}"));
    }
    if name.len() > MAX {
        return Err(format!(
            "machine name {name:?} is {} characters long; systemd allows {MAX}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        let what = match c {
            '_' => "'_' (systemd refuses it in machine names)".to_string(),
            '\n' => "a newline".to_string(),
            '/' => "'/'".to_string(),
            c => format!("{c:?}"),
        };
        return Err(format!("machine name {name:?} contains {what}; {hint}"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!(
                "machine name {name:?} has an empty label (\"..\", or a dot at an end); {hint}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "machine name {name:?} has a label starting or ending with '-'; {hint}"
            ));
        }
    }
    Ok(())
}

/// The host veth of a machine: `ve-` + its first 11 characters.
pub fn veth(name: &str) -> String {
    format!("ve-{}", name.chars().take(VETH_CHARS).collect::<String>())
}

/// Other machines whose host veth would be the same as `name`'s.
pub fn veth_clashes<'a>(name: &str, others: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mine = veth(name);
    let mut v: Vec<String> = others
        .into_iter()
        .filter(|o| *o != name && veth(o) == mine)
        .map(str::to_owned)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check("sai-builder-1").is_ok());
        assert!(check("a.b").is_ok());
        assert!(check("a_b")
            .unwrap_err()
            .contains("'_' (systemd refuses it"));
        assert!(check("a\nb").unwrap_err().contains("a newline"));
        assert!(check("..").unwrap_err().contains("empty label"));
        assert!(check("a/b").is_err());
        assert!(check("-a").is_err());
        assert!(check("").is_err());
        assert!(check(&"a".repeat(65)).is_err());
    }

    #[test]
    fn veth_prefix() {
        assert_eq!(veth("sai-builder-1"), "ve-sai-builder");
        assert_eq!(
            veth_clashes("sai-builder-1", ["sai-builder-2", "other", "sai-builder-1"]),
            ["sai-builder-2"]
        );
        assert!(veth_clashes("short", ["shorter"]).is_empty());
    }
}
