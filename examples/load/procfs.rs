//! What the tool reads from `/proc`: CPU time, resident memory, the machine,
//! and the open-file limit.

use std::io;

/// Clock ticks per second in `/proc/<pid>/stat`. Linux reports `utime` and
/// `stime` in USER_HZ, which is 100 on every architecture the kernel exposes
/// to user space (`getconf CLK_TCK`).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system, all threads, live and exited) of a process, in
/// seconds, from fields 14 and 15 of `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| bad("no ')' in stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| -> io::Result<f64> {
        fields.get(n - 3).and_then(|f| f.parse::<f64>().ok()).ok_or_else(|| bad("short stat"))
    };
    Ok((field(14)? + field(15)?) / USER_HZ)
}

/// A `Vm*` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, key: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(key)?.strip_prefix(':')?;
            v.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| bad("no such status line"))
}

/// Resident set size now, in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size, in KiB.
pub fn hwm_kib(pid: u32) -> io::Result<u64> {
    status_kib(pid, "VmHWM")
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// The machine, as the report states it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned()))
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 =
        meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let (nofile_soft, nofile_hard) = nofile();
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        cpu_model,
        mem_total_mib: mem_kib / 1024,
        kernel,
        nofile_soft,
        nofile_hard,
    }
}

/// The open-file limit (soft, hard).
pub fn nofile() -> (u64, u64) {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).unwrap_or((0, 0))
}

/// Raises the soft open-file limit towards `want` (never above the hard
/// limit); returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{setrlimit, Resource};
    let (soft, hard) = nofile();
    if soft >= want {
        return soft;
    }
    let target = want.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, target as _, hard as _) {
        Ok(()) => target,
        Err(e) => {
            eprintln!("load: could not raise the open-file limit from {soft} to {target}: {e}");
            soft
        }
    }
}
