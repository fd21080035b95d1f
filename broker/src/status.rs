//! `devbroker status`: asks a running broker over its admin socket and
//! prints a table or JSON.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use wire::control::{request_line, Reply, Request, Status, VERSION};

/// Connects to a control socket and sends `hello`: the writing half and the
/// buffered reading half.
fn connect(socket: &Path) -> anyhow::Result<(UnixStream, BufReader<UnixStream>)> {
    let sock = UnixStream::connect(socket).with_context(|| {
        format!(
            "can't reach the broker at {}: is `devbroker run` running with this --run-dir?",
            socket.display()
        )
    })?;
    let mut w = sock.try_clone()?;
    w.write_all(&request_line(&Request::Hello {
        version: VERSION,
        client: "devbroker-cli".into(),
    }))?;
    Ok((w, BufReader::new(sock)))
}

/// Reads one reply; the broker's refusal is an error.
fn read_reply(r: &mut BufReader<UnixStream>) -> anyhow::Result<Reply> {
    let mut line = String::new();
    r.read_line(&mut line)
        .context("the broker did not answer")?;
    let reply: Reply =
        serde_json::from_str(&line).with_context(|| format!("unreadable reply: {line}"))?;
    if let Reply::Error { message, .. } = &reply {
        bail!("the broker refused: {message}");
    }
    Ok(reply)
}

/// Sends `hello` and one request on a control socket and returns the reply.
pub fn ask(socket: &Path, req: &Request) -> anyhow::Result<Reply> {
    let (mut w, mut r) = connect(socket)?;
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(30)))?;
    read_reply(&mut r)?;
    w.write_all(&request_line(req))?;
    read_reply(&mut r)
}

/// Fetches the status.
pub fn fetch(socket: &Path) -> anyhow::Result<Status> {
    match ask(socket, &Request::Status {})? {
        Reply::Status(s) => Ok(s),
        other => bail!("unexpected reply: {other:?}"),
    }
}

/// A human-readable table.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    if s.boards.is_empty() {
        out.push_str("no boards configured\n");
    }
    for b in &s.boards {
        let mut users: Vec<String> = b.machines.iter().map(|m| format!("machine {m}")).collect();
        users.extend(b.host_groups.iter().map(|g| format!("group {g}")));
        out.push_str(&format!(
            "{}  [{}]  for {}\n",
            b.name,
            b.compatible.join(", "),
            if users.is_empty() {
                "nobody".to_string()
            } else {
                users.join(", ")
            }
        ));
        if let Some(l) = &b.lease {
            out.push_str(&format!("  leased to {} since {}\n", l.who, l.since));
        }
        for (i, w) in b.waiting.iter().enumerate() {
            out.push_str(&format!(
                "  waiting #{}: {} since {}\n",
                i + 1,
                w.who,
                w.since
            ));
        }
        if b.console == "always" {
            out.push_str("  console captured always\n");
        }
        for t in &b.ttys {
            let state = if t.present { "present" } else { "absent " };
            out.push_str(&format!(
                "  {:<12} {state}  {}\n",
                t.name,
                t.by_id.as_deref().unwrap_or("-")
            ));
            if let Some(d) = &t.device {
                out.push_str(&format!("               device {d}\n"));
            }
            match &t.holder {
                Some(h) => out.push_str(&format!(
                    "               held by {}{} since {}\n",
                    h.who,
                    wire::control::tool_and_pid(h.tool.as_deref(), h.pid),
                    h.since
                )),
                None => out.push_str("               free\n"),
            }
            if let (Some(dtr), Some(rts)) = (t.dtr, t.rts) {
                let onoff = |b: bool| if b { "on" } else { "off" };
                out.push_str(&format!(
                    "               DTR {}, RTS {}\n",
                    onoff(dtr),
                    onoff(rts)
                ));
            }
            out.push_str(&format!(
                "               {} bytes to board, {} bytes from board\n",
                t.bytes_to_board, t.bytes_from_board
            ));
        }
    }
    out
}

/// Prints to stdout.
pub fn print(s: &Status, json: bool) -> anyhow::Result<()> {
    let mut o = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut o, s)?;
        writeln!(o)?;
    } else {
        o.write_all(render(s).as_bytes())?;
    }
    Ok(())
}

/// `devbroker log BOARD [--follow]`: prints what the board's console sent
/// (the ring), then, following, each new chunk until interrupted.
pub fn log(socket: &Path, board: &str, follow: bool) -> anyhow::Result<()> {
    let (mut w, mut r) = connect(socket)?;
    w.write_all(&request_line(&Request::Log {
        board: board.into(),
        follow,
    }))?;
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        match serde_json::from_str::<Reply>(&line)
            .with_context(|| format!("unreadable reply: {line}"))?
        {
            Reply::Error { message, .. } => bail!("{message}"),
            Reply::Log { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
                if first && !follow {
                    return Ok(());
                }
                first = false;
            }
            _ => {}
        }
    }
}
