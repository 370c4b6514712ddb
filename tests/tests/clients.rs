//! The example clients of `client-examples/` against a real server with auth:
//! the Python and Go CLIs (built by `client-examples/setup.sh`) and the
//! grpcurl session script read what the store holds, statuses and event
//! times included, trust only the views GetFreshness calls fresh enough, and
//! send the bearer token (the server refuses calls without it).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, Output},
    sync::OnceLock,
};

use freshet_store::state::Scalar;
use freshet_tests::{event, fresh_database, reference_views, server, store_events, tempfile_dir};
use serde_json::Value;

const TOKEN: &str = "client-examples-token";

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn examples_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../client-examples"))
}

/// The example clients, as `client-examples/setup.sh` reports them.
struct Clients {
    python: PathBuf,
    go: PathBuf,
}

/// Runs `client-examples/setup.sh` once per test binary (it is idempotent,
/// and takes a lock of its own against other processes).
fn clients() -> &'static Clients {
    static CLIENTS: OnceLock<Clients> = OnceLock::new();
    CLIENTS.get_or_init(|| {
        let out = Command::new(examples_dir().join("setup.sh")).output().expect("run client-examples/setup.sh");
        assert!(out.status.success(), "client-examples/setup.sh failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        let path_of = |prefix: &str| -> PathBuf {
            let line = stdout.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in:\n{stdout}"));
            PathBuf::from(line.split_whitespace().next().unwrap())
        };
        Clients { python: path_of("python:"), go: path_of("go:") }
    })
}

/// Known state: user 1 in both views, user 2 with an order that never said
/// whether express, user 404 unknown. Ingest progress makes `orders` FRESH
/// (caught up) and `user_activity` STALLED (behind, no commit for minutes).
async fn known_state(url: &str, now: i64) {
    store_events(
        url,
        "orders",
        vec![
            event(1, now - 2000, &[("amount", Scalar::Double(10.5)), ("items", Scalar::Int(2)), ("express", Scalar::Bool(true))]),
            event(1, now - 1000, &[("amount", Scalar::Double(4.5)), ("items", Scalar::Int(1)), ("express", Scalar::Bool(false))]),
            event(2, now - 1500, &[("amount", Scalar::Double(1.0))]),
        ],
    )
    .await;
    store_events(
        url,
        "user_activity",
        vec![event(1, now - 3000, &[("event_type", Scalar::Str("click".into())), ("occurred_at", Scalar::Time(now - 3000))])],
    )
    .await;
    // Offsets far above anything a broker of the test run holds, so a server
    // that also asks the broker for high watermarks sees the same lag.
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    sqlx::query(
        "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset, owner_epoch, owner, high_watermark,
                                     newest_event_at, last_commit_at)
         VALUES ('freshet', 'app.public.orders', 0, 1000000000, 1, 'test', 1000000000, now() - interval '1 second', now()),
                ('freshet', 'app.public.user_events', 0, 10, 1, 'test', 1000000000, now() - interval '10 minutes',
                 now() - interval '10 minutes')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
}

fn run(command: &mut Command) -> Output {
    command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

fn json_of(what: &str, out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn python(address: &str, token: &str) -> Output {
    let dir = examples_dir().join("python");
    run(Command::new(&clients().python)
        .args(["-m", "freshet_client.example", "--address", address, "--token", token, "--users", "1,2,404"])
        .env("PYTHONPATH", &dir)
        .current_dir(&dir))
}

fn go(address: &str, token: &str) -> Output {
    run(Command::new(&clients().go).args(["--address", address, "--token", token, "--users", "1,2,404"]))
}

fn grpcurl_session(address: &str, token: &str) -> Output {
    run(Command::new(examples_dir().join("grpcurl.sh")).args([address, token, "1,2,404"]))
}

/// The same numbers whatever the JSON encoder wrote (15 or 15.0).
fn normalized(v: &Value) -> Value {
    match v {
        Value::Number(n) => serde_json::json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(normalized).collect()),
        Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), normalized(v))).collect()),
        other => other.clone(),
    }
}

/// Checks the JSON printed by the Python or Go example.
fn check_example(what: &str, json: &Value, now: i64) {
    let ctx = || format!("{what}: {}", serde_json::to_string_pretty(json).unwrap());
    assert_eq!(json["freshness"]["orders"]["verdict"], "FRESH", "{}", ctx());
    assert_eq!(json["freshness"]["orders"]["trusted"], true, "{}", ctx());
    assert_eq!(json["freshness"]["user_activity"]["verdict"], "STALLED", "{}", ctx());
    assert_eq!(json["freshness"]["user_activity"]["trusted"], false, "{}", ctx());
    assert_eq!(json["freshness"]["user_activity"]["budget_ms"], 5000, "{}", ctx());

    let features: Vec<&str> = json["features"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert_eq!(features.len(), 11, "{}", ctx());
    let users = json["users"].as_array().unwrap();
    assert_eq!(users.iter().map(|u| u["user"].as_i64().unwrap()).collect::<Vec<_>>(), [1, 2, 404], "request order");

    let value = |user: usize, feature: &str| &users[user]["values"][feature];
    // User 1: every type, with the event time of the newest event it reflects.
    let u1 = |f: &str| value(0, f);
    assert_eq!(u1("orders:spend_1h")["status"], "PRESENT", "{}", ctx());
    assert_eq!(u1("orders:spend_1h")["value"].as_f64(), Some(15.0), "{}", ctx());
    assert_eq!(u1("orders:spend_1h")["event_time_ms"].as_i64(), Some(now - 1000), "{}", ctx());
    assert_eq!(u1("orders:orders_1h")["value"].as_i64(), Some(2), "{}", ctx());
    assert_eq!(u1("orders:items_1h")["value"].as_i64(), Some(3), "{}", ctx());
    assert_eq!(u1("orders:avg_order_1h")["value"].as_f64(), Some(7.5), "{}", ctx());
    assert_eq!(u1("orders:max_order_1h")["value"].as_f64(), Some(10.5), "{}", ctx());
    assert_eq!(u1("orders:last_express")["value"], false, "the newest order's flag: {}", ctx());
    assert_eq!(u1("user_activity:last_event_type")["value"], "click", "{}", ctx());
    assert_eq!(u1("user_activity:last_event_type")["event_time_ms"].as_i64(), Some(now - 3000), "{}", ctx());
    assert_eq!(u1("user_activity:last_event_at")["value"].as_i64(), Some(now - 3000), "{}", ctx());
    assert_eq!(u1("user_activity:events_1h")["value"].as_i64(), Some(1), "{}", ctx());
    // User 2: known to orders but express never set; unknown to user_activity.
    assert_eq!(value(1, "orders:spend_1h")["value"].as_f64(), Some(1.0), "{}", ctx());
    assert_eq!(value(1, "orders:last_express")["status"], "NULL_VALUE", "{}", ctx());
    assert_eq!(value(1, "orders:last_express")["value"], Value::Null, "{}", ctx());
    assert_eq!(value(1, "user_activity:events_1h")["status"], "NOT_FOUND", "{}", ctx());
    // User 404: never seen; no value, no event time.
    for f in &features {
        assert_eq!(value(2, f)["status"], "NOT_FOUND", "{f}: {}", ctx());
        assert_eq!(value(2, f)["value"], Value::Null, "{f}: {}", ctx());
        assert_eq!(value(2, f)["event_time_ms"], Value::Null, "{f}: {}", ctx());
    }

    // The model's vector, in its fixed order: trusted orders values are used,
    // the STALLED view's present values are replaced by defaults.
    let vector = |user: usize| -> Vec<f64> { users[user]["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
    let v1 = vector(0);
    assert_eq!(v1.len(), 11);
    assert_eq!(v1[5..], [2.0, 15.0, 7.5, 10.5, 3.0, 0.0], "orders features of user 1: {}", ctx());
    assert_eq!(v1[..5], [0.0, 0.0, 0.0, 0.0, 1e6], "user_activity is STALLED: defaults: {}", ctx());
    assert_eq!(vector(2)[5..], [0.0, 0.0, 25.0, 25.0, 0.0, 0.0], "defaults for an unknown user: {}", ctx());
    let score = users[0]["score"].as_f64().unwrap();
    assert!(score > 0.0 && score < 1.0, "{}", ctx());
}

#[tokio::test]
async fn python_go_and_grpcurl_examples_read_values_statuses_and_freshness() {
    clients(); // setup first: on a cold cache it takes a minute
    let dir = tempfile_dir::Dir::new();
    let tokens = dir.path.join("tokens");
    std::fs::write(&tokens, format!("# tokens of the client examples\n{TOKEN}\n")).unwrap();
    let url = fresh_database().await;
    let now = now_ms();
    known_state(&url, now).await;
    let (_server, address) = server(&reference_views(), &url, &["--tokens-file", tokens.to_str().unwrap()]);
    let address = address.to_string();

    let out = python(&address, TOKEN);
    assert!(out.status.success(), "python example: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let from_python = json_of("python example", &out);
    assert_eq!(from_python["client"], "python");
    check_example("python", &from_python, now);

    let out = go(&address, TOKEN);
    assert!(out.status.success(), "go example: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let from_go = json_of("go example", &out);
    assert_eq!(from_go["client"], "go");
    check_example("go", &from_go, now);
    // Both clients saw and computed the same (numbers compared as numbers).
    assert_eq!(normalized(&from_python["users"]), normalized(&from_go["users"]));
    assert_eq!(from_python["features"], from_go["features"]);

    let out = grpcurl_session(&address, TOKEN);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "grpcurl.sh: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // The transcript: "== <step>" then grpcurl's answer.
    let mut steps: BTreeMap<&str, String> = BTreeMap::new();
    let mut current = None;
    for line in stdout.lines() {
        if let Some(step) = line.strip_prefix("== ") {
            current = Some(step);
            steps.insert(step, String::new());
        } else if let Some(step) = current {
            let text = steps.get_mut(step).unwrap();
            text.push_str(line);
            text.push('\n');
        }
    }
    assert!(steps["list"].contains("freshet.v1.FeatureService"), "{stdout}");
    assert!(steps["describe freshet.v1.FeatureService"].contains("rpc GetFeatures"), "{stdout}");
    assert!(steps["ListFeatureViews"].contains("\"last_express\""), "{stdout}");
    let freshness: Value = serde_json::from_str(&steps["GetFreshness"]).unwrap();
    let verdicts: BTreeMap<&str, &str> =
        freshness["views"].as_array().unwrap().iter().map(|v| (v["view"].as_str().unwrap(), v["verdict"].as_str().unwrap())).collect();
    assert_eq!(verdicts, BTreeMap::from([("orders", "FRESH"), ("user_activity", "STALLED")]));
    let features: Value = serde_json::from_str(&steps["GetFeatures"]).unwrap();
    let names: Vec<&str> = features["featureNames"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    let column = |name: &str| names.iter().position(|n| *n == name).unwrap_or_else(|| panic!("{name} not in {names:?}"));
    let cell = |row: usize, name: &str| &features["results"][row]["values"][column(name)];
    assert_eq!(cell(0, "orders:spend_1h")["value"]["doubleValue"], 15.0, "{stdout}");
    assert_eq!(cell(0, "orders:spend_1h")["status"], "PRESENT", "{stdout}");
    assert_eq!(cell(0, "user_activity:last_event_type")["value"]["stringValue"], "click", "{stdout}");
    assert_eq!(cell(0, "user_activity:events_1m")["value"]["int64Value"], "1", "int64 is a JSON string: {stdout}");
    assert_eq!(cell(1, "orders:last_express")["status"], "NULL_VALUE", "{stdout}");
    assert_eq!(features["results"][2]["entity"]["int64Key"], "404", "{stdout}");
    for name in &names {
        assert_eq!(cell(2, name)["status"], "NOT_FOUND", "{stdout}");
        assert!(cell(2, name).get("value").is_none() && cell(2, name).get("eventTime").is_none(), "{stdout}");
    }
    assert!(steps["grpc.health.v1.Health/Check"].contains("SERVING"), "{stdout}");
}

#[tokio::test]
async fn examples_send_the_token_and_report_a_wrong_one() {
    clients();
    let dir = tempfile_dir::Dir::new();
    let tokens = dir.path.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let url = fresh_database().await;
    let (_server, address) = server(&reference_views(), &url, &["--tokens-file", tokens.to_str().unwrap()]);
    let address = address.to_string();
    let unauthenticated = |what: &str, out: Output| {
        assert_eq!(out.status.code(), Some(1), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let json = json_of(what, &out);
        assert_eq!(json["error"]["code"], "UNAUTHENTICATED", "{what}: {json}");
    };
    unauthenticated("python, wrong token", python(&address, "guess"));
    unauthenticated("go, wrong token", go(&address, "guess"));
    let out = grpcurl_session(&address, "guess");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"), "{}", String::from_utf8_lossy(&out.stderr));
    // And with the right one the same server answers all three.
    assert!(python(&address, TOKEN).status.success());
    assert!(go(&address, TOKEN).status.success());
    assert!(grpcurl_session(&address, TOKEN).status.success());
}
