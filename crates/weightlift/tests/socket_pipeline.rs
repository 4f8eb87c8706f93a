//! The socket transport overlaps each side's work on one bucket with the socket I/O of the
//! next (the sender packs bucket k+1 while bucket k is written; the receiver reads bucket k+1
//! while bucket k is unpacked). Updates of many small buckets arrive bit exact, full or delta;
//! a peer that goes away mid-update while the other side is a bucket ahead ends the update
//! with an error on the side left (never a hang), the receiver on its committed version.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weightlift::core::Version;
use weightlift::core::{destination_manifest, DType, Manifest, Preset, PresetOptions, SourceSet, TensorSpec, TpRank};
use weightlift::{
    Endpoint, HostTensors, Receiver, ReceiverOptions, SendError, Sender, SenderOptions, TransportKind, UpdateOutcome,
    UpdateReport,
};

mod common;
use common::{assert_bit_exact, setup_at, socket_path, Setup};

/// Bounds every push of these tests: a side that hangs fails the test instead.
const NO_HANG: Duration = Duration::from_secs(30);

fn socket_sender(endpoint: &Endpoint, s: &Setup, bucket_bytes: u64, delta: bool) -> Sender {
    let options = SenderOptions { transport: TransportKind::Tcp, bucket_bytes, delta, ..SenderOptions::default() };
    Sender::connect(endpoint, s.trainer.manifest(), &s.rules, options).unwrap()
}

#[test]
fn dozens_of_small_buckets_arrive_bit_exact_full_and_delta() {
    for endpoint in [Endpoint::Tcp("127.0.0.1:0".into()), Endpoint::Unix(socket_path("pipeline-bits"))] {
        let label = endpoint.to_string();
        let mut s = setup_at("qwen3-moe-tiny", TpRank::SINGLE, endpoint, ReceiverOptions::default());
        let mut tx = socket_sender(&s.endpoint, &s, 1024, true);
        for v in 1..=2 {
            s.trainer.perturb();
            let report = tx.push(Version(v), &s.trainer).unwrap();
            assert!(report.verified && report.skipped_tensors == 0, "{label} v{v}: {report:?}");
            assert!(report.buckets >= 24, "{label}: dozens of buckets: {report:?}");
            assert_bit_exact(&s, &tx);
        }
        // The three largest tensors change: the delta update skips the rest, and takes
        // buckets of its own.
        let (manifest, mut data) = s.trainer.clone().into_parts();
        let mut largest: Vec<usize> = (0..data.len()).collect();
        largest.sort_by_key(|&i| std::cmp::Reverse(data[i].len()));
        for &i in &largest[..3] {
            data[i].iter_mut().step_by(7).for_each(|b| *b ^= 0x01);
        }
        s.trainer = HostTensors::new(manifest, data).unwrap();
        let report = tx.push(Version(3), &s.trainer).unwrap();
        assert!(report.verified && report.is_committed(), "{label}: {report:?}");
        assert!(report.skipped_tensors > 0 && report.bytes_saved > 0, "{label}: {report:?}");
        assert!(report.buckets >= 24, "{label}: {report:?}");
        assert_bit_exact(&s, &tx);
        assert_eq!(s.receiver.committed(), Version(3));
    }
}

/// Eight 4 MiB tensors mapped as they are: 32 MiB per update, more than loopback's socket
/// buffers hold, so a sender cut off mid-update is blocked writing, a bucket packed ahead.
fn big_setup() -> Setup {
    let specs: Vec<TensorSpec> =
        (0..8).map(|i| TensorSpec::new(format!("layer.{i}.weight"), DType::BF16, vec![1024, 2048])).collect();
    let source = Manifest::new(specs).unwrap();
    let rules = Preset::Identity.rules(PresetOptions { head_dim: None, expert_parallel: false }).unwrap();
    let dest = destination_manifest(&SourceSet::single(source.clone()), &rules, TpRank::SINGLE, None, false).unwrap();
    let options = ReceiverOptions { timeout: Duration::from_secs(5), ..ReceiverOptions::default() };
    let receiver = Receiver::new(HostTensors::filled(dest, 0), options);
    let listener = Endpoint::Tcp("127.0.0.1:0".into()).bind().unwrap();
    let endpoint = listener.endpoint().unwrap();
    let serving = receiver.clone();
    std::thread::spawn(move || serving.serve(&listener));
    let data: Vec<Vec<u8>> = source.iter().map(|s| vec![0x11; s.byte_len() as usize]).collect();
    Setup { rules, receiver, endpoint, trainer: HostTensors::new(source, data).unwrap() }
}

/// A TCP hop to `to` for one connection that forwards the sender's first `budget` bytes, then
/// stops reading (the sender's writes back up) for a moment and closes both ends: as the
/// sender sees it, a receiver gone mid-update; as the receiver sees it, a sender gone.
fn cut_after(to: &Endpoint, budget: u64) -> Endpoint {
    let Endpoint::Tcp(to) = to else { panic!("a tcp endpoint") };
    let to: SocketAddr = to.parse().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let at = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut sender, _) = listener.accept().unwrap();
        let mut receiver = TcpStream::connect(to).unwrap();
        let (mut back_from, mut back_to) = (receiver.try_clone().unwrap(), sender.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut buf = vec![0u8; 64 << 10];
        let mut forwarded = 0u64;
        while forwarded < budget {
            let want = buf.len().min((budget - forwarded) as usize);
            match sender.read(&mut buf[..want]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    receiver.write_all(&buf[..n]).unwrap();
                    forwarded += n as u64;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let _ = sender.shutdown(Shutdown::Both);
        let _ = receiver.shutdown(Shutdown::Both);
        let _ = back.join();
        // Dropped with the sender's bytes unread: it is reset.
    });
    Endpoint::Tcp(at.to_string())
}

/// `push` of `version` on a thread of its own, failing the test if it takes [`NO_HANG`].
fn push_bounded(mut tx: Sender, trainer: &HostTensors, version: Version) -> Result<UpdateReport, SendError> {
    let trainer = trainer.clone();
    let (done, result) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(tx.push(version, &trainer));
    });
    result.recv_timeout(NO_HANG).unwrap_or_else(|_| panic!("the push of {version} hangs"))
}

/// The receiver's report of `version` once it has settled it.
fn settled(s: &Setup, version: Version) -> UpdateReport {
    let deadline = Instant::now() + NO_HANG;
    loop {
        match s.receiver.last_report() {
            Some(r) if r.version == version && s.receiver.status().in_flight.is_none() => return r,
            report if Instant::now() > deadline => panic!("the receiver never settled {version}: {report:?}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

const BUCKET: u64 = 256 << 10;

/// Commits version 1 over a direct connection; returns the bytes of one update.
fn commit_base(s: &mut Setup) -> u64 {
    s.trainer.perturb();
    let report = socket_sender(&s.endpoint, s, BUCKET, false).push(Version(1), &s.trainer).unwrap();
    assert!(report.verified && report.buckets >= 64, "{report:?}");
    report.bytes
}

/// After a cut: the receiver failed version 2, stayed on 1, and the next update commits.
fn assert_receiver_survived(s: &mut Setup) {
    let report = settled(s, Version(2));
    assert_eq!((report.outcome, report.committed), (UpdateOutcome::Failed, Version(1)), "{report:?}");
    let error = report.error.as_deref().unwrap();
    assert!(error.contains("bucket") && error.contains("closed"), "{error}");
    assert!(!report.dirty.is_empty() && report.dirty.len() < 8, "only what landed is dirty: {report:?}");
    assert_eq!(s.receiver.committed(), Version(1));
    let mut tx = socket_sender(&s.endpoint, s, BUCKET, false);
    let report = tx.push(Version(2), &s.trainer).unwrap();
    assert!(report.verified && report.is_committed(), "{report:?}");
    assert!(s.receiver.dirty().is_empty());
    assert_bit_exact(s, &tx);
}

#[test]
fn a_receiver_gone_while_the_sender_packs_ahead_ends_the_push_with_an_error() {
    let mut s = big_setup();
    let bytes = commit_base(&mut s);
    s.trainer.perturb();
    let cut = cut_after(&s.endpoint, bytes / 4);
    let tx = socket_sender(&cut, &s, BUCKET, false);
    let started = Instant::now();
    let err = push_bounded(tx, &s.trainer, Version(2)).expect_err("the receiver went away");
    // The same kind as when the sender packed one bucket at a time: the transfer broke.
    assert!(matches!(err, SendError::Transfer(_) | SendError::Protocol(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "noticed at once: {:?}", started.elapsed());
    assert_receiver_survived(&mut s);
}

#[test]
fn a_sender_gone_while_the_receiver_reads_ahead_leaves_it_on_its_version() {
    let mut s = big_setup();
    let bytes = commit_base(&mut s);
    s.trainer.perturb();
    // Mid-bucket, late in the update: most buckets were read, the last ones only in part.
    let cut = cut_after(&s.endpoint, bytes * 3 / 4 + BUCKET / 3);
    let tx = socket_sender(&cut, &s, BUCKET, false);
    let _ = push_bounded(tx, &s.trainer, Version(2));
    assert_receiver_survived(&mut s);
}
