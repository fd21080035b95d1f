//! A tty's RFC 2217 endpoint on `127.0.0.1`: what a pty can't carry (DTR,
//! RTS, break, parity, data size) reaches the real port through it.
//!
//! Each TCP client gets its own connection to the tty's broker socket, and
//! bytes are relayed unchanged both ways: the broker is the RFC 2217 server.
//! It allows one session per tty, so a client while a tool has the pty open
//! (or the other way round) gets the broker's refusal — a line of text naming
//! the holder — and is closed. Nothing runs while no client is connected.
//!
//! An RFC 2217 client shows nothing of a server that just closes (pyserial
//! raises a bare "connection reset", esptool adds "the port is busy or
//! doesn't exist"), and no error it raises carries text from the server.
//! So a refusal is delivered as a port would deliver it: the endpoint
//! answers the client's negotiation and settings, then sends the reason as
//! the port's first line and closes cleanly. A script reading the port
//! prints it; the reader's next read fails as after an unplug.
//!
//! The tty's pty is the job user's (mode 0660), so its endpoint is too: any
//! local user can connect to `127.0.0.1`, but only the job user and root are
//! served. TCP has no `SO_PEERCRED`; the client's socket is found the way
//! `ss -e` finds it, as the row of `/proc/net/tcp` (or `tcp6`) whose local
//! address is the peer's and whose remote address is ours, and its `uid`
//! column names the user who made it. Anyone else gets a line saying so and
//! is closed before a byte reaches the broker.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use wire::rfc2217::{control, Command, Direction};
use wire::telnet::{self, Decoder, Event, Negotiator, IAC, OPT_COM_PORT};

use crate::users::User;

/// Buffer size each way.
const CHUNK: usize = 64 * 1024;

/// Binds a listener on `127.0.0.1` at a port the kernel picks.
pub fn bind() -> io::Result<(std::net::TcpListener, u16)> {
    let l = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    l.set_nonblocking(true)?;
    let port = l.local_addr()?.port();
    Ok((l, port))
}

/// Serves `listener` to `job` (and root) until `cancel`; then closes it
/// and every connection.
pub async fn run(
    listener: std::net::TcpListener,
    socket: PathBuf,
    label: String,
    job: User,
    cancel: CancellationToken,
) {
    let job = Arc::new(job);
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!(tty = %label, "RFC 2217 endpoint: {e}");
            return;
        }
    };
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    debug!(tty = %label, %peer, "RFC 2217 client");
                    conns.spawn(relay(tcp, socket.clone(), label.clone(), job.clone()));
                }
                Err(e) => {
                    // Out of descriptors and the like: the client is gone, go on.
                    warn!(tty = %label, "RFC 2217 endpoint: accept: {e}");
                }
            },
        }
    }
    // Abort the relays, closing their sockets, and wait until they are gone.
    conns.shutdown().await;
    info!(tty = %label, "RFC 2217 endpoint closed");
}

/// Relays one TCP client to a fresh connection to the broker socket, if it
/// is the job user's or root's.
async fn relay(mut tcp: TcpStream, socket: PathBuf, label: String, job: Arc<User>) {
    let _ = tcp.set_nodelay(true);
    if let Err(why) = admit(&tcp, &job) {
        info!(tty = %label, "RFC 2217 client refused: {why}");
        refuse(tcp, &format!("devshim: permission denied: {why}\r\n")).await;
        return;
    }
    let mut unix = match UnixStream::connect(&socket).await {
        Ok(u) => u,
        Err(e) => {
            let why = format!(
                "devshim: can't reach {label} at {}: {e}\r\n",
                socket.display()
            );
            refuse(tcp, &why).await;
            return;
        }
    };
    // A session starts with the broker's negotiation (IAC); a refusal is a
    // line of text.
    let mut first = vec![0u8; CHUNK];
    let n = match tokio::time::timeout(FIRST_WORD, unix.read(&mut first)).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            refuse(
                tcp,
                &format!("devshim: {label}: the broker failed: {e}\r\n"),
            )
            .await;
            return;
        }
        Err(_) => {
            let why =
                format!("devshim: {label}: the broker did not answer within {FIRST_WORD:?}\r\n");
            refuse(tcp, &why).await;
            return;
        }
    };
    if n == 0 || first[0] != IAC {
        let mut why = String::from_utf8_lossy(&first[..n]).into_owned();
        let mut rest = String::new();
        if unix.read_to_string(&mut rest).await.is_ok() {
            why.push_str(&rest);
        }
        if why.is_empty() {
            why = format!("devshim: the broker closed {label}'s session\r\n");
        }
        info!(tty = %label, "RFC 2217 client refused by the broker: {}", why.trim_end());
        refuse(tcp, &why).await;
        return;
    }
    if tcp.write_all(&first[..n]).await.is_err() {
        return;
    }
    drop(first);
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut unix, CHUNK, CHUNK).await {
        Ok((up, down)) => {
            debug!(tty = %label, "RFC 2217 client left: {up} bytes to the broker, {down} back")
        }
        Err(e) => debug!(tty = %label, "RFC 2217 client ended: {e}"),
    }
}

/// How long the broker may take to answer a new session.
const FIRST_WORD: Duration = Duration::from_secs(10);

/// How long a refused client may go on negotiating and setting its line.
const REFUSAL_TALK: Duration = Duration::from_secs(3);

/// Quiet after which a refused client has set its line and waits for data.
const REFUSAL_QUIET: Duration = Duration::from_millis(300);

/// How long a refused client has to read the reason and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(3);

/// Refuses a client so that it can show why: answers its telnet
/// negotiation and COM-PORT-OPTION commands as a port would (the values it
/// asks for), so its open completes; once it has been quiet a moment, sends
/// `why` as the port's data; goes on answering until the client closes or
/// [`REFUSAL_LINGER`] passes (pyserial reports a closed connection before
/// the data it already has, so the text must be read while the connection
/// stands); then closes.
async fn refuse(mut tcp: TcpStream, why: &str) {
    let mut neg = Negotiator::server();
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 4096];
    let mut told = false;
    let start = tokio::time::Instant::now();
    let talk = async {
        tcp.write_all(&neg.opening()).await?;
        loop {
            let now = tokio::time::Instant::now();
            let until = if told {
                start + REFUSAL_TALK + REFUSAL_LINGER
            } else {
                (now + REFUSAL_QUIET).min(start + REFUSAL_TALK)
            };
            let n = match tokio::time::timeout_at(until, tcp.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) if !told => {
                    tcp.write_all(why.as_bytes()).await?;
                    told = true;
                    continue;
                }
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            let mut out = Vec::new();
            let mut at = 0;
            while at < n {
                let (used, ev) = dec.feed(&buf[at..n]);
                at += used;
                match ev {
                    Some(Event::Negotiate(v, o)) => {
                        if let Some((rv, ro)) = neg.answer(v, o) {
                            telnet::negotiate(rv, ro, &mut out);
                        }
                    }
                    Some(Event::Subnegotiation(OPT_COM_PORT, payload)) => {
                        if let Ok((Direction::ClientToServer, cmd)) = Command::decode(&payload) {
                            if let Some(reply) = as_a_port_would(cmd) {
                                reply.encode(Direction::ServerToClient, &mut out);
                            }
                        }
                    }
                    _ => {}
                }
            }
            tcp.write_all(&out).await?;
        }
        tcp.shutdown().await
    };
    let _ = talk.await;
}

/// The answer a port gives a command, for a refused client: the value it
/// asked for (a query is answered with a plain default).
fn as_a_port_would(cmd: Command) -> Option<Command> {
    Some(match cmd {
        Command::SetBaudRate(b) => Command::SetBaudRate(if b == 0 { 115_200 } else { b }),
        Command::SetDataSize(v) => Command::SetDataSize(if v == 0 { 8 } else { v }),
        Command::SetParity(v) => Command::SetParity(v.max(1)),
        Command::SetStopSize(v) => Command::SetStopSize(v.max(1)),
        Command::SetControl(v) => Command::SetControl(match v {
            control::DTR_REQUEST => control::DTR_OFF,
            control::RTS_REQUEST => control::RTS_OFF,
            control::FLOW_REQUEST => control::FLOW_NONE,
            control::BREAK_REQUEST => control::BREAK_OFF,
            other => other,
        }),
        Command::PurgeData(v) => Command::PurgeData(v),
        Command::Signature(s) if s.is_empty() => Command::Signature(b"devshim (refused)".to_vec()),
        Command::NotifyModemState(_) => Command::NotifyModemState(0),
        Command::SetLineStateMask(m) => Command::SetLineStateMask(m),
        Command::SetModemStateMask(m) => Command::SetModemStateMask(m),
        _ => return None,
    })
}

/// Whether the client on `tcp` may use the endpoint: root and the job user
/// may; for anyone else, why not.
fn admit(tcp: &TcpStream, job: &User) -> Result<(), String> {
    let (peer, ours) = match (tcp.peer_addr(), tcp.local_addr()) {
        (Ok(p), Ok(o)) => (p, o),
        (Err(e), _) | (_, Err(e)) => return Err(format!("can't tell who is connecting: {e}")),
    };
    let tables: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    let uid = socket_owner(tables.iter().map(String::as_str), peer, ours).ok_or_else(|| {
        format!("can't tell which user is connecting from {peer}: no open socket of theirs in /proc/net/tcp")
    })?;
    if uid == 0 || uid == job.uid {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} is not the job user {} (uid {})",
            job.name, job.uid
        ))
    }
}

/// The uid that owns the TCP socket whose local address is `client` and
/// whose remote address is `server`, from the text of `/proc/net/tcp` and
/// `/proc/net/tcp6` (as `ss -e` reads it). Rows without an inode are left
/// out: no process holds those sockets, and a `TIME_WAIT` row's uid is
/// always 0. IPv4-mapped IPv6 addresses match their IPv4 address.
pub fn socket_owner<'a>(
    tables: impl IntoIterator<Item = &'a str>,
    client: SocketAddr,
    server: SocketAddr,
) -> Option<u32> {
    let (client, server) = (plain(client), plain(server));
    tables.into_iter().flat_map(str::lines).find_map(|line| {
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[9] == "0" {
            return None;
        }
        let (local, remote) = (parse_addr(f[1])?, parse_addr(f[2])?);
        (plain(local) == client && plain(remote) == server)
            .then(|| f[7].parse().ok())
            .flatten()
    })
}

/// An address as `/proc/net/tcp*` prints it: the address as the kernel
/// stores it, read as native-endian 32-bit words in hex, and the port in
/// hex (`0100007F:1F90` is 127.0.0.1:8080 on a little-endian machine).
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = ip.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps.
fn plain(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // As a little-endian machine prints them: the endpoint listens on
    // 127.0.0.1:40123 (9CBB); uid 1001 connected from port 51966 (CAFE),
    // the job user 883 from 47989 (BB75) over an IPv6 socket; an earlier
    // client's connection from 60000 (EA60) lingers in TIME_WAIT.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9CBB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 110278 1 000000005a621539 100 0 0 10 0
   1: 0100007F:CAFE 0100007F:9CBB 01 00000000:00000000 00:00000000 00000000  1001        0 111147 1 00000000850c687a 20 0 0 10 -1
   2: 0100007F:9CBB 0100007F:CAFE 01 00000000:00000000 00:00000000 00000000     0        0 111150 1 00000000e2639ce3 20 4 30 10 -1
   3: 0100007F:EA60 0100007F:9CBB 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0000000012345678
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0000000000000000FFFF00000100007F:BB75 0000000000000000FFFF00000100007F:9CBB 01 00000000:00000000 00:00000000 00000000   883        0 111160 1 00000000e2639ce4 20 0 0 10 -1
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:A000 01 00000000:00000000 00:00000000 00000000   500        0 111170 1 00000000e2639ce5 20 0 0 10 -1
";

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn finds_the_owner_of_the_client_socket() {
        let server = at(40123);
        let owner = |client| socket_owner([TCP, TCP6], client, server);
        assert_eq!(owner(at(51966)), Some(1001));
        // The server's own row of that connection is the other way round.
        assert_eq!(socket_owner([TCP], server, at(51966)), Some(0));
        // An IPv6 socket connected to 127.0.0.1 is in tcp6, mapped.
        assert_eq!(owner(at(47989)), Some(883));
        let v6: SocketAddr = "[::ffff:127.0.0.1]:47989".parse().unwrap();
        assert_eq!(socket_owner([TCP6], v6, server), Some(883));
        // ::1 parses as itself.
        assert_eq!(
            socket_owner(
                [TCP6],
                "[::1]:8080".parse().unwrap(),
                "[::1]:40960".parse().unwrap()
            ),
            Some(500)
        );
        // TIME_WAIT (inode 0, uid 0 whoever it was): no owner, not root.
        assert_eq!(owner(at(60000)), None);
        // Nobody connected from there.
        assert_eq!(owner(at(1234)), None);
        assert_eq!(socket_owner([TCP], at(51966), at(9999)), None);
    }

    #[test]
    fn addresses_parse_as_the_kernel_prints_them() {
        let lo = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(parse_addr(&format!("{lo}:1F90")), Some(at(8080)));
        assert_eq!(parse_addr("0100007F"), None);
        assert_eq!(parse_addr("zz00007F:0050"), None);
        assert_eq!(parse_addr("00007F:0050"), None);
        assert_eq!(parse_addr("local_address"), None);
    }
}
