//! Where the broker's log goes and how it looks: plain lines on stderr —
//! coloured only when stderr is a terminal, so a log file or the journal
//! never holds escape codes — or, when systemd connected stderr to the
//! journal (`JOURNAL_STREAM`), journald's native protocol, with the level
//! and each field (`tty`, `machine`, ...) as a journal field.

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Whether stderr is the journal stream systemd named in `JOURNAL_STREAM`
/// (`DEVICE:INODE` of the stream it connected), as sd_journal_stream_fd's
/// users check.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// Sets up logging, filtered by the environment variable `filter_var`
/// (`DEVBROKER_LOG=debug`), `info` by default.
pub fn init(filter_var: &str) {
    let filter = EnvFilter::try_from_env(filter_var).unwrap_or_else(|_| "info".into());
    if stderr_is_journal() {
        if let Ok(journald) = tracing_journald::layer() {
            tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("devbroker".into()))
                .init();
            return;
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
