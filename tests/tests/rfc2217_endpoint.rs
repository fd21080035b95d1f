//! devshim's RFC 2217 endpoints on 127.0.0.1, with the real broker and
//! devshim: pyserial's `rfc2217://` reaches the fake board (data both ways,
//! baud, DTR/RTS/break, parity and data size as the broker replies them), one
//! session per tty between the endpoint and the pty, the endpoint and its
//! state-file entry following the tty, `devshim lease` exporting
//! `SAI_DEVICE_RFC2217_<n>`, and only the job user and root served.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use devbroker_tests::*;
use wire::rfc2217::{control, parity, Command as Rfc, Direction};
use wire::telnet::{self, Decoder, Event, Negotiator};

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_E2217A-if00-port0";
const S: Duration = Duration::from_secs(1);

/// A board only machine ci1 uses: its socket is there without a lease.
const DEDICATED: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_E2217A-if00-port0" }
"#;

/// A board two machines share: its socket is in a machine only while that
/// machine holds the lease.
const SHARED: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1", "ci2"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_E2217A-if00-port0" }
"#;

/// `devshim list --state-dir DIR`: its table.
fn table(state: &Path) -> String {
    let out = Command::new(devshim())
        .arg("list")
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}

fn wait_released(w: &World) {
    wait_for(5 * S, "the broker to release esp1.console", || {
        w.holder("esp1").is_none()
    });
}

/// A python3 script driven line by line: it prints a line at each step and
/// waits for a newline on stdin before going on.
struct Py {
    child: Child,
    out: BufReader<ChildStdout>,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Py {
    fn start(w: &World, name: &str, script: &str, args: &[&str]) -> Py {
        let log = w.path(&format!("{name}.log"));
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", script])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .die_with_parent()
            .spawn()
            .expect("python3 with python3-serial");
        Py {
            out: BufReader::new(child.stdout.take().unwrap()),
            stdin: child.stdin.take().unwrap(),
            child,
            log,
        }
    }

    /// The script's next line; panics with its stderr and the logs at EOF.
    fn next(&mut self, w: &World) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        if line.is_empty() {
            let _ = self.child.wait();
            panic!(
                "the python script ended early:\n{}\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default(),
                w.logs()
            );
        }
        line.trim_end().to_string()
    }

    /// Lets the script go on to its next step.
    fn go(&mut self) {
        writeln!(self.stdin).unwrap();
    }

    fn finish(mut self, w: &World) {
        let st = self.child.wait().unwrap();
        assert!(
            st.success(),
            "python failed:\n{}\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            w.logs()
        );
    }
}

/// A bare RFC 2217 client over TCP, to see exactly what the server replies.
struct Raw {
    s: TcpStream,
    dec: Decoder,
    neg: Negotiator,
    replies: std::collections::VecDeque<Rfc>,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(5 * S)).unwrap();
        let mut neg = Negotiator::client();
        s.write_all(&neg.opening()).unwrap();
        Raw {
            s,
            dec: Decoder::new(),
            neg,
            replies: Default::default(),
        }
    }

    /// Reads once from the server, answering negotiations and queueing
    /// COM-PORT-OPTION replies. False at end of stream.
    fn pump(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        let n = self
            .s
            .read(&mut buf)
            .expect("the server answers within 5 s");
        let mut answers = Vec::new();
        let mut pos = 0;
        while pos < n {
            let (used, ev) = self.dec.feed(&buf[pos..n]);
            pos += used;
            match ev {
                Some(Event::Negotiate(v, o)) => {
                    if let Some((rv, ro)) = self.neg.answer(v, o) {
                        telnet::negotiate(rv, ro, &mut answers);
                    }
                }
                Some(Event::Subnegotiation(telnet::OPT_COM_PORT, p)) => {
                    if let Ok((Direction::ServerToClient, c)) = Rfc::decode(&p) {
                        self.replies.push_back(c);
                    }
                }
                _ => {}
            }
        }
        if !answers.is_empty() {
            self.s.write_all(&answers).unwrap();
        }
        n > 0
    }

    /// Sends `cmd` and returns the server's reply to it.
    fn ask(&mut self, cmd: Rfc) -> Rfc {
        self.s
            .write_all(&cmd.to_bytes(Direction::ClientToServer))
            .unwrap();
        loop {
            if let Some(i) = self
                .replies
                .iter()
                .position(|r| std::mem::discriminant(r) == std::mem::discriminant(&cmd))
            {
                return self.replies.remove(i).unwrap();
            }
            assert!(self.pump(), "the server closed before answering {cmd:?}");
        }
    }

    /// True once the server has closed the connection (within 5 s).
    fn closed(&mut self) -> bool {
        loop {
            match self.s.read(&mut [0u8; 4096]) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// What a refused client reads: the line that says why (the endpoint's
/// negotiation left out, as a client's telnet layer would).
fn refusal_text(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(5 * S)).unwrap();
    let mut got = Vec::new();
    loop {
        let text = telnet_data(&got);
        if text.ends_with("\r\n") {
            return text;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return text,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("a refused client is told why within 5 s: {e}; got {text:?}"),
        }
    }
}

/// The data in a telnet stream, without its commands.
fn telnet_data(mut bytes: &[u8]) -> String {
    let mut dec = Decoder::new();
    let mut data = Vec::new();
    while !bytes.is_empty() {
        let (used, ev) = dec.feed(bytes);
        if let Some(Event::Data(d)) = ev {
            data.extend_from_slice(d);
        }
        bytes = &bytes[used..];
    }
    String::from_utf8_lossy(&data).into_owned()
}

/// A board, the broker and ci1's devshim; the guest link and its port.
fn attached(w: &World) -> (FakeBoard, Proc, Proc, PathBuf, u16) {
    let board = w.plug(FTDI);
    let broker = w.broker();
    let shim = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    let port = w.endpoint_port("ci1", &link);
    (board, broker, shim, link, port)
}

const PYSERIAL_SESSION: &str = r#"
import serial, sys
def step(*msg):
    print(*msg, flush=True)
    sys.stdin.readline()
s = serial.serial_for_url(sys.argv[1], baudrate=115200, timeout=5)
step("open")
s.write(b"ping\n")
s.flush()
step("wrote")
step("read", s.read(6).hex())
for rate in (921600, 250000):
    s.write(b"at-old-rate")
    s.baudrate = rate
    step("baud", rate)
# Each setter waits for the server's answer and raises unless it agrees.
s.dtr = False
s.rts = False
s.dtr = True
s.rts = True
s.break_condition = True
s.break_condition = False
s.send_break(0.05)
step("controls", s.dtr, s.rts, s.break_condition)
s.close()
step("closed")
# Parity and data size: the server answers with the value in force.
for kw in ({"parity": serial.PARITY_EVEN}, {"bytesize": serial.SEVENBITS}):
    try:
        serial.serial_for_url(sys.argv[1], baudrate=115200, **kw).close()
        step("accepted", kw)
    except ValueError as e:
        step("rejected", e)
"#;

#[test]
fn pyserial_through_the_endpoint_reaches_the_board() {
    let w = World::new(DEDICATED);
    let (board, _b, shim, link, port) = attached(&w);
    let state = w.state_dir("ci1");

    // The state file: one entry with the tty's names, guest path and port.
    let entries = w.endpoints("ci1").unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let e = &entries[0];
    assert_eq!(e["board"], "esp1");
    assert_eq!(e["tty"], "console");
    assert_eq!(e["by_id"], FTDI);
    assert_eq!(e["link"], link.display().to_string());
    assert_eq!(e["pid"], shim.pid());
    let table = table(&state);
    let url = format!("rfc2217://127.0.0.1:{port}");
    assert!(
        table.starts_with("esp1.console  ")
            && table.contains(&link.display().to_string())
            && table.trim_end().ends_with(&url),
        "{table}"
    );
    assert_eq!(
        std::fs::metadata(state.join("ports.json"))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
            .unwrap(),
        0o644
    );

    let mut py = Py::start(&w, "pyserial", PYSERIAL_SESSION, &[&url]);
    assert_eq!(py.next(&w), "open");
    wait_for(2 * S, "the session to be held", || {
        w.holder("esp1").is_some()
    });
    let holder = w.holder("esp1");
    assert!(
        holder
            .as_deref()
            .is_some_and(|h| h.starts_with("machine ci1")),
        "{holder:?}"
    );
    py.go();
    // Tool → board.
    assert_eq!(py.next(&w), "wrote");
    let got = read_exact_timeout(board.master_fd(), 5, 5 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}", w.logs()));
    assert_eq!(got, b"ping\n");
    // Board → tool, with a 0xFF the broker escapes and pyserial unescapes.
    write_all_fd(board.master_fd(), b"po\xffng\n").unwrap();
    py.go();
    assert_eq!(py.next(&w), format!("read {}", hex(b"po\xffng\n")));
    py.go();
    // Baud changes land on the board, after the bytes written before them.
    for rate in [921600u32, 250000] {
        assert_eq!(py.next(&w), format!("baud {rate}"));
        wait_for(2 * S, &format!("the board at {rate}"), || {
            board.baud() == rate
        });
        let got = read_exact_timeout(board.master_fd(), 11, 2 * S).unwrap();
        assert_eq!(got, b"at-old-rate");
        py.go();
    }
    // DTR, RTS and break: pyserial checked each answer (a pty has no modem
    // lines; the broker reports the state asked for).
    assert_eq!(py.next(&w), "controls True True False");
    py.go();
    assert_eq!(py.next(&w), "closed");
    wait_released(&w);
    py.go();
    // Parity and data size reach the port, and the broker answers with what
    // is in force. The fake board is a pty, whose driver forces CS8 and
    // clears PARENB: pyserial hears 8N and says so (a real adapter takes 7E).
    assert_eq!(
        py.next(&w),
        "rejected remote rejected value for option 'parity'"
    );
    wait_released(&w);
    py.go();
    assert_eq!(
        py.next(&w),
        "rejected remote rejected value for option 'datasize'"
    );
    wait_released(&w);
    py.go();
    py.finish(&w);

    // The same, byte for byte, with a bare client: the replies are the
    // port's settings, read back after applying the request.
    let mut raw = Raw::connect(port);
    let in_force = || wire::termios::to_settings(&board.termios().unwrap());
    assert_eq!(
        raw.ask(Rfc::SetParity(parity::EVEN)),
        Rfc::SetParity(in_force().parity)
    );
    assert_eq!(in_force().parity, parity::NONE);
    assert_eq!(raw.ask(Rfc::SetDataSize(7)), Rfc::SetDataSize(8));
    assert_eq!(raw.ask(Rfc::SetBaudRate(460800)), Rfc::SetBaudRate(460800));
    assert_eq!(board.baud(), 460800);
    for c in [
        control::DTR_OFF,
        control::RTS_OFF,
        control::DTR_ON,
        control::RTS_ON,
        control::BREAK_ON,
        control::BREAK_OFF,
    ] {
        assert_eq!(raw.ask(Rfc::SetControl(c)), Rfc::SetControl(c));
    }
    assert_eq!(
        raw.ask(Rfc::Signature(Vec::new())),
        Rfc::Signature(
            format!("devbroker {} esp1.console", env!("CARGO_PKG_VERSION")).into_bytes()
        )
    );
    drop(raw);
    wait_released(&w);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn one_session_per_tty_between_the_endpoint_and_the_pty() {
    let w = World::new(DEDICATED);
    let (board, _b, _shim, link, port) = attached(&w);

    // A tool has the pty open: a TCP client gets the broker's refusal,
    // naming the holder, and is closed.
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"ping\n").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 5, 5 * S).unwrap(),
        b"ping\n"
    );
    // devshim names the tool (this test's process) to the broker.
    let me = std::process::id();
    wait_for(5 * S, "status to name the tool", || {
        w.first_tty("esp1")["holder"]["pid"] == me
    });
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    assert_eq!(w.first_tty("esp1")["holder"]["tool"], comm.trim_end());
    let text = refusal_text(port);
    let expect = format!(
        "devbroker: esp1.console is in use by machine ci1 ({}, pid {me}) since ",
        comm.trim_end()
    );
    assert!(
        text.starts_with(&expect) && text.ends_with("try again when it is released\r\n"),
        "{text:?}\n{}",
        w.logs()
    );
    // pyserial shows why: the refusal reads as the port's first line, and
    // the next read finds the port gone.
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import serial, sys\ns = serial.serial_for_url(sys.argv[1], timeout=5)\nprint(s.readline().decode().strip())\ntry:\n    print('then:', repr(s.read(1) + s.read(1)))\nexcept serial.SerialException as e:\n    print('then:', e)",
            &format!("rfc2217://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && said.starts_with(expect.trim_end())
            && (said.contains("then: b''") || said.contains("then: connection failed")),
        "pyserial on a held port: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The refusals left the tool's session alone.
    write_all_fd(board.master_fd(), b"pong\n").unwrap();
    assert_eq!(
        read_exact_timeout(tool.fd.as_raw_fd(), 5, 5 * S).unwrap(),
        b"pong\n"
    );
    drop(tool);
    wait_released(&w);

    // And the other way round: while a TCP client holds the port, a tool
    // opening the pty is hung up (EIO), as after an unplug.
    let mut raw = Raw::connect(port);
    assert_eq!(raw.ask(Rfc::SetBaudRate(0)), Rfc::SetBaudRate(115200));
    let tool = Tool::open(&link).unwrap();
    tool.eio_after(5 * S, "a tool on a held tty is hung up", || {});
    // The TCP client's session goes on.
    raw.s.write_all(b"still here").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 10, 5 * S).unwrap(),
        b"still here"
    );
    drop(raw);
    wait_released(&w);
    // A tool reopening the path gets a working pty again.
    wait_for(5 * S, "the relinked pty", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"again\n").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 6, 5 * S).unwrap(),
        b"again\n"
    );
    // The pty was replaced; the endpoint stayed.
    assert_eq!(w.endpoint_port("ci1", &link), port);
}

#[test]
fn the_endpoint_follows_the_tty() {
    let w = World::new(DEDICATED);
    let (board, _b, mut shim, link, port) = attached(&w);
    let mut raw = Raw::connect(port);
    assert_eq!(raw.ask(Rfc::SetBaudRate(0)), Rfc::SetBaudRate(115200));

    // Unplugged: the client's connection ends, the listener closes and the
    // entry goes.
    board.unplug();
    assert!(raw.closed(), "the TCP connection outlived the tty");
    wait_for(2 * S, "the entry to go", || {
        w.endpoints("ci1") == Some(Vec::new())
    });
    assert!(!exists(&link));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the endpoint still listens"
    );

    // Plugged again: a new endpoint that works.
    let board = w.plug(FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    let port = w.endpoint_port("ci1", &link);
    let mut raw = Raw::connect(port);
    assert_eq!(raw.ask(Rfc::SetBaudRate(230400)), Rfc::SetBaudRate(230400));
    raw.s.write_all(b"hello").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 5, 5 * S).unwrap(),
        b"hello"
    );
    assert_eq!(board.baud(), 230400);

    // The port stays while the tty does: a tool's session on the pty and its
    // hangup don't move it.
    drop(raw);
    wait_released(&w);
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"x").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 1, 5 * S).unwrap(),
        b"x"
    );
    drop(tool);
    assert_eq!(w.endpoint_port("ci1", &link), port);

    // devshim stopping withdraws its entries.
    assert!(shim.stop().success());
    assert_eq!(w.endpoints("ci1"), Some(Vec::new()));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
}

/// A job's script: records its environment, then talks to the board
/// through `SAI_DEVICE_RFC2217_0`.
const LEASE_JOB: &str = r#"
import os, serial, sys
with open(sys.argv[1], "w") as f:
    f.write(os.environ.get("SAI_DEVICE_TTY0", "") + "\n")
    f.write(os.environ.get("SAI_DEVICE_RFC2217_0", "") + "\n")
    f.write(os.environ.get("ESPPORT", "") + "\n")
s = serial.serial_for_url(os.environ["SAI_DEVICE_RFC2217_0"], baudrate=115200, timeout=5)
s.dtr = False
s.rts = True
s.write(b"hi")
got = s.read(3)
s.close()
sys.exit(0 if got == b"ok\n" else 3)
"#;

#[test]
fn lease_exports_the_rfc2217_endpoint() {
    let w = World::new(SHARED);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let _s = w.shim("ci1");
    let state = w.state_dir("ci1");
    let link = w.guest_link("ci1", FTDI);
    // Not leased: no socket, no link, no entry (the file is there, empty).
    wait_for(5 * S, "devshim's state file", || {
        w.endpoints("ci1").is_some()
    });
    assert_eq!(w.endpoints("ci1"), Some(Vec::new()));
    assert!(!exists(&link));

    let seen = w.path("seen");
    let lease_log = w.path("lease.log");
    let mut job = Command::new(devshim())
        .arg("lease")
        .arg("--dir")
        .arg(w.run.join("machines/ci1"))
        .arg("--link-root")
        .arg(w.guest("ci1"))
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--board",
            "esp1",
            "ESPPORT=0",
            "--",
            "/usr/bin/python3",
            "-c",
            LEASE_JOB,
        ])
        .arg(&seen)
        .stderr(std::fs::File::create(&lease_log).unwrap())
        .die_with_parent()
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&lease_log).unwrap_or_default();
    let got = read_exact_timeout(board.master_fd(), 2, 10 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}\n{}", log(), w.logs()));
    assert_eq!(got, b"hi");
    // While the job runs, the exported URL is the tty's entry.
    let port = w.endpoint_port("ci1", &link);
    let lines: Vec<String> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            link.display().to_string(),
            format!("rfc2217://127.0.0.1:{port}"),
            link.display().to_string()
        ]
    );
    write_all_fd(board.master_fd(), b"ok\n").unwrap();
    let st = job.wait().unwrap();
    assert!(st.success(), "{st:?}\n{}\n{}", log(), w.logs());
    assert!(
        log().contains(&format!(
            "devshim: got esp1 ({}, rfc2217://127.0.0.1:{port})",
            link.display()
        )),
        "{}",
        log()
    );
    // The lease ended: the socket, the link and the entry go.
    wait_for(5 * S, "the entry to go after the lease", || {
        w.endpoints("ci1") == Some(Vec::new())
    });

    // sai-device takes the state directory from DEVBROKER_STATE_DIR.
    let sai = w.path("bin/sai-device");
    std::fs::create_dir_all(sai.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(devshim(), &sai).unwrap();
    let script = format!(
        "echo \"$SAI_DEVICE_RFC2217_0\" > {} && devshim_list=$({} list --state-dir {}) && echo \"$devshim_list\" >> {}",
        seen.display(),
        devshim().display(),
        state.display(),
        seen.display()
    );
    let out = Command::new(&sai)
        .args(["esp32", "sh", "-c", &script])
        .env("DEVBROKER_DIR", w.run.join("machines/ci1"))
        .env("DEVBROKER_LINK_ROOT", w.guest("ci1"))
        .env("DEVBROKER_STATE_DIR", &state)
        .die_with_parent()
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.logs()
    );
    let seen_text = std::fs::read_to_string(&seen).unwrap();
    let mut lines = seen_text.lines();
    let url = lines.next().unwrap();
    let port: u16 = url
        .strip_prefix("rfc2217://127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("SAI_DEVICE_RFC2217_0={url:?}"));
    let row = lines.next().unwrap_or_default();
    assert!(
        row.starts_with("esp1.console") && row.ends_with(&format!(":{port}")),
        "{seen_text}"
    );

    // A state directory devshim serve doesn't keep: the job still runs,
    // told why it has no endpoint.
    let out = Command::new(devshim())
        .arg("lease")
        .arg("--dir")
        .arg(w.run.join("machines/ci1"))
        .arg("--link-root")
        .arg(w.guest("ci1"))
        .arg("--state-dir")
        .arg(w.path("nowhere"))
        .args([
            "--board",
            "esp1",
            "--",
            "sh",
            "-c",
            "test -z \"${SAI_DEVICE_RFC2217_0+set}\" && test -e \"$SAI_DEVICE_TTY0\"",
        ])
        .die_with_parent()
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "devshim: no RFC 2217 endpoint for {} ({}",
            link.display(),
            w.path("nowhere/ports.json").display()
        )),
        "{err}"
    );
}

/// Runs python3 `script` with `args` as `uid` (its group the same number, no
/// other groups), through setpriv; returns (success, stdout + stderr).
fn python_as(uid: u32, script: &str, args: &[&str]) -> (bool, String) {
    let id = uid.to_string();
    let out = Command::new("setpriv")
        .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
        .args(["/usr/bin/python3", "-c", script])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv (util-linux) and python3");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Connects, sends a line, and prints (as hex) all it gets until closed.
const STRANGER: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"from a stranger\n")
got = b""
while not got.endswith(b"\r\n"):
    b = s.recv(4096)
    if not b:
        break
    got += b
print(got.hex())
"#;

/// A job's session through pyserial: a line to the board.
const JOB: &str = r#"
import serial, sys
s = serial.serial_for_url(sys.argv[1], baudrate=115200, timeout=5)
s.write(b"from the job\n")
s.flush()
s.close()
print("sent")
"#;

#[test]
fn only_the_job_user_and_root_may_use_the_endpoint() {
    if !nix::unistd::geteuid().is_root() {
        skip("connecting as other users needs root (run the suite as root, as CI does)");
        return;
    }
    // The job user is `daemon`, whom every Debian has; 4242 is anybody else.
    let job = devshim::users::lookup(Path::new("/"), "daemon").expect("user daemon");
    let w = World::new(DEDICATED);
    let board = w.plug(FTDI);
    let _broker = w.broker();
    let _shim = w.shim_for("ci1", "daemon", &[]);
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    let port = w.endpoint_port("ci1", &link);

    // Anybody else: told why, closed, and nothing reaches the board.
    let (ok, out) = python_as(4242, STRANGER, &[&port.to_string()]);
    assert!(ok, "{out}\n{}", w.logs());
    let text = telnet_data(
        &(0..out.trim().len() / 2)
            .map(|i| u8::from_str_radix(&out.trim()[2 * i..2 * i + 2], 16).unwrap())
            .collect::<Vec<u8>>(),
    );
    assert_eq!(
        text,
        format!(
            "devshim: permission denied: uid 4242 is not the job user daemon (uid {})\r\n",
            job.uid
        ),
        "{}",
        w.logs()
    );
    assert_eq!(
        w.holder("esp1"),
        None,
        "a refused client reached the broker"
    );
    assert_eq!(
        read_timeout(board.master_fd(), &mut [0u8; 64], S / 2).unwrap(),
        None,
        "the board got bytes from a refused client"
    );

    // The job user: a session, bytes to the board.
    let url = format!("rfc2217://127.0.0.1:{port}");
    let (ok, out) = python_as(job.uid, JOB, &[&url]);
    assert!(ok && out.contains("sent"), "{out}\n{}", w.logs());
    let got = read_exact_timeout(board.master_fd(), 13, 5 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}", w.logs()));
    assert_eq!(got, b"from the job\n");
    wait_released(&w);

    // Root: served too.
    let mut raw = Raw::connect(port);
    assert_eq!(raw.ask(Rfc::SetBaudRate(57600)), Rfc::SetBaudRate(57600));
    drop(raw);
    wait_released(&w);
}
