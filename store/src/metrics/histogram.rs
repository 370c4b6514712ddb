//! A histogram whose observations are atomic adds.
//!
//! `prometheus_client`'s own `Histogram` takes a mutex on every observation
//! (its source notes "consider using atomics"); the server observes every
//! call's latency, so concurrent calls of a method would meet on that mutex.
//! This one keeps a counter per bucket and the sum as the bits of an `f64`,
//! and joins the library's registry and encoder through its `EncodeMetric`
//! trait, so it is rendered exactly as the library renders its own.
//!
//! A scrape reads the counters one by one while observations go on, so the
//! sum may be an observation or so off the counts; the count is the total of
//! the buckets, so `_count` and `le="+Inf"` always agree.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric},
};

/// A handle: clones share the counts.
#[derive(Debug, Clone)]
pub struct AtomicHistogram {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending.
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative), one past the last bound.
    counts: Box<[AtomicU64]>,
    /// The sum of observations, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with buckets up to each of `bounds` (ascending) and `+Inf`.
    pub fn new(bounds: &'static [f64]) -> Self {
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self { inner: Arc::new(Inner { bounds, counts, sum: AtomicU64::new(0f64.to_bits()) }) }
    }

    pub fn observe(&self, value: f64) {
        let inner = &*self.inner;
        // The first bucket whose bound is at least `value` (`le` includes it).
        let bucket = inner.bounds.partition_point(|bound| *bound < value);
        inner.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let _ = inner.sum.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| Some((f64::from_bits(sum) + value).to_bits()));
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let counts: Vec<u64> = inner.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        // The encoder adds up the buckets, and closes them with `+Inf`.
        let buckets: Vec<(f64, u64)> = inner.bounds.iter().copied().zip(counts.iter().copied()).collect();
        let sum = f64::from_bits(inner.sum.load(Ordering::Relaxed));
        encoder.encode_histogram::<NoLabelSet>(sum, counts.iter().sum(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::prometheus_text::encode, registry::Registry};

    use super::*;

    #[test]
    fn renders_cumulative_buckets_a_sum_and_a_count() {
        let mut registry = Registry::default();
        let histogram = AtomicHistogram::new(&[0.25, 0.5, 1.0]);
        registry.register("took_seconds", "Time", histogram.clone());
        // On a bound, inside a bucket, past the last bound.
        for value in [0.25, 0.375, 0.375, 7.0] {
            histogram.observe(value);
        }
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert_eq!(
            text,
            "# HELP took_seconds Time.\n# TYPE took_seconds histogram\n\
             took_seconds_bucket{le=\"0.25\"} 1\ntook_seconds_bucket{le=\"0.5\"} 3\ntook_seconds_bucket{le=\"1\"} 3\n\
             took_seconds_bucket{le=\"+Inf\"} 4\ntook_seconds_sum 8.0\ntook_seconds_count 4\n"
        );
    }

    #[test]
    fn concurrent_observations_are_all_counted() {
        let histogram = AtomicHistogram::new(&[1.0]);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..10_000).for_each(|_| histogram.observe(0.5)));
            }
        });
        let counts: Vec<u64> = histogram.inner.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(counts, [40_000, 0]);
        assert_eq!(f64::from_bits(histogram.inner.sum.load(Ordering::Relaxed)), 20_000.0);
    }
}
