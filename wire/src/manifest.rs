//! The index of a machine directory: which tty sockets it holds and the by-id
//! name each should appear under in the container.
//!
//! The broker writes it atomically (write, then rename) before it creates a
//! socket and after it removes one; devshim reads it on every change of the
//! directory. It is data from outside the container, so [`Manifest::parse`]
//! checks every name before devshim turns it into a path.

use serde::{Deserialize, Serialize};

use crate::names::{check_link_name, check_name, socket_name, NameError};

/// File name of the index inside a machine directory.
pub const FILE: &str = "ttys.json";
/// File name of the control socket inside a machine directory.
pub const CONTROL_SOCKET: &str = "control.sock";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub ttys: Vec<Entry>,
}

/// One tty the machine may use now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub board: String,
    pub tty: String,
    /// The adapter's link name in the host's `/dev/serial/by-id`.
    pub by_id: Option<String>,
    /// The rate the config gives the tty; a new guest pty starts at it.
    pub rate: u32,
}

impl Entry {
    /// The socket file of this tty.
    pub fn socket(&self) -> String {
        socket_name(&self.board, &self.tty)
    }

    /// `<board>.<tty>`, the name under `/dev/devbroker`.
    pub fn short_name(&self) -> String {
        format!("{}.{}", self.board, self.tty)
    }
}

/// Why an index is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("unreadable index: {0}")]
    Json(#[from] serde_json::Error),
    #[error("index version {0} is not supported (this build reads 1)")]
    Version(u32),
    /// A board, tty or by-id name that could escape a directory or collide.
    #[error("{what} name {name:?} refused: {why}")]
    Name {
        what: &'static str,
        name: String,
        why: NameError,
    },
}

impl Manifest {
    /// Parses and checks a manifest.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_slice(bytes)?;
        if m.version != 1 {
            return Err(ManifestError::Version(m.version));
        }
        fn refused<'a>(
            what: &'static str,
            name: &'a str,
        ) -> impl FnOnce(NameError) -> ManifestError + 'a {
            move |why| ManifestError::Name {
                what,
                name: name.to_string(),
                why,
            }
        }
        for e in &m.ttys {
            check_name(&e.board).map_err(refused("board", &e.board))?;
            check_name(&e.tty).map_err(refused("tty", &e.tty))?;
            if let Some(l) = &e.by_id {
                check_link_name(l).map_err(refused("by-id", l))?;
            }
        }
        Ok(m)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escaping_names() {
        let good = Manifest {
            version: 1,
            ttys: vec![Entry {
                board: "b".into(),
                tty: "t".into(),
                by_id: Some("usb-x".into()),
                rate: 115200,
            }],
        };
        assert_eq!(Manifest::parse(&good.to_bytes()).unwrap(), good);
        let mut bad = good.clone();
        bad.ttys[0].by_id = Some("../../etc/shadow".into());
        assert!(Manifest::parse(&bad.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("by-id name"));
        let mut bad = good.clone();
        bad.ttys[0].board = "..".into();
        assert!(Manifest::parse(&bad.to_bytes()).is_err());
        assert!(Manifest::parse(b"{").is_err());
    }
}
