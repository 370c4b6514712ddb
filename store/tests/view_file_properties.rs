//! Properties of the feature-view file parser (`Catalog::parse`) on
//! arbitrary and adversarial text: it never panics, every refusal is a clear
//! error (a message of bounded size, a line inside the file), and every
//! file it accepts keeps the limits later code relies on. `PROPTEST_CASES`
//! sets the number of cases (256 by default).

use std::collections::HashSet;

use freshet_store::view::{Catalog, MAX_FEATURES, ViewError, duration};
use proptest::{collection::vec, prelude::*, sample::Index};

const REFERENCE: &str = include_str!("../../deploy/views/reference.toml");

/// Text of every width: ASCII, 2-, 3- and 4-byte characters, controls, and
/// the characters TOML gives meaning to.
fn text(max: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        any::<char>(),
        prop::sample::select(vec!['é', '✓', '😀', '\0', '\n', '"', '\'', '[', ']', '{', '}', '=', '.', '#', '\\', ' ']),
    ];
    vec(ch, 0..max).prop_map(|c| c.into_iter().collect())
}

/// A TOML string literal holding `s`, escaped by the toml crate itself.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Values a setting might be given: durations near and past the bound, huge
/// numbers, empty and huge strings, multi-byte text, nesting.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<u64>(), prop::sample::select(vec!["ms", "s", "m", "h", "d", "", "x", "µs"])).prop_map(|(n, u)| quoted(&format!("{n}{u}"))),
        (3640u64..3660, Just("d")).prop_map(|(n, u)| quoted(&format!("{n}{u}"))),
        Just(quoted("106751991168d")),
        Just(quoted("")),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        text(40).prop_map(|s| quoted(&s)),
        (1usize..200_000).prop_map(|n| quoted(&"é".repeat(n))),
        (1usize..3000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (1usize..3000).prop_map(|d| format!("{}1{}", "{a = ".repeat(d), "}".repeat(d))),
        Just("true".into()),
        Just("1979-05-27T07:32:00Z".into()),
        Just("[\"a\", \"a.dlq\"]".into()),
    ]
}

/// The lines of the reference file, one of them (or a new one) rewritten.
fn edited_reference() -> impl Strategy<Value = String> {
    (
        any::<Index>(),
        prop::sample::select(vec![
            "name",
            "window",
            "max_age",
            "topics",
            "dlq_topic",
            "max_future",
            "field",
            "type",
            "aggregation",
            "entity",
            "allowed_lateness",
            "a.b.c",
        ]),
        value(),
        0..3u8,
    )
        .prop_map(|(line, key, value, kind)| {
            let mut lines: Vec<String> = REFERENCE.lines().map(str::to_string).collect();
            let i = line.index(lines.len());
            let setting = format!("{key} = {value}");
            match kind {
                // Give the setting on that line a new value.
                0 => match lines[i].split_once(" = ") {
                    Some((k, _)) => lines[i] = format!("{k} = {value}"),
                    None => lines.insert(i, setting),
                },
                1 => lines.insert(i, setting),
                _ => {
                    lines.remove(i);
                }
            }
            lines.join("\n")
        })
}

/// The reference file with arbitrary text inserted at a character boundary.
fn spliced_reference() -> impl Strategy<Value = String> {
    (any::<Index>(), text(64)).prop_map(|(at, insert)| {
        let i = REFERENCE.floor_char_boundary(at.index(REFERENCE.len() + 1));
        format!("{}{insert}{}", &REFERENCE[..i], &REFERENCE[i..])
    })
}

/// A duration as a file might hold it: mostly plausible, sometimes at or past
/// the bound, sometimes overflowing.
fn duration_text() -> impl Strategy<Value = String> {
    let unit = prop::sample::select(vec!["ms", "s", "m", "h", "d"]);
    prop_oneof![
        100 => (1u64..100, unit.clone()).prop_map(|(n, u)| format!("{n}{u}")),
        2 => (3640u64..3660).prop_map(|n| format!("{n}d")),
        1 => (any::<u64>(), unit).prop_map(|(n, u)| format!("{n}{u}")),
        1 => Just("0s".to_string()),
    ]
}

/// Mostly one of a few good values, sometimes one of the bad ones.
fn pick(good: &[&'static str], bad: &[&'static str]) -> impl Strategy<Value = &'static str> + Clone {
    prop_oneof![25 => prop::sample::select(good.to_vec()), 1 => prop::sample::select(bad.to_vec())]
}

/// One `[[view.feature]]`: mostly a well-formed one, sometimes a random mix.
fn feature() -> impl Strategy<Value = String> {
    let body = |(aggregation, field, field_type, window): (&str, Option<&str>, Option<&str>, Option<String>)| {
        let mut text = format!("aggregation = \"{aggregation}\"\n");
        if let Some(field) = field {
            text += &format!("field = {}\n", quoted(field));
        }
        if let Some(t) = field_type {
            text += &format!("type = \"{t}\"\n");
        }
        if let Some(w) = window {
            text += &format!("window = {}\n", quoted(&w));
        }
        text
    };
    prop_oneof![
        3 => duration_text().prop_map(move |w| body(("count", None, None, Some(w)))),
        3 => (pick(&["sum", "avg", "min", "max"], &["median"]), pick(&["x", "é✓😀"], &[""]), pick(&["double", "int64"], &["string"]), duration_text())
            .prop_map(move |(a, f, t, w)| body((a, Some(f), Some(t), Some(w)))),
        3 => (pick(&["y", "z"], &[""]), pick(&["string", "bool", "timestamp"], &["int64"])).prop_map(move |(f, t)| body(("last", Some(f), Some(t), None))),
        1 => (
            prop::sample::select(vec!["count", "sum", "min", "max", "avg", "last"]),
            prop::option::of(prop::sample::select(vec!["x", "y", ""])),
            prop::option::of(prop::sample::select(vec!["int64", "double", "string", "bool", "timestamp"])),
            prop::option::of(duration_text()),
        )
            .prop_map(body),
    ]
}

/// Well-formed files of one to three views whose settings are drawn from
/// small pools, so names, topics and dead-letter topics collide, durations
/// reach their bound, and many files load.
fn generated_file() -> impl Strategy<Value = String> {
    let topic = pick(&["a", "b", "c", "a.dlq"], &["b c", ""]);
    let view = (
        pick(&["v", "w", "u"], &["é", "9v"]),
        prop::sample::select(vec!["int64", "string"]),
        vec(duration_text(), 3),
        prop::option::of(duration_text()),
        vec(topic.clone(), 1..3),
        prop::option::weighted(0.3, topic),
        prop::sample::select(vec!["ignore", "retract"]),
        vec(feature(), 1..5),
    );
    vec(view, 1..4).prop_map(|views| {
        let mut file = String::new();
        for (name, key_type, durations, max_future, topics, dlq, on_delete, features) in views {
            file += &format!(
                "[[view]]\nname = {}\nentity = \"k\"\nentity_type = \"{key_type}\"\nmax_age = {}\nfreshness_budget = {}\nallowed_lateness = {}\n",
                quoted(name),
                quoted(&durations[0]),
                quoted(&durations[1]),
                quoted(&durations[2])
            );
            if let Some(d) = max_future {
                file += &format!("max_future = {}\n", quoted(&d));
            }
            let topics: Vec<String> = topics.iter().map(|t| quoted(t)).collect();
            file += &format!("[view.source]\ntopics = [{}]\nformat = \"json\"\nevent_time = \"t\"\non_delete = \"{on_delete}\"\n", topics.join(", "));
            if let Some(dlq) = dlq {
                file += &format!("dlq_topic = {}\n", quoted(dlq));
            }
            for (i, feature) in features.into_iter().enumerate() {
                file += &format!("[[view.feature]]\nname = \"f{i}\"\n{feature}");
            }
        }
        file
    })
}

/// A refusal says where and why, briefly.
fn check_refusal(text: &str, e: &ViewError) -> Result<(), TestCaseError> {
    prop_assert!(!e.message.is_empty());
    prop_assert!(e.message.len() <= 512, "{} bytes: {}", e.message.len(), e);
    prop_assert_eq!(&e.origin, "views.toml");
    if let Some(line) = e.line {
        prop_assert!(line >= 1 && line <= text.lines().count() + 1, "line {} of {}", line, text.lines().count());
    }
    Ok(())
}

/// A file that loads keeps every limit the rest of Freshet relies on.
fn check_accepted(catalog: &Catalog) -> Result<(), TestCaseError> {
    let sources: HashSet<&String> = catalog.views.iter().flat_map(|v| &v.source.topics).collect();
    for view in &catalog.views {
        prop_assert!((1..=MAX_FEATURES).contains(&view.features.len()));
        for d in [view.max_age, view.freshness_budget, view.allowed_lateness, view.max_future] {
            prop_assert!(d <= duration::MAX);
        }
        for topic in &view.source.topics {
            prop_assert!(!sources.contains(&view.dlq_topic(topic)), "{} dead-letters into a source", view.name);
        }
        for feature in &view.features {
            prop_assert!(feature.window.is_none_or(|w| w <= duration::MAX));
            prop_assert!(feature.name.len() <= 128 && feature.field.as_ref().is_none_or(|f| (1..=255).contains(&f.len())));
            if let Some(key) = &feature.series {
                prop_assert!(view.series.iter().any(|s| &s.key == key));
            }
        }
    }
    Ok(())
}

fn check(text: &str) -> Result<(), TestCaseError> {
    match Catalog::parse(text, "views.toml") {
        Ok(catalog) => check_accepted(&catalog),
        Err(e) => check_refusal(text, &e),
    }
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in text(400)) {
        check(&text)?;
    }

    #[test]
    fn generated_files_are_refused_clearly_or_safe(text in generated_file()) {
        check(&text)?;
    }

    #[test]
    fn edited_reference_files_are_refused_clearly_or_safe(text in prop_oneof![edited_reference(), spliced_reference()]) {
        check(&text)?;
    }
}

#[test]
fn the_reference_file_passes_the_checks() {
    check(REFERENCE).unwrap();
    assert!(Catalog::parse(REFERENCE, "views.toml").is_ok());
}
