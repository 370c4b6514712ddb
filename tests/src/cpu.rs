//! CPU time of process trees, from /proc: what the benchmarks charge each
//! system with. On a small shared machine CPU seconds compare systems
//! fairly where latency does not: they do not depend on who else got the
//! cores.

use std::{collections::BTreeMap, process::Command, sync::OnceLock};

/// One process from /proc/<pid>/stat.
struct Stat {
    ppid: u32,
    /// utime + stime + cutime + cstime: its own time and that of children it
    /// has reaped, so a Postgres backend that exits mid-case still counts.
    ticks: u64,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may itself hold spaces and ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat { ppid: field(4)? as u32, ticks: field(14)? + field(15)? + field(16)? + field(17)? })
}

/// Every process of the machine at one moment.
pub struct ProcessTable(BTreeMap<u32, Stat>);

impl ProcessTable {
    pub fn now() -> ProcessTable {
        ProcessTable(
            std::fs::read_dir("/proc")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| Some((pid, stat(pid)?)))
                .collect(),
        )
    }

    /// CPU seconds of `root` and every live descendant (0 if it is gone).
    pub fn tree_seconds(&self, root: u32) -> f64 {
        let mut pids = vec![root];
        let mut ticks = 0;
        while let Some(pid) = pids.pop() {
            ticks += self.0.get(&pid).map_or(0, |s| s.ticks);
            pids.extend(self.0.iter().filter(|(_, s)| s.ppid == pid).map(|(p, _)| *p));
        }
        ticks as f64 / clock_ticks()
    }
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        let out = Command::new("getconf").arg("CLK_TCK").output().expect("getconf CLK_TCK");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("CLK_TCK is a number")
    })
}
