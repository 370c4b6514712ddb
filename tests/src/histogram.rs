//! A Prometheus histogram read from a scrape of `/metrics`, for benchmarks
//! that report a binary's own view of what they measured (the server's
//! call durations, ingest's commit durations) beside their own.

use std::collections::BTreeMap;

/// One family's buckets: (upper bound in seconds, observations at or below
/// it), cumulative.
#[derive(Clone, Default)]
pub struct Histogram(Vec<(f64, f64)>);

impl Histogram {
    /// The buckets of `family` (e.g. `freshet_ingest_commit_duration_seconds`)
    /// in `scrape` whose labels include `label` (e.g. `method="Check"`; empty
    /// for a family without labels).
    pub fn of(scrape: &BTreeMap<String, f64>, family: &str, label: &str) -> Histogram {
        let prefix = format!("{family}_bucket{{");
        let mut buckets: Vec<(f64, f64)> = scrape
            .iter()
            .filter_map(|(key, &count)| {
                let labels = key.strip_prefix(&prefix)?.trim_end_matches('}');
                if !label.is_empty() && !labels.split(',').any(|l| l == label) {
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

    /// The observations since `before`.
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

    /// How many observations it holds.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, c)| *c)
    }

    /// The `q` quantile in ms, interpolated linearly inside its bucket as
    /// Prometheus' `histogram_quantile` does; "> x" when it falls past the
    /// last finite bound.
    pub fn quantile_ms(&self, q: f64) -> String {
        let total = self.count();
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
    fn buckets_are_read_by_family_and_label() {
        let scrape: BTreeMap<String, f64> = [
            ("freshet_server_call_duration_seconds_bucket{method=\"GetFeatures\",le=\"0.001\"}", 4.0),
            ("freshet_server_call_duration_seconds_bucket{method=\"GetFeatures\",le=\"+Inf\"}", 10.0),
            ("freshet_server_call_duration_seconds_bucket{method=\"Check\",le=\"0.001\"}", 7.0),
            ("freshet_ingest_commit_duration_seconds_bucket{le=\"0.005\"}", 3.0),
            ("freshet_ingest_commit_duration_seconds_bucket{le=\"+Inf\"}", 5.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let calls = Histogram::of(&scrape, "freshet_server_call_duration_seconds", "method=\"GetFeatures\"");
        assert_eq!(calls.0, vec![(0.001, 4.0), (f64::INFINITY, 10.0)]);
        let commits = Histogram::of(&scrape, "freshet_ingest_commit_duration_seconds", "");
        assert_eq!(commits.0, vec![(0.005, 3.0), (f64::INFINITY, 5.0)]);
        assert_eq!(commits.count(), 5.0);
    }
}
