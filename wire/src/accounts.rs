//! Users and groups from `passwd` and `group` text, as both ends need them:
//! devshim (a static binary in old distributions, with no NSS) finds the job
//! user in the container's files, and `machine setup` reads the tree's.

/// A user's ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Finds a user by name or by uid in passwd text.
pub fn find_user(passwd: &str, want: &str) -> Option<User> {
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || line.starts_with('#') {
            return None;
        }
        let (uid, gid) = (f[2].parse().ok()?, f[3].parse().ok()?);
        if f[0] == want || want.parse::<u32>().ok() == Some(uid) {
            Some(User {
                name: f[0].into(),
                uid,
                gid,
                home: f[5].into(),
            })
        } else {
            None
        }
    })
}

/// The name of a uid, if passwd has one.
pub fn user_name(passwd: &str, uid: u32) -> Option<String> {
    find_user(passwd, &uid.to_string()).map(|u| u.name)
}

/// The gid of a group by name, from group text.
pub fn group_gid(group: &str, name: &str) -> Option<u32> {
    group.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            f[2].parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/bash\nsai:x:883:883::/home/sai:/bin/sh\nbroken\n";

    #[test]
    fn finds_users() {
        assert_eq!(find_user(PASSWD, "sai").unwrap().uid, 883);
        assert_eq!(find_user(PASSWD, "0").unwrap().name, "root");
        assert!(find_user(PASSWD, "nobody").is_none());
        assert_eq!(user_name(PASSWD, 883).as_deref(), Some("sai"));
        assert_eq!(group_gid("dialout:x:20:\nsai:x:883:\n", "sai"), Some(883));
        assert_eq!(group_gid("dialout:x:20:\n", "plugdev"), None);
    }
}
