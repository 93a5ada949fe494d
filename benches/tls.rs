//! One connection over 127.0.0.1: 64 MiB through mutual TLS 1.3 (rustls with
//! aws-lc-rs, configured by `blockrep_pki` exactly as agent and server are), next
//! to the same bytes over plain TCP. Certificates are made at bench time in a
//! temporary directory. Also the cost of one mutual-TLS handshake.
//!
//! Each iteration sends 64 MiB on an open connection and waits for the receiver
//! to acknowledge having read all of it, so the figure is end to end: encryption
//! on the sending core, decryption on the other.
//!
//! Target: `loopback_64MiB/tls13` near 1.2 GiB/s on this class of machine; it is
//! the ceiling of one replication session.
#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use blockrep_core::SourceId;
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const TRANSFER_BYTES: usize = 64 << 20;
/// Size of each write: a few frames' worth, like the agent's writer.
const WRITE_BYTES: usize = 256 << 10;
const READ_BYTES: usize = 256 << 10;

struct Tls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    _dir: tempfile::TempDir,
}

fn tls() -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    blockrep_pki::init_ca(path, &["localhost".into(), "127.0.0.1".into()], false).unwrap();
    let (cert, key) = blockrep_pki::issue_source(path, &SourceId::new("bench").unwrap()).unwrap();
    let ca = path.join("ca.crt");
    let server =
        blockrep_pki::server_config(&ca, &path.join("server.crt"), &path.join("server.key"))
            .unwrap();
    let client = blockrep_pki::client_config(&ca, &cert, &key).unwrap();
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
        _dir: dir,
    }
}

fn server_name() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// Receiver side: reads `TRANSFER_BYTES` at a time, discarding them, and answers
/// each transfer with one byte, until the sender closes.
async fn sink(mut stream: impl AsyncRead + AsyncWrite + Unpin) {
    let mut buf = vec![0u8; READ_BYTES];
    loop {
        let mut left = TRANSFER_BYTES;
        while left > 0 {
            let n = stream.read(&mut buf[..left.min(READ_BYTES)]).await.unwrap();
            if n == 0 {
                return;
            }
            left -= n;
        }
        stream.write_all(&[1]).await.unwrap();
        stream.flush().await.unwrap();
    }
}

/// Sender side: one transfer, timed until the receiver's acknowledgement.
async fn transfer(stream: &mut (impl AsyncRead + AsyncWrite + Unpin), data: &[u8]) -> Duration {
    let started = Instant::now();
    for piece in data.chunks(WRITE_BYTES) {
        stream.write_all(piece).await.unwrap();
    }
    stream.flush().await.unwrap();
    let mut ack = [0u8; 1];
    stream.read_exact(&mut ack).await.unwrap();
    started.elapsed()
}

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    let (client, server) = (client.unwrap(), accepted.unwrap().0);
    client.set_nodelay(true).unwrap();
    server.set_nodelay(true).unwrap();
    (client, server)
}

fn payload() -> Vec<u8> {
    // Content does not matter to TLS or TCP; distinct bytes avoid any
    // accidental shortcut.
    (0..TRANSFER_BYTES).map(|i| (i * 131 % 253) as u8).collect()
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn loopback(c: &mut Criterion) {
    let rt = runtime();
    let tls = tls();
    let data = payload();
    let mut group = c.benchmark_group("loopback_64MiB");
    group.throughput(Throughput::Bytes(TRANSFER_BYTES as u64));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);

    let mut plain = rt.block_on(async {
        let (client, server) = tcp_pair().await;
        tokio::spawn(sink(server));
        client
    });
    group.bench_function("tcp", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += transfer(&mut plain, &data).await;
                }
                total
            })
        })
    });

    let mut secure = rt.block_on(async {
        let (client, server) = tcp_pair().await;
        let acceptor = tls.acceptor.clone();
        tokio::spawn(async move { sink(acceptor.accept(server).await.unwrap()).await });
        tls.connector.connect(server_name(), client).await.unwrap()
    });
    group.bench_function("tls13", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += transfer(&mut secure, &data).await;
                }
                total
            })
        })
    });
    group.finish();
    rt.block_on(async {
        plain.shutdown().await.unwrap();
        secure.shutdown().await.unwrap();
    });
}

/// A full mutual-TLS handshake over a fresh TCP connection: what a reconnecting
/// agent pays before its first frame.
fn handshake(c: &mut Criterion) {
    let rt = runtime();
    let tls = tls();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tls.acceptor.clone();
    rt.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let mut stream = acceptor.accept(stream).await.unwrap();
                // Answer once so the client knows the server finished too.
                stream.write_all(&[1]).await.unwrap();
                stream.flush().await.unwrap();
            });
        }
    });
    let mut group = c.benchmark_group("mtls13_handshake");
    group.bench_function("connect_and_first_byte", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let mut stream = tls.connector.connect(server_name(), tcp).await.unwrap();
                let mut ack = [0u8; 1];
                stream.read_exact(&mut ack).await.unwrap();
            })
        })
    });
    group.finish();
}

criterion_group!(benches, loopback, handshake);
criterion_main!(benches);
