//! One table of faults run over every host transport: whatever breaks an update, the receiver
//! stays on its committed version with nothing in flight, the update's report says it failed
//! (or was refused) and why, what it wrote is marked dirty, and the next good update commits
//! bit exact. A new transport is one more entry in [`Transport::ALL`].

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use weightlift::core::{TpRank, Version};
use weightlift::{
    Endpoint, Fault, ReceiverOptions, Schedule, Sender, SenderOptions, Trainer, TransportKind, UpdateOutcome,
    UpdateReport,
};

mod common;
use common::{first_difference, setup_at, socket_path, stderr, weightlift, Setup};

const MODEL: &str = "qwen3-tiny";
/// Small enough that the model takes several buckets more than [`FAULT_BUCKET`].
const BUCKET_BYTES: u64 = 8192;
/// Faults strike before this bucket is sent: buckets `0..FAULT_BUCKET` have landed.
const FAULT_BUCKET: u32 = 2;
/// Short, as the stalled case waits it out; the sender stalls for [`Fault::STALL`], longer.
const RECEIVER_TIMEOUT: Duration = Duration::from_secs(1);
/// What every case starts from: committed by a good update, so that "still on it" means
/// something other than the initial version.
const BASE: Version = Version(2);
const NEXT: Version = Version(3);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    /// A Unix socket with buckets in a shared-memory ring.
    Shm,
    /// Loopback TCP, buckets in the stream.
    Tcp,
    /// `Receiver::connect_in_process`: a ring in this process's memory.
    InProcess,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::Shm, Transport::Tcp, Transport::InProcess];

    fn kind(self) -> TransportKind {
        match self {
            Transport::Shm => TransportKind::Shm,
            Transport::Tcp => TransportKind::Tcp,
            Transport::InProcess => TransportKind::InProcess,
        }
    }

    fn setup(self, label: &str) -> Setup {
        let endpoint = match self {
            Transport::Tcp => Endpoint::Tcp("127.0.0.1:0".into()),
            // In-process senders do not use it; the receiver serves there all the same.
            Transport::Shm | Transport::InProcess => Endpoint::Unix(socket_path(label)),
        };
        let options = ReceiverOptions { timeout: RECEIVER_TIMEOUT, ..ReceiverOptions::default() };
        setup_at(MODEL, TpRank::SINGLE, endpoint, options)
    }

    fn connect(self, s: &Setup, fault: Option<Fault>, label: &str) -> Sender {
        let options = SenderOptions {
            transport: self.kind(),
            bucket_bytes: BUCKET_BYTES,
            fault,
            // Bounds a hang, should a case break; longer than the stall.
            timeout: Duration::from_secs(10),
            ..SenderOptions::default()
        };
        let (manifest, rules) = (s.trainer.manifest(), &s.rules);
        let sender = match self {
            Transport::InProcess => s.receiver.connect_in_process(manifest, rules, options),
            Transport::Shm | Transport::Tcp => Sender::connect(&s.endpoint, manifest, rules, options),
        };
        sender.unwrap_or_else(|e| panic!("{label}: connecting: {e}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// `weightlift push --fault abort:N`: the sender process dies by SIGABRT mid-update.
    SenderKilled,
    /// A byte of one bucket flipped after it was digested.
    CorruptedBucket,
    /// A version below the committed one.
    OlderVersion,
    /// The committed version again.
    SameVersion,
    /// The sender stops sending for longer than the receiver's timeout.
    StalledSender,
    /// The sender closes the connection mid-update.
    HangUp,
}

impl Case {
    const ALL: [Case; 6] = [
        Case::SenderKilled,
        Case::CorruptedBucket,
        Case::OlderVersion,
        Case::SameVersion,
        Case::StalledSender,
        Case::HangUp,
    ];

    /// Why the case cannot run over `transport`, if it cannot.
    fn not_applicable(self, transport: Transport) -> Option<&'static str> {
        match (self, transport) {
            (Case::SenderKilled, Transport::InProcess) => {
                Some("an in-process sender is the receiver's own process: killing it kills both")
            }
            _ => None,
        }
    }

    fn version(self) -> Version {
        match self {
            Case::OlderVersion => Version(BASE.0 - 1),
            Case::SameVersion => BASE,
            _ => NEXT,
        }
    }

    fn refused(self) -> bool {
        matches!(self, Case::OlderVersion | Case::SameVersion)
    }

    /// Words the reports' errors must hold: the receiver's (`None` for a refusal, which it
    /// does not record) and the trainer's (`None` where the trainer died).
    fn causes(self) -> (Option<Vec<String>>, Option<Vec<String>>) {
        let bucket = format!("bucket {FAULT_BUCKET} of");
        let words = |w: &[&str]| Some(w.iter().map(|s| s.to_string()).collect());
        match self {
            Case::SenderKilled => (words(&[&bucket, "closed"]), None),
            // The tensor is named by both; checked against `mismatched` below.
            Case::CorruptedBucket => (words(&["digest mismatch"]), words(&["digest mismatch"])),
            Case::OlderVersion => (None, words(&["version 1 is stale", "already committed version 2"])),
            Case::SameVersion => (None, words(&["version 2 refused", "already committed it"])),
            Case::StalledSender => {
                let timeout = "no message from the peer within";
                (words(&[&bucket, timeout]), words(&[timeout]))
            }
            Case::HangUp => (words(&[&bucket, "closed"]), words(&["hung up"])),
        }
    }

    /// Strikes, pushing [`Case::version`]; returns the trainer's report of the update (None
    /// when the trainer died).
    fn strike(self, transport: Transport, s: &Setup, label: &str) -> Option<UpdateReport> {
        let fault = match self {
            Case::SenderKilled => return kill_sender(transport, s, label),
            Case::CorruptedBucket => Some(Fault::FlipByteInBucket(FAULT_BUCKET)),
            Case::OlderVersion | Case::SameVersion => None,
            Case::StalledSender => Some(Fault::StallAfterBuckets(FAULT_BUCKET)),
            Case::HangUp => Some(Fault::HangUpAfterBuckets(FAULT_BUCKET)),
        };
        // Through a trainer, as deployments push: it turns a refusal or a broken transfer
        // into the rank's report.
        let mut trainer = Trainer::from_senders(vec![transport.connect(s, fault, label)]);
        let step = trainer.push(self.version(), &s.trainer).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert!(!step.committed, "{label}: {step:?}");
        assert_eq!(step.ranks.len(), 1, "{label}");
        step.ranks.into_iter().next()
    }
}

/// `weightlift push --fault abort:N` at the receiver, a process of its own; it must die by the
/// signal (else the fault never struck).
fn kill_sender(transport: Transport, s: &Setup, label: &str) -> Option<UpdateReport> {
    let (to, version, buckets) = (s.endpoint.to_string(), NEXT.0.to_string(), BUCKET_BYTES.to_string());
    let fault = format!("abort:{FAULT_BUCKET}");
    let out = weightlift(&["push", "--synthetic", MODEL, "--to", &to, "--version", &version])
        .args(["--transport", &transport.kind().to_string(), "--bucket-bytes", &buckets, "--fault", &fault])
        .output()
        .unwrap();
    assert!(out.status.code().is_none(), "{label}: the sender must die by a signal: {:?} {}", out.status, stderr(&out));
    None
}

/// The receiver's report of `version` once it has settled it (a broken connection is noticed
/// on the receiver's own thread, a stall only after its timeout).
fn settled(s: &Setup, version: Version, label: &str) -> UpdateReport {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = s.receiver.last_report();
        match report {
            Some(r) if r.version == version && s.receiver.status().in_flight.is_none() => return r,
            _ if Instant::now() > deadline => panic!("{label}: the receiver never settled {version}: {report:?}"),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn receiver_bytes(s: &Setup) -> Vec<Vec<u8>> {
    let count = s.receiver.manifest().len();
    s.receiver.with_host_tensors(|t| (0..count).map(|i| t.bytes(i).to_vec()).collect()).unwrap()
}

fn assert_contains_all(text: Option<&str>, words: &[String], what: &str, label: &str) {
    let text = text.unwrap_or_else(|| panic!("{label}: {what} gives no reason"));
    for word in words {
        assert!(text.contains(word.as_str()), "{label}: {what} should name `{word}`: {text}");
    }
}

fn run(transport: Transport, case: Case) {
    let label = format!("{transport:?} x {case:?}");
    let mut s = transport.setup(&format!("matrix-{transport:?}-{case:?}"));
    s.trainer.perturb();
    let mut good = transport.connect(&s, None, &label);
    let base = good.push(BASE, &s.trainer).unwrap_or_else(|e| panic!("{label}: the first update: {e}"));
    assert!(base.verified, "{label}: {base:?}");
    assert!(base.buckets > FAULT_BUCKET as usize + 1, "{label}: the fault must strike mid-update: {base:?}");
    let destinations: Vec<String> = good.plan().destinations.iter().map(|d| d.name.clone()).collect();
    // What the fault's buckets wrote before it struck: the dirty set of a broken transfer.
    let schedule = Schedule::new(good.plan(), &[], BUCKET_BYTES).unwrap();
    let landed: BTreeSet<String> = schedule.buckets[..FAULT_BUCKET as usize]
        .iter()
        .flat_map(|b| &b.entries)
        .map(|e| destinations[e.op.dst as usize].clone())
        .collect();
    drop(good);
    let before = receiver_bytes(&s);

    s.trainer.perturb();
    let trainer_report = case.strike(transport, &s, &label);
    let version = case.version();
    let (receiver_words, trainer_words) = case.causes();

    // The receiver's view: a refusal is not recorded, anything else settles as failed.
    let receiver_report = if case.refused() {
        let last = s.receiver.last_report().unwrap();
        assert_eq!((last.version, last.outcome), (BASE, UpdateOutcome::Committed), "{label}: {last:?}");
        None
    } else {
        let report = settled(&s, version, &label);
        assert_eq!(report.outcome, UpdateOutcome::Failed, "{label}: {report:?}");
        assert_eq!(report.committed, BASE, "{label}: {report:?}");
        assert!(!report.verified, "{label}: {report:?}");
        assert_contains_all(report.error.as_deref(), &receiver_words.unwrap(), "the receiver's report", &label);
        Some(report)
    };

    // The trainer's view.
    if let Some(report) = &trainer_report {
        let outcome = if case.refused() { UpdateOutcome::Refused } else { UpdateOutcome::Failed };
        assert_eq!(report.outcome, outcome, "{label}: {report:?}");
        assert_eq!((report.version, report.committed), (version, BASE), "{label}: {report:?}");
        assert_contains_all(report.error.as_deref(), &trainer_words.unwrap(), "the trainer's report", &label);
    }

    let status = s.receiver.status();
    assert_eq!(status.committed, BASE, "{label}: {status:?}");
    assert_eq!(status.in_flight, None, "{label}: {status:?}");
    let dirty: BTreeSet<String> = status.dirty.iter().cloned().collect();
    if let Some(report) = &receiver_report {
        assert_eq!(report.dirty, status.dirty, "{label}: the report names what is dirty");
    }
    match case {
        Case::OlderVersion | Case::SameVersion => {
            assert!(dirty.is_empty(), "{label}: {dirty:?}");
            assert!(receiver_bytes(&s) == before, "{label}: a refused update wrote bytes");
        }
        Case::CorruptedBucket => {
            // Every bucket landed, so every tensor was written; one differs, by name.
            assert_eq!(dirty.len(), destinations.len(), "{label}: {dirty:?}");
            for report in [receiver_report.as_ref(), trainer_report.as_ref()].into_iter().flatten() {
                assert_eq!(report.mismatched.len(), 1, "{label}: {report:?}");
                let name = format!("`{}`", report.mismatched[0]);
                assert!(report.error.as_deref().unwrap().contains(&name), "{label}: {report:?}");
                assert!(dirty.contains(&report.mismatched[0]), "{label}: {dirty:?}");
            }
        }
        Case::SenderKilled | Case::StalledSender | Case::HangUp => {
            assert!(!landed.is_empty() && landed.len() < destinations.len(), "{label}: {landed:?}");
            assert_eq!(dirty, landed, "{label}: exactly the tensors of the buckets that landed are dirty");
        }
    }

    // A good update over a new connection commits, cleans, and is bit exact.
    let mut good = transport.connect(&s, None, &label);
    let report = good.push(NEXT, &s.trainer).unwrap_or_else(|e| panic!("{label}: the next update: {e}"));
    assert!(report.verified && report.is_committed(), "{label}: {report:?}");
    let status = s.receiver.status();
    assert_eq!((status.committed, status.in_flight), (NEXT, None), "{label}: {status:?}");
    assert!(status.dirty.is_empty(), "{label}: {status:?}");
    assert_eq!(first_difference(&s, &good), None, "{label}: the next update is not bit exact");
}

#[test]
fn every_fault_over_every_transport_leaves_the_receiver_on_its_version() {
    let started = Instant::now();
    let mut ran = Vec::new();
    for transport in Transport::ALL {
        for case in Case::ALL {
            match case.not_applicable(transport) {
                Some(why) => eprintln!("{transport:?} x {case:?}: not applicable: {why}"),
                None => {
                    let t = Instant::now();
                    run(transport, case);
                    ran.push(format!("{transport:?} x {case:?} ({:.1?})", t.elapsed()));
                }
            }
        }
    }
    eprintln!("ran in {:.1?}: {}", started.elapsed(), ran.join(", "));
    assert_eq!(ran.len(), Transport::ALL.len() * Case::ALL.len() - 1, "one case does not apply");
}
