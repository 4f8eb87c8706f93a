//! The streaming receiver over every host path (shm, tcp, in-process, a source applied
//! locally): an engine thread takes each bucket as it is handed over, reading the ring through
//! a mapping of its own (as an engine reads its views), and loads the bytes into its own
//! tensors, slowly. What it loaded equals the trainer's tensors bit for bit (so no bucket was
//! overwritten before it was given back); the update commits only once the engine took every
//! bucket; a corrupted bucket, a sender that hangs up and an engine that gives up each fail the
//! update on the engine's side with the reason and what it was handed, and leave the receiver
//! on its version, ready for the next.

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use weightlift::core::{synthetic, DType, Manifest, Module, Preset, PresetOptions, TensorSpec, Version};
use weightlift::{
    DestinationTensors, Endpoint, Fault, HostTensors, Receiver, ReceiverOptions, Sender, SenderOptions, StreamFailure,
    StreamOptions, StreamPlan, Trainer, TransportKind,
};
use weightlift_cuda::SharedMemory;

mod common;
use common::socket_path;

const MODEL: &str = "qwen3-tiny";
/// Several buckets, and the embedding larger than one (through the dedicated buffer).
const BUCKET_BYTES: u64 = 16 << 10;

/// The ring's buffers in shared memory: the receiver writes one mapping, the engine reads
/// another of the same pages, handed over bucket by bucket.
struct ShmBuffers {
    manifest: Manifest,
    regions: Vec<SharedMemory>,
}

impl ShmBuffers {
    fn new(sizes: &[u64]) -> ShmBuffers {
        let specs = sizes.iter().enumerate().map(|(i, &n)| TensorSpec::new(format!("ring{i}"), DType::U8, vec![n]));
        let regions = sizes.iter().map(|&n| SharedMemory::create("wl-stream-test", n as usize).unwrap()).collect();
        ShmBuffers { manifest: Manifest::new(specs.collect()).unwrap(), regions }
    }

    /// The engine's own mapping of the same buffers.
    fn engine_view(&self) -> Vec<SharedMemory> {
        self.regions.iter().map(|r| SharedMemory::open(r.path(), r.len()).unwrap()).collect()
    }
}

impl DestinationTensors for ShmBuffers {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn bytes(&self, index: usize) -> &[u8] {
        self.regions[index].as_slice()
    }
    fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        self.regions[index].as_mut_slice()
    }
    fn all_mut(&mut self) -> Vec<&mut [u8]> {
        self.regions.iter_mut().map(|r| r.as_mut_slice()).collect()
    }
}

struct Setup {
    receiver: Receiver,
    endpoint: Endpoint,
    trainer: HostTensors,
    /// The engine's mapping of the ring.
    view: Arc<Vec<SharedMemory>>,
    plan: StreamPlan,
}

fn setup(endpoint: Endpoint) -> Setup {
    setup_of(endpoint, MODEL, Module::Whole)
}

/// A streaming receiver of `module` of `model` (the tensors that module holds, as the trainer
/// names them); the trainer holds the whole checkpoint.
fn setup_of(endpoint: Endpoint, model: &str, module: Module) -> Setup {
    let config = synthetic(model).unwrap();
    let trainer = HostTensors::synthetic(&config, 11);
    let specs = Manifest::new(trainer.manifest().iter().filter(|s| holds(module, &s.name)).cloned().collect()).unwrap();
    let stream = StreamOptions { depth: 2, bucket_bytes: BUCKET_BYTES, module };
    let plan = StreamPlan::new(&specs, stream).unwrap();
    let buffers = ShmBuffers::new(&plan.buffer_sizes());
    let view = Arc::new(buffers.engine_view());
    let options = ReceiverOptions { timeout: Duration::from_secs(2), ..ReceiverOptions::default() };
    let receiver = Receiver::streaming(&specs, buffers, stream, options).unwrap();
    let listener = endpoint.bind().unwrap();
    let endpoint = listener.endpoint().unwrap();
    let serving = receiver.clone();
    std::thread::spawn(move || serving.serve(&listener));
    Setup { receiver, endpoint, trainer, view, plan }
}

/// Whether an engine holding `module` has the checkpoint's tensor `name`.
fn holds(module: Module, name: &str) -> bool {
    match module {
        Module::Whole | Module::Draft => true,
        Module::Main => !name.starts_with("mtp."),
        Module::Mtp => name.starts_with("mtp.") || name == "model.embed_tokens.weight" || name == "lm_head.weight",
    }
}

/// What the engine loaded of one version: each tensor's bytes, by name.
type Loaded = HashMap<String, Vec<u8>>;

/// An engine loading every update after `after`: takes the buckets in turn, sleeping `delay`
/// in each (a slow loader), copying each tensor out of the ring; gives up after `give_up_at`
/// buckets if asked to.
fn engine(
    s: &Setup,
    after: Version,
    delay: Duration,
    give_up_at: Option<usize>,
) -> JoinHandle<Result<(Version, Loaded), StreamFailure>> {
    let handoff = s.receiver.handoff().expect("a streaming receiver");
    let (view, plan) = (s.view.clone(), s.plan.clone());
    std::thread::spawn(move || {
        let version = handoff.next_update(after, Duration::from_secs(10)).expect("an update streams");
        let places = plan.places();
        let mut loaded = Loaded::new();
        let mut taken = 0;
        while let Some(k) = handoff.next_bucket(version, Duration::from_secs(10))? {
            if give_up_at == Some(taken) {
                handoff.abandon(version, "load_weights raised KeyError: 'model.norm.weight'".into());
                continue;
            }
            taken += 1;
            std::thread::sleep(delay);
            for &d in &plan.layout.complete_after[k] {
                let spec = &plan.plan.destinations[d as usize];
                let (buffer, offset) = places[d as usize].expect("placed");
                let bytes = &view[buffer].as_slice()[offset as usize..(offset + spec.byte_len()) as usize];
                loaded.insert(spec.name.clone(), bytes.to_vec());
            }
        }
        handoff.settled(version, Duration::from_secs(10))?;
        Ok((version, loaded))
    })
}

fn connect(s: &Setup, transport: TransportKind, fault: Option<Fault>) -> Sender {
    let rules = Preset::Identity.rules(PresetOptions::default()).unwrap();
    // The sender's bucket size is its own; a streaming receiver's wins.
    let options = SenderOptions { transport, fault, bucket_bytes: 1 << 20, ..SenderOptions::default() };
    match transport {
        TransportKind::InProcess => s.receiver.connect_in_process(s.trainer.manifest(), &rules, options),
        _ => Sender::connect(&s.endpoint, s.trainer.manifest(), &rules, options),
    }
    .unwrap()
}

fn assert_loaded_exactly(s: &Setup, loaded: &Loaded, label: &str) {
    assert_eq!(loaded.len(), s.plan.plan.destinations.len(), "{label}");
    for (spec, want) in s.trainer.manifest().iter().zip(s.trainer.data()) {
        if s.plan.plan.destinations.iter().any(|d| d.name == spec.name) {
            assert!(loaded[&spec.name] == *want, "{label}: `{}` differs", spec.name);
        }
    }
}

fn endpoint_for(transport: TransportKind, label: &str) -> Endpoint {
    match transport {
        TransportKind::Tcp => Endpoint::Tcp("127.0.0.1:0".into()),
        _ => Endpoint::Unix(socket_path(&format!("stream-{label}"))),
    }
}

const TRANSPORTS: [TransportKind; 3] = [TransportKind::Shm, TransportKind::Tcp, TransportKind::InProcess];

#[test]
fn a_slow_engine_loads_every_tensor_exactly_over_every_host_path() {
    for transport in TRANSPORTS {
        let label = transport.to_string();
        let mut s = setup(endpoint_for(transport, &label));
        assert!(s.plan.layout.dedicated_bytes > 0, "the embedding takes the dedicated buffer");
        assert!(s.plan.buckets.len() > 4, "{label}: several buckets");
        let mut sender = connect(&s, transport, None);
        for version in [Version(1), Version(2)] {
            let loading = engine(&s, Version(version.0 - 1), Duration::from_millis(2), None);
            let report = sender.push(version, &s.trainer).unwrap();
            assert!(report.is_committed() && report.verified, "{label}: {report:?}");
            let (got, loaded) = loading.join().unwrap().unwrap();
            assert_eq!(got, version);
            assert_loaded_exactly(&s, &loaded, &format!("{label} v{version}"));
            assert_eq!(s.receiver.committed(), version);
            // Everything again next step: the receiver kept nothing to skip.
            assert_eq!(report.skipped_tensors, 0);
            s.trainer.perturb();
        }
    }
}

/// A streamed update reports where its time went: every bucket handed over and taken, each
/// step's seconds within the update's, and the slow engine's loading seen as the receiver
/// waiting for buffers to be given back.
#[test]
fn a_streamed_update_reports_its_time_per_step_over_every_host_path() {
    for transport in TRANSPORTS {
        let label = transport.to_string();
        let s = setup(endpoint_for(transport, &format!("timing-{label}")));
        let mut sender = connect(&s, transport, None);
        let delay = Duration::from_millis(2);
        let loading = engine(&s, Version(0), delay, None);
        let report = sender.push(Version(1), &s.trainer).unwrap();
        loading.join().unwrap().unwrap();
        assert!(report.is_committed(), "{label}: {report:?}");
        let timing = report.stream_timing.as_deref().unwrap_or_else(|| panic!("{label}: no timing in {report:?}"));
        let buckets = s.plan.buckets.len();
        assert_eq!((timing.buckets, timing.engine_buckets), (buckets, buckets), "{label}: {timing:?}");
        assert_eq!(report.buckets, buckets, "{label}");
        let steps = [
            timing.buffer_wait_seconds,
            timing.launch_seconds,
            timing.gpu_wait_seconds,
            timing.write_seconds,
            timing.hand_over_seconds,
            timing.end_wait_seconds,
            timing.last_given_back_seconds,
        ];
        assert!(steps.iter().all(|&t| t >= 0.0) && steps.iter().sum::<f64>() <= timing.seconds, "{label}: {timing:?}");
        assert!(timing.seconds <= report.seconds, "{label}: {timing:?} / {}", report.seconds);
        // A host transport launches nothing on a GPU; it writes every bucket itself.
        assert_eq!((timing.launch_seconds, timing.gpu_wait_seconds), (0.0, 0.0), "{label}");
        assert!(timing.write_seconds > 0.0 && timing.hand_over_seconds > 0.0, "{label}: {timing:?}");
        // The engine sleeps in every bucket: the buffers come back no faster than that, and
        // the later buckets' waits are at most the whole update's.
        let reused = s.plan.layout.reuses.iter().flatten().count() as f64;
        assert!(timing.buffer_wait_seconds > 0.5 * reused * delay.as_secs_f64(), "{label}: {timing:?}");
        assert!(timing.engine_first_wait_seconds <= timing.engine_wait_seconds, "{label}: {timing:?}");
        assert!(timing.engine_wait_seconds <= timing.seconds + 1.0, "{label}: {timing:?}");
    }
}

/// An update applied from a local source into a streaming receiver reports the same steps.
#[test]
fn a_source_applied_locally_reports_its_time_per_step() {
    let s = setup(endpoint_for(TransportKind::Shm, "local-timing"));
    let loading = engine(&s, Version(0), Duration::ZERO, None);
    let rules = Preset::Identity.rules(PresetOptions::default()).unwrap();
    let report = s.receiver.apply_local(Version(1), &s.trainer, &rules).unwrap();
    loading.join().unwrap().unwrap();
    let timing = report.stream_timing.expect("a streamed update's timing");
    assert_eq!((timing.buckets, timing.engine_buckets), (s.plan.buckets.len(), s.plan.buckets.len()));
    assert!(timing.write_seconds > 0.0, "{timing:?}");
}

#[test]
fn a_source_applied_locally_streams_the_same() {
    let s = setup(endpoint_for(TransportKind::Shm, "local"));
    let loading = engine(&s, Version(0), Duration::from_millis(1), None);
    let rules = Preset::Identity.rules(PresetOptions::default()).unwrap();
    let report = s.receiver.apply_local(Version(4), &s.trainer, &rules).unwrap();
    assert!(report.is_committed(), "{report:?}");
    let (_, loaded) = loading.join().unwrap().unwrap();
    assert_loaded_exactly(&s, &loaded, "local");
}

#[test]
fn failures_reach_the_engine_named_and_leave_the_version() {
    for transport in TRANSPORTS {
        let label = transport.to_string();
        let mut s = setup(endpoint_for(transport, &format!("fail-{label}")));
        let mut sender = connect(&s, transport, None);
        let loading = engine(&s, Version(0), Duration::ZERO, None);
        assert!(sender.push(Version(1), &s.trainer).unwrap().is_committed());
        loading.join().unwrap().unwrap();
        s.trainer.perturb();

        // A corrupted bucket: the engine hears which tensor, and the version stays.
        let mut corrupt = connect(&s, transport, Some(Fault::FlipByteInBucket(3)));
        let loading = engine(&s, Version(1), Duration::ZERO, None);
        let report = corrupt.push(Version(2), &s.trainer).unwrap();
        assert!(!report.is_committed(), "{label}: {report:?}");
        let Err(StreamFailure::Failed { reason, handed, .. }) = loading.join().unwrap() else { panic!("{label}") };
        assert!(reason.contains("digest mismatch") && !report.mismatched.is_empty(), "{label}: {reason}");
        assert!(reason.contains(&report.mismatched[0]), "{label}: {reason}");
        // Buckets 0..3 were handed over: they are what the engine may have loaded.
        let mut handed = handed;
        handed.sort();
        assert!(!handed.is_empty() && report.dirty == handed, "{label}: {handed:?} / {:?}", report.dirty);
        assert_eq!(s.receiver.committed(), Version(1));

        // The engine gives up midway (its loader raised): the update fails with its reason.
        let loading = engine(&s, Version(2), Duration::ZERO, Some(2));
        let report = sender.push(Version(3), &s.trainer).unwrap();
        assert!(!report.is_committed(), "{label}: {report:?}");
        assert!(report.error.as_deref().unwrap_or("").contains("KeyError"), "{label}: {report:?}");
        assert!(matches!(loading.join().unwrap(), Err(StreamFailure::Failed { .. })), "{label}");

        // The same connection takes the next update: it stayed in step.
        let loading = engine(&s, Version(3), Duration::ZERO, None);
        assert!(sender.push(Version(4), &s.trainer).unwrap().is_committed(), "{label}");
        assert_loaded_exactly(&s, &loading.join().unwrap().unwrap().1, &label);

        // A sender that hangs up mid-update (not in-process: it is this process).
        if transport != TransportKind::InProcess {
            let mut gone = connect(&s, transport, Some(Fault::HangUpAfterBuckets(3)));
            let loading = engine(&s, Version(4), Duration::ZERO, None);
            let _ = gone.push(Version(5), &s.trainer);
            let failure = loading.join().unwrap().unwrap_err();
            assert!(matches!(failure, StreamFailure::Failed { .. }), "{label}: {failure}");
            assert_eq!(s.receiver.committed(), Version(4));
        }
    }
}

#[test]
fn weightlift_push_streams_into_it_from_another_process() {
    let s = setup(endpoint_for(TransportKind::Shm, "cli"));
    let first = engine(&s, Version(0), Duration::ZERO, None);
    let to = s.endpoint.to_string();
    let push = common::weightlift(&["push", "--synthetic", MODEL, "--preset", "identity", "--to", &to, "--steps", "2"])
        .spawn()
        .unwrap();
    let mut trainer = HostTensors::synthetic(&synthetic(MODEL).unwrap(), 7);
    let mut s = s;
    for (version, loading) in [(Version(1), Some(first)), (Version(2), None)] {
        let loading = loading.unwrap_or_else(|| engine(&s, Version(1), Duration::ZERO, None));
        let (got, loaded) = loading.join().unwrap().unwrap();
        assert_eq!(got, version);
        trainer.perturb();
        s.trainer = trainer.clone();
        assert_loaded_exactly(&s, &loaded, &format!("cli {version}"));
    }
    assert!(push.wait_with_output().unwrap().status.success());
    assert_eq!(s.receiver.committed(), Version(2));
}

/// A main model and its MTP draft (Qwen3-Next naming), each a streaming receiver of its module,
/// take one version from one trainer: committed on both once the engine loaded both; when the
/// draft's loader gives up, on neither (the main model, verified and voted, is called off and
/// dirty with what it handed over), and the next version reaches both again.
#[test]
fn a_main_model_and_its_mtp_draft_take_one_version_on_both_or_neither() {
    let model = "qwen3-moe-tiny-mtp";
    let mut main = setup_of(endpoint_for(TransportKind::Shm, "mtp-main"), model, Module::Main);
    let mut draft = setup_of(endpoint_for(TransportKind::Tcp, "mtp-draft"), model, Module::Mtp);
    let connect = |s: &Setup, module, transport| {
        let rules = Preset::Identity.module_rules(module, PresetOptions::default(), None).unwrap();
        let options = SenderOptions { transport, ..SenderOptions::default() };
        Sender::connect(&s.endpoint, s.trainer.manifest(), &rules, options).unwrap()
    };
    let mut trainer = Trainer::from_senders(vec![
        connect(&main, Module::Main, TransportKind::Shm),
        connect(&draft, Module::Mtp, TransportKind::Tcp),
    ]);
    let mtp_names = draft.plan.plan.destinations.iter().filter(|d| d.name.starts_with("mtp.")).count();
    assert!(mtp_names > 10 && draft.plan.plan.destinations.len() == mtp_names + 2);

    let (loading_main, loading_draft) =
        (engine(&main, Version(0), Duration::from_millis(1), None), engine(&draft, Version(0), Duration::ZERO, None));
    let step = trainer.push(Version(1), &main.trainer).unwrap();
    assert!(step.committed && step.verified, "{:?}", step.failure());
    assert_loaded_exactly(&main, &loading_main.join().unwrap().unwrap().1, "main");
    assert_loaded_exactly(&draft, &loading_draft.join().unwrap().unwrap().1, "draft");

    main.trainer.perturb();
    let (loading_main, loading_draft) =
        (engine(&main, Version(1), Duration::ZERO, None), engine(&draft, Version(1), Duration::ZERO, Some(1)));
    let step = trainer.push(Version(2), &main.trainer).unwrap();
    assert!(!step.committed, "{step:?}");
    let Err(StreamFailure::Failed { reason, .. }) = loading_main.join().unwrap() else { panic!("main committed") };
    assert!(reason.contains("called the update off") && reason.contains("KeyError"), "{reason}");
    assert!(matches!(loading_draft.join().unwrap(), Err(StreamFailure::Failed { .. })));
    assert_eq!((main.receiver.committed(), draft.receiver.committed()), (Version(1), Version(1)));
    let mut dirty = main.receiver.dirty();
    dirty.sort();
    let mut every: Vec<String> = main.plan.plan.destinations.iter().map(|d| d.name.clone()).collect();
    every.sort();
    assert_eq!(dirty, every, "the main model was handed every tensor");

    main.trainer.perturb();
    draft.trainer = main.trainer.clone();
    let (loading_main, loading_draft) =
        (engine(&main, Version(2), Duration::ZERO, None), engine(&draft, Version(2), Duration::ZERO, None));
    assert!(trainer.push(Version(3), &main.trainer).unwrap().committed);
    assert_loaded_exactly(&main, &loading_main.join().unwrap().unwrap().1, "main v3");
    assert_loaded_exactly(&draft, &loading_draft.join().unwrap().unwrap().1, "draft v3");
    assert!(main.receiver.dirty().is_empty() && draft.receiver.dirty().is_empty());
}

/// A sharded trainer's rank is refused by name: a streaming receiver's digests are per whole
/// tensor, and a rank holds parts.
#[test]
fn a_streaming_receiver_refuses_a_sharded_trainers_rank_by_name() {
    let s = setup(weightlift::Endpoint::Unix(socket_path("stream-shard")));
    let rules = Preset::Identity.rules(PresetOptions::default()).unwrap();
    let (mine, placements) = s.trainer.fsdp_shard(0, 2);
    let shard = weightlift::Shard { rank: 0, world: 2, placements };
    let err = Sender::connect_shard(&s.endpoint, mine.manifest(), &rules, SenderOptions::default(), shard)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("a streaming receiver takes one sender"), "{err}");
}
