//! devbroker against a real kernel's USB serial stack.
//!
//! Tier 4 (`tests/emulated.rs`) boots the host's distribution kernel under
//! QEMU with an initramfs made at test time: udevd, the `ftdi_sio` driver
//! stack and the binaries under test. QEMU emulates an FT232 whose line is a
//! host pty, so a test sees what really reaches the adapter: bytes and baud
//! on the pty, DTR and RTS in QEMU's trace; adapters are plugged and pulled
//! over QMP. Inside, the broker runs on its udev source and devshim presents
//! the board as a container job sees it.
//!
//! Tier 5 (`tests/real_board.rs`) runs the same kinds of checks on the host
//! against a real adapter, named by `DEVBROKER_HW_BY_ID` (see [`real`]).

use std::time::{Duration, Instant};

pub mod cache;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod libs;
pub mod modules;
pub mod prereq;
pub mod python;
pub mod qmp;
pub mod real;
pub mod rig;
pub mod shell;
pub mod trace;
pub mod vm;

/// Polls `get` every 10 ms until it returns `want`, for up to `limit`;
/// returns how long that took. Unlike the suite's `wait_for`, which panics,
/// a timeout is an error naming the last value seen, so the caller can
/// append its logs.
pub fn wait_value<T: PartialEq + std::fmt::Debug>(
    limit: Duration,
    what: &str,
    want: T,
    mut get: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let now = get()?;
        if now == want {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            anyhow::bail!("{what}: expected {want:?}, still {now:?} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
