//! QEMU's machine protocol (QMP), for what a person does at a USB port:
//! plugging an adapter in and pulling it out while the guest runs.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// A QMP connection in command mode.
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Every asynchronous event seen so far, for failure reports.
    pub events: Vec<Value>,
}

/// How long QEMU gets to answer a command.
const REPLY_LIMIT: Duration = Duration::from_secs(20);

impl Qmp {
    /// Connects (retrying while QEMU starts) and leaves capabilities negotiation.
    pub fn connect(path: &Path, limit: Duration) -> Result<Qmp> {
        let mut q = Qmp {
            stream: crate::shell::connect(path, limit, "QMP's socket")?,
            buf: Vec::new(),
            events: Vec::new(),
        };
        let greeting = q.message(Instant::now() + REPLY_LIMIT)?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting expected, got {greeting}");
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    /// Runs a command; returns its `return` value, or its error as an error.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let line = json!({ "execute": command, "arguments": arguments }).to_string() + "\n";
        self.stream
            .write_all(line.as_bytes())
            .context("writing to QMP")?;
        let deadline = Instant::now() + REPLY_LIMIT;
        loop {
            let msg = self.message(deadline)?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                bail!("QMP {command} {arguments} failed: {err}");
            }
            self.events.push(msg);
        }
    }

    /// Waits for an event named `name` whose `data` satisfies `matches`,
    /// among those already seen and those to come.
    pub fn wait_event(
        &mut self,
        name: &str,
        matches: impl Fn(&Value) -> bool,
        limit: Duration,
    ) -> Result<Value> {
        let hit = |e: &Value| e["event"] == name && matches(&e["data"]);
        if let Some(i) = self.events.iter().position(hit) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + limit;
        loop {
            let msg = self
                .message(deadline)
                .with_context(|| format!("waiting for QMP event {name}"))?;
            if hit(&msg) {
                return Ok(msg);
            }
            self.events.push(msg);
        }
    }

    /// The next JSON message.
    fn message(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(&text).with_context(|| format!("QMP sent {text:?}"));
            }
            if !crate::shell::read_more(
                &mut self.stream,
                &mut self.buf,
                deadline,
                "the QMP connection",
            )? {
                bail!("QEMU did not answer on QMP in time");
            }
        }
    }

    /// Plugs a QEMU `usb-serial` (an FT232) whose line is the host tty
    /// `path`, with USB serial number `serial`.
    pub fn plug_usb_serial(&mut self, id: &str, path: &Path, serial: &str) -> Result<()> {
        let chardev = format!("{id}-line");
        self.execute(
            "chardev-add",
            json!({ "id": chardev, "backend": { "type": "serial", "data": { "device": path } } }),
        )?;
        self.execute(
            "device_add",
            json!({ "driver": "usb-serial", "id": id, "chardev": chardev, "serial": serial }),
        )?;
        Ok(())
    }

    /// Pulls the adapter plugged as `id` out and frees its line; returns once
    /// QEMU has removed the device.
    pub fn unplug_usb_serial(&mut self, id: &str) -> Result<()> {
        self.execute("device_del", json!({ "id": id }))?;
        self.wait_event(
            "DEVICE_DELETED",
            |d| d["device"] == id,
            Duration::from_secs(10),
        )?;
        self.execute("chardev-remove", json!({ "id": format!("{id}-line") }))?;
        Ok(())
    }
}
