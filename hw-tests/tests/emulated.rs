//! Tier 4: the broker and devshim on a real kernel's USB serial stack. QEMU
//! emulates an FT232 (driven by `ftdi_sio`, named by udev); a guest job uses
//! devshim's pty as a container job would; the test watches the adapter's
//! far end on the host. See `devbroker_hw_tests::rig` for the setup.
//!
//! Skips with the reason when QEMU or a kernel is missing, except under CI
//! (`CI=true`), where that fails.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use devbroker_hw_tests::rig::{
    self, guest_link, scenario, socket, Adapter, Rig, BOARD, MACHINE_DIR, RATE, SERIAL,
};
use devbroker_hw_tests::trace::{levels, ModemCtrl};
use devbroker_hw_tests::wait_value;
use devbroker_tests::{read_exact_timeout, write_all_fd};

/// `seq FROM TO` as busybox prints it: data both ends can make without
/// sending it over the shell.
fn seq(from: u32, to: u32) -> String {
    (from..=to).map(|n| format!("{n}\n")).collect()
}

/// Where two byte strings first differ, for a failure message.
fn mismatch(want: &[u8], got: &[u8]) -> String {
    let at = want
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len()));
    let show = |b: &[u8]| {
        String::from_utf8_lossy(&b[at.min(b.len())..(at + 40).min(b.len())]).into_owned()
    };
    format!(
        "{} bytes expected, {} got; first difference at byte {at}: expected {:?}, got {:?}",
        want.len(),
        got.len(),
        show(want),
        show(got)
    )
}

/// Opens devshim's link in the guest in the background and keeps it open,
/// as a terminal program would, so one session holds the port; returns once
/// the broker has opened the port (the board's line is at the config's rate).
fn hold_link(rig: &mut Rig) -> Result<Duration> {
    rig.sh(&format!(
        "( exec 3<>{}; exec sleep 600 ) >/tmp/holder.log 2>&1 &\necho $! >/tmp/holder.pid",
        guest_link()
    ))?;
    let took = rig.wait_baud(
        RATE,
        Duration::from_secs(30),
        "opening devshim's pty should start a session at the config's rate",
    )?;
    // The session is set up once the broker applied what devshim sends at
    // its start (the tool's settings, then DTR and RTS raised): only then
    // is a later change of the lines the last word.
    rig.sh(
        "for i in $(seq 300); do grep -q 'SET-CONTROL RTS on applied' /tmp/devbroker.log && exit 0; sleep 0.1; done; echo 'no RTS on from the session start' >&2; exit 1",
    )?;
    Ok(took)
}

#[test]
fn bytes_both_ways() {
    scenario("1: bytes both ways", Adapter::AtBoot, |rig| {
        let to_board = seq(1, 1000);
        let to_guest = seq(2000, 2999);
        // The job writes first and then reads what the board answers.
        rig.sh(&format!(
            "rm -f /tmp/rx /tmp/rx.done\n\
             ( exec 3<>{link}; seq 1 1000 >&3; head -c {n} <&3 >/tmp/rx; echo $? >/tmp/rx.done ) >/tmp/client.log 2>&1 &",
            link = guest_link(),
            n = to_guest.len()
        ))?;
        let got = read_exact_timeout(
            rig.board.master_fd(),
            to_board.len(),
            Duration::from_secs(30),
        )
        .context("the board reading what the guest job wrote to devshim's pty")?;
        ensure!(
            got == to_board.as_bytes(),
            "guest to board: {}",
            mismatch(to_board.as_bytes(), &got)
        );
        // The guest's bytes arrived, so the session is up: the board answers.
        write_all_fd(rig.board.master_fd(), to_guest.as_bytes())?;
        let out = rig.sh_status(
            "wait_path /tmp/rx.done 30000 || { echo \"the job got $(wc -c </tmp/rx) bytes\"; exit 1; }\n\
             seq 2000 2999 >/tmp/expect && cmp /tmp/expect /tmp/rx && cat /tmp/rx.done",
            Duration::from_secs(40),
        )?;
        ensure!(
            out.status == 0 && out.text.trim() == "0",
            "board to guest: the job did not read what the board sent: {}",
            out.text
        );
        // The project's rules gave the adapter's node to the broker's group, never 0666.
        let node = rig.sh(&format!(
            "stat -L -c '%G %a' /dev/serial/by-id/{}",
            rig::by_id(SERIAL)
        ))?;
        ensure!(
            node.trim() == "devbroker 660",
            "60-devbroker.rules should make the node group devbroker, mode 660; it is {node:?}"
        );
        Ok(())
    });
}

#[test]
fn baud_set_in_the_guest_reaches_the_line() {
    scenario("2: baud change", Adapter::AtBoot, |rig| {
        hold_link(rig)?;
        for baud in [9600, 230400, 19200] {
            rig.sh(&format!("stty -F {} {baud}", guest_link()))?;
            let took = rig.wait_baud(
                baud,
                Duration::from_secs(10),
                &format!("stty -F LINK {baud} in the guest"),
            )?;
            println!(
                "{baud} baud on the line {:.0} ms after stty returned",
                took.as_secs_f64() * 1000.0
            );
        }
        Ok(())
    });
}

#[test]
fn dtr_and_rts_from_devshim_ctl_reach_the_adapter() {
    scenario("3: DTR/RTS via devshim ctl", Adapter::AtBoot, |rig| {
        hold_link(rig)?;
        let both = |on: bool| ModemCtrl {
            dtr: Some(on),
            rts: Some(on),
        };
        let opened = levels(ModemCtrl::default(), &rig.modem_ctrl());
        ensure!(
            opened == both(true),
            "opening the port should raise DTR and RTS; the adapter has {opened:?}"
        );
        for (steps, on) in [
            ("dtr=0 rts=0", false),
            ("dtr=1 rts=1", true),
            ("dtr=0 rts=0", false),
            ("dtr=1 rts=1", true),
        ] {
            let seen = rig.modem_ctrl().len();
            let out = rig.sh(&format!("devshim ctl {BOARD} {steps} --dir {MACHINE_DIR}"))?;
            wait_levels(
                rig,
                seen,
                both(on),
                &format!("after `devshim ctl {BOARD} {steps}` (it printed {out:?})"),
            )?;
        }
        // The job closing the pty ends the session: DTR and RTS, raised by
        // the last step, drop, as on closing a real port.
        let seen = rig.modem_ctrl().len();
        rig.sh("kill $(cat /tmp/holder.pid)")?;
        wait_levels(rig, seen, both(false), "after the job closed the pty")?;
        Ok(())
    });
}

/// Waits until the SET_MODEM_CTRL requests after the first `seen` leave the
/// lines at `want`.
fn wait_levels(rig: &Rig, seen: usize, want: ModemCtrl, what: &str) -> Result<()> {
    wait_value(
        Duration::from_secs(10),
        &format!("{what}: the adapter's lines"),
        want,
        || {
            let all = rig.modem_ctrl();
            Ok(levels(ModemCtrl::default(), &all[seen.min(all.len())..]))
        },
    )?;
    Ok(())
}

#[test]
fn hotplug_cycles() {
    scenario("4: hotplug, 10 cycles", Adapter::Later, |rig| {
        let (sock, link) = (socket(), guest_link());
        rig.sh(&format!("! test -e {sock} && ! test -e {link}"))
            .context(
                "with nothing plugged, neither the board's socket nor devshim's link should exist",
            )?;
        let line = rig.board.slave_path.clone();
        let mut timings = Vec::new();
        for cycle in 1..=10 {
            let id = format!("hot{cycle}");
            let t0 = Instant::now();
            rig.qmp
                .plug_usb_serial(&id, &line, SERIAL)
                .with_context(|| format!("cycle {cycle}: plugging"))?;
            rig.sh(&format!("wait_path {sock} 20000 && wait_path {link} 10000"))
                .with_context(|| format!("cycle {cycle}: after plugging the adapter"))?;
            let up = t0.elapsed();
            let t1 = Instant::now();
            rig.qmp
                .unplug_usb_serial(&id)
                .with_context(|| format!("cycle {cycle}: pulling"))?;
            rig.sh(&format!("wait_gone {sock} 20000 && wait_gone {link} 10000"))
                .with_context(|| format!("cycle {cycle}: after pulling the adapter"))?;
            timings.push((up, t1.elapsed()));
        }
        let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
        println!(
            "plug → socket and link (ms): {}; pull → both gone (ms): {}",
            timings
                .iter()
                .map(|t| ms(t.0))
                .collect::<Vec<_>>()
                .join(" "),
            timings
                .iter()
                .map(|t| ms(t.1))
                .collect::<Vec<_>>()
                .join(" ")
        );
        Ok(())
    });
}

/// pyserial's modem calls, unchanged, on devshim's pty under `devshim run`:
/// each line change is printed after the call returned.
const PYSERIAL_LINES: &str = "import serial, sys
s = serial.Serial(sys.argv[1], 115200)
for name, on in (('dtr', 0), ('rts', 0), ('dtr', 1), ('rts', 1), ('dtr', 0)):
    setattr(s, name, bool(on))
    print(name, on, flush=True)
s.close()
";

#[test]
fn dtr_and_rts_from_an_unchanged_tool_under_devshim_run() {
    scenario(
        "5: DTR/RTS from pyserial under devshim run",
        Adapter::AtBoot,
        |rig| {
            let seen = rig.modem_ctrl().len();
            let script = PYSERIAL_LINES.replace('\'', "'\\''");
            let out = rig.sh(&format!(
                "devshim run --state-dir /run/devshim -- python3 -c '{script}' {}",
                guest_link()
            ))?;
            ensure!(
                out.contains("dtr 0\nrts 0\ndtr 1\nrts 1\ndtr 0")
                    && !out.contains("without line control"),
                "pyserial under devshim run printed {out:?}"
            );
            // Each change reached the FT232, in order, between the open (both
            // up) and the close (both down, HUPCL).
            let mut now = ModemCtrl::default();
            let mut steps = Vec::new();
            for r in &rig.modem_ctrl()[seen..] {
                now = levels(now, std::slice::from_ref(r));
                if steps.last() != Some(&now) {
                    steps.push(now);
                }
            }
            let lv = |dtr, rts| ModemCtrl {
                dtr: Some(dtr),
                rts: Some(rts),
            };
            let want = [
                lv(true, true),
                lv(false, true),
                lv(false, false),
                lv(true, false),
                lv(true, true),
                lv(false, true),
                lv(false, false),
            ];
            ensure!(
                steps == want,
                "the FT232's lines went {steps:?}, expected {want:?}"
            );
            Ok(())
        },
    );
}
