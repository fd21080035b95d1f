//! Names of boards, ttys and machines, and the by-id link names of adapters.
//!
//! These names become file names on the host and in containers
//! (`machines/<machine>/<board>.<tty>.sock`, `/dev/serial/by-id/<by-id>`), so
//! anything that could escape a directory or collide is refused here, once,
//! for both ends.

/// Longest board, tty or machine name.
pub const MAX_NAME: usize = 63;

/// Why a name is refused; its text completes "… is refused: ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("it is empty")]
    Empty,
    #[error("it is {len} characters long; the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("it starts with {0:?}; names start with a-z or 0-9")]
    BadStart(char),
    #[error("it contains {0:?}; names use only a-z, 0-9, '.' and '-'")]
    BadChar(char),
    #[error("{0:?} is a directory reference, not a link name")]
    DirectoryReference(String),
    #[error("it contains '/'; give the link's name alone, not a path")]
    Slash,
    #[error("it is {len} bytes long; file names end at {max}")]
    TooLongForFile { len: usize, max: usize },
    #[error("it contains {0:?}")]
    Unprintable(char),
}

/// Checks a board, tty or machine name against `[a-z0-9][a-z0-9.-]{0,62}`.
/// The error says what is wrong; [`suggest_name`] says what to write instead.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong {
            len: name.len(),
            max: MAX_NAME,
        });
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
        // The first character, whole (it may not be ASCII).
        return Err(NameError::BadStart(name.chars().next().unwrap_or('?')));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '.' || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    Ok(())
}

/// A valid name close to `name`: lower case, other characters become `-`.
pub fn suggest_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = s.trim_start_matches(['.', '-']).to_string();
    s = trimmed;
    s.truncate(MAX_NAME);
    if s.is_empty() {
        s = "board1".into();
    }
    s
}

/// Checks the name of a link in `/dev/serial/by-id`: one path component,
/// no `/`, not `.` or `..`, printable, at most 255 bytes.
pub fn check_link_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NameError::DirectoryReference(name.into()));
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    if name.len() > 255 {
        return Err(NameError::TooLongForFile {
            len: name.len(),
            max: 255,
        });
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(NameError::Unprintable(c));
    }
    Ok(())
}

/// The socket file name of a board's tty: `<board>.<tty>.sock`.
pub fn socket_name(board: &str, tty: &str) -> String {
    format!("{board}.{tty}.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("esp32-1").is_ok());
        assert!(check_name("a.b").is_ok());
        assert!(check_name("0").is_ok());
        assert!(check_name(&"a".repeat(63)).is_ok());
        assert!(check_name(&"a".repeat(64)).is_err());
        assert!(check_name("").is_err());
        assert!(check_name(".x").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("A").is_err());
        assert!(check_name("a_b").unwrap_err().to_string().contains("'_'"));
        assert!(check_name("a/b").is_err());
        assert!(check_name("a\nb").is_err());
        assert_eq!(suggest_name("ESP_1"), "esp-1");
        assert_eq!(suggest_name("../x"), "x");
    }

    #[test]
    fn link_names() {
        assert!(check_link_name("usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0").is_ok());
        assert!(check_link_name("..").is_err());
        assert!(check_link_name("../../etc/passwd").is_err());
        assert!(check_link_name("a b").is_err());
        assert!(check_link_name("").is_err());
    }
}
