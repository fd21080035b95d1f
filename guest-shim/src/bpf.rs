//! The seccomp filter `devshim run` installs: `ioctl` with one of a few
//! line-control requests goes to the supervisor (`SECCOMP_RET_USER_NOTIF`),
//! everything else is allowed at once.
//!
//! Only the request number can be checked here — a BPF program can't tell
//! which file a descriptor is — so every `TIOCM*`, break and `TCSETS*`/
//! `TCGETS*` of the job reaches the supervisor, which lets the kernel run
//! those on anything but a devshim pty. All other system calls, and all other
//! ioctls, never leave the kernel: the job pays nothing for them.
//!
//! The program is plain data ([`program`]); [`run`] evaluates it as the
//! kernel would, so tests check its decisions without installing it.

/// `struct seccomp_data` offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// The low 32 bits of `args[1]` (little-endian), the ioctl request: the
/// kernel takes the request as an `unsigned int`, so the high bits a caller
/// may leave in the register must not decide anything.
const OFF_ARG1_LO: u32 = 16 + 8;

/// The architecture whose system call numbers the program checks.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// One BPF instruction, as `struct sock_filter`.
pub type Insn = libc::sock_filter;

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The program: `ioctl(fd, R, ...)` with `R` (low 32 bits) in `requests` →
/// notify; anything else → allow. At most 250 requests (jumps are 8 bits).
pub fn program(requests: &[u32]) -> Vec<Insn> {
    assert!(requests.len() < 250, "too many requests for 8-bit jumps");
    let n = requests.len() as u8;
    let mut p = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        // Another ABI (a 32-bit binary): not ours to judge.
        jump(JEQ_K, AUDIT_ARCH, 0, n + 3),
        stmt(LD_W_ABS, OFF_NR),
        jump(JEQ_K, libc::SYS_ioctl as u32, 0, n + 1),
        stmt(LD_W_ABS, OFF_ARG1_LO),
    ];
    for (i, r) in requests.iter().enumerate() {
        // Match: jump over the remaining compares and the allow.
        let to_notify = n - i as u8;
        p.push(jump(JEQ_K, *r, to_notify, 0));
    }
    p.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    p.push(stmt(RET_K, libc::SECCOMP_RET_USER_NOTIF));
    p
}

/// Evaluates `prog` on a system call as the kernel's seccomp BPF does, for
/// the instructions [`program`] uses: the action it returns.
pub fn run(prog: &[Insn], arch: u32, nr: i64, args: [u64; 6]) -> u32 {
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let mut acc = 0u32;
    let mut pc = 0usize;
    loop {
        let i = prog[pc];
        pc += 1;
        match i.code {
            LD_W_ABS => {
                let at = i.k as usize;
                acc = u32::from_ne_bytes(data[at..at + 4].try_into().unwrap());
            }
            JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
            RET_K => return i.k,
            other => panic!("instruction {other:#x} is not evaluated here"),
        }
    }
}

#[cfg(test)]
// Requests are `c_ulong`: the casts are no-ops on 64-bit targets only.
#[allow(clippy::unnecessary_cast)]
mod tests {
    use super::*;

    const REQS: [u32; 3] = [
        libc::TIOCMBIS as u32,
        libc::TCGETS as u32,
        libc::TCSBRK as u32,
    ];
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const NOTIFY: u32 = libc::SECCOMP_RET_USER_NOTIF;

    fn ioctl(req: u64) -> u32 {
        run(
            &program(&REQS),
            AUDIT_ARCH,
            libc::SYS_ioctl,
            [3, req, 0x7ffd_0000, 0, 0, 0],
        )
    }

    #[test]
    fn listed_requests_notify_and_the_rest_is_allowed() {
        for r in REQS {
            assert_eq!(ioctl(r as u64), NOTIFY, "{r:#x}");
        }
        for r in [libc::TIOCINQ, libc::TIOCOUTQ, libc::FIONBIO, libc::TIOCEXCL] {
            assert_eq!(ioctl(r as u64), ALLOW, "{r:#x}");
        }
    }

    #[test]
    fn only_the_low_32_bits_of_the_request_count() {
        // The kernel truncates the request to unsigned int: so must we.
        assert_eq!(ioctl(0xdead_beef_0000_0000 | libc::TIOCMBIS as u64), NOTIFY);
        assert_eq!(ioctl(libc::TIOCMBIS as u64 + (1 << 32) + 1), ALLOW);
    }

    #[test]
    fn other_calls_and_other_abis_are_allowed() {
        let p = program(&REQS);
        let args = [3, libc::TIOCMBIS as u64, 0, 0, 0, 0];
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_read, args), ALLOW);
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_write, args), ALLOW);
        assert_eq!(run(&p, 0x4000_0003, libc::SYS_ioctl, args), ALLOW);
        assert_eq!(run(&p, AUDIT_ARCH, libc::SYS_ioctl, args), NOTIFY);
    }

    #[test]
    fn an_empty_list_allows_everything() {
        let p = program(&[]);
        assert_eq!(
            run(
                &p,
                AUDIT_ARCH,
                libc::SYS_ioctl,
                [0, libc::TCGETS as u64, 0, 0, 0, 0]
            ),
            ALLOW
        );
    }
}
