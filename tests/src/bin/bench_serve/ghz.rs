//! `ghz`, an independent gRPC load generator, beside the project's own: the
//! same prepared requests (count-prefixed binary, which ghz sends round
//! robin), the method resolved through the server's reflection, pinned to
//! the generator's core. Its latencies run from each call's send.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use prost::bytes::Bytes;
use serde_json::Value;

pub struct Ghz {
    binary: PathBuf,
    cpus: String,
    dir: freshet_tests::tempfile_dir::Dir,
}

/// What one ghz run reports.
pub struct Run {
    pub calls: usize,
    pub rate: f64,
    /// Of the calls answered OK, sorted.
    pub latencies: Vec<Duration>,
    /// Calls not answered OK, by status.
    pub failures: Vec<(String, u64)>,
}

impl Ghz {
    /// The ghz binary at `BENCH_GHZ`, if set, run on `cpus`.
    pub fn from_env(cpus: &str) -> Option<Ghz> {
        let binary = std::env::var_os("BENCH_GHZ")?.into();
        Some(Ghz { binary, cpus: cpus.to_string(), dir: freshet_tests::tempfile_dir::Dir::new() })
    }

    /// Writes `requests` as count-prefixed messages for ghz's `--binary-file`.
    pub fn data(&self, name: &str, requests: &[Bytes]) -> PathBuf {
        let mut out = Vec::new();
        for r in requests {
            prost::encoding::encode_varint(r.len() as u64, &mut out);
            out.extend_from_slice(r);
        }
        let path = self.dir.path.join(name);
        std::fs::write(&path, out).unwrap();
        path
    }

    /// Closed loop: `callers` workers back to back for `phase`.
    pub async fn closed_loop(&self, address: &str, call: &str, data: &Path, callers: usize, phase: Duration) -> Run {
        self.run(address, call, data, phase, &["-c".into(), callers.to_string()]).await
    }

    /// Open loop: `rate` calls/s, each sent without waiting for earlier ones.
    pub async fn open_loop(&self, address: &str, call: &str, data: &Path, rate: f64, phase: Duration) -> Run {
        let rate = (rate.round() as u64).max(1).to_string();
        self.run(address, call, data, phase, &["--async".into(), "--rps".into(), rate, "-c".into(), "64".into()]).await
    }

    async fn run(&self, address: &str, call: &str, data: &Path, phase: Duration, extra: &[String]) -> Run {
        let mut command = Command::new("taskset");
        command
            .args(["-c", &self.cpus])
            .arg(&self.binary)
            .args(["--insecure", "--call", call, "--connections", "4", "--format", "json", "--binary-file"])
            .arg(data)
            .args(["-z", &format!("{}ms", phase.as_millis())])
            .args(extra)
            .arg(address);
        let out = tokio::task::spawn_blocking(move || command.output().expect("run ghz")).await.unwrap();
        assert!(out.status.success(), "ghz failed: {}", String::from_utf8_lossy(&out.stderr));
        parse(&serde_json::from_slice(&out.stdout).expect("ghz --format json"))
    }
}

fn parse(report: &Value) -> Run {
    let mut latencies: Vec<Duration> = report["details"]
        .as_array()
        .map(|calls| {
            calls.iter().filter(|c| c["status"] == "OK").filter_map(|c| Some(Duration::from_nanos(c["latency"].as_u64()?))).collect()
        })
        .unwrap_or_default();
    latencies.sort();
    let failures = report["statusCodeDistribution"]
        .as_object()
        .map(|codes| codes.iter().filter(|(code, _)| *code != "OK").map(|(code, n)| (code.clone(), n.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    Run { calls: report["count"].as_u64().unwrap_or(0) as usize, rate: report["rps"].as_f64().unwrap_or(0.0), latencies, failures }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_gives_its_ok_latencies_sorted_and_its_failures() {
        let report = serde_json::json!({
            "count": 3, "rps": 1.5,
            "statusCodeDistribution": {"OK": 2, "ResourceExhausted": 1},
            "details": [
                {"latency": 3000000, "status": "OK"},
                {"latency": 1000000, "status": "OK"},
                {"latency": 500000, "status": "ResourceExhausted"}
            ]
        });
        let run = parse(&report);
        assert_eq!(run.calls, 3);
        assert_eq!(run.latencies, vec![Duration::from_millis(1), Duration::from_millis(3)]);
        assert_eq!(run.failures, vec![("ResourceExhausted".to_string(), 1)]);
    }
}
