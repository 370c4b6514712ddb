//! Postgres commit → servable through Debezium and through the direct
//! source, side by side in one run (issue 12): same machine, same
//! application table, same writer, one freshet-server serving both views.
//!
//! `tests/bench/run.sh wal` starts Postgres, Redis, Kafka and Kafka Connect,
//! registers the Debezium connector on the application database ("app",
//! `deploy/local/source-schema.sql`) and runs this. It starts one
//! freshet-ingest for a Debezium view of `public.user_events` (topic
//! `app.public.user_events`), one for a direct view of the same table (its
//! own publication and slot), and a server for both. A writer then commits
//! rows to the table, one transaction per 10 ms tick, the first row of each
//! for an entity of its own (a marker); both views' `events_1h` are polled
//! for every marker (`freshet_tests::freshness`), timing from the moment
//! COMMIT returns.
//!
//! - Fixed rates: 100 and 5,000 rows/s for `BENCH_WAL_SECONDS` (15) each:
//!   p50/p95/p99/max per path.
//! - A ramp: `BENCH_WAL_STEPS` (2000,5000,10000,20000,40000 rows/s) for
//!   `BENCH_WAL_STEP_SECONDS` (10) each, both paths drained between steps.
//!   A path keeps up at a step when every marker was seen and the median
//!   latency of the step's last third is within max(100 ms, +50%) of its
//!   first third's: latency that grows over a step is a backlog that grows.
//!   "Sustained" is the highest written rate it kept up with before the
//!   first step it did not.
//! - CPU seconds per path over each phase, from /proc: ingest, Kafka and
//!   Connect, and the path's own Postgres backends (walsender, store
//!   connections); Postgres as a whole, the server and the writer beside.
//!
//! Environment (run.sh sets it): FRESHET_DATABASE_URL, FRESHET_KAFKA_BROKERS,
//! BENCH_APP_URL, BENCH_POSTGRES_PID, BENCH_KAFKA_PID, BENCH_CONNECT_PID.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use freshet_tests::{
    Process, binary,
    cpu::ProcessTable,
    env, free_port, fresh_database,
    freshness::{self, Markers, Seen},
    ingest_with, scrape, server, views_file,
};
use sqlx::PgPool;

/// The writer's transaction rate: one marker per transaction.
const TICK: Duration = Duration::from_millis(10);
/// The direct view's slot and publication.
const SLOT: &str = "bench_direct";
/// Debezium's slot (services.sh's connector).
const DEBEZIUM_SLOT: &str = "freshet_slot";
/// Background rows spread over this many users; markers are far above.
const USERS: i64 = 10_000;

/// The two paths from the table to the features, in the order of every table.
#[derive(Clone, Copy)]
enum Via {
    Debezium,
    Direct,
}

const PATHS: [Via; 2] = [Via::Debezium, Via::Direct];

impl Via {
    fn name(self) -> &'static str {
        match self {
            Via::Debezium => "Debezium + Kafka",
            Via::Direct => "direct (slot)",
        }
    }

    fn view(self) -> &'static str {
        match self {
            Via::Debezium => "via_debezium",
            Via::Direct => "via_slot",
        }
    }

    /// The `application_name` of the path's ingest connections to the store.
    fn application(self) -> &'static str {
        match self {
            Via::Debezium => "bench-ingest-debezium",
            Via::Direct => "bench-ingest-direct",
        }
    }

    fn source(self) -> String {
        match self {
            Via::Debezium => "topics = [\"app.public.user_events\"]\nformat = \"debezium\"".into(),
            Via::Direct => {
                format!("format = \"postgres\"\ntable = \"public.user_events\"\nslot = \"{SLOT}\"\npublication = \"{SLOT}\"")
            }
        }
    }

    fn views(self) -> String {
        format!(
            "[[view]]\nname = \"{}\"\nentity = \"user_id\"\nentity_type = \"int64\"\nmax_age = \"1d\"\nfreshness_budget = \"5s\"\n\
             allowed_lateness = \"1h\"\n[view.source]\n{}\nevent_time = \"occurred_at\"\non_update = \"ignore\"\non_delete = \"ignore\"\n\
             [[view.feature]]\nname = \"events_1h\"\naggregation = \"count\"\nwindow = \"1h\"\n",
            self.view(),
            self.source()
        )
    }

    fn feature(self) -> String {
        format!("{}:events_1h", self.view())
    }
}

/// Everything the phases share.
struct Bench {
    app: PgPool,
    address: String,
    /// Processes charged to each path (trees), beside its Postgres backends.
    processes: [Vec<(&'static str, u32)>; 2],
    postgres: u32,
    server: u32,
    /// Each ingest's metrics port.
    metrics: [u16; 2],
    next_marker: i64,
}

/// CPU seconds used so far.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// Per path: ingest, Kafka + Connect, its Postgres backends.
    paths: [[f64; 3]; 2],
    postgres: f64,
    server: f64,
    writer: f64,
}

/// What one phase measured for one path.
struct Measured {
    seen: Vec<Seen>,
    unseen: usize,
    /// The slot's WAL not confirmed as flushed when the writer stopped.
    unconfirmed: Option<i64>,
    commits: Commits,
}

/// Ingest's commits over a phase, from its metrics.
#[derive(Default)]
struct Commits {
    count: f64,
    seconds: f64,
    /// Kafka records (Debezium) or source transactions (direct) committed.
    items: f64,
}

impl Commits {
    async fn scrape(port: u16) -> Commits {
        let m = scrape(port).await;
        let get = |name: &str| m.get(name).copied().unwrap_or(0.0);
        Commits {
            count: get("freshet_ingest_commit_duration_seconds_count"),
            seconds: get("freshet_ingest_commit_duration_seconds_sum"),
            items: get("freshet_ingest_batch_records_sum"),
        }
    }

    fn since(&self, before: &Commits) -> Commits {
        Commits { count: self.count - before.count, seconds: self.seconds - before.seconds, items: self.items - before.items }
    }
}

/// One phase: a rate held for a while, both paths watched until drained.
struct Phase {
    rate: u64,
    rows: u64,
    markers: usize,
    written: Duration,
    /// From the writer's first commit: to split a step into thirds.
    started: Instant,
    paths: [Measured; 2],
    cpu: Cpu,
}

impl Bench {
    /// Postgres backends of each path: its ingest's store connections and
    /// its slot's walsender (and Debezium's own connections).
    async fn backends(&self) -> [Vec<u32>; 2] {
        let rows: Vec<(i32, String)> = sqlx::query_as(
            "SELECT pid, CASE WHEN application_name = $1 OR application_name LIKE 'Debezium%' THEN 'debezium'
                              WHEN application_name = $2 THEN 'direct' END
             FROM pg_stat_activity WHERE application_name IN ($1, $2) OR application_name LIKE 'Debezium%'
             UNION
             SELECT active_pid, CASE WHEN slot_name = $3 THEN 'debezium' ELSE 'direct' END
             FROM pg_replication_slots WHERE slot_name IN ($3, $4) AND active_pid IS NOT NULL",
        )
        .bind(Via::Debezium.application())
        .bind(Via::Direct.application())
        .bind(DEBEZIUM_SLOT)
        .bind(SLOT)
        .fetch_all(&self.app)
        .await
        .unwrap();
        let of = |which: &str| rows.iter().filter(|(_, w)| w == which).map(|(pid, _)| *pid as u32).collect();
        [of("debezium"), of("direct")]
    }

    async fn cpu(&self) -> Cpu {
        let backends = self.backends().await;
        let table = ProcessTable::now();
        let mut cpu = Cpu {
            postgres: table.tree_seconds(self.postgres),
            server: table.tree_seconds(self.server),
            writer: table.tree_seconds(std::process::id()),
            ..Cpu::default()
        };
        for (i, path) in cpu.paths.iter_mut().enumerate() {
            for (what, pid) in &self.processes[i] {
                path[usize::from(*what != "ingest")] += table.tree_seconds(*pid);
            }
            path[2] = backends[i].iter().map(|pid| table.tree_seconds(*pid)).sum();
        }
        cpu
    }

    /// Both slots' WAL not yet confirmed as flushed, in bytes.
    async fn unconfirmed(&self) -> [Option<i64>; 2] {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT slot_name::text, (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name IN ($1, $2)",
        )
        .bind(DEBEZIUM_SLOT)
        .bind(SLOT)
        .fetch_all(&self.app)
        .await
        .unwrap();
        let of = |slot: &str| rows.iter().find(|(s, _)| s == slot).map(|(_, b)| *b);
        [of(DEBEZIUM_SLOT), of(SLOT)]
    }

    /// Writes `rate` rows/s for `seconds`, then waits (up to `drain`) for
    /// both paths to serve every marker.
    async fn phase(&mut self, rate: u64, seconds: Duration, drain: Duration) -> Phase {
        let markers: [Arc<Markers>; 2] = Default::default();
        let watchers: Vec<_> = markers
            .iter()
            .zip(PATHS)
            .map(|(m, via)| {
                let (m, address) = (m.clone(), self.address.clone());
                tokio::spawn(async move { m.watch(&address, &via.feature(), drain).await })
            })
            .collect();
        let before = self.cpu().await;
        let commits_before = [Commits::scrape(self.metrics[0]).await, Commits::scrape(self.metrics[1]).await];
        let started = Instant::now();
        let (mut rows, mut count) = (0u64, 0usize);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while started.elapsed() < seconds {
            tick.tick().await;
            // Rows due by now: a slow commit makes the next transaction bigger.
            let due = (started.elapsed().min(seconds).as_secs_f64() * rate as f64) as u64;
            if due <= rows {
                continue;
            }
            let marker = self.next_marker;
            self.next_marker += 1;
            sqlx::query(
                "INSERT INTO public.user_events (user_id, event_type, occurred_at)
                 SELECT CASE WHEN g = 1 THEN $1 ELSE 1 + (random() * ($3 - 1))::int8 END, 'bench', clock_timestamp()
                 FROM generate_series(1, $2::int4) AS g",
            )
            .bind(marker)
            .bind((due - rows) as i32)
            .bind(USERS)
            .execute(&self.app)
            .await
            .unwrap();
            let at = Instant::now();
            markers.iter().for_each(|m| m.written(marker, at));
            rows = due;
            count += 1;
        }
        let written = started.elapsed();
        let unconfirmed = self.unconfirmed().await;
        markers.iter().for_each(|m| m.close());
        let mut seen = Vec::new();
        for watcher in watchers {
            seen.push(watcher.await.unwrap());
        }
        let after = self.cpu().await;
        let mut seen = seen.into_iter();
        let mut paths = Vec::new();
        for (i, before) in commits_before.iter().enumerate() {
            let commits = Commits::scrape(self.metrics[i]).await.since(before);
            paths.push(Measured { seen: seen.next().unwrap(), unseen: markers[i].unseen(), unconfirmed: unconfirmed[i], commits });
        }
        let paths: [Measured; 2] = paths.try_into().unwrap_or_else(|_| unreachable!("two paths"));
        Phase { rate, rows, markers: count, written, started, paths, cpu: after.since(&before) }
    }
}

impl Cpu {
    fn since(&self, before: &Cpu) -> Cpu {
        let mut paths = self.paths;
        for (now, then) in paths.iter_mut().flatten().zip(before.paths.iter().flatten()) {
            *now -= then;
        }
        Cpu { paths, postgres: self.postgres - before.postgres, server: self.server - before.server, writer: self.writer - before.writer }
    }
}

impl Phase {
    fn achieved(&self) -> f64 {
        self.rows as f64 / self.written.as_secs_f64()
    }

    /// Median latency (ms) of the markers written in `part` of the writing
    /// time (0.0..1.0).
    fn median_ms(&self, path: usize, part: std::ops::Range<f64>) -> f64 {
        let total = self.written.as_secs_f64();
        let latencies: Vec<Duration> = self.paths[path]
            .seen
            .iter()
            .filter(|s| part.contains(&((s.written - self.started).as_secs_f64() / total)))
            .map(|s| s.latency)
            .collect();
        freshness::quantiles_ms(&latencies)[0]
    }

    /// Kept up: every marker seen, and latency did not grow over the step.
    fn kept_up(&self, path: usize) -> bool {
        let (first, last) = (self.median_ms(path, 0.0..1.0 / 3.0), self.median_ms(path, 2.0 / 3.0..1.01));
        self.paths[path].unseen == 0 && last <= first + (first * 0.5).max(100.0)
    }

    /// Seconds from the writer's end to the path's last marker served.
    fn drained_s(&self, path: usize) -> f64 {
        let end = self.started + self.written;
        let last = self.paths[path].seen.iter().map(|s| s.written + s.latency).max();
        last.map_or(0.0, |l| l.saturating_duration_since(end).as_secs_f64())
    }
}

fn views(paths: &[Via]) -> String {
    paths.iter().map(|p| p.views()).collect::<Vec<_>>().join("\n")
}

fn ingest_direct(path: &Path, store: &str, app_url: &str, metrics: &str) -> Process {
    Process::start(
        Command::new(binary("freshet-ingest"))
            .args(["run", "--metrics-listen", metrics])
            .env("FRESHET_VIEWS", path)
            .env("FRESHET_DATABASE_URL", with_application(store, Via::Direct))
            .env("FRESHET_SOURCE_DATABASE_URL", app_url)
            .env_remove("FRESHET_KAFKA_BROKERS")
            .env("FRESHET_GROUP", "bench")
            // Its log (stdout) into the bench's output: warnings say why it stalls.
            .env("RUST_LOG", std::env::var("BENCH_WAL_INGEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::inherit()),
    )
}

fn with_application(url: &str, path: Via) -> String {
    format!("{url}{}application_name={}", if url.contains('?') { '&' } else { '?' }, path.application())
}

fn pid(name: &str) -> u32 {
    env(name).trim().parse().unwrap_or_else(|_| panic!("{name} is not a pid"))
}

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A Markdown table's header and separator lines.
fn table_header(columns: &[&str]) {
    println!("| {} |", columns.join(" | "));
    println!("|{}", "---|".repeat(columns.len()));
}

fn print_latencies(phases: &[Phase]) {
    freshness::header();
    for phase in phases {
        for (i, path) in PATHS.iter().enumerate() {
            let what = format!("{}, {} rows/s (written {:.0}/s)", path.name(), phase.rate, phase.achieved());
            freshness::row(&what, &phase.paths[i].seen, phase.markers);
        }
    }
}

fn print_ramp(steps: &[Phase]) {
    table_header(&[
        "target rows/s",
        "written rows/s",
        "path",
        "p50 first third ms",
        "p50 last third ms",
        "p99 ms",
        "max ms",
        "unseen",
        "served all within s of the writer's end",
        "slot WAL unconfirmed at the end, MB",
        "kept up",
    ]);
    for step in steps {
        for (i, path) in PATHS.iter().enumerate() {
            let latencies: Vec<Duration> = step.paths[i].seen.iter().map(|s| s.latency).collect();
            let [_, _, p99, max] = freshness::quantiles_ms(&latencies);
            println!(
                "| {} | {:.0} | {} | {:.1} | {:.1} | {p99:.1} | {max:.1} | {} | {:.2} | {} | {} |",
                step.rate,
                step.achieved(),
                path.name(),
                step.median_ms(i, 0.0..1.0 / 3.0),
                step.median_ms(i, 2.0 / 3.0..1.01),
                step.paths[i].unseen,
                step.drained_s(i),
                step.paths[i].unconfirmed.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6)),
                if step.kept_up(i) { "yes" } else { "**no**" }
            );
        }
    }
    println!();
    table_header(&["path", "sustained rows/s until the first sign of lag growth"]);
    for (i, path) in PATHS.iter().enumerate() {
        let kept: Vec<&Phase> = steps.iter().take_while(|s| s.kept_up(i)).collect();
        let verdict = match (kept.last(), kept.len() == steps.len()) {
            (None, _) => format!("below {} (fell behind at the first step)", steps[0].rate),
            (Some(s), true) => format!("≥ {:.0} (kept up with every step; the writer's ceiling here)", s.achieved()),
            (Some(s), false) => format!("{:.0} (fell behind at {} rows/s)", s.achieved(), steps[kept.len()].rate),
        };
        println!("| {} | {verdict} |", path.name());
    }
}

fn print_cpu(named: &[(&str, &Phase)]) {
    table_header(&[
        "phase",
        "rows",
        "path",
        "ingest s",
        "Kafka + Connect s",
        "its Postgres backends s",
        "path total s",
        "CPU ms per 1000 rows",
        "Postgres (all) s",
        "server s",
        "writer s",
    ]);
    per_phase_and_path(named, |name, phase, i| {
        let [ingest, jvms, backends] = phase.cpu.paths[i];
        let total = ingest + jvms + backends;
        format!(
            "| {name} | {} | {} | {ingest:.1} | {} | {backends:.1} | **{total:.1}** | {:.1} | {:.1} | {:.1} | {:.1} |",
            phase.rows,
            PATHS[i].name(),
            if i == 0 { format!("{jvms:.1}") } else { "-".into() },
            total * 1e6 / phase.rows.max(1) as f64,
            phase.cpu.postgres,
            phase.cpu.server,
            phase.cpu.writer
        )
    });
}

/// Prints `line` of each phase and path (by index into `PATHS`).
fn per_phase_and_path(named: &[(&str, &Phase)], line: impl Fn(&str, &Phase, usize) -> String) {
    for (name, phase) in named {
        for i in 0..PATHS.len() {
            println!("{}", line(name, phase, i));
        }
    }
}

fn print_commits(named: &[(&str, &Phase)]) {
    table_header(&[
        "phase",
        "path",
        "ingest commits",
        "mean commit ms",
        "items per commit (Kafka records / source transactions)",
        "rows per commit",
    ]);
    per_phase_and_path(named, |name, phase, i| {
        let c = &phase.paths[i].commits;
        let per = |x: f64| if c.count > 0.0 { x / c.count } else { 0.0 };
        format!(
            "| {name} | {} | {:.0} | {:.1} | {:.1} | {:.0} |",
            PATHS[i].name(),
            c.count,
            per(c.seconds) * 1000.0,
            per(c.items),
            per(phase.rows as f64)
        )
    });
}

#[tokio::main]
async fn main() {
    let app_url = env("BENCH_APP_URL");
    let app = PgPool::connect(&app_url).await.unwrap();
    // REPLICA IDENTITY FULL is set by source-schema.sql; no view here retracts.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE PUBLICATION {SLOT} FOR TABLE public.user_events"))).execute(&app).await.unwrap();
    let store = fresh_database().await;
    let (_d1, debezium_views) = views_file(&Via::Debezium.views());
    let (_d2, direct_views) = views_file(&Via::Direct.views());
    let (_d3, both_views) = views_file(&views(&PATHS));
    let metrics = [free_port(), free_port()];
    let listen = metrics.map(|port| format!("127.0.0.1:{port}"));
    let debezium =
        ingest_with(&debezium_views, &with_application(&store, Via::Debezium), "bench", "debezium", &["--metrics-listen", &listen[0]]);
    let direct = ingest_direct(&direct_views, &store, &app_url, &listen[1]);
    let (server, address) = server(&both_views, &store, &[]);
    let mut bench = Bench {
        app,
        address: address.to_string(),
        processes: [
            vec![("ingest", debezium.child.id()), ("kafka", pid("BENCH_KAFKA_PID")), ("connect", pid("BENCH_CONNECT_PID"))],
            vec![("ingest", direct.child.id())],
        ],
        postgres: pid("BENCH_POSTGRES_PID"),
        server: server.child.id(),
        metrics,
        next_marker: 1_000_000_000,
    };
    let seconds = Duration::from_secs(setting("BENCH_WAL_SECONDS", 15));
    let step_seconds = Duration::from_secs(setting("BENCH_WAL_STEP_SECONDS", 10));
    let drain = Duration::from_secs(setting("BENCH_WAL_DRAIN_SECONDS", 60));
    let steps: Vec<u64> = setting("BENCH_WAL_STEPS", "2000,5000,10000,20000,40000".to_string())
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_WAL_STEPS: rows/s, comma-separated"))
        .collect();

    // Warm-up: the Debezium ingest joins its group, the direct one takes its
    // snapshot; both must serve before anything is measured.
    let warm = bench.phase(100, Duration::from_secs(3), Duration::from_secs(120)).await;
    for (i, path) in PATHS.iter().enumerate() {
        assert_eq!(warm.paths[i].unseen, 0, "{} never served the warm-up's markers", path.name());
    }
    println!("load average before: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    let fixed = [bench.phase(100, seconds, drain).await, bench.phase(5_000, seconds, drain).await];
    let mut ramp = Vec::new();
    for rate in steps {
        ramp.push(bench.phase(rate, step_seconds, drain).await);
    }
    println!("load average after: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());

    println!("\n### Postgres commit → servable, side by side ({}s per rate)\n", seconds.as_secs());
    print_latencies(&fixed);
    println!("\n### Ramp ({}s per step, drained between steps)\n", step_seconds.as_secs());
    print_ramp(&ramp);
    println!("\n### CPU seconds per path\n");
    let mut named: Vec<(String, &Phase)> = vec![("100 rows/s".into(), &fixed[0]), ("5000 rows/s".into(), &fixed[1])];
    named.extend(ramp.iter().map(|s| (format!("ramp {}", s.rate), s)));
    let named: Vec<(&str, &Phase)> = named.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    print_cpu(&named);
    println!("\n### Ingest commits per phase\n");
    print_commits(&named);
    drop((debezium, direct, server));
}
