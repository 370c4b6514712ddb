//! The server's Prometheus metrics: every family registered once, at
//! start-up, and recorded through typed handles.
//!
//! Calls by method and gRPC code, their latency, calls in flight and calls
//! shed; cache outcomes, degraded mode and whether Postgres answers; the hot
//! tier's size and refreshes; the CDC source's replication slots. Names, types and labels are what
//! `deploy/validate.sh`, the dashboard and the alert rules use (the test
//! below holds them to it).
//!
//! What every call records (its method and code, latency, in-flight, cache
//! outcome) goes to handles resolved here, at start-up, for every method
//! this server serves and every code: an atomic add each, with no registry
//! lookup, no lock and no label text built per call. Those series are there,
//! at 0, from the start, so a rate over them is defined before the first
//! call, and any path a caller invents is counted as `unknown`.

use std::time::Duration;

use freshet_store::metrics::{AtomicHistogram, SECONDS};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// What a method that is not served is counted as.
const UNKNOWN: &str = "unknown";
/// gRPC status codes are 0 (`OK`) to 16 (`UNAUTHENTICATED`).
const CODES: usize = 17;
/// Cache outcomes, as `reader::CacheOutcome::as_str` names them; one it
/// adds later is counted all the same, from its first read.
const OUTCOMES: [&str; 6] = ["hot", "hit", "partial", "miss", "bypassed", "stale"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SlotLabels {
    slot: String,
}

/// A method's handles.
struct MethodCalls {
    name: &'static str,
    /// Indexed by gRPC code.
    by_code: [Counter; CODES],
    duration: AtomicHistogram,
}

/// Which method a call is counted under (see [`ServerMetrics::method`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(usize);

pub struct ServerMetrics {
    /// Every method served, then `unknown`.
    methods: Vec<MethodCalls>,
    pub in_flight: Gauge,
    pub shed: Counter,
    cache_reads: Family<OutcomeLabels, Counter>,
    outcomes: Vec<(&'static str, Counter)>,
    pub cache_degraded: Gauge,
    pub store_up: Gauge,
    pub hot_capacity: Gauge,
    pub hot_bytes: Gauge,
    pub hot_entries: Gauge,
    pub hot_refreshed: Counter,
    pub listening: Gauge,
    slot_lag: Family<SlotLabels, Gauge>,
    slot_retained: Family<SlotLabels, Gauge>,
    slot_active: Family<SlotLabels, Gauge>,
}

impl ServerMetrics {
    /// Registers the server's families in `registry`; `methods` are the
    /// names of the methods it serves.
    pub fn new(registry: &mut Registry, methods: impl IntoIterator<Item = &'static str>) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let durations = Family::<MethodLabels, AtomicHistogram>::new_with_constructor(|| AtomicHistogram::new(SECONDS));
        let mut names: Vec<&'static str> = Vec::new();
        for name in methods.into_iter().chain([UNKNOWN]) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        let methods = names
            .into_iter()
            .map(|method| MethodCalls {
                name: method,
                by_code: std::array::from_fn(|code| calls.get_or_create_owned(&CallLabels { method, code: code as i32 })),
                duration: durations.get_or_create_owned(&MethodLabels { method }),
            })
            .collect();
        let cache_reads = Family::<OutcomeLabels, Counter>::default();
        let outcomes = OUTCOMES.map(|outcome| (outcome, cache_reads.get_or_create_owned(&OutcomeLabels { outcome }))).to_vec();
        let m = ServerMetrics {
            methods,
            in_flight: Gauge::default(),
            shed: Counter::default(),
            cache_reads,
            outcomes,
            cache_degraded: Gauge::default(),
            store_up: Gauge::default(),
            hot_capacity: Gauge::default(),
            hot_bytes: Gauge::default(),
            hot_entries: Gauge::default(),
            hot_refreshed: Counter::default(),
            listening: Gauge::default(),
            slot_lag: Family::default(),
            slot_retained: Family::default(),
            slot_active: Family::default(),
        };
        // Counters are named without `_total`: the encoder adds it.
        let r = registry;
        r.register("freshet_server_calls", "Calls by method and gRPC status code", calls);
        r.register("freshet_server_call_duration_seconds", "Call latency by method", durations);
        r.register("freshet_server_in_flight_calls", "Calls being handled now", m.in_flight.clone());
        r.register("freshet_server_shed_calls", "Calls refused at the concurrency limit", m.shed.clone());
        r.register("freshet_server_cache_reads", "GetFeatures reads by cache outcome", m.cache_reads.clone());
        r.register("freshet_server_cache_degraded", "1 while Redis fails and reads go to Postgres", m.cache_degraded.clone());
        r.register("freshet_server_store_up", "1 while Postgres answers the server's probe", m.store_up.clone());
        r.register("freshet_server_hot_cache_capacity_bytes", "Bytes the hot tier may hold (--hot-cache-bytes)", m.hot_capacity.clone());
        r.register("freshet_server_hot_cache_bytes", "Bytes the hot tier holds, as its entries weigh", m.hot_bytes.clone());
        r.register("freshet_server_hot_cache_entries", "(view, entity) rows the hot tier holds", m.hot_entries.clone());
        r.register(
            "freshet_server_hot_cache_refreshed_rows",
            "Rows read again into the hot tier after a commit notification named them",
            m.hot_refreshed.clone(),
        );
        r.register("freshet_server_commit_listener_up", "1 while the server follows ingest's commit notifications", m.listening.clone());
        r.register("freshet_source_replication_slot_lag_bytes", "WAL written since the slot's consumer last confirmed", m.slot_lag.clone());
        r.register("freshet_source_replication_slot_retained_bytes", "WAL the source keeps for the slot", m.slot_retained.clone());
        r.register("freshet_source_replication_slot_active", "1 while a consumer is attached to the slot", m.slot_active.clone());
        m
    }

    /// The method a call is counted under: `name` if this server serves it,
    /// `unknown` otherwise.
    pub fn method(&self, name: Option<&str>) -> Method {
        let unknown = self.methods.len() - 1;
        Method(name.and_then(|name| self.methods[..unknown].iter().position(|m| m.name == name)).unwrap_or(unknown))
    }

    /// A call of `method` ended with `code` after `took`.
    pub fn call_ended(&self, method: Method, code: tonic::Code, took: Duration) {
        let method = &self.methods[method.0];
        method.by_code[code as usize].inc();
        method.duration.observe(took.as_secs_f64());
    }

    /// A GetFeatures read whose rows came from where `outcome` says.
    pub fn cache_read(&self, outcome: &'static str) {
        match self.outcomes.iter().find(|(o, _)| *o == outcome) {
            Some((_, counter)) => counter.inc(),
            None => self.cache_reads.get_or_create(&OutcomeLabels { outcome }).inc(),
        };
    }

    /// What the source database says of replication slot `name`.
    pub fn slot(&self, name: &str, lag_bytes: i64, retained_bytes: i64, active: bool) {
        let labels = SlotLabels { slot: name.to_string() };
        self.slot_lag.get_or_create(&labels).set(lag_bytes);
        self.slot_retained.get_or_create(&labels).set(retained_bytes);
        self.slot_active.get_or_create(&labels).set(active as i64);
    }
}

/// The server's metrics in a registry of their own, and its rendering.
#[cfg(test)]
pub mod testing {
    use super::*;

    pub fn registered() -> (Registry, std::sync::Arc<ServerMetrics>) {
        let mut registry = Registry::default();
        let metrics = ServerMetrics::new(&mut registry, crate::layers::METHODS.iter().map(|(_, method)| *method));
        (registry, std::sync::Arc::new(metrics))
    }

    pub fn render(registry: &Registry) -> String {
        freshet_store::metrics::render(registry).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use freshet_store::metrics::exported;

    use super::{
        testing::{registered, render},
        *,
    };

    #[test]
    fn exports_what_the_deploy_checks_expect() {
        let (registry, metrics) = registered();
        // Slot series appear with the first look at the source.
        metrics.slot("freshet_slot", 1, 2, true);
        let rendered = exported::rendered(&render(&registry));
        let deploy = include_str!("../../deploy/validate.sh");
        assert_eq!(rendered, exported::expected(deploy, &["freshet_server_", "freshet_source_"]));
        // The outcomes the dashboard may select are the ones there from the start.
        let values = deploy.split_once("VALUES = {\"outcome\": {").expect("validate.sh lists outcomes").1;
        let mut listed: Vec<&str> = values.split_once('}').unwrap().0.split(", ").map(|v| v.trim_matches('"')).collect();
        let mut ours = OUTCOMES.to_vec();
        listed.sort();
        ours.sort();
        assert_eq!(listed, ours);
    }

    #[test]
    fn every_method_and_code_is_there_at_zero_from_the_start() {
        let (registry, _metrics) = registered();
        let text = render(&registry);
        for series in [
            "freshet_server_calls_total{method=\"GetFeatures\",code=\"0\"} 0\n",
            "freshet_server_calls_total{method=\"Check\",code=\"16\"} 0\n",
            "freshet_server_calls_total{method=\"unknown\",code=\"1\"} 0\n",
            "freshet_server_call_duration_seconds_count{method=\"ListFeatureViews\"} 0\n",
            "freshet_server_cache_reads_total{outcome=\"stale\"} 0\n",
            "freshet_server_shed_calls_total 0\n",
            "freshet_server_in_flight_calls 0\n",
            "freshet_server_store_up 0\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
        // Both reflection services share a method name: one series each.
        let reflection = text.lines().filter(|l| l.starts_with("freshet_server_calls_total{method=\"ServerReflectionInfo\",code=\"0\"}"));
        assert_eq!(reflection.count(), 1);
    }

    /// The hot path records through handles resolved in `new`: `Counter` and
    /// `Gauge` are atomics, `AtomicHistogram` is atomics; nothing on it takes
    /// the families' locks or formats a label. Many threads at once must
    /// therefore lose nothing, and a method nobody serves must land on
    /// `unknown`.
    #[test]
    fn concurrent_calls_are_all_counted_under_their_method_and_code() {
        let (registry, metrics) = registered();
        let get = metrics.method(Some("GetFeatures"));
        let made_up = metrics.method(Some("Nope"));
        assert_eq!(metrics.method(None), made_up);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        metrics.in_flight.inc();
                        metrics.call_ended(get, tonic::Code::Ok, Duration::from_micros(300));
                        metrics.call_ended(made_up, tonic::Code::Unauthenticated, Duration::from_micros(300));
                        metrics.cache_read("hit");
                        metrics.in_flight.dec();
                    }
                });
            }
        });
        metrics.cache_read("a new outcome");
        let text = render(&registry);
        for series in [
            "freshet_server_calls_total{method=\"GetFeatures\",code=\"0\"} 4000\n",
            "freshet_server_calls_total{method=\"unknown\",code=\"16\"} 4000\n",
            "freshet_server_call_duration_seconds_bucket{method=\"GetFeatures\",le=\"0.0005\"} 4000\n",
            "freshet_server_cache_reads_total{outcome=\"hit\"} 4000\n",
            "freshet_server_cache_reads_total{outcome=\"a new outcome\"} 1\n",
            "freshet_server_in_flight_calls 0\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }
}
