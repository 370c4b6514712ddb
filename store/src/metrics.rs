//! Prometheus metrics, as both binaries expose them on `GET /metrics`.
//!
//! A small registry rather than a metrics framework: counters, gauges and
//! histograms keyed by name and label set, rendered in the text exposition
//! format. Names follow Prometheus conventions (`_total` counters, base
//! units such as `_seconds`); times are exposed as timestamps so that
//! `time() - x` gives an age that keeps growing when nothing happens.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds of histogram buckets for durations, in seconds.
const SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds of histogram buckets for sizes (records per batch).
const SIZES: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 50000.0];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

enum Series {
    Value(f64),
    Histogram { bounds: &'static [f64], counts: Vec<u64>, sum: f64, count: u64 },
}

struct Family {
    help: &'static str,
    kind: Kind,
    series: BTreeMap<String, Series>,
}

#[derive(Default)]
pub struct Metrics {
    families: Mutex<BTreeMap<&'static str, Family>>,
}

pub type Labels<'a> = &'a [(&'a str, &'a str)];

fn label_text(labels: Labels<'_>) -> String {
    let mut text = String::new();
    for (i, (k, v)) in labels.iter().enumerate() {
        let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(text, "{}{k}=\"{v}\"", if i > 0 { "," } else { "" });
    }
    text
}

impl Metrics {
    fn with(&self, name: &'static str, help: &'static str, kind: Kind, labels: Labels<'_>, update: impl FnOnce(&mut Series)) {
        let mut families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let family = families.entry(name).or_insert_with(|| Family { help, kind, series: BTreeMap::new() });
        let series = family.series.entry(label_text(labels)).or_insert_with(|| match kind {
            Kind::Histogram => {
                let bounds = if name.ends_with("_seconds") { SECONDS } else { SIZES };
                Series::Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
            }
            _ => Series::Value(0.0),
        });
        update(series);
    }

    /// Adds to a counter.
    pub fn add(&self, name: &'static str, help: &'static str, labels: Labels<'_>, by: f64) {
        self.shift(name, help, Kind::Counter, labels, by);
    }

    /// Moves a gauge up or down (what is in progress, say).
    pub fn adjust(&self, name: &'static str, help: &'static str, labels: Labels<'_>, by: f64) {
        self.shift(name, help, Kind::Gauge, labels, by);
    }

    fn shift(&self, name: &'static str, help: &'static str, kind: Kind, labels: Labels<'_>, by: f64) {
        self.with(name, help, kind, labels, |s| {
            if let Series::Value(v) = s {
                *v += by;
            }
        });
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, help: &'static str, labels: Labels<'_>, to: f64) {
        self.with(name, help, Kind::Gauge, labels, |s| {
            if let Series::Value(v) = s {
                *v = to;
            }
        });
    }

    /// Records one observation in a histogram: seconds for names ending in
    /// `_seconds`, sizes (counts of things) otherwise.
    pub fn observe(&self, name: &'static str, help: &'static str, labels: Labels<'_>, value: f64) {
        self.with(name, help, Kind::Histogram, labels, |s| {
            if let Series::Histogram { bounds, counts, sum, count } = s {
                for (bound, c) in bounds.iter().zip(counts.iter_mut()) {
                    if value <= *bound {
                        *c += 1;
                    }
                }
                *sum += value;
                *count += 1;
            }
        });
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        for (name, family) in families.iter() {
            let kind = match family.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {kind}", family.help);
            for (labels, series) in &family.series {
                let braces = |extra: &str| match (labels.is_empty(), extra.is_empty()) {
                    (true, true) => String::new(),
                    (true, false) => format!("{{{extra}}}"),
                    (false, true) => format!("{{{labels}}}"),
                    (false, false) => format!("{{{labels},{extra}}}"),
                };
                match series {
                    Series::Value(v) => {
                        let _ = writeln!(out, "{name}{} {v}", braces(""));
                    }
                    Series::Histogram { bounds, counts, sum, count } => {
                        for (bound, c) in bounds.iter().zip(counts) {
                            let _ = writeln!(out, "{name}_bucket{} {c}", braces(&format!("le=\"{bound}\"")));
                        }
                        let _ = writeln!(out, "{name}_bucket{} {count}", braces("le=\"+Inf\""));
                        let _ = writeln!(out, "{name}_sum{} {sum}\n{name}_count{} {count}", braces(""), braces(""));
                    }
                }
            }
        }
        out
    }
}

/// Serves `GET /metrics` on `address` until the process ends; returns the
/// bound address (port 0 picks a free one).
pub async fn serve(metrics: Arc<Metrics>, address: SocketAddr) -> std::io::Result<SocketAddr> {
    // Say which address: "Address already in use" alone does not tell an
    // operator which of a binary's listeners clashed.
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot serve metrics on {address}: {e}")))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut request = Vec::with_capacity(1024);
                let mut buffer = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let response = if request.starts_with(b"GET /metrics ") {
                    let body = metrics.render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let m = Metrics::default();
        m.add("x_total", "Things.", &[("topic", "a\"b")], 2.0);
        m.add("x_total", "Things.", &[("topic", "a\"b")], 1.0);
        m.set("y", "Level.", &[], 7.0);
        m.adjust("w", "Busy.", &[], 2.0);
        m.adjust("w", "Busy.", &[], -1.0);
        m.observe("z_seconds", "Time.", &[("m", "Get")], 0.003);
        let text = m.render();
        assert!(text.contains("# TYPE x_total counter\nx_total{topic=\"a\\\"b\"} 3\n"), "{text}");
        assert!(text.contains("y 7\n"), "{text}");
        assert!(text.contains("# TYPE w gauge\nw 1\n"), "{text}");
        assert!(text.contains("z_seconds_bucket{m=\"Get\",le=\"0.0025\"} 0\n"), "{text}");
        assert!(text.contains("z_seconds_bucket{m=\"Get\",le=\"0.005\"} 1\n"), "{text}");
        assert!(
            text.contains("z_seconds_bucket{m=\"Get\",le=\"+Inf\"} 1\nz_seconds_sum{m=\"Get\"} 0.003\nz_seconds_count{m=\"Get\"} 1\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_busy_address_is_named_in_the_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = taken.local_addr().unwrap();
        let error = serve(Arc::new(Metrics::default()), address).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::AddrInUse);
        assert!(error.to_string().starts_with(&format!("cannot serve metrics on {address}: ")), "{error}");
    }
}
