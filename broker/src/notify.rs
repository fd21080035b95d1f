//! Telling systemd how the broker is doing (`Type=notify`): `READY=1` once
//! every socket the config asks for is up, `STATUS=` with what it serves,
//! `RELOADING=1` around a config reload, and `WATCHDOG=1` when the unit sets
//! `WatchdogSec=`. Outside systemd (no `NOTIFY_SOCKET`) it all does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

use crate::state::Shared;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!("sd_notify: {e}");
    }
}

/// Whether systemd listens (`NOTIFY_SOCKET` is set).
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Every socket is up: ready, with the status line.
pub fn ready(shared: &Shared) {
    send(&[NotifyState::Ready, NotifyState::Status(&shared.summary())]);
}

/// A reload begins (`systemctl reload` waits for the `READY=1` that ends it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Keeps `STATUS=` current: whenever sessions, leases or adapters change
/// (at most ten times a second), and never while nothing does.
pub async fn keep_status(shared: Shared) {
    if !enabled() {
        return;
    }
    let mut last = String::new();
    loop {
        shared.activity.notified().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = shared.summary();
        if now != last {
            send(&[NotifyState::Status(&now)]);
            last = now;
        }
    }
}

/// Pings the watchdog at half its interval when the unit sets one. It runs
/// on the broker's own thread, so a broker stuck there stops pinging and
/// systemd restarts it.
pub async fn watchdog() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    debug!("watchdog: pinging every {every:?}");
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        if let Err(e) = sd_notify::notify(false, &[NotifyState::Watchdog]) {
            warn!("watchdog ping: {e}");
        }
    }
}
