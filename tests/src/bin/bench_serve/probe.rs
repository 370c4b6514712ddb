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

/// A latency histogram of one method, as the server exports it:
/// (upper bound in seconds, calls at or below it), cumulative.
#[derive(Clone, Default)]
pub struct Histogram(Vec<(f64, f64)>);

const BUCKETS: &str = "freshet_server_call_duration_seconds_bucket{";
const CACHE_READS: &str = "freshet_server_cache_reads_total{outcome=\"";

impl Histogram {
    /// `method`'s buckets in a scrape of the server's `/metrics`.
    pub fn of(metrics: &Metrics, method: &str) -> Histogram {
        let wanted = format!("method=\"{method}\"");
        let mut buckets: Vec<(f64, f64)> = metrics
            .iter()
            .filter_map(|(key, &count)| {
                let labels = key.strip_prefix(BUCKETS)?.trim_end_matches('}');
                if !labels.split(',').any(|l| l == wanted) {
                    return None;
                }
                let le = labels.split("le=\"").nth(1)?.trim_end_matches('"');
                let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((bound, count))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Histogram(buckets)
    }

    /// The calls observed since `before`.
    pub fn since(&self, before: &Histogram) -> Histogram {
        Histogram(
            self.0
                .iter()
                .map(|&(bound, count)| {
                    let earlier = before.0.iter().find(|(b, _)| *b == bound).map_or(0.0, |(_, c)| *c);
                    (bound, count - earlier)
                })
                .collect(),
        )
    }

    /// The `q` quantile in ms, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does; "> x" when it falls past the
    /// last finite bound.
    pub fn quantile_ms(&self, q: f64) -> String {
        let total = self.0.last().map_or(0.0, |(_, c)| *c);
        if total == 0.0 {
            return "-".into();
        }
        let rank = q * total;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(bound, count) in &self.0 {
            if count >= rank {
                if bound.is_infinite() {
                    return format!("> {:.0}", lower * 1000.0);
                }
                let inside = if count > below { (rank - below) / (count - below) } else { 1.0 };
                return format!("{:.2}", (lower + (bound - lower) * inside) * 1000.0);
            }
            (lower, below) = (bound, count);
        }
        "-".into()
    }
}

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
    fn quantiles_interpolate_inside_the_bucket_that_holds_them() {
        let h = Histogram(vec![(0.001, 50.0), (0.002, 100.0), (f64::INFINITY, 100.0)]);
        assert_eq!(h.quantile_ms(0.5), "1.00");
        assert_eq!(h.quantile_ms(0.75), "1.50");
        let later = Histogram(vec![(0.001, 60.0), (0.002, 110.0), (f64::INFINITY, 200.0)]);
        assert_eq!(later.since(&h).quantile_ms(0.99), "> 2");
        assert_eq!(Histogram::default().quantile_ms(0.5), "-");
    }

    #[test]
    fn buckets_and_cache_reads_are_read_from_a_scrape() {
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
        let h = Histogram::of(&scrape(0.0, 4.0), "GetFeatures");
        assert_eq!(h.0, vec![(0.001, 4.0), (f64::INFINITY, 10.0)]);
        assert_eq!(cache_reads(&scrape(0.0, 0.0), &scrape(3.0, 0.0)), "hit 100%");
        assert_eq!(cache_reads(&scrape(0.0, 0.0), &scrape(0.0, 0.0)), "-");
    }
}
