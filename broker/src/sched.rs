//! The calling thread's CPU scheduling policy (sched(7)), on Linux: the one module of the
//! broker with `unsafe` code (two libc calls that neither std nor rustix wraps). The
//! async runtime's threads take `SCHED_BATCH` here (`config::runtime_scheduling`), the
//! password hashing and thumbnail threads `SCHED_IDLE` (`background`).
#![allow(unsafe_code)]

/// The calling thread's policy (`libc::SCHED_OTHER`, `SCHED_BATCH`, `SCHED_IDLE`, ...).
///
/// # Errors
/// What pthread_getschedparam(3) returns.
pub(crate) fn own_policy() -> std::io::Result<libc::c_int> {
    let (mut policy, mut param) = (0, libc::sched_param { sched_priority: 0 });
    // pthread_*schedparam rather than sched_*scheduler: musl's sched_setscheduler is a
    // stub that always fails; both are the same system call on glibc.
    // SAFETY: `pthread_self()` is the calling thread, alive across the call; `policy` and
    // `param` are valid for writes for its duration.
    match unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) } {
        0 => Ok(policy),
        error => Err(std::io::Error::from_raw_os_error(error)),
    }
}

/// Puts the calling thread under `policy`, one without a static priority (not real-time):
/// its nice value is kept. An unprivileged thread may always move to `SCHED_BATCH` or
/// `SCHED_IDLE`.
///
/// # Errors
/// What pthread_setschedparam(3) returns (`EPERM` from a sandbox, `EINVAL`).
pub(crate) fn set_own_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `pthread_self()` is the calling thread, alive across the call; `param` is
    // only read.
    match unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) } {
        0 => Ok(()),
        error => Err(std::io::Error::from_raw_os_error(error)),
    }
}

/// The calling thread's policy as the kernel has it: field 41 of its `stat` (proc(5));
/// glibc's pthread_getschedparam may answer from a cache of its own.
#[cfg(test)]
pub(crate) fn kernel_policy_of_this_thread() -> libc::c_int {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    // The command name (field 2) may hold spaces: count from after its ')'.
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    after_name.split(' ').nth(41 - 3).unwrap().parse().unwrap()
}
