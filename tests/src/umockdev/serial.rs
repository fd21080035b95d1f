//! A USB serial adapter's line control in front of an emulated tty.
//!
//! umockdev backs an emulated `/dev/ttyUSB0` with a pty, and a pty has no
//! modem lines (`TIOCM*` fails with `ENOTTY`), sends no break and forces 8
//! data bits without parity. Without more, umockdev 0.17 also answers
//! `ENOTTY` to the ioctls it has no recording for (`TIOCEXCL`, `TCGETS2`),
//! so the broker can't even open the port. The handler attached here makes
//! the device act like an FT232R for the calls the broker makes:
//!
//! - `TIOCMGET`/`TIOCMSET`/`TIOCMBIS`/`TIOCMBIC` work on emulated modem bits;
//!   DTR and RTS go up when a client opens the device, as the kernel raises
//!   them on open;
//! - `TIOCSBRK`/`TIOCCBRK` are recorded (a break has nowhere to go);
//! - every other ioctl runs on the backing pty (`umockdev_ioctl_client_execute`
//!   runs it in the calling process, on its descriptor); the settings of
//!   `TCSETS*`/`TCSETS2*` and `TCSBRK*` are recorded on the way;
//! - `TCGETS`/`TCGETS2` answer with the pty's settings but the data size
//!   and parity last set, which a UART keeps and the pty drops, so a client
//!   reading back what it set sees what a real adapter would show.
//!
//! umockdev picks the handler by the path string given to `open()`, not by
//! the device it leads to: attach it to the node and to every link a client
//! may open (the broker opens the by-id link).
//!
//! The handler is a GObject signal handler (`handle-ioctl`). umockdev 0.17
//! emits it on a worker thread of the testbed's own (with a private
//! `GMainContext`), never on the test's thread: the test runs no main loop,
//! and reads what happened through a [`SerialLog`] (state behind a mutex)
//! while the handler goes on answering, even while the test blocks.

use std::ffi::{c_char, c_int, c_long, c_ulong, c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use wire::rfc2217::LineSettings;

use super::{sym, GError, Lib, UMockdev};

/// `TRUE`: the request is handled (and completed).
const HANDLED: c_int = 1;
/// The bits of `c_cflag` a pty forces (`CS8`, no `PARENB`) and a UART keeps.
const KEPT_CFLAG: libc::tcflag_t = libc::CSIZE | libc::PARENB;
/// Offset of `c_cflag` in both `struct termios` (kernel) and `termios2`.
const CFLAG_OFFSET: usize = 8;
/// The kernel's `struct termios` (not glibc's): what `TCGETS` and `TCSETS`
/// carry.
const KERNEL_TERMIOS_LEN: usize = 36;
const TERMIOS2_LEN: usize = std::mem::size_of::<libc::termios2>();
/// Modem bits a client can set (the rest are inputs).
const OUTPUTS: c_int = libc::TIOCM_DTR | libc::TIOCM_RTS;

/// The ioctl-emulation calls of libumockdev (0.16 and later) and the one of
/// libgobject it needs.
struct IoctlLib {
    base_new: unsafe extern "C" fn() -> *mut c_void,
    attach:
        unsafe extern "C" fn(*mut c_void, *const c_char, *mut c_void, *mut *mut GError) -> c_int,
    get_request: unsafe extern "C" fn(*mut c_void) -> c_ulong,
    get_devnode: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    get_arg: unsafe extern "C" fn(*mut c_void) -> *mut c_void,
    execute: unsafe extern "C" fn(*mut c_void, *mut c_int, *mut *mut GError) -> c_int,
    complete: unsafe extern "C" fn(*mut c_void, c_long, c_int),
    resolve: unsafe extern "C" fn(*mut c_void, usize, usize, *mut *mut GError) -> *mut c_void,
    retrieve: unsafe extern "C" fn(*mut c_void, *mut *mut u8, *mut c_int),
    update: unsafe extern "C" fn(*mut c_void, usize, *const u8, c_int),
    signal_connect: unsafe extern "C" fn(
        *mut c_void,
        *const c_char,
        *const c_void,
        *mut c_void,
        Option<unsafe extern "C" fn(*mut c_void, *mut c_void)>,
        c_int,
    ) -> c_ulong,
    lib: &'static Lib,
}

// SAFETY: plain function pointers and a reference to another such table.
unsafe impl Send for IoctlLib {}
unsafe impl Sync for IoctlLib {}

fn ioctl_lib(lib: &'static Lib) -> Result<&'static IoctlLib, String> {
    static IOCTL: OnceLock<Result<IoctlLib, String>> = OnceLock::new();
    IOCTL
        .get_or_init(|| {
            let h = lib.handle as *mut c_void;
            // SAFETY (each `sym`): the field's type is the C signature in
            // umockdev.h (0.17) or gobject's gsignal.h; `dlsym` on the
            // library's handle also finds the libraries it links (gobject).
            unsafe {
                Ok(IoctlLib {
                    base_new: sym(h, "umockdev_ioctl_base_new")?,
                    attach: sym(h, "umockdev_testbed_attach_ioctl")?,
                    get_request: sym(h, "umockdev_ioctl_client_get_request")?,
                    get_devnode: sym(h, "umockdev_ioctl_client_get_devnode")?,
                    get_arg: sym(h, "umockdev_ioctl_client_get_arg")?,
                    execute: sym(h, "umockdev_ioctl_client_execute")?,
                    complete: sym(h, "umockdev_ioctl_client_complete")?,
                    resolve: sym(h, "umockdev_ioctl_data_resolve")?,
                    retrieve: sym(h, "umockdev_ioctl_data_retrieve")?,
                    update: sym(h, "umockdev_ioctl_data_update")?,
                    signal_connect: sym(h, "g_signal_connect_data")?,
                    lib,
                })
            }
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Terminal settings as a client set them (`TCSETS*` or `TCSETS2*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Termios {
    pub iflag: libc::tcflag_t,
    pub oflag: libc::tcflag_t,
    pub cflag: libc::tcflag_t,
    pub lflag: libc::tcflag_t,
    /// The rate as a number (`termios2`), or decoded from `CBAUD`.
    pub ispeed: u32,
    pub ospeed: u32,
}

impl Termios {
    /// Parses the kernel's `struct termios` or a `termios2`.
    fn parse(b: &[u8]) -> Option<Termios> {
        if b.len() < KERNEL_TERMIOS_LEN {
            return None;
        }
        let word = |at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().unwrap());
        let cflag = word(8);
        let (ispeed, ospeed) = if b.len() >= TERMIOS2_LEN {
            (word(36), word(40))
        } else {
            let r = cbaud_rate(cflag & libc::CBAUD);
            (r, r)
        };
        Some(Termios {
            iflag: word(0),
            oflag: word(4),
            cflag,
            lflag: word(12),
            ispeed,
            ospeed,
        })
    }

    /// In RFC 2217 terms: baud, data size, parity, stop size, flow.
    pub fn settings(&self) -> LineSettings {
        // SAFETY: termios2 is plain data; zero is a valid value.
        let mut t: libc::termios2 = unsafe { std::mem::zeroed() };
        t.c_iflag = self.iflag;
        t.c_oflag = self.oflag;
        t.c_cflag = self.cflag;
        t.c_lflag = self.lflag;
        t.c_ispeed = self.ispeed;
        t.c_ospeed = self.ospeed;
        wire::termios::to_settings(&t)
    }
}

/// The rate of a `CBAUD` code (old `TCSETS`); 0 for `BOTHER` or unknown.
fn cbaud_rate(code: libc::tcflag_t) -> u32 {
    const RATES: &[(libc::tcflag_t, u32)] = &[
        (libc::B1200, 1200),
        (libc::B2400, 2400),
        (libc::B4800, 4800),
        (libc::B9600, 9600),
        (libc::B19200, 19200),
        (libc::B38400, 38400),
        (libc::B57600, 57600),
        (libc::B115200, 115200),
        (libc::B230400, 230400),
        (libc::B460800, 460800),
        (libc::B921600, 921600),
    ];
    RATES
        .iter()
        .find(|(c, _)| *c == code)
        .map_or(0, |(_, r)| *r)
}

/// One thing a client did to the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// A client opened the device by this path; DTR and RTS went up.
    Opened(String),
    /// `TIOCMSET`/`TIOCMBIS`/`TIOCMBIC`: the modem bits after it.
    Modem(c_int),
    /// `TIOCSBRK`.
    BreakOn,
    /// `TIOCCBRK`.
    BreakOff,
    /// `TCSBRK`/`TCSBRKP` with its argument (0: a break of 0.25 to 0.5 s).
    TimedBreak(c_int),
    /// `TCSETS*`/`TCSETS2*`.
    Set(Termios),
}

#[derive(Debug, Default)]
struct State {
    modem: c_int,
    /// Where each change of DTR/RTS is told, as the line
    /// `MONOTONIC_NS DTR RTS` (0 or 1 each): a board's reset circuit.
    edges: Option<std::fs::File>,
    /// `CSIZE` and `PARENB` as last set.
    kept_cflag: Option<libc::tcflag_t>,
    events: Vec<(Instant, LineEvent)>,
    /// Every ioctl request number seen, in order (for failure messages).
    requests: Vec<c_ulong>,
    /// Requests whose handling failed, and why.
    failures: Vec<String>,
}

/// What clients did to an emulated adapter's line, as it happens.
#[derive(Clone)]
pub struct SerialLog {
    state: Arc<Mutex<State>>,
}

impl State {
    /// Records new modem bits; a change of DTR or RTS is told to `edges`.
    fn set_modem(&mut self, bits: c_int) {
        let before = self.modem & OUTPUTS;
        self.modem = bits;
        if bits & OUTPUTS != before {
            if let Some(f) = self.edges.as_mut() {
                use std::io::Write;
                let mut ts = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: writes one timespec.
                unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
                let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
                let _ = writeln!(
                    f,
                    "{ns} {} {}",
                    u8::from(bits & libc::TIOCM_DTR != 0),
                    u8::from(bits & libc::TIOCM_RTS != 0)
                );
            }
        }
    }
}

impl SerialLog {
    fn with<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    /// Tells every change of DTR/RTS from now on to `to` (the write end of
    /// a pipe), one line each: `CLOCK_MONOTONIC nanoseconds, DTR, RTS`.
    /// A board emulator reads them as its reset circuit would see the lines.
    pub fn tell_edges(&self, to: std::os::fd::OwnedFd) {
        self.state.lock().unwrap().edges = Some(std::fs::File::from(to));
    }

    /// Sets the adapter's inputs (`TIOCM_CTS`, `TIOCM_DSR`, `TIOCM_RI`,
    /// `TIOCM_CD`), as the board drives them.
    pub fn set_inputs(&self, bits: c_int) {
        let mut s = self.state.lock().unwrap();
        s.modem = (s.modem & OUTPUTS) | (bits & !OUTPUTS);
    }

    /// The modem bits now (`TIOCM_*`).
    pub fn modem(&self) -> c_int {
        self.with(|s| s.modem)
    }

    pub fn dtr(&self) -> bool {
        self.modem() & libc::TIOCM_DTR != 0
    }

    pub fn rts(&self) -> bool {
        self.modem() & libc::TIOCM_RTS != 0
    }

    /// Everything so far, with when it happened.
    pub fn events(&self) -> Vec<(Instant, LineEvent)> {
        self.with(|s| s.events.clone())
    }

    /// The break events (on, off, timed), with when they happened.
    pub fn breaks(&self) -> Vec<(Instant, LineEvent)> {
        self.events()
            .into_iter()
            .filter(|(_, e)| {
                matches!(
                    e,
                    LineEvent::BreakOn | LineEvent::BreakOff | LineEvent::TimedBreak(_)
                )
            })
            .collect()
    }

    /// The settings a client set last.
    pub fn termios(&self) -> Option<Termios> {
        self.with(|s| {
            s.events.iter().rev().find_map(|(_, e)| match e {
                LineEvent::Set(t) => Some(*t),
                _ => None,
            })
        })
    }

    /// The paths clients opened the device by, in order.
    pub fn opens(&self) -> Vec<String> {
        self.with(|s| {
            s.events
                .iter()
                .filter_map(|(_, e)| match e {
                    LineEvent::Opened(path) => Some(path.clone()),
                    _ => None,
                })
                .collect()
        })
    }

    /// Every ioctl request number seen, in order.
    pub fn requests(&self) -> Vec<c_ulong> {
        self.with(|s| s.requests.clone())
    }

    /// Requests the handler could not carry out (empty when all went well).
    pub fn failures(&self) -> Vec<String> {
        self.with(|s| s.failures.clone())
    }
}

impl std::fmt::Debug for SerialLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with(|s| {
            let t0 = s.events.first().map(|(t, _)| *t);
            writeln!(f, "modem bits {:#x}", s.modem)?;
            for (t, e) in &s.events {
                let at = t0.map(|t0| t.duration_since(t0)).unwrap_or_default();
                writeln!(f, "  +{at:?} {e:?}")?;
            }
            writeln!(f, "  requests: {:x?}", s.requests)?;
            write!(f, "  failures: {:?}", s.failures)
        })
    }
}

/// What the signal handlers get: the calls and the shared state.
struct Handler {
    fns: &'static IoctlLib,
    state: Arc<Mutex<State>>,
}

impl UMockdev {
    /// Puts a USB serial adapter's line control in front of the emulated tty
    /// `node` (`/dev/ttyUSB0`), for opens of `node` and of each of `links`
    /// (e.g. its `/dev/serial/by-id/...` path). Call it before a client opens
    /// the device.
    pub fn emulate_serial(&self, node: &str, links: &[&str]) -> SerialLog {
        let fns = ioctl_lib(self.lib).unwrap_or_else(|e| panic!("umockdev ioctl emulation: {e}"));
        let state = Arc::new(Mutex::new(State::default()));
        // SAFETY: a plain constructor; the object lives as long as the process
        // (the testbed keeps it attached, and we never drop our reference).
        let base = unsafe { (fns.base_new)() };
        assert!(!base.is_null(), "umockdev_ioctl_base_new failed");
        let connect = |signal: &str, cb: *const c_void| {
            let handler = Box::into_raw(Box::new(Handler {
                fns,
                state: state.clone(),
            }));
            let name = CString::new(signal).unwrap();
            // SAFETY: `cb` has the signal's C signature; the box is freed by
            // `drop_handler` when the handler is disconnected.
            let id = unsafe {
                (fns.signal_connect)(
                    base,
                    name.as_ptr(),
                    cb,
                    handler.cast(),
                    Some(drop_handler),
                    0,
                )
            };
            assert!(id != 0, "g_signal_connect_data({signal}) failed");
        };
        connect("handle-ioctl", handle_ioctl as *const c_void);
        connect("client-connected", client_connected as *const c_void);
        for path in std::iter::once(node).chain(links.iter().copied()) {
            let p = CString::new(path).unwrap();
            let mut err: *mut GError = std::ptr::null_mut();
            // SAFETY: valid testbed, path, handler object and error pointer.
            let ok = unsafe { (fns.attach)(self.tb, p.as_ptr(), base, &mut err) } != 0;
            assert!(
                ok,
                "umockdev_testbed_attach_ioctl({path}): {}",
                self.lib.error_message(err, "failed")
            );
        }
        SerialLog { state }
    }
}

unsafe extern "C" fn drop_handler(data: *mut c_void, _closure: *mut c_void) {
    // SAFETY: the box `emulate_serial` leaked for this connection.
    drop(unsafe { Box::from_raw(data.cast::<Handler>()) });
}

/// `client-connected`: an `open()` of the device. DTR and RTS go up, as
/// the kernel raises them when a port is opened.
unsafe extern "C" fn client_connected(_base: *mut c_void, client: *mut c_void, data: *mut c_void) {
    // SAFETY: the Handler box connected with this callback.
    let h = unsafe { &*data.cast::<Handler>() };
    // SAFETY: a string the client owns, copied at once.
    let path = unsafe { (h.fns.get_devnode)(client) };
    let path = if path.is_null() {
        String::new()
    } else {
        // SAFETY: NUL-terminated, alive while the client is.
        unsafe { std::ffi::CStr::from_ptr(path) }
            .to_string_lossy()
            .into_owned()
    };
    let mut s = h.state.lock().unwrap();
    let bits = s.modem | OUTPUTS;
    s.set_modem(bits);
    s.events.push((Instant::now(), LineEvent::Opened(path)));
}

/// `handle-ioctl`: every ioctl a client makes on the device. Always
/// completes the request, so the client never hangs.
unsafe extern "C" fn handle_ioctl(
    _base: *mut c_void,
    client: *mut c_void,
    data: *mut c_void,
) -> c_int {
    // SAFETY: the Handler box connected with this callback.
    let h = unsafe { &*data.cast::<Handler>() };
    let call = Call { fns: h.fns, client };
    // SAFETY: a client being handled.
    let req = unsafe { (h.fns.get_request)(client) };
    h.state.lock().unwrap().requests.push(req);
    let done =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&call, req, &h.state)));
    let (res, errno) = match done {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            h.state
                .lock()
                .unwrap()
                .failures
                .push(format!("ioctl {req:#x}: {why}"));
            (-1, libc::EIO)
        }
        Err(_) => {
            h.state
                .lock()
                .unwrap()
                .failures
                .push(format!("ioctl {req:#x}: the handler panicked"));
            (-1, libc::EIO)
        }
    };
    // SAFETY: completes the request being handled, once.
    unsafe { (h.fns.complete)(client, res, errno) };
    HANDLED
}

/// One request being handled.
struct Call {
    fns: &'static IoctlLib,
    client: *mut c_void,
}

impl Call {
    /// The argument as passed (a number, or the client's pointer).
    fn raw_arg(&self) -> Result<c_ulong, String> {
        // SAFETY: the client's argument object (not ours to free).
        let arg = unsafe { (self.fns.get_arg)(self.client) };
        let b = self.bytes(arg)?;
        Ok(c_ulong::from_ne_bytes(
            b.get(..8)
                .ok_or("the argument is shorter than a pointer")?
                .try_into()
                .unwrap(),
        ))
    }

    /// The `len` bytes the argument points to, in a local copy that
    /// `complete` writes back to the client if it changed. Freed on drop.
    fn pointee(&self, len: usize) -> Result<Pointee<'_>, String> {
        // SAFETY: the client's argument object (not ours to free).
        let arg = unsafe { (self.fns.get_arg)(self.client) };
        let mut err: *mut GError = std::ptr::null_mut();
        // SAFETY: resolving the pointer at offset 0 of the argument.
        let d = unsafe { (self.fns.resolve)(arg, 0, len, &mut err) };
        if d.is_null() {
            return Err(self
                .fns
                .lib
                .error_message(err, "a null pointer as argument"));
        }
        Ok(Pointee { call: self, d })
    }

    /// Runs the ioctl in the client, on the backing pty: (result, errno).
    fn execute(&self) -> Result<(c_long, c_int), String> {
        let mut errno: c_int = 0;
        let mut err: *mut GError = std::ptr::null_mut();
        // SAFETY: a request being handled; out-pointers are valid.
        let r = unsafe { (self.fns.execute)(self.client, &mut errno, &mut err) };
        if !err.is_null() {
            return Err(self.fns.lib.error_message(err, "execute failed"));
        }
        Ok((r as c_long, if r < 0 { errno } else { 0 }))
    }

    fn bytes(&self, d: *mut c_void) -> Result<Vec<u8>, String> {
        let mut p: *mut u8 = std::ptr::null_mut();
        let mut n: c_int = 0;
        // SAFETY: a data object; the copy it returns is ours to free.
        unsafe { (self.fns.retrieve)(d, &mut p, &mut n) };
        if p.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: `n` bytes at `p`, freed right after copying.
        let v = unsafe { std::slice::from_raw_parts(p, n.max(0) as usize) }.to_vec();
        unsafe { (self.fns.lib.g_free)(p.cast()) };
        Ok(v)
    }
}

/// A resolved argument: the client's memory, copied here.
struct Pointee<'a> {
    call: &'a Call,
    d: *mut c_void,
}

impl Pointee<'_> {
    fn read(&self) -> Result<Vec<u8>, String> {
        self.call.bytes(self.d)
    }

    fn write(&self, offset: usize, b: &[u8]) {
        // SAFETY: within the resolved length (the callers write into the
        // struct they resolved).
        unsafe { (self.call.fns.update)(self.d, offset, b.as_ptr(), b.len() as c_int) }
    }
}

impl Drop for Pointee<'_> {
    fn drop(&mut self) {
        // SAFETY: `resolve` returned a reference we own.
        unsafe { (self.call.fns.lib.g_object_unref)(self.d) }
    }
}

/// Handles one request: emulated, or run on the pty and recorded.
fn serve(call: &Call, req: c_ulong, state: &Mutex<State>) -> Result<(c_long, c_int), String> {
    let now = Instant::now;
    let event = |e: LineEvent| state.lock().unwrap().events.push((now(), e));
    let int_arg = |p: &Pointee| -> Result<c_int, String> {
        let b = p.read()?;
        Ok(c_int::from_ne_bytes(
            b.get(..4).ok_or("short int argument")?.try_into().unwrap(),
        ))
    };
    match req {
        libc::TIOCMGET => {
            let p = call.pointee(4)?;
            let bits = state.lock().unwrap().modem;
            p.write(0, &bits.to_ne_bytes());
            Ok((0, 0))
        }
        libc::TIOCMSET | libc::TIOCMBIS | libc::TIOCMBIC => {
            let arg = int_arg(&call.pointee(4)?)? & OUTPUTS;
            let mut s = state.lock().unwrap();
            let bits = match req {
                libc::TIOCMSET => (s.modem & !OUTPUTS) | arg,
                libc::TIOCMBIS => s.modem | arg,
                _ => s.modem & !arg,
            };
            s.set_modem(bits);
            s.events.push((now(), LineEvent::Modem(bits)));
            Ok((0, 0))
        }
        libc::TIOCSBRK => {
            event(LineEvent::BreakOn);
            Ok((0, 0))
        }
        libc::TIOCCBRK => {
            event(LineEvent::BreakOff);
            Ok((0, 0))
        }
        libc::TCSBRK | libc::TCSBRKP => {
            event(LineEvent::TimedBreak(call.raw_arg()? as c_int));
            call.execute()
        }
        libc::TCSETS | libc::TCSETSW | libc::TCSETSF => set(call, state, KERNEL_TERMIOS_LEN),
        libc::TCSETS2 | libc::TCSETSW2 | libc::TCSETSF2 => set(call, state, TERMIOS2_LEN),
        libc::TCGETS => get(call, state, KERNEL_TERMIOS_LEN),
        libc::TCGETS2 => get(call, state, TERMIOS2_LEN),
        _ => call.execute(),
    }
}

/// `TCSETS*`: recorded, then applied to the pty.
fn set(call: &Call, state: &Mutex<State>, len: usize) -> Result<(c_long, c_int), String> {
    let t = {
        let p = call.pointee(len)?;
        Termios::parse(&p.read()?).ok_or("short termios")?
    };
    let r = call.execute()?;
    if r.0 == 0 {
        let mut s = state.lock().unwrap();
        s.kept_cflag = Some(t.cflag & KEPT_CFLAG);
        s.events.push((Instant::now(), LineEvent::Set(t)));
    }
    Ok(r)
}

/// `TCGETS*`: the pty's settings, with the data size and parity last set.
fn get(call: &Call, state: &Mutex<State>, len: usize) -> Result<(c_long, c_int), String> {
    let r = call.execute()?;
    let kept = state.lock().unwrap().kept_cflag;
    if let (0, Some(kept)) = (r.0, kept) {
        // After `execute` the argument must be resolved again to see what
        // the kernel wrote.
        let p = call.pointee(len)?;
        let b = p.read()?;
        let at = CFLAG_OFFSET;
        let cflag = u32::from_ne_bytes(
            b.get(at..at + 4)
                .ok_or("short termios")?
                .try_into()
                .unwrap(),
        );
        p.write(at, &((cflag & !KEPT_CFLAG) | kept).to_ne_bytes());
    }
    Ok(r)
}
