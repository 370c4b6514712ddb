//! Feast's Python feature server beside Freshet, in the same run: the kit in
//! `../shared/peers/feast/` installs it and loads 10,000 users × 50 features
//! into a Redis of its own (`tests/bench/run.sh serve --with-feast` runs its
//! setup); here `feast serve` runs pinned like freshet-server, and `wrk`
//! with the kit's request script drives it from the generator's core.
//!
//! wrk is a closed loop only, so Feast gets capacity (8 connections) and its
//! latency with one connection, not latency at half capacity.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use freshet_tests::Process;

use crate::probe::{Cpu, Processes};

pub struct Feast {
    /// The scratch directory the kit's setup.sh used (venv, repo, data).
    dir: PathBuf,
    /// The kit itself (post.lua, verify.py).
    kit: PathBuf,
    redis: Option<u32>,
}

/// One wrk run against Feast.
pub struct Run {
    pub rate: f64,
    pub p50: String,
    pub p99: String,
    /// CPU µs per call: `server` is every process of `feast serve`.
    pub cpu: Cpu,
    /// What wrk reported besides latencies, if anything went wrong.
    pub errors: String,
}

impl Feast {
    /// Feast as `run.sh --with-feast` set it up (`BENCH_FEAST_DIR`), if it did.
    pub fn from_env() -> Option<Feast> {
        let dir: PathBuf = std::env::var_os("BENCH_FEAST_DIR")?.into();
        let kit = std::env::var_os("BENCH_FEAST_KIT").expect("BENCH_FEAST_KIT is set with BENCH_FEAST_DIR").into();
        let redis = std::env::var("BENCH_FEAST_REDIS_PID").ok().and_then(|p| p.parse().ok());
        Some(Feast { dir, kit, redis })
    }

    /// Its version, as `feast version` prints it (in colour): `0.67.0`.
    pub fn version(&self) -> String {
        let out = Command::new(self.dir.join("venv/bin/feast")).arg("version").output().expect("feast version");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split('"').nth(1).unwrap_or(text.trim()).to_string()
    }

    /// Starts `feast serve` (one worker, no access log, no worker recycling:
    /// the kit's "tuned" setup) on `cpus`; returns it once it answers right.
    pub fn start(&self, cpus: &str) -> (Process, String) {
        let port = freshet_tests::free_port();
        let url = format!("http://127.0.0.1:{port}/get-online-features");
        let serve = Process::start(
            Command::new("taskset")
                .args(["-c", cpus])
                .arg(self.dir.join("venv/bin/feast"))
                .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--workers", "1", "--no-access-log", "--max-requests", "0"])
                .current_dir(self.dir.join("repo"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        for _ in 0..120 {
            let verified = Command::new(self.dir.join("venv/bin/python"))
                .arg(self.kit.join("verify.py"))
                .arg(self.dir.join("repo/data/user_features.parquet"))
                .args([&url, "4242"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if verified {
                return (serve, url);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("feast serve did not answer {url} correctly within 60 s");
    }

    /// wrk from `cpus` with `connections` for `phase`, after a warm-up.
    pub fn wrk(&self, serve: &Process, url: &str, cpus: &str, shape: (usize, usize), connections: usize, phase: Duration) -> Run {
        let wrk = |seconds: u64, latency: bool| {
            let mut command = Command::new("taskset");
            command.args(["-c", cpus, "wrk", "-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "--timeout", "10s"]);
            if latency {
                command.arg("--latency");
            }
            command.arg("-s").arg(self.kit.join("post.lua")).args([url, "--", &shape.0.to_string(), &shape.1.to_string()]);
            let out = command.output().expect("run wrk");
            assert!(out.status.success(), "wrk failed: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        wrk(2, false);
        let processes = Processes { server: serve.child.id(), redis: self.redis, postgres: None };
        let before = processes.cpu();
        let report = wrk(phase.as_secs().max(1), true);
        let after = processes.cpu();
        parse(&report, |calls| after.per_call_since(&before, calls))
    }
}

fn parse(report: &str, cpu: impl Fn(usize) -> Cpu) -> Run {
    let after = |prefix: &str| report.lines().find_map(|l| l.trim().strip_prefix(prefix).map(str::trim));
    let calls = report.lines().find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse::<usize>().ok())).unwrap_or(0);
    let errors =
        report.lines().map(str::trim).filter(|l| l.starts_with("Non-2xx") || l.starts_with("Socket errors")).collect::<Vec<_>>().join("; ");
    Run {
        rate: after("Requests/sec:").and_then(|v| v.parse().ok()).unwrap_or(0.0),
        p50: after("50%").map_or("-".into(), ms),
        p99: after("99%").map_or("-".into(), ms),
        cpu: cpu(calls),
        errors,
    }
}

/// wrk's `812.00us` / `8.01ms` / `1.20s` as milliseconds.
fn ms(value: &str) -> String {
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1000.0)
    } else {
        (value, f64::NAN)
    };
    number.parse::<f64>().map_or_else(|_| value.to_string(), |n| format!("{:.2}", n * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrk_report_gives_rate_quantiles_in_ms_and_errors() {
        let report = "Running 10s test @ http://127.0.0.1:1/x\n  1 threads and 8 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.00ms\n     99%    1.20s\n  9270 requests in 10.00s, 15.00MB read\n  Non-2xx or 3xx responses: 5\nRequests/sec:    927.00\n";
        let run = parse(report, |calls| Cpu { server: calls as f64, ..Cpu::default() });
        assert_eq!(run.rate, 927.0);
        assert_eq!((run.p50.as_str(), run.p99.as_str()), ("0.81", "1200.00"));
        assert_eq!(run.cpu.server, 9270.0);
        assert_eq!(run.errors, "Non-2xx or 3xx responses: 5");
    }
}
