//! Tier 5: a real USB serial adapter through the host broker and devshim.
//! Opt-in: set `DEVBROKER_HW_BY_ID` to the adapter's name in
//! `/dev/serial/by-id` (and `DEVBROKER_HW_LOOPBACK=1` when its TX is wired
//! to its RX); unset, every test prints "skipped" and passes. Run as root,
//! so the tests can look at the port beside the broker (see
//! `devbroker_hw_tests::real`).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use devbroker_hw_tests::real::{self, Port, RealRig, RATE};
use devbroker_hw_tests::wait_value;
use devbroker_tests::{random_bytes, read_exact_timeout, Tool};

/// Runs `body` on the adapter, if one is named; a failure carries the
/// broker's and devshim's logs.
fn on_adapter(check: &str, body: impl FnOnce(&RealRig) -> Result<()>) {
    let Some(by_id) = real::adapter() else { return };
    let _turn = real::exclusive();
    let rig = RealRig::start(&by_id).unwrap_or_else(|e| panic!("{check} on {by_id}: {e:#}"));
    if let Err(e) = body(&rig) {
        panic!("{check} on {by_id} failed: {e:#}\n{}", rig.world.logs());
    }
}

/// Sets the tool's pty to `baud`, as `tcsetattr` in any program does.
fn set_baud(tool: &Tool, baud: u32) -> Result<()> {
    let fd = &tool.fd;
    let mut t = wire::termios::get(fd)?;
    wire::termios::set_baud(&mut t, baud);
    wire::termios::set(fd, &t, wire::termios::When::Now)?;
    Ok(())
}

#[test]
fn real_adapter_opens_at_the_config_rate_and_follows_baud_changes() {
    on_adapter("open and baud", |rig| {
        let tool = rig.open_session()?;
        let port = Port::open(&rig.device())?;
        wait_value(
            Duration::from_secs(5),
            "the port's baud after the open",
            RATE,
            || port.baud(),
        )?;
        for baud in [9600, 57600, RATE] {
            set_baud(&tool, baud)?;
            wait_value(
                Duration::from_secs(5),
                &format!("the port's baud after the tool set {baud}"),
                baud,
                || port.baud(),
            )?;
        }
        drop(port);
        drop(tool);
        Ok(())
    });
}

#[test]
fn real_adapter_takes_dtr_and_rts_from_devshim_ctl() {
    on_adapter("DTR/RTS via devshim ctl", |rig| {
        let tool = rig.open_session()?;
        let port = Port::open(&rig.device())?;
        let lines = "the adapter's (DTR, RTS)";
        wait_value(
            Duration::from_secs(5),
            &format!("{lines} after the open"),
            (true, true),
            || port.modem_lines(),
        )?;
        for (steps, want) in [
            ("dtr=0 rts=0", (false, false)),
            ("dtr=1 rts=1", (true, true)),
            ("dtr=0 rts=1", (false, true)),
            ("dtr=1 rts=0", (true, false)),
        ] {
            let printed = rig.ctl(steps)?;
            wait_value(
                Duration::from_secs(5),
                &format!("{lines} after `devshim ctl {steps}` ({printed:?})"),
                want,
                || port.modem_lines(),
            )?;
        }
        drop(port);
        drop(tool);
        Ok(())
    });
}

#[test]
fn real_adapter_carries_bytes_both_ways_when_looped() {
    if !real::looped() {
        if real::adapter().is_some() {
            println!(
                "skipped: set {}=1 when the adapter's TX is wired to its RX",
                real::LOOPBACK_VAR
            );
        }
        return;
    }
    on_adapter("bytes both ways (loopback)", |rig| {
        use std::os::fd::AsRawFd;
        let tool = rig.open_session()?;
        // 4 KiB is about 0.4 s each way at 115200 baud.
        let data = random_bytes(4096, 5);
        tool.write_all(&data)?;
        let back = read_exact_timeout(tool.fd.as_raw_fd(), data.len(), Duration::from_secs(10))
            .context("reading back what went out through the loop")?;
        ensure!(
            back == data,
            "the bytes that came back differ from those sent"
        );
        Ok(())
    });
}
