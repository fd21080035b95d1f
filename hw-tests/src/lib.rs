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

pub mod cache;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod libs;
pub mod modules;
pub mod prereq;
pub mod qmp;
pub mod real;
pub mod rig;
pub mod shell;
pub mod trace;
pub mod vm;
