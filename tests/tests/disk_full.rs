//! A full disk stops nothing for good: the index and the console log are
//! written again once there is room. Each test mounts a small tmpfs, fills
//! it, and empties it again (root only).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);
const FTDI: &str = "usb-FTDI_FT232R_USB_UART_D15KF-if00-port0";

/// A tmpfs of `kib` KiB at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kib: u32) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            skip("mounting a small tmpfs to fill needs root (run the suite as root, as CI does)");
            return None;
        }
        fs::create_dir_all(dir).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={kib}k,mode=0755").as_str()),
        )
        .unwrap();
        Some(Tmpfs(dir.to_path_buf()))
    }

    /// Fills it up; the filler's path.
    fn fill(&self) -> PathBuf {
        let p = self.0.join("filler");
        let mut f = fs::File::create(&p).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[test]
fn the_index_is_written_once_there_is_room_again() {
    let w = World::new(&format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n"
    ));
    let Some(fs_) = Tmpfs::mount(&w.run, 256) else {
        return;
    };
    let _b = w.broker();
    let index = w.run.join("machines/ci1/ttys.json");
    wait_for(5 * S, "the empty index", || {
        fs::read_to_string(&index).is_ok()
    });
    let filler = fs_.fill();
    let _board = w.plug(FTDI);
    wait_for(5 * S, "the broker to fail writing the index", || {
        fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .contains("can't write the index")
    });
    assert!(!fs::read_to_string(&index).unwrap().contains(FTDI));
    assert!(
        !exists(&w.run.join("machines/ci1/esp1.console.sock")),
        "no socket before its index"
    );
    fs::remove_file(filler).unwrap();
    wait_for(5 * S, "the index with the board", || {
        fs::read_to_string(&index)
            .unwrap_or_default()
            .contains(FTDI)
    });
    wait_for(5 * S, "the socket", || {
        exists(&w.run.join("machines/ci1/esp1.console.sock"))
    });
}

#[test]
fn the_console_log_goes_on_once_there_is_room_again() {
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path().join("logs");
    let Some(fs_) = Tmpfs::mount(&logs, 64) else {
        return;
    };
    let log = logs.join("esp1.log");
    let w = World::new(&format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[board.console]\nmode = \"always\"\nlog = \"{}\"\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n",
        log.display()
    ));
    let board = w.plug(FTDI);
    let _b = w.broker();
    wait_for(5 * S, "the drain", || {
        fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .contains("capturing the console of esp1.console")
    });
    let filler = fs_.fill();
    write_all_fd(board.master_fd(), b"printed while the disk is full\r\n").unwrap();
    let failed = format!(
        "console log {}: No space left on device (os error 28); keeping what comes in the ring and trying again every 1s",
        log.display()
    );
    wait_for(5 * S, "the log to fail", || {
        fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .contains(&failed)
    });
    fs::remove_file(filler).unwrap();
    // The log is tried again at most every second: keep printing until a
    // line makes it.
    wait_for(10 * S, "the log to work again", || {
        let _ = write_all_fd(board.master_fd(), b"after\r\n");
        std::thread::sleep(Duration::from_millis(100));
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("after")
    });
    let text = fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("bytes of console output could not be logged]"),
        "{text}"
    );
    let said = fs::read_to_string(w.path("broker.log")).unwrap();
    assert!(
        said.contains(&format!("console log {} works again (", log.display())),
        "{said}"
    );
}
