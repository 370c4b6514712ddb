//! What the benchmark reads beside the calls: CPU time and RSS of the
//! processes involved (from /proc), which core they may run on, and the
//! server's own latency histogram (from its /metrics).
//!
//! CPU time per call is the figure that compares systems fairly on a small
//! shared machine: it does not depend on who else got the cores.

use std::{collections::BTreeMap, process::Command};

use freshet_tests::cpu::ProcessTable;

/// A scrape of `/metrics`: `name{labels}` → value.
pub type Metrics = BTreeMap<String, f64>;

/// The processes whose CPU time a case is charged with.
#[derive(Clone, Copy, Default)]
pub struct Processes {
    pub server: u32,
    pub redis: Option<u32>,
    pub postgres: Option<u32>,
}

/// CPU seconds used so far, per process tree.
#[derive(Clone, Copy, Default)]
pub struct Cpu {
    pub server: f64,
    pub redis: f64,
    pub postgres: f64,
}

impl Processes {
    pub fn cpu(&self) -> Cpu {
        let table = ProcessTable::now();
        let of = |pid: Option<u32>| pid.map_or(0.0, |pid| table.tree_seconds(pid));
        Cpu { server: of(Some(self.server)), redis: of(self.redis), postgres: of(self.postgres) }
    }
}

impl Cpu {
    /// Microseconds per call of each tree between `before` and `self`.
    pub fn per_call_since(&self, before: &Cpu, calls: usize) -> Cpu {
        let per = |now: f64, then: f64| (now - then) * 1e6 / calls.max(1) as f64;
        Cpu { server: per(self.server, before.server), redis: per(self.redis, before.redis), postgres: per(self.postgres, before.postgres) }
    }
}

/// Resident memory of `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Moves every thread of `pid` to `cpus` (a `taskset` list such as `0`);
/// threads it starts later inherit it.
pub fn pin(pid: u32, cpus: &str) {
    let out = Command::new("taskset").args(["-a", "-cp", cpus, &pid.to_string()]).output().expect("run taskset");
    assert!(out.status.success(), "taskset -a -cp {cpus} {pid}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The distinct CPU lists the threads of `pid` may run on.
pub fn allowed_cpus(pid: u32) -> Vec<String> {
    let mut lists: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
                .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).map(|v| v.trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    lists.sort();
    lists.dedup();
    lists
}

const CACHE_READS: &str = "freshet_server_cache_reads_total{outcome=\"";

/// GetFeatures reads by where their rows came from, between two scrapes,
/// as shares: "hit 98%, miss 2%".
pub fn cache_reads(before: &Metrics, after: &Metrics) -> String {
    let reads: Vec<(&str, f64)> = after
        .iter()
        .filter_map(|(key, &n)| {
            let outcome = key.strip_prefix(CACHE_READS)?.trim_end_matches("\"}");
            Some((outcome, n - before.get(key).copied().unwrap_or(0.0)))
        })
        .filter(|(_, n)| *n > 0.0)
        .collect();
    let total: f64 = reads.iter().map(|(_, n)| n).sum();
    if total == 0.0 {
        return "-".into();
    }
    reads.iter().map(|(outcome, n)| format!("{outcome} {:.0}%", 100.0 * n / total)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_reads_are_read_from_a_scrape() {
        let scrape = |hit: f64, le1: f64| -> Metrics {
            [
                ("freshet_server_call_duration_seconds_bucket{method=\"GetFeatures\",le=\"0.001\"}", le1),
                ("freshet_server_call_duration_seconds_bucket{method=\"GetFeatures\",le=\"+Inf\"}", 10.0),
                ("freshet_server_call_duration_seconds_bucket{method=\"Check\",le=\"0.001\"}", 7.0),
                ("freshet_server_cache_reads_total{outcome=\"hit\"}", hit),
                ("freshet_server_cache_reads_total{outcome=\"miss\"}", 1.0),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        assert_eq!(cache_reads(&scrape(0.0, 0.0), &scrape(3.0, 0.0)), "hit 100%");
        assert_eq!(cache_reads(&scrape(0.0, 0.0), &scrape(0.0, 0.0)), "-");
    }
}
