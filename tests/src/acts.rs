//! The "acts" workload shared by the exactly-once tests and the soak
//! benchmark: users doing acts with an amount, a view that counts, sums and
//! keeps the newest of them, a reference computed without any of Freshet's
//! code, and transactional producers that abort some transactions.
//!
//! Records are keyed the way Debezium keys change events, by the source
//! row's primary key (here the act's unique event time), so one user's acts
//! land on every partition and two ingest instances touch the same entities.

use std::{collections::BTreeMap, time::Duration};

use freshet_store::{
    entities,
    state::{Reading, Scalar},
    view::Catalog,
};
use rand::{Rng, SeedableRng, seq::SliceRandom};
use rdkafka::{
    ClientConfig,
    producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer},
};

use crate::{brokers, unique};

/// The view file of the workload, reading `topic`.
pub fn views(topic: &str) -> String {
    format!(
        r#"
[[view]]
name = "acts"
entity = "user"
entity_type = "int64"
max_age = "3650d"
freshness_budget = "5s"
allowed_lateness = "3650d"
[view.source]
topics = ["{topic}"]
format = "json"
event_time = "at"
dlq_topic = "{topic}.dlq"
[[view.feature]]
name = "n"
aggregation = "count"
window = "3650d"
[[view.feature]]
name = "total"
aggregation = "sum"
field = "amount"
type = "int64"
window = "3650d"
[[view.feature]]
name = "biggest"
aggregation = "max"
field = "amount"
type = "int64"
window = "3650d"
[[view.feature]]
name = "last_amount"
aggregation = "last"
field = "amount"
type = "int64"
[[view.feature]]
name = "last_note"
aggregation = "last"
field = "note"
type = "string"
"#
    )
}

#[derive(Clone, Copy, Debug)]
pub struct Act {
    pub user: i64,
    /// Unique per act: it is also the record key.
    pub at_ms: i64,
    pub amount: i64,
    /// A poison act has a text amount: ingest must dead-letter it.
    pub poison: bool,
}

impl Act {
    pub fn new(user: i64, at_ms: i64, amount: i64) -> Act {
        Act { user, at_ms, amount, poison: false }
    }

    pub fn json(&self) -> String {
        if self.poison {
            return format!(r#"{{"user": {}, "at": {}, "amount": "{} (text)"}}"#, self.user, self.at_ms, self.amount);
        }
        format!(r#"{{"user": {}, "at": {}, "amount": {}, "extra": "ignored"}}"#, self.user, self.at_ms, self.amount)
    }

    pub fn key(&self) -> String {
        self.at_ms.to_string()
    }
}

/// Per user: (count, sum, max, amount of the newest act).
pub type Totals = BTreeMap<i64, (i64, i64, i64, i64)>;

/// What the store must hold after `acts`, computed from the acts alone
/// (poison ones excluded), without any of Freshet's code.
pub fn reference(acts: &[Act]) -> Totals {
    let mut by_user: BTreeMap<i64, Vec<Act>> = BTreeMap::new();
    for a in acts.iter().filter(|a| !a.poison) {
        by_user.entry(a.user).or_default().push(*a);
    }
    by_user
        .into_iter()
        .map(|(user, acts)| {
            let newest = acts.iter().max_by_key(|a| a.at_ms).unwrap();
            (user, (acts.len() as i64, acts.iter().map(|a| a.amount).sum(), acts.iter().map(|a| a.amount).max().unwrap(), newest.amount))
        })
        .collect()
}

/// What the store holds for `users`, read with the server's code path.
pub async fn stored(url: &str, views_text: &str, users: &[i64]) -> Totals {
    let catalog = Catalog::parse(views_text, "test").unwrap();
    let view = &catalog.views[0];
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let keys: Vec<String> = users.iter().map(i64::to_string).collect();
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let states = entities::read(&pool, &["acts"], &key_refs).await.unwrap();
    pool.close().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let int = |r: Reading| match r {
        Reading::Value { value: Scalar::Int(i), .. } => i,
        other => panic!("expected an int, got {other:?}"),
    };
    states
        .into_iter()
        .map(|((_, entity), s)| {
            let f = |name: &str| int(s.read(view.feature(name).unwrap(), now));
            (entity.parse().unwrap(), (f("n"), f("total"), f("biggest"), f("last_amount")))
        })
        .collect()
}

/// Records applied (not dead-lettered) by `group`, as committed.
pub async fn applied(url: &str, group: &str) -> i64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let n = sqlx::query_scalar("SELECT coalesce(sum(records_applied), 0)::int8 FROM ingest_offsets WHERE consumer_group = $1")
        .bind(group)
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// `n` acts of users `1..=users` with unique, shuffled event times (arrival
/// order is not event-time order); about one in `poison_one_in` is poison.
pub fn random_acts(n: usize, users: i64, poison_one_in: u32, seed: u64) -> Vec<Act> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let base = 1_700_000_000_000i64;
    let mut times: Vec<i64> = (0..n as i64).map(|i| base + i * 7).collect();
    times.shuffle(&mut rng);
    times
        .into_iter()
        .map(|at_ms| Act {
            user: rng.random_range(1..=users),
            at_ms,
            amount: rng.random_range(-50..1000),
            poison: poison_one_in != u32::MAX && rng.random_ratio(1, poison_one_in),
        })
        .collect()
}

/// Produces `acts` in transactions of `per_tx`, aborting about one in
/// `abort_one_in`; returns the acts of committed transactions.
pub fn produce_transactions(topic: &str, acts: Vec<Act>, per_tx: usize, abort_one_in: u32, seed: u64) -> Vec<Act> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("producer"))
        .set("linger.ms", "5")
        .create()
        .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut committed = Vec::new();
    for chunk in acts.chunks(per_tx) {
        producer.begin_transaction().unwrap();
        for act in chunk {
            let (key, value) = (act.key(), act.json());
            let mut record = BaseRecord::to(topic).key(&key).payload(&value);
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((_, r)) => {
                        // Queue full: let it drain.
                        producer.poll(Duration::from_millis(10));
                        record = r;
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        if abort_one_in != u32::MAX && rng.random_ratio(1, abort_one_in) {
            producer.abort_transaction(Duration::from_secs(30)).unwrap();
        } else {
            producer.commit_transaction(Duration::from_secs(30)).unwrap();
            committed.extend_from_slice(chunk);
        }
    }
    committed
}
