//! The project's own load generator, kept cheap so that what it measures is
//! the server: every request is encoded once, before the clock starts, and
//! sent as raw bytes; answers are counted, never decoded.
//!
//! Two ways to load a server: a closed loop (callers back to back, for
//! capacity) and an open loop (calls sent on a fixed schedule whatever the
//! server does, so queueing shows in the latency). In the open loop a pacing
//! thread releases each call at its scheduled time and the call records when
//! it actually went out: that difference is the generator's own send slip,
//! reported beside the latencies it would otherwise hide in.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prost::bytes::{Buf, BufMut, Bytes};
use tonic::{
    Code, Status,
    client::Grpc,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http::uri::PathAndQuery,
    transport::Channel,
};

/// HTTP/2 connections the generator spreads its calls over.
const CONNECTIONS: usize = 4;

/// A method and the requests to send it, encoded; calls cycle through them.
#[derive(Clone)]
pub struct Load(Arc<Inner>);

struct Inner {
    channels: Vec<Grpc<Channel>>,
    path: PathAndQuery,
    requests: Vec<Bytes>,
    failed: AtomicBool,
}

/// One open-loop call.
pub struct Sample {
    /// From its scheduled time to when it was sent.
    pub slip: Duration,
    /// From its scheduled time to the answer: what a caller on that schedule sees.
    pub latency: Duration,
    /// From when it was sent to the answer.
    pub service: Duration,
    pub outcome: Outcome,
}

/// How a call ended.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered; a call that ran out of time counts too, at its latency.
    Admitted,
    /// Refused with `RESOURCE_EXHAUSTED`.
    Refused,
    /// Any other error, such as a connection the server closed.
    Failed,
}

/// Connections to one server, shared by the loads sent to it.
pub async fn connect(address: std::net::SocketAddr) -> Vec<Channel> {
    let mut channels = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        channels.push(Channel::from_shared(format!("http://{address}")).unwrap().connect().await.unwrap());
    }
    channels
}

impl Load {
    /// `requests` to `path` (`/package.Service/Method`), over `channels`.
    pub fn new(channels: &[Channel], path: &'static str, requests: Vec<Bytes>) -> Load {
        assert!(!requests.is_empty(), "a load needs at least one request");
        Load(Arc::new(Inner {
            channels: channels.iter().cloned().map(Grpc::new).collect(),
            path: PathAndQuery::from_static(path),
            requests,
            failed: AtomicBool::new(false),
        }))
    }

    /// Sends request `n` (cycling). The first failure of a load is printed.
    async fn call(&self, n: usize) -> Outcome {
        let load = &self.0;
        let mut grpc = load.channels[n % load.channels.len()].clone();
        let answer = match grpc.ready().await {
            Ok(()) => {
                let request = tonic::Request::new(load.requests[n % load.requests.len()].clone());
                grpc.unary(request, load.path.clone(), Raw).await.map(drop)
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        };
        match answer {
            Ok(()) => Outcome::Admitted,
            Err(s) if s.code() == Code::DeadlineExceeded => Outcome::Admitted,
            Err(s) if s.code() == Code::ResourceExhausted => Outcome::Refused,
            Err(s) => {
                if !load.failed.swap(true, Ordering::Relaxed) {
                    eprintln!("bench_serve: {}: first failure: {s}", load.path);
                }
                Outcome::Failed
            }
        }
    }

    /// Calls answered per second with `callers` callers back to back for `phase`.
    pub async fn closed_loop(&self, callers: usize, phase: Duration) -> f64 {
        let end = Instant::now() + phase;
        // Callers start spread over the requests, so together they touch
        // all of them, as the open loop does, not one small working set.
        let stride = self.0.requests.len() / callers.max(1);
        let tasks: Vec<_> = (0..callers)
            .map(|c| {
                let load = self.clone();
                tokio::spawn(async move {
                    let mut n = c * stride;
                    let mut answered = 0;
                    while Instant::now() < end {
                        answered += usize::from(load.call(n).await == Outcome::Admitted);
                        n += 1;
                    }
                    answered
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total as f64 / phase.as_secs_f64()
    }

    /// Sends `rate` calls/s for `phase` on a fixed schedule.
    pub async fn open_loop(&self, rate: f64, phase: Duration) -> Vec<Sample> {
        let total = (rate * phase.as_secs_f64()) as usize;
        let runtime = tokio::runtime::Handle::current();
        let load = self.clone();
        // A thread of its own: its sleep is precise to tens of µs, where
        // the runtime's timer rounds up to the next millisecond.
        let pacer = std::thread::spawn(move || {
            let start = Instant::now();
            (0..total)
                .map(|n| {
                    let scheduled = start + Duration::from_secs_f64(n as f64 / rate);
                    if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let load = load.clone();
                    runtime.spawn(async move {
                        let sent = Instant::now();
                        let outcome = load.call(n).await;
                        let done = Instant::now();
                        Sample { slip: sent - scheduled, latency: done - scheduled, service: done - sent, outcome }
                    })
                })
                .collect::<Vec<_>>()
        });
        let calls = tokio::task::spawn_blocking(move || pacer.join().unwrap()).await.unwrap();
        let mut samples = Vec::with_capacity(calls.len());
        for call in calls {
            samples.push(call.await.unwrap());
        }
        samples
    }
}

/// Requests go out as the bytes they already are; an answer is only counted.
#[derive(Clone, Copy)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = ();
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
