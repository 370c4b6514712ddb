//! Markers for the freshness benchmarks: a writer notes when each marker
//! (an event for an entity of its own) was appended or committed, and a
//! watcher polls `GetFeatures` until the marker's feature is present, which
//! times "written → servable" for each.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use freshet_proto::v1::{EntityKey, FeatureStatus, GetFeaturesRequest, entity_key::Key, feature_service_client::FeatureServiceClient};

/// How often pending markers are polled: fine enough to measure, coarse
/// enough not to load the machine it measures.
const POLL: Duration = Duration::from_millis(10);

/// Markers asked about per poll. Entities become servable in the order they
/// were written, so the oldest pending ones are the ones worth asking about.
const PER_POLL: usize = 100;

/// Markers written and not yet seen, and whether more will come.
#[derive(Default)]
pub struct Markers {
    /// Entity → when its write returned. Entities grow with time, so the
    /// first keys are the oldest markers.
    pending: Mutex<BTreeMap<i64, Instant>>,
    closed: AtomicBool,
}

/// A marker seen servable: when it was written and how long it took.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub entity: i64,
    pub written: Instant,
    pub latency: Duration,
}

impl Markers {
    /// `entity`'s marker was written (appended, or its commit returned) at `at`.
    pub fn written(&self, entity: i64, at: Instant) {
        self.pending.lock().unwrap().insert(entity, at);
    }

    /// No more markers will be written.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Markers written and never seen.
    pub fn unseen(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Polls `feature` for pending markers, oldest first, until they are
    /// closed and all seen, or `drain` has passed since they were closed.
    pub async fn watch(&self, address: &str, feature: &str, drain: Duration) -> Vec<Seen> {
        let mut client = FeatureServiceClient::connect(format!("http://{address}")).await.unwrap();
        let mut seen = Vec::new();
        let mut closed_at = None;
        loop {
            if self.closed.load(Ordering::SeqCst) {
                let since = *closed_at.get_or_insert_with(Instant::now);
                if self.unseen() == 0 || since.elapsed() > drain {
                    return seen;
                }
            }
            let entities: Vec<i64> = self.pending.lock().unwrap().keys().copied().take(PER_POLL).collect();
            if !entities.is_empty() {
                let request = GetFeaturesRequest {
                    features: vec![feature.to_string()],
                    entities: entities.iter().map(|e| EntityKey { key: Some(Key::Int64Key(*e)) }).collect(),
                    max_age: None,
                };
                let response = client.get_features(request).await.unwrap().into_inner();
                let now = Instant::now();
                let mut pending = self.pending.lock().unwrap();
                for (entity, row) in entities.iter().zip(response.results) {
                    if row.values[0].status() == FeatureStatus::Present
                        && let Some(written) = pending.remove(entity)
                    {
                        seen.push(Seen { entity: *entity, written, latency: now - written });
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// p50, p95, p99 and max of `latencies` in ms (zeros when there are none).
pub fn quantiles_ms(latencies: &[Duration]) -> [f64; 4] {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let pct = |p: f64| match sorted.len() {
        0 => 0.0,
        n => sorted[((n as f64 * p).ceil() as usize).clamp(1, n) - 1].as_secs_f64() * 1000.0,
    };
    [pct(0.5), pct(0.95), pct(0.99), pct(1.0)]
}

/// The header of the table `row` prints lines of.
pub fn header() {
    println!("| path | markers seen | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
}

/// One line of latencies, `seen` of `expected` markers.
pub fn row(what: &str, seen: &[Seen], expected: usize) {
    let latencies: Vec<Duration> = seen.iter().map(|s| s.latency).collect();
    let [p50, p95, p99, max] = quantiles_ms(&latencies);
    println!("| {what} | {} of {expected} | {p50:.1} | {p95:.1} | {p99:.1} | {max:.1} |", seen.len());
}
