//! The project's own load generator, kept cheap so that what it measures is
//! the server: every request is encoded once, before the clock starts, and
//! sent as raw bytes straight on h2 (no tonic channel, whose buffer task is
//! one more hop per call); answers are counted, never decoded. Each call
//! reads its status from the trailers, as any gRPC client does.
//!
//! Two ways to load a server: a closed loop (callers back to back, for
//! capacity) and an open loop (calls sent on a fixed schedule whatever the
//! server does, so queueing shows in the latency). In the open loop a pacing
//! thread releases each call at its scheduled time and the call records when
//! it actually went out: that difference is the generator's own send slip,
//! reported beside the latencies it would otherwise hide in.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use h2::client::SendRequest;
use prost::bytes::{BufMut, Bytes, BytesMut};
use tonic::Code;

/// HTTP/2 connections the generator spreads its calls over.
const CONNECTIONS: usize = 4;

/// A method and the requests to send it, framed; calls cycle through them.
#[derive(Clone)]
pub struct Load(Arc<Inner>);

struct Inner {
    connections: Vec<SendRequest<Bytes>>,
    uri: http::Uri,
    /// Each a gRPC message: uncompressed flag, length, bytes.
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
#[derive(Clone)]
pub struct Connections {
    address: SocketAddr,
    senders: Vec<SendRequest<Bytes>>,
}

pub async fn connect(address: SocketAddr) -> Connections {
    let mut senders = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        // Windows wide enough that the server never has to split an answer
        // to fit them: a generator that falls behind would otherwise hold
        // many small fragments, which h2 takes for a flood
        // (GOAWAY "too_many_data_frames").
        let (sender, connection) =
            h2::client::Builder::new().initial_window_size(4 << 20).initial_connection_window_size(64 << 20).handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("bench_serve: connection ended: {e}");
            }
        });
        senders.push(sender);
    }
    Connections { address, senders }
}

impl Load {
    /// `requests` to `path` (`/package.Service/Method`), over `connections`.
    pub fn new(connections: &Connections, path: &'static str, requests: Vec<Bytes>) -> Load {
        assert!(!requests.is_empty(), "a load needs at least one request");
        let framed = requests
            .iter()
            .map(|message| {
                let mut framed = BytesMut::with_capacity(5 + message.len());
                framed.put_u8(0);
                framed.put_u32(message.len() as u32);
                framed.put_slice(message);
                framed.freeze()
            })
            .collect();
        Load(Arc::new(Inner {
            connections: connections.senders.clone(),
            uri: format!("http://{}{path}", connections.address).parse().unwrap(),
            requests: framed,
            failed: AtomicBool::new(false),
        }))
    }

    /// Sends request `n` (cycling). The first failure of a load is printed.
    async fn call(&self, n: usize) -> Outcome {
        let load = &self.0;
        match self.exchange(n).await {
            Ok(Code::Ok | Code::DeadlineExceeded) => Outcome::Admitted,
            Ok(Code::ResourceExhausted) => Outcome::Refused,
            answer => {
                if !load.failed.swap(true, Ordering::Relaxed) {
                    eprintln!("bench_serve: {}: first failure: {answer:?}", load.uri.path());
                }
                Outcome::Failed
            }
        }
    }

    /// One unary call on h2: its gRPC status.
    async fn exchange(&self, n: usize) -> Result<Code, h2::Error> {
        let load = &self.0;
        let mut sender = load.connections[n % load.connections.len()].clone().ready().await?;
        let request = http::Request::post(load.uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("a valid request");
        let (answer, mut stream) = sender.send_request(request, false)?;
        stream.send_data(load.requests[n % load.requests.len()].clone(), true)?;
        let (head, mut body) = answer.await?.into_parts();
        // A refusal comes as headers alone ("trailers-only").
        if let Some(code) = grpc_status(&head.headers) {
            return Ok(code);
        }
        while let Some(chunk) = body.data().await {
            let _ = body.flow_control().release_capacity(chunk?.len());
        }
        Ok(body.trailers().await?.as_ref().and_then(grpc_status).unwrap_or(Code::Unknown))
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

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let status = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    Some(Code::from_i32(status))
}
