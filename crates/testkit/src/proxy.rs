//! A TCP proxy that puts network faults between an agent and a server, in the
//! test's own process: latency with jitter, a bandwidth limit, tiny segments,
//! a connection reset at a chosen byte, and a black hole.
//!
//! The proxy listens on 127.0.0.1:0 and opens one upstream connection per
//! accepted connection. Each direction is a reader that stamps what it reads
//! with its delivery time and a writer that delivers it in order: latency and
//! bandwidth delay bytes, never reorder or change them. Connection faults
//! (reset, black hole) apply to the connections a [`Which`] selects, counted
//! from 1 in accept order, and trigger on the count of bytes forwarded
//! client-to-server on that connection (the direction that carries chunks).
//!
//! Everything random comes from the configuration's seed, so a run is
//! reproducible: the same seed gives the same reset byte, jitter and segment
//! sizes.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::rng::SplitMix64;

/// Bytes read from a socket at a time.
const READ_BYTES: usize = 16 * 1024;
/// Reads queued between a direction's reader and writer: bounds what the proxy
/// holds (with latency, this also bounds throughput to queue / latency, as a
/// real path's buffers would).
const QUEUE_READS: usize = 256;

/// Which connections a connection fault applies to, numbered from 1 in the
/// order the proxy accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Only the first connection.
    First,
    /// Connections N, 2N, 3N...
    EveryNth(u64),
    /// Every connection.
    All,
}

impl Which {
    fn applies(self, number: u64) -> bool {
        match self {
            Which::First => number == 1,
            Which::EveryNth(n) => number.is_multiple_of(n), // false for n = 0: numbers start at 1
            Which::All => true,
        }
    }
}

/// Faults of one direction of every connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct DirectionFaults {
    /// Every byte is delivered this much later than it was read...
    pub latency: Duration,
    /// ...plus a seeded random extra of up to this much; order is kept.
    pub jitter: Duration,
    /// Most bytes per second delivered; `None` is unlimited.
    pub bytes_per_second: Option<u64>,
    /// Deliver in writes of 1 to 7 bytes, each its own TCP segment (nodelay).
    pub tiny_segments: bool,
}

/// Close both sides with a TCP reset once a connection has forwarded a random
/// number of client-to-server bytes in `after_bytes_min..=after_bytes_max`.
#[derive(Debug, Clone, Copy)]
pub struct ResetFault {
    pub after_bytes_min: u64,
    pub after_bytes_max: u64,
    pub which: Which,
}

/// Stop forwarding in both directions, silently and with both sockets kept
/// open, after `after_bytes` client-to-server bytes or `after` from accept,
/// whichever comes first. The sockets stay open until the proxy is dropped, as
/// a dead route would leave them: only a time-out at either end notices.
#[derive(Debug, Clone, Copy)]
pub struct BlackHoleFault {
    pub after_bytes: Option<u64>,
    pub after: Option<Duration>,
    pub which: Which,
}

/// What the proxy does to the connections it carries.
#[derive(Debug, Clone, Default)]
pub struct FaultConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Client to server.
    pub upstream: DirectionFaults,
    /// Server to client.
    pub downstream: DirectionFaults,
    pub reset: Option<ResetFault>,
    pub black_hole: Option<BlackHoleFault>,
}

/// What the proxy has carried so far.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Bytes delivered client to server, all connections.
    pub bytes_upstream: AtomicU64,
    /// Bytes delivered server to client, all connections.
    pub bytes_downstream: AtomicU64,
    /// Connections closed with a reset by [`ResetFault`].
    pub resets: AtomicU64,
    /// Connections swallowed by [`BlackHoleFault`].
    pub black_holes: AtomicU64,
}

impl ProxyStats {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    pub fn bytes_upstream(&self) -> u64 {
        self.bytes_upstream.load(Ordering::Relaxed)
    }
    pub fn bytes_downstream(&self) -> u64 {
        self.bytes_downstream.load(Ordering::Relaxed)
    }
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
    pub fn black_holes(&self) -> u64 {
        self.black_holes.load(Ordering::Relaxed)
    }
}

/// A running proxy; dropping it closes every connection it holds.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    stats: Arc<ProxyStats>,
    accept_task: JoinHandle<()>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1:0 and forwards each connection to `upstream`.
    /// Must be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr, config: FaultConfig) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(ProxyStats::default());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let config = Arc::new(config);
        let accept_task = tokio::spawn({
            let (stats, connections) = (Arc::clone(&stats), Arc::clone(&connections));
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let number = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
                    let task = tokio::spawn(serve(
                        client,
                        upstream,
                        number,
                        Arc::clone(&config),
                        Arc::clone(&stats),
                    ));
                    connections.lock().unwrap().push(task);
                }
            }
        });
        Ok(Self {
            addr,
            stats,
            accept_task,
            connections,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trip {
    None,
    Reset,
    BlackHole,
}

/// A client-to-server byte count at which a connection fault trips.
#[derive(Debug, Clone, Copy)]
struct Threshold {
    at_bytes: u64,
    trip: Trip,
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    number: u64,
    config: Arc<FaultConfig>,
    stats: Arc<ProxyStats>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // dropping the client closes it: as a refused connection would
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut rng = SplitMix64::stream(config.seed, number);
    let reset = config
        .reset
        .filter(|r| r.which.applies(number))
        .map(|r| Threshold {
            at_bytes: rng.between(r.after_bytes_min, r.after_bytes_max),
            trip: Trip::Reset,
        });
    let black_hole = config.black_hole.filter(|b| b.which.applies(number));
    let hole_bytes = black_hole
        .and_then(|b| b.after_bytes)
        .map(|at_bytes| Threshold {
            at_bytes,
            trip: Trip::BlackHole,
        });
    // The earlier of the two byte thresholds trips first.
    let threshold = match (reset, hole_bytes) {
        (Some(a), Some(b)) => Some(if a.at_bytes <= b.at_bytes { a } else { b }),
        (a, b) => a.or(b),
    };
    let hole_after = black_hole.and_then(|b| b.after);
    let (trip_tx, mut trip_rx) = watch::channel(Trip::None);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    {
        let up = pump(
            &mut client_read,
            &mut server_write,
            config.upstream,
            SplitMix64::stream(config.seed, number << 1),
            &stats.bytes_upstream,
            threshold,
            &trip_tx,
        );
        let down = pump(
            &mut server_read,
            &mut client_write,
            config.downstream,
            SplitMix64::stream(config.seed, (number << 1) | 1),
            &stats.bytes_downstream,
            None,
            &trip_tx,
        );
        let hole_timer = async {
            match hole_after {
                Some(after) => tokio::time::sleep(after).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = async { tokio::join!(up, down) } => return,
            _ = trip_rx.wait_for(|t| *t != Trip::None) => {}
            () = hole_timer => { trip_tx.send_replace(Trip::BlackHole); }
        }
    }
    // The pumps are gone: nothing more is forwarded either way.
    let trip = *trip_rx.borrow();
    match trip {
        Trip::Reset => {
            stats.resets.fetch_add(1, Ordering::Relaxed);
            // SO_LINGER 0 makes close() send RST instead of FIN, on both sides.
            let client = client_read.unsplit(client_write);
            let server = server_read.unsplit(server_write);
            let _ = client.set_zero_linger();
            let _ = server.set_zero_linger();
        }
        Trip::BlackHole => {
            stats.black_holes.fetch_add(1, Ordering::Relaxed);
            // Hold both sockets open and silent until the proxy is dropped.
            let _held = (client_read, client_write, server_read, server_write);
            std::future::pending::<()>().await;
        }
        Trip::None => {}
    }
}

/// Forwards `from` to `to` with `faults`; returns at end of stream (after
/// passing the end on) or when `threshold` trips.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    faults: DirectionFaults,
    mut rng: SplitMix64,
    delivered_total: &AtomicU64,
    threshold: Option<Threshold>,
    trip: &watch::Sender<Trip>,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(QUEUE_READS);
    let jitter_ns = faults.jitter.as_nanos() as u64;
    let mut jitter_rng = rng.clone();
    let reader = async move {
        let mut last_delivery = Instant::now();
        let mut buf = vec![0u8; READ_BYTES];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let jitter = Duration::from_nanos(jitter_rng.between(0, jitter_ns));
            // Never before an earlier read: latency and jitter keep the order.
            let delivery = (Instant::now() + faults.latency + jitter).max(last_delivery);
            last_delivery = delivery;
            if tx
                .send((delivery, Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        let mut delivered = 0u64;
        let mut next_free = Instant::now();
        // Pace in slices of about 10 ms of the limit, so a slow link is smooth.
        let slice_max = faults
            .bytes_per_second
            .map_or(usize::MAX, |rate| (rate / 100).max(1) as usize);
        while let Some((delivery, data)) = rx.recv().await {
            tokio::time::sleep_until(delivery).await;
            let mut rest = &data[..];
            while !rest.is_empty() {
                let mut len = rest.len().min(slice_max);
                if faults.tiny_segments {
                    len = len.min(rng.between(1, 7) as usize);
                }
                let tripped = threshold.filter(|t| delivered + len as u64 >= t.at_bytes);
                if let Some(t) = tripped {
                    len = (t.at_bytes - delivered) as usize;
                }
                if let Some(rate) = faults.bytes_per_second {
                    tokio::time::sleep_until(next_free).await;
                    let cost = Duration::from_nanos(len as u64 * 1_000_000_000 / rate.max(1));
                    next_free = next_free.max(Instant::now()) + cost;
                }
                if len > 0 {
                    if to.write_all(&rest[..len]).await.is_err() {
                        return;
                    }
                    delivered += len as u64;
                    delivered_total.fetch_add(len as u64, Ordering::Relaxed);
                }
                if let Some(t) = tripped {
                    let _ = to.flush().await;
                    trip.send_replace(t.trip);
                    return;
                }
                rest = &rest[len..];
            }
        }
        // End of stream: pass it on.
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: returns every byte it receives.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Sends `data` through the proxy to the echo server; returns what came back
    /// and how long it took.
    async fn round_trip(proxy: &FaultProxy, data: &[u8]) -> (Vec<u8>, Duration) {
        let started = std::time::Instant::now();
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let sent = data.to_vec();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        (back, started.elapsed())
    }

    fn data(len: usize) -> Vec<u8> {
        let mut rng = SplitMix64::stream(7, 0);
        (0..len).map(|_| rng.next_u64() as u8).collect()
    }

    #[tokio::test]
    async fn bytes_pass_unchanged_under_latency_jitter_and_tiny_segments() {
        let upstream = echo().await;
        let faults = DirectionFaults {
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            bytes_per_second: None,
            tiny_segments: true,
        };
        let proxy = FaultProxy::start(
            upstream,
            FaultConfig {
                seed: 1,
                upstream: faults,
                downstream: faults,
                ..FaultConfig::default()
            },
        )
        .await
        .unwrap();
        let sent = data(100_000);
        let (back, elapsed) = round_trip(&proxy, &sent).await;
        assert!(back == sent, "bytes changed on the way");
        assert!(
            elapsed >= Duration::from_millis(40),
            "no latency: {elapsed:?}"
        );
        assert_eq!(proxy.stats().bytes_upstream(), sent.len() as u64);
        assert_eq!(proxy.stats().bytes_downstream(), sent.len() as u64);
        assert_eq!(proxy.stats().connections(), 1);
    }

    #[tokio::test]
    async fn bandwidth_limit_paces_delivery() {
        let upstream = echo().await;
        let proxy = FaultProxy::start(
            upstream,
            FaultConfig {
                upstream: DirectionFaults {
                    bytes_per_second: Some(1_000_000),
                    ..DirectionFaults::default()
                },
                ..FaultConfig::default()
            },
        )
        .await
        .unwrap();
        let sent = data(300_000);
        let (back, elapsed) = round_trip(&proxy, &sent).await;
        assert!(back == sent);
        assert!(
            elapsed >= Duration::from_millis(280),
            "300 kB at 1 MB/s took {elapsed:?}"
        );
    }

    #[tokio::test]
    async fn reset_cuts_the_first_connection_at_a_seeded_byte_only() {
        let upstream = echo().await;
        let config = FaultConfig {
            seed: 42,
            reset: Some(ResetFault {
                after_bytes_min: 10_000,
                after_bytes_max: 50_000,
                which: Which::First,
            }),
            ..FaultConfig::default()
        };
        let expected_cut = SplitMix64::stream(42, 1).between(10_000, 50_000);
        let proxy = FaultProxy::start(upstream, config).await.unwrap();
        let sent = data(200_000);
        let stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut r, mut w) = stream.into_split();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&sent).await;
        });
        let mut back = Vec::new();
        let result = r.read_to_end(&mut back).await;
        let _ = writer.await;
        let error = result.expect_err("a reset, not a clean end");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(proxy.stats().bytes_upstream(), expected_cut);
        assert_eq!(proxy.stats().resets(), 1);
        // The second connection is not cut.
        let sent = data(100_000);
        let (back, _) = round_trip(&proxy, &sent).await;
        assert!(back == sent);
        assert_eq!(proxy.stats().resets(), 1);
    }

    #[tokio::test]
    async fn black_hole_goes_silent_and_keeps_the_connection_open() {
        let upstream = echo().await;
        let proxy = FaultProxy::start(
            upstream,
            FaultConfig {
                black_hole: Some(BlackHoleFault {
                    after_bytes: Some(1000),
                    after: None,
                    which: Which::All,
                }),
                ..FaultConfig::default()
            },
        )
        .await
        .unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        stream.write_all(&data(5000)).await.unwrap();
        // At most the first 1000 bytes come back (the echo races the trip), then
        // nothing at all: no data and no end of stream.
        let mut back = vec![0u8; 5000];
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(read) = tokio::time::timeout_at(deadline, stream.read(&mut back[got..])).await
        {
            let n = read.unwrap();
            assert!(n > 0, "closed instead of going silent");
            got += n;
        }
        assert!(got <= 1000, "{got} bytes came back through the black hole");
        assert_eq!(proxy.stats().black_holes(), 1);
        assert_eq!(proxy.stats().bytes_upstream(), 1000);
    }
}
