//! What the binaries export, held against what the deploy checks expect.
//!
//! `deploy/validate.sh` checks every metric and label that the Grafana
//! dashboard and the alert rules select against its own list of what the
//! binaries export (`EXPORTED`, name -> type and label names). Each binary's
//! tests render its registry and compare it with that list, so the code, the
//! list and the dashboards cannot drift apart unnoticed.

use std::collections::{BTreeMap, BTreeSet};

/// Family name -> (type, label names of its series, `le` aside).
pub type Families = BTreeMap<String, (String, BTreeSet<String>)>;

/// The families in the `EXPORTED` list of `validate_sh` (the text of
/// `deploy/validate.sh`) whose names start with one of `prefixes`.
pub fn expected(validate_sh: &str, prefixes: &[&str]) -> Families {
    let list = validate_sh.split_once("\nEXPORTED = {\n").expect("validate.sh lists EXPORTED").1;
    let list = list.split_once("\n}").expect("EXPORTED ends").0;
    list.lines()
        .filter_map(|line| {
            // `    "name": ("kind", {"a", "b"}),` or `    "name": ("kind", set()),`
            let (name, rest) = line.trim().strip_prefix('"')?.split_once("\": (\"")?;
            let (kind, labels) = rest.split_once("\", ")?;
            let labels = labels.trim_end_matches("),").trim_start_matches('{').trim_end_matches('}');
            let labels = labels.split(", ").filter(|l| *l != "set()" && !l.is_empty()).map(|l| l.trim_matches('"').to_string());
            Some((name.to_string(), (kind.to_string(), labels.collect())))
        })
        .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
        .collect()
}

/// The families of `text`, in the Prometheus text format.
pub fn rendered(text: &str) -> Families {
    let mut families = Families::new();
    for line in text.lines() {
        if let Some(declared) = line.strip_prefix("# TYPE ") {
            let (name, kind) = declared.split_once(' ').expect("# TYPE name kind");
            families.insert(name.to_string(), (kind.to_string(), BTreeSet::new()));
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').expect("series value").0;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        // A histogram's series are the family's name and a suffix.
        let family = ["", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| families.contains_key(*f)))
            .unwrap_or_else(|| panic!("{name} has no # TYPE before it"));
        families.get_mut(family).expect("found").1.extend(label_names(labels).into_iter().filter(|l| l != "le"));
    }
    families
}

/// The names in `a="x",b="y\"z"}`.
fn label_names(labels: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = labels;
    while let Some((name, value)) = rest.split_once("=\"") {
        names.push(name.trim_start_matches(',').to_string());
        // Past the value's closing quote: the first one not escaped.
        let mut escaped = false;
        let end = value
            .char_indices()
            .find(|&(_, c)| {
                let closes = c == '"' && !escaped;
                escaped = c == '\\' && !escaped;
                closes
            })
            .map_or(value.len(), |(i, _)| i + 1);
        rest = &value[end..];
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(kind: &str, labels: &[&str]) -> (String, BTreeSet<String>) {
        (kind.to_string(), labels.iter().map(|l| l.to_string()).collect())
    }

    #[test]
    fn reads_the_list_of_validate_sh() {
        let text = "x\nEXPORTED = {\n    \"a_total\": (\"counter\", {\"topic\", \"partition\"}),\n    \
                    \"b_seconds\": (\"histogram\", set()),\n    \"other\": (\"gauge\", {\"slot\"}),\n}\nSERIES = {}\n";
        let want = Families::from([
            ("a_total".to_string(), family("counter", &["topic", "partition"])),
            ("b_seconds".to_string(), family("histogram", &[])),
        ]);
        assert_eq!(expected(text, &["a_", "b_"]), want);
        let whole = expected(include_str!("../../../deploy/validate.sh"), &["freshet_"]);
        assert_eq!(whole.get("freshet_server_calls_total"), Some(&family("counter", &["method", "code"])));
    }

    #[test]
    fn reads_families_and_label_names_from_the_text_format() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{m=\"x\\\",y=\\\"\",code=\"0\"} 1\n\
                    # TYPE h histogram\nh_bucket{k=\"v\",le=\"1\"} 0\nh_bucket{k=\"v\",le=\"+Inf\"} 0\nh_sum{k=\"v\"} 0\nh_count{k=\"v\"} 0\n\
                    # TYPE g gauge\ng 2\n";
        let want = Families::from([
            ("a_total".to_string(), family("counter", &["m", "code"])),
            ("h".to_string(), family("histogram", &["k"])),
            ("g".to_string(), family("gauge", &[])),
        ]);
        assert_eq!(rendered(text), want);
    }
}
