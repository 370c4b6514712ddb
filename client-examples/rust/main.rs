//! Freshet from Rust with the generated client of `freshet-proto` (tonic).
//!
//! ```sh
//! cargo run -p freshet-proto --example client -- --address 127.0.0.1:50051 --token T --users 1,2,404
//! ```
//!
//! Shows: one channel reused by every call (cloning a tonic client is cheap
//! and shares the connection), the bearer token added by an interceptor, a
//! deadline on every call, retries with backoff on UNAVAILABLE and
//! RESOURCE_EXHAUSTED (tonic has no service-config retries: a small loop
//! does it), GetFreshness before trusting a view, and every value read with
//! its status and event time.

use std::{future::Future, time::Duration};

use freshet_proto::v1::{
    EntityKey, FeatureStatus, FreshnessVerdict, GetFeaturesRequest, GetFreshnessRequest, entity_key::Key,
    feature_service_client::FeatureServiceClient, value::Kind,
};
use tonic::{Code, Request, Status, metadata::MetadataValue, transport::Channel};

const FEATURES: &[&str] = &["user_activity:events_1m", "user_activity:last_event_type", "orders:spend_1h", "orders:last_express"];
const DEADLINE: Duration = Duration::from_millis(500);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (mut address, mut token, mut users) = ("127.0.0.1:50051".to_string(), std::env::var("FRESHET_TOKEN").ok(), vec![1i64, 2, 404]);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--address" => address = value,
            "--token" => token = Some(value),
            "--users" => users = value.split(',').map(|u| u.trim().parse()).collect::<Result<_, _>>()?,
            _ => return Err(format!("unknown flag {flag} (--address, --token, --users)").into()),
        }
    }

    // One channel for the process; connect_lazy: connects on the first call,
    // reconnects by itself after a failure.
    let channel = Channel::from_shared(format!("http://{address}"))?
        .connect_timeout(Duration::from_secs(2))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .connect_lazy();
    let auth: Option<MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse()).transpose()?;
    let client = FeatureServiceClient::with_interceptor(channel, move |mut request: Request<()>| {
        if let Some(auth) = &auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        Ok(request)
    });

    // Freshness first: a view that is not FRESH or LAGGING is not trusted
    // (a model server would use its defaults for that view's features).
    let freshness = retry(|| {
        let mut client = client.clone();
        async move { client.get_freshness(deadline(GetFreshnessRequest { views: vec![] })).await }
    })
    .await?
    .into_inner();
    for view in &freshness.views {
        let trusted = matches!(view.verdict(), FreshnessVerdict::Fresh | FreshnessVerdict::Lagging);
        println!("view {}: {:?} (trusted: {trusted})", view.view, view.verdict());
    }

    // One batched call for all users.
    let request = GetFeaturesRequest {
        features: FEATURES.iter().map(|f| f.to_string()).collect(),
        entities: users.iter().map(|u| EntityKey { key: Some(Key::Int64Key(*u)) }).collect(),
        max_age: None,
    };
    let response = retry(|| {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.get_features(deadline(request)).await }
    })
    .await?
    .into_inner();
    for (user, row) in users.iter().zip(&response.results) {
        for (name, value) in response.feature_names.iter().zip(&row.values) {
            let shown = match (value.status(), value.value.as_ref().and_then(|v| v.kind.as_ref())) {
                (FeatureStatus::Present, Some(Kind::Int64Value(v))) => v.to_string(),
                (FeatureStatus::Present, Some(Kind::DoubleValue(v))) => v.to_string(),
                (FeatureStatus::Present, Some(Kind::StringValue(v))) => format!("{v:?}"),
                (FeatureStatus::Present, Some(Kind::BoolValue(v))) => v.to_string(),
                (FeatureStatus::Present, Some(Kind::TimestampValue(t))) => format!("{}s", t.seconds),
                (status, _) => format!("({})", status.as_str_name()),
            };
            let at = value.event_time.as_ref().map(|t| format!(" at {}.{:03}", t.seconds, t.nanos / 1_000_000)).unwrap_or_default();
            println!("user {user} {name} = {shown}{at}");
        }
    }
    Ok(())
}

/// A request with a deadline: sent as grpc-timeout, which the server honours.
fn deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

/// Up to 4 attempts with jittered exponential backoff (50 ms, 100 ms, 200 ms)
/// for the codes worth retrying: UNAVAILABLE (server restarting, connection
/// lost) and RESOURCE_EXHAUSTED (Freshet sheds calls over its in-flight
/// limit at once). Everything else is final.
async fn retry<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1;
    loop {
        match call().await {
            Err(status) if attempt < 4 && matches!(status.code(), Code::Unavailable | Code::ResourceExhausted) => {
                // Full jitter, so clients shed together do not return together.
                let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
                tokio::time::sleep(backoff.mul_f64(f64::from(nanos % 1000) / 1000.0)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
                attempt += 1;
            }
            result => return result,
        }
    }
}
