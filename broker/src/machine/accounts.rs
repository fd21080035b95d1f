//! The job user in a container's `/etc/passwd`, `/etc/group`, `/etc/shadow`
//! and `/etc/gshadow`, edited as text (the tree is not the running system:
//! `useradd` would edit the host).

/// The lines that add `name` with `uid` (and a group of the same id), or an
/// error if the name or id is taken by someone else. `None` per file when the
/// user is already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserLines {
    pub passwd: Option<String>,
    pub group: Option<String>,
    pub shadow: Option<String>,
    pub gshadow: Option<String>,
}

fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

/// Works out the lines to add for the job user.
pub fn user_lines(
    passwd: &str,
    group: &str,
    name: &str,
    uid: u32,
    days_since_epoch: u64,
) -> Result<UserLines, String> {
    let mut out = UserLines {
        passwd: None,
        group: None,
        shadow: None,
        gshadow: None,
    };
    match entries(passwd).find(|f| f.first() == Some(&name)) {
        Some(f) => {
            if f.get(2) != Some(&uid.to_string().as_str()) {
                return Err(format!(
                    "user {name} exists in the tree with uid {}, not {uid}; pass --user {name}:{} or fix the tree",
                    f.get(2).unwrap_or(&"?"),
                    f.get(2).unwrap_or(&"?")
                ));
            }
            return Ok(out);
        }
        None => {
            if let Some(f) = entries(passwd).find(|f| f.get(2) == Some(&uid.to_string().as_str())) {
                return Err(format!(
                    "uid {uid} belongs to {} in the tree; choose another with --user NAME:UID",
                    f[0]
                ));
            }
            out.passwd = Some(format!("{name}:x:{uid}:{uid}::/home/{name}:/bin/bash"));
            out.shadow = Some(format!("{name}:!:{days_since_epoch}:0:99999:7:::"));
        }
    }
    if !entries(group).any(|f| f.first() == Some(&name)) {
        if let Some(f) = entries(group).find(|f| f.get(2) == Some(&uid.to_string().as_str())) {
            return Err(format!("gid {uid} belongs to group {} in the tree; choose another uid with --user NAME:UID", f[0]));
        }
        out.group = Some(format!("{name}:x:{uid}:"));
        out.gshadow = Some(format!("{name}:!::"));
    }
    Ok(out)
}

/// Appends a line to a file's text.
pub fn append(text: &str, line: &str) -> String {
    let mut s = text.to_string();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s.push_str(line);
    s.push('\n');
    s
}

/// Removes exactly `line` from a file's text.
pub fn remove_line(text: &str, line: &str) -> String {
    text.lines()
        .filter(|l| *l != line)
        .map(|l| format!("{l}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_user_once() {
        let l = user_lines(
            "root:x:0:0:root:/root:/bin/bash\n",
            "root:x:0:\n",
            "sai",
            883,
            20000,
        )
        .unwrap();
        assert_eq!(
            l.passwd.as_deref(),
            Some("sai:x:883:883::/home/sai:/bin/bash")
        );
        assert_eq!(l.group.as_deref(), Some("sai:x:883:"));
        let passwd = append(
            "root:x:0:0:root:/root:/bin/bash\n",
            l.passwd.as_ref().unwrap(),
        );
        let again = user_lines(&passwd, "root:x:0:\nsai:x:883:\n", "sai", 883, 20000).unwrap();
        assert_eq!(
            again,
            UserLines {
                passwd: None,
                group: None,
                shadow: None,
                gshadow: None
            }
        );
        assert!(user_lines(&passwd, "", "sai", 884, 0)
            .unwrap_err()
            .contains("exists in the tree with uid 883"));
        assert!(user_lines(&passwd, "", "bob", 883, 0)
            .unwrap_err()
            .contains("uid 883 belongs to sai"));
        assert_eq!(
            remove_line(&passwd, "sai:x:883:883::/home/sai:/bin/bash"),
            "root:x:0:0:root:/root:/bin/bash\n"
        );
    }
}
