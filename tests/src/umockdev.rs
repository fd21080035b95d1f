//! Tier 2: real libudev against an emulated `/sys` and `/dev` (umockdev).
//!
//! There is no umockdev crate; the few calls the tests need are bound here.
//! libumockdev is loaded at run time (`dlopen`), so the suite builds without
//! it and its tests say "skipped" when it is missing.
//!
//! A process must run under `LD_PRELOAD=libumockdev-preload.so.0` for
//! libudev to see the testbed, and it can hold one testbed. So a test starts
//! with [`testbed!`]: in `cargo test`'s process it re-executes the test
//! binary for that one test (by exact name, with [`CHILD_ENV`] set and the
//! preload library), waits for it and returns from the test; in that child
//! it makes the testbed and hands it over. Tests stay parallel: one process
//! and one testbed each. Processes the test starts inherit the preload and
//! the testbed (`UMOCKDEV_DIR`), so a broker run from it sees the testbed.
//!
//! ```ignore
//! #[test]
//! fn finds_it() {
//!     let tb = umockdev::testbed!();
//!     tb.add_from_string(&umockdev::testdata("ftdi-ft232r.umockdev")).unwrap();
//!     // ... libudev now sees the FT232R
//! }
//! ```
//!
//! An emulated tty is a pty underneath, which has no modem lines, no break
//! and no parity: [`UMockdev::emulate_serial`] puts a USB serial adapter's
//! line control in front of it (see [`serial`]).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::DieWithParent;

pub mod serial;
pub use serial::{LineEvent, SerialLog, Termios};

/// Set (to the test's name) in the re-executed child.
pub const CHILD_ENV: &str = "DEVBROKER_UMOCKDEV_CHILD";
/// The library the child runs under.
pub const PRELOAD: &str = "libumockdev-preload.so.0";
const LIBRARY: &str = "libumockdev.so.0";
/// How long a child may take (a booted container and a flash included).
const CHILD_LIMIT: Duration = Duration::from_secs(180);

#[repr(C)]
struct GError {
    domain: u32,
    code: c_int,
    message: *mut c_char,
}

type Testbed = *mut c_void;

/// The bound functions.
struct Lib {
    testbed_new: unsafe extern "C" fn() -> Testbed,
    add_from_string: unsafe extern "C" fn(Testbed, *const c_char, *mut *mut GError) -> c_int,
    uevent: unsafe extern "C" fn(Testbed, *const c_char, *const c_char),
    remove_device: unsafe extern "C" fn(Testbed, *const c_char),
    get_dev_fd: unsafe extern "C" fn(Testbed, *const c_char) -> c_int,
    get_root_dir: unsafe extern "C" fn(Testbed) -> *mut c_char,
    in_mock_environment: unsafe extern "C" fn() -> c_int,
    g_object_unref: unsafe extern "C" fn(*mut c_void),
    g_free: unsafe extern "C" fn(*mut c_void),
    g_error_free: unsafe extern "C" fn(*mut GError),
    /// The `dlopen` handle, for symbols only some tests need.
    handle: usize,
    /// The directory libumockdev was loaded from (the preload library is
    /// installed beside it).
    dir: PathBuf,
}

// SAFETY: plain function pointers and a path.
unsafe impl Send for Lib {}
unsafe impl Sync for Lib {}

fn dlerror() -> String {
    // SAFETY: dlerror returns a thread-local message or NULL.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: a NUL-terminated string owned by libdl.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn load() -> Result<Lib, String> {
    let name = CString::new(LIBRARY).unwrap();
    // SAFETY: loading a shared library by name.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(format!(
            "{LIBRARY} can't be loaded ({}); install the Debian package umockdev",
            dlerror()
        ));
    }
    // SAFETY (each `sym`): the field's type is the C signature declared in
    // umockdev.h or by glib.
    let new: *mut c_void = unsafe { sym(h, "umockdev_testbed_new")? };
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: asking which object holds a symbol's address.
    let dir = if unsafe { libc::dladdr(new, &mut info) } != 0 && !info.dli_fname.is_null() {
        // SAFETY: a NUL-terminated path owned by libdl.
        let f = unsafe { CStr::from_ptr(info.dli_fname) }
            .to_string_lossy()
            .into_owned();
        Path::new(&f)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    } else {
        PathBuf::new()
    };
    unsafe {
        Ok(Lib {
            testbed_new: sym(h, "umockdev_testbed_new")?,
            add_from_string: sym(h, "umockdev_testbed_add_from_string")?,
            uevent: sym(h, "umockdev_testbed_uevent")?,
            remove_device: sym(h, "umockdev_testbed_remove_device")?,
            get_dev_fd: sym(h, "umockdev_testbed_get_dev_fd")?,
            get_root_dir: sym(h, "umockdev_testbed_get_root_dir")?,
            in_mock_environment: sym(h, "umockdev_in_mock_environment")?,
            g_object_unref: sym(h, "g_object_unref")?,
            g_free: sym(h, "g_free")?,
            g_error_free: sym(h, "g_error_free")?,
            handle: h as usize,
            dir,
        })
    }
}

/// Looks a symbol up in (and below) a loaded library.
///
/// # Safety
/// `F` must be a pointer (a function pointer of the symbol's C signature).
unsafe fn sym<F: Copy>(h: *mut c_void, n: &str) -> Result<F, String> {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let c = CString::new(n).unwrap();
    // SAFETY: a valid handle and name.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    if p.is_null() {
        return Err(format!("{LIBRARY} has no {n}: {}", dlerror()));
    }
    // SAFETY: same size; the caller names the right type.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

impl Lib {
    /// The message of a GError a call left (and frees it), or `fallback`.
    fn error_message(&self, err: *mut GError, fallback: &str) -> String {
        if err.is_null() {
            return fallback.to_string();
        }
        // SAFETY: a GError we own and free.
        let m = unsafe { CStr::from_ptr((*err).message) }
            .to_string_lossy()
            .into_owned();
        unsafe { (self.g_error_free)(err) };
        m
    }
}

fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// The preload library's path, or why it can't be had.
pub fn preload_path() -> Result<PathBuf, String> {
    let l = lib()?;
    let beside = l.dir.join(PRELOAD);
    if beside.exists() {
        return Ok(beside);
    }
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        let p = Path::new(d).join(PRELOAD);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!(
        "{PRELOAD} is not installed (Debian package libumockdev0)"
    ))
}

/// The by-id name of the FT232R in `testdata/ftdi-ft232r.umockdev`
/// (serial A1B2C3; a config matches it with
/// `{ usb = "0403:6001", serial = "A1B2C3" }`).
pub const FT232R_BY_ID: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";
/// Its tty node in the testbed.
pub const FT232R_NODE: &str = "/dev/ttyUSB0";

/// A file of `tests/testdata`.
pub fn testdata(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The testbed of the test it is written in; in `cargo test`'s process it
/// runs the test in a child under the preload and returns from the test
/// (see the module docs). The test's name comes from the compiler, so a
/// renamed test still re-executes itself.
#[macro_export]
macro_rules! umockdev_testbed {
    () => {{
        fn here() {}
        let name = $crate::umockdev::test_name(::std::any::type_name_of_val(&here));
        match $crate::umockdev::enter(&name) {
            ::std::option::Option::Some(tb) => tb,
            ::std::option::Option::None => return,
        }
    }};
}
pub use crate::umockdev_testbed as testbed;

/// The name libtest knows a test by (`test` or `module::test`), from the
/// type name of a function declared in its body (`crate::test::here`).
pub fn test_name(here: &str) -> String {
    let parts: Vec<&str> = here.split("::").collect();
    assert!(parts.len() >= 3, "not a function inside a test: {here}");
    parts[1..parts.len() - 1].join("::")
}

/// Runs the test `name` in a child under the preload (returns `None`), or,
/// in that child, makes its testbed (returns it). Prints "skipped: ..." and
/// returns `None` when umockdev is not installed. [`testbed!`] calls it with
/// the test's own name.
pub fn enter(name: &str) -> Option<UMockdev> {
    match std::env::var(CHILD_ENV) {
        Ok(child) if child == name => Some(UMockdev::new()),
        Ok(other) => panic!("{CHILD_ENV}={other} but test {name} runs: run one test per child"),
        Err(_) => {
            run_child(name);
            None
        }
    }
}

fn run_child(name: &str) {
    let preload = match preload_path() {
        Ok(p) => p,
        Err(why) => {
            crate::skip(&format!("{name}: {why}"));
            return;
        }
    };
    let mut ld_preload = preload.display().to_string();
    if let Ok(old) = std::env::var("LD_PRELOAD") {
        if !old.is_empty() {
            ld_preload = format!("{ld_preload}:{old}");
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    let t0 = Instant::now();
    let mut child = Command::new(&exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .env("LD_PRELOAD", &ld_preload)
        .env_remove("UMOCKDEV_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .die_with_parent()
        .spawn()
        .expect("re-execute the test binary");
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = pipe(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if t0.elapsed() > CHILD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    let shown = format!("--- child stdout ---\n{out}--- child stderr ---\n{err}");
    let Some(status) = status else {
        panic!("{name}: the child under umockdev did not finish within {CHILD_LIMIT:?}\n{shown}");
    };
    assert!(
        status.success(),
        "{name} failed under umockdev ({status})\n{shown}"
    );
    assert!(
        out.contains("1 passed"),
        "{name}: the child under umockdev ran no test\n{shown}"
    );
    print!("{out}");
    println!("{name}: child under umockdev took {:?}", t0.elapsed());
}

/// One testbed: an emulated `/sys` and `/dev` that libudev (and `open`) in
/// this process see. Removed when dropped.
pub struct UMockdev {
    tb: Testbed,
    lib: &'static Lib,
}

impl UMockdev {
    fn new() -> UMockdev {
        let lib = lib().expect("libumockdev (the parent found it)");
        // SAFETY: plain constructor.
        let tb = unsafe { (lib.testbed_new)() };
        assert!(!tb.is_null(), "umockdev_testbed_new failed");
        // Only now: before the testbed exists the answer is cached as false.
        // SAFETY: no arguments.
        let mocked = unsafe { (lib.in_mock_environment)() } != 0;
        assert!(
            mocked,
            "not in the umockdev environment: {PRELOAD} is not preloaded (LD_PRELOAD={:?})",
            std::env::var("LD_PRELOAD")
        );
        UMockdev { tb, lib }
    }

    /// The testbed's root directory (its `sys/` and `dev/`).
    pub fn root_dir(&self) -> PathBuf {
        // SAFETY: returns a newly allocated string we free.
        let p = unsafe { (self.lib.get_root_dir)(self.tb) };
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        unsafe { (self.lib.g_free)(p.cast()) };
        PathBuf::from(s)
    }

    /// Adds devices from a `umockdev-record` description; emits an `add`
    /// uevent for each.
    pub fn add_from_string(&self, text: &str) -> Result<(), String> {
        let c = CString::new(text).map_err(|e| e.to_string())?;
        let mut err: *mut GError = std::ptr::null_mut();
        // SAFETY: valid testbed, string and error out-pointer.
        let ok = unsafe { (self.lib.add_from_string)(self.tb, c.as_ptr(), &mut err) } != 0;
        if ok {
            return Ok(());
        }
        Err(self
            .lib
            .error_message(err, "umockdev_testbed_add_from_string failed"))
    }

    /// Sends a uevent (`add`, `change`, `remove`, ...) for a device, by
    /// syspath (`/sys/devices/...`).
    pub fn uevent(&self, syspath: &str, action: &str) {
        let (p, a) = (
            CString::new(syspath).unwrap(),
            CString::new(action).unwrap(),
        );
        // SAFETY: valid testbed and strings.
        unsafe { (self.lib.uevent)(self.tb, p.as_ptr(), a.as_ptr()) }
    }

    /// Removes a device (and what is below it). Emits no uevent.
    pub fn remove_device(&self, syspath: &str) {
        let p = CString::new(syspath).unwrap();
        // SAFETY: valid testbed and string.
        unsafe { (self.lib.remove_device)(self.tb, p.as_ptr()) }
    }

    /// Unplugs a USB serial adapter as the kernel and udev do: `remove` for
    /// the tty and for the USB device, then the devices go (the USB device
    /// and every device below it: `remove_device` takes one device's class
    /// links and node, not its children's), and the `/dev` links that now
    /// lead nowhere.
    ///
    /// umockdev 0.17 keeps the pty of a removed tty node: the same node name
    /// (`/dev/ttyUSB0`) can't be added again in this testbed.
    pub fn unplug(&self, tty_syspath: &str, usb_syspath: &str) {
        self.uevent(tty_syspath, "remove");
        self.uevent(usb_syspath, "remove");
        for dev in self.devices_under(usb_syspath) {
            self.remove_device(&dev);
        }
        // udev removes the device's links; remove_device leaves them.
        let dev = self.root_dir().join("dev");
        let mut stack = vec![dev];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() => stack.push(p),
                    Ok(t) if t.is_symlink() && !p.exists() => {
                        let _ = std::fs::remove_file(&p);
                    }
                    _ => {}
                }
            }
        }
    }

    /// `syspath` and the devices below it, deepest first.
    pub fn devices_under(&self, syspath: &str) -> Vec<String> {
        let root = self.root_dir();
        let mut found = Vec::new();
        let mut stack = vec![syspath.to_string()];
        while let Some(p) = stack.pop() {
            let real = root.join(p.trim_start_matches('/'));
            // Class directories (`ttyUSB0/tty`) hold devices but are none.
            if let Ok(rd) = std::fs::read_dir(&real) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(format!("{p}/{}", e.file_name().to_string_lossy()));
                    }
                }
            }
            if real.join("uevent").exists() {
                found.push(p);
            }
        }
        found.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        found
    }

    /// The board's side of an emulated device node (a pty master), or
    /// `None` when the node has none.
    pub fn dev_fd(&self, devnode: &str) -> Option<OwnedFd> {
        let p = CString::new(devnode).unwrap();
        // SAFETY: valid testbed and string.
        let fd = unsafe { (self.lib.get_dev_fd)(self.tb, p.as_ptr()) };
        // SAFETY: a descriptor the testbed keeps; we take a duplicate.
        (fd >= 0).then(|| {
            let dup = unsafe { libc::dup(fd) };
            assert!(dup >= 0, "dup: {}", std::io::Error::last_os_error());
            unsafe { OwnedFd::from_raw_fd(dup) }
        })
    }

    /// Hangs up an emulated tty as the kernel does when the USB device
    /// behind it goes: from now on a client that has it open reads end of
    /// file or `EIO` and its writes fail. umockdev keeps the pty of a removed
    /// node, so without this a client goes on talking to a device that is
    /// gone. Call it before [`UMockdev::unplug`] (the kernel hangs the tty
    /// up before the `remove` uevents).
    ///
    /// The board's side is closed: drop every descriptor [`UMockdev::dev_fd`]
    /// gave first. A process started while the device was present inherited
    /// the board's side and keeps the pty alive: add the device after
    /// starting the processes that must see it hang up. Returns `false` when
    /// `devnode` has no pty.
    pub fn hang_up(&self, devnode: &str) -> bool {
        let p = CString::new(devnode).unwrap();
        // SAFETY: valid testbed and string.
        let fd = unsafe { (self.lib.get_dev_fd)(self.tb, p.as_ptr()) };
        if fd < 0 {
            return false;
        }
        // The testbed closes its descriptor when dropped: leave /dev/null
        // under that number instead of a number a later open may take.
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .expect("/dev/null");
        // SAFETY: replaces the testbed's descriptor (closing the pty's
        // master) with a duplicate of ours, atomically.
        let r = unsafe { libc::dup3(std::os::fd::AsRawFd::as_raw_fd(&null), fd, libc::O_CLOEXEC) };
        assert!(r == fd, "dup3: {}", std::io::Error::last_os_error());
        true
    }
}

impl Drop for UMockdev {
    fn drop(&mut self) {
        // SAFETY: our reference; the testbed removes its directory.
        unsafe { (self.lib.g_object_unref)(self.tb) }
    }
}
