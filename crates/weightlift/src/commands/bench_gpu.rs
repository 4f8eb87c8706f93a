//! `weightlift bench --device cuda[:N]`: the GPU data plane against ceilings measured in the
//! same run (copy-engine D2D and peer copies, HBM read):
//! - in one process on one GPU: a plan's copies alone, digests alone, and the fused update,
//!   then every fused copy+digest kernel the GPU has on the same plan (and, with two GPUs,
//!   pulling from the other GPU's memory, last), each checked against the plan's own;
//! - between processes over CUDA IPC, as deployed: `weightlift serve --device cuda:R` as the
//!   engine and this process as the trainer, colocated (same GPU; the trainer's tensors from
//!   cudaMalloc as torch's are, again in VMM memory shared as file descriptors, and in 20 MiB
//!   VMM pieces as torch's expandable segments hold them) and cross-GPU (NVLink);
//! - host memory into a GPU engine (`staged` rows): this process's host tensors pushed over shm
//!   and tcp to `weightlift serve --device cuda:N`, against the pinned host-to-device copy;
//! - a checkpoint on disk into a GPU engine (`disk` rows, the first model): written under
//!   `$WEIGHTLIFT_BENCH_DIR` (default the temporary directory), pushed with the page cache warm
//!   (against the pinned copy) and cold (evicted before every update, against a sequential read
//!   of the same file, O_DIRECT where the file system takes it, in the same run); then applied
//!   by an engine in this process, as the HTTP agent's disk source does, with the checkpoint
//!   opened for each update (staged through page-locked scratch, or page-locked first); warm
//!   pushes run with the sender's sources page-locked once (kept over its updates) and staged.

use std::time::Instant;

use serde::Serialize;
use weightlift::core::{plan, TpRank, Version};
use weightlift::{
    today, write_file, CheckpointTensors, GpuPlan, GpuTensors, HostTensors, PlanInputs, Receiver, ReceiverOptions,
    Sender, SenderOptions, SourceTensors, TransportKind, UpdateReport,
};
use weightlift_cuda::{
    cufile_available, device_count, drop_cached, sequential_read_rate, CudaError, FusedKernel, Gpu, ReadMode,
    SourceGpu, SEQUENTIAL_CHUNK,
};

use super::{gb, spawn_receiver, CommandError, ModelArgs};

const CEILING_BYTES: usize = 4 << 30;
/// The size of the VMM handles torch's expandable segments map side by side (its large pool).
const EXPANDABLE_SEGMENT_BYTES: usize = 20 << 20;
const RUNS: usize = 5;
/// Reads of the whole ceiling buffer per timed sample of the read ceiling (launch and
/// synchronisation amortised, as torch's ceilings time ten operations a sample).
const READ_LAUNCHES: usize = 10;
/// Free memory a run leaves on each GPU.
const HEADROOM: u64 = 4 << 30;

#[derive(Serialize)]
struct Ceilings {
    d2d_copy_gbps: f64,
    hbm_read_gbps: f64,
    /// GPU0 -> GPU1 with the copy engines and peer access enabled; None with one GPU.
    peer_copy_gbps: Option<f64>,
    /// Page-locked host memory -> this GPU, one 4 GiB copy.
    pinned_h2d_gbps: f64,
    /// One TCP connection over loopback: 4 GiB written in 64 MiB writes of one buffer, read
    /// by another thread into one buffer (what the tcp rows are a ratio of).
    tcp_loopback_gbps: f64,
    /// The same, the writes taken in turn from 4 GiB of memory, as an update's bytes are
    /// (none of it in the CPU's caches): a second figure, not a ratio's denominator.
    tcp_loopback_streamed_gbps: f64,
}

/// Host tensors of this process pushed to a GPU engine process (device staging).
#[derive(Serialize)]
struct StagedRow {
    model: String,
    transport: TransportKind,
    /// `device slots` (the sender's copy engines write them), `ring` or `socket`.
    path: &'static str,
    bytes: u64,
    tensors: usize,
    updates: usize,
    median_seconds: f64,
    best_seconds: f64,
    /// The first update (untimed otherwise): it also page-locks the sender's tensors.
    first_seconds: f64,
    gbps: f64,
    /// Against the pinned host-to-device copy of the same run.
    ratio_to_pinned: f64,
    /// What bounds this path: `pinned H2D`, or for tcp the plain socket (`tcp loopback`).
    ceiling: &'static str,
    ratio_to_ceiling: f64,
    receiver_update_median_seconds: f64,
    device_extra_bytes: u64,
    verified: bool,
}

/// A checkpoint on disk into a GPU engine, warm or cold: pushed by a sender process over shm
/// (device slots), or applied by the engine's process itself, as the HTTP agent's disk source
/// does (the checkpoint opened anew for each update).
#[derive(Serialize)]
struct DiskRow {
    model: String,
    /// `push` (page-locked once by the sender), `push staged` (through its page-locked
    /// scratch), `local staged` or `local pinned` (the engine page-locks each mapping).
    path: &'static str,
    /// `warm` (the file in the page cache) or `cold` (evicted before every update).
    cache: &'static str,
    bytes: u64,
    updates: usize,
    median_seconds: f64,
    best_seconds: f64,
    gbps: f64,
    /// `pinned H2D` (warm) or `sequential read` (cold, the same file, same run).
    ceiling: &'static str,
    ceiling_gbps: f64,
    ratio_to_ceiling: f64,
    /// Share of the file in the page cache as each timed update began (the median).
    resident_before: f64,
    /// Whether the sender read the file (cold) rather than its map.
    read_from_disk: bool,
    verified: bool,
}

/// What the disk rows ran on.
#[derive(Serialize)]
struct DiskSetup {
    dir: String,
    /// The cold ceiling: the file read front to back in 64 MiB reads after eviction.
    sequential_read_gbps: f64,
    read_mode: String,
    /// What cuFile (GPUDirect Storage) offers here, or why it does not load.
    cufile: String,
}

#[derive(Serialize)]
struct SameProcessRow {
    model: String,
    tensors: usize,
    copies: usize,
    bytes: u64,
    copy_ms: f64,
    copy_gbps: f64,
    digest_ms: f64,
    digest_gbps: f64,
    /// Copy, then digest: two passes.
    unfused_update_ms: f64,
    /// Fused copy+digest where the bytes allow it.
    fused_bytes: u64,
    update_ms: f64,
    update_gbps: f64,
    update_ratio_to_d2d: f64,
    digest_ratio_to_read: f64,
    verified_against_cpu: bool,
    launches: usize,
    device_extra_bytes: u64,
    /// Every fused kernel this GPU has, on the same bound plan.
    fused_kernels: Vec<KernelRow>,
}

/// One fused copy+digest kernel run on a bound plan, next to the kernel the plan picks.
#[derive(Serialize)]
struct KernelRow {
    model: String,
    /// `this GPU`, or `peer GPU`: GPU 0's tensors pulled into GPU 1's over NVLink, in one
    /// process (what a cross-GPU receiver's pull is, without the IPC).
    sources: &'static str,
    kernel: &'static str,
    /// The kernel the plan picks for these sources.
    default: bool,
    update_ms: f64,
    /// Against the D2D copy rate (this GPU) or the peer copy rate.
    update_ratio_to_ceiling: f64,
    /// The digests alone of the tensors in place (this GPU only).
    digest_ms: Option<f64>,
    digest_ratio_to_read: Option<f64>,
    /// The update's digests, the bytes it wrote (digested by the default kernel) and the
    /// digests alone all equal the default kernel's, on sources of distinct bytes.
    agrees_with_default: bool,
}

#[derive(Serialize)]
struct IpcRow {
    model: String,
    /// colocated: both processes on GPU 0; cross: trainer GPU 0, engine GPU 1; colocated-vmm:
    /// colocated with the trainer's tensors in VMM memory shared as file descriptors (the
    /// others share cudaMalloc memory through legacy IPC handles, as torch tensors are);
    /// colocated-pieces: in 20 MiB VMM handles side by side, one descriptor each, as torch's
    /// expandable segments hold tensors.
    mode: &'static str,
    /// The sender digests its own memory for the receiver to compare with (a second read of
    /// the model); else the receiver's digests of what it wrote are recorded.
    sender_digests: bool,
    bytes: u64,
    tensors: usize,
    updates: usize,
    /// Trainer's wall time of one push: from Begin to the receiver's report.
    median_seconds: f64,
    best_seconds: f64,
    gbps: f64,
    ceiling_gbps: f64,
    ratio_to_ceiling: f64,
    /// The receiver's pull (copy + digest kernels) alone.
    receiver_pull_median_seconds: f64,
    /// The receiver's whole update: from accepting it to its report (the trainer's time less
    /// the Begin round trip, the sender's own work and the report's way back).
    receiver_update_median_seconds: f64,
    first_update_seconds: f64,
    ipc_opens_first: u64,
    ipc_opens_later: u64,
    device_extra_bytes: u64,
    sender_device_extra_bytes: u64,
    launches: usize,
    /// Every update compared the receiver's digests with the sender's (false with receiver
    /// digests only: committed, not verified).
    verified: bool,
    committed: bool,
}

#[derive(Serialize)]
struct GpuBench {
    benchmark: &'static str,
    device: String,
    gpus: usize,
    date: String,
    ceilings: Ceilings,
    same_process: Vec<SameProcessRow>,
    ipc: Vec<IpcRow>,
    staged: Vec<StagedRow>,
    disk: Vec<DiskRow>,
    disk_setup: Option<DiskSetup>,
    /// Every fused kernel pulling from a peer GPU (two GPUs only).
    peer_kernels: Vec<KernelRow>,
    skipped: Vec<String>,
}

/// Median and best (in seconds) of `RUNS` timed runs of `f`, after one warm-up.
fn time(mut f: impl FnMut() -> Result<(), CudaError>) -> Result<(f64, f64), CommandError> {
    f()?;
    let mut t: Vec<f64> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok((t[RUNS / 2], t[0]))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median and best seconds of timed updates of `bytes` each, and GB/s at the median.
struct Timed {
    median_seconds: f64,
    best_seconds: f64,
    gbps: f64,
}

fn summarize(seconds: impl Iterator<Item = f64>, bytes: u64) -> Timed {
    let seconds: Vec<f64> = seconds.collect();
    let best_seconds = seconds.iter().copied().fold(f64::INFINITY, f64::min);
    let median_seconds = median(seconds);
    Timed { median_seconds, best_seconds, gbps: bytes as f64 / median_seconds / 1e9 }
}

fn ceilings(gpu: &Gpu, peer: Option<&Gpu>) -> Result<Ceilings, CommandError> {
    let src = gpu.alloc(CEILING_BYTES)?;
    let mut dst = gpu.alloc(CEILING_BYTES)?;
    let (_, copy_best) = time(|| {
        gpu.copy(&mut dst, &src, CEILING_BYTES)?;
        gpu.synchronize()
    })?;
    let (_, read_best) = time(|| gpu.read_all(&src, READ_LAUNCHES))?;
    let peer_copy_gbps = match peer {
        Some(peer) => {
            gpu.enable_peer_access(peer)?;
            let mut remote = peer.alloc(CEILING_BYTES)?;
            let (_, best) = time(|| {
                gpu.copy_to_peer(&mut remote, &src, CEILING_BYTES)?;
                gpu.synchronize()
            })?;
            Some(CEILING_BYTES as f64 / best / 1e9)
        }
        None => None,
    };
    let host = vec![0x5au8; CEILING_BYTES];
    let _pinned = gpu.register_host(&host)?;
    let (_, h2d_best) = time(|| gpu.copy_from_host(&dst, 0, &host))?;
    Ok(Ceilings {
        d2d_copy_gbps: CEILING_BYTES as f64 / copy_best / 1e9,
        hbm_read_gbps: (CEILING_BYTES * READ_LAUNCHES) as f64 / read_best / 1e9,
        peer_copy_gbps,
        pinned_h2d_gbps: CEILING_BYTES as f64 / h2d_best / 1e9,
        tcp_loopback_gbps: tcp_loopback_gbps(None)?,
        tcp_loopback_streamed_gbps: tcp_loopback_gbps(Some(&host))?,
    })
}

/// A plain socket's throughput over loopback, one connection, best of [`RUNS`]: the writes
/// from one buffer, or taken in turn from `source` ([`CEILING_BYTES`] of it).
fn tcp_loopback_gbps(source: Option<&[u8]>) -> Result<f64, CommandError> {
    use std::io::{Read, Write};
    let io = |e: std::io::Error| CommandError::Io(format!("tcp loopback ceiling: {e}"));
    const WRITE: usize = 64 << 20;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        let mut buffer = vec![0u8; WRITE];
        while stream.read(&mut buffer)? > 0 {}
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(addr).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let chunk = vec![0x5au8; WRITE];
    let mut best = f64::INFINITY;
    for _ in 0..=RUNS {
        let started = Instant::now();
        for i in 0..CEILING_BYTES / WRITE {
            let bytes = source.map_or(&chunk[..], |s| &s[i * WRITE..(i + 1) * WRITE]);
            stream.write_all(bytes).map_err(io)?;
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    drop(stream);
    reader.join().map_err(|_| CommandError::Io("the loopback reader panicked".into()))?.map_err(io)?;
    Ok(CEILING_BYTES as f64 / best / 1e9)
}

/// The groups of rows of the GPU benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuRows {
    /// The kernels in this process: copies, digests, the fused update.
    SameProcess,
    /// CUDA IPC between processes (colocated, and cross-GPU with two).
    Ipc,
    /// Host tensors into a GPU engine (shm device slots and ring, tcp).
    Staged,
    /// A checkpoint on disk into a GPU engine, warm and cold.
    Disk,
}

pub fn run(
    ordinal: usize,
    models: &[String],
    model_args: &ModelArgs,
    rows: &[GpuRows],
    json: bool,
) -> Result<(), CommandError> {
    let gpus = device_count()?;
    let gpu = Gpu::open(ordinal)?;
    let peer_ordinal = (0..gpus).find(|&g| g != ordinal);
    let peer = peer_ordinal.map(Gpu::open).transpose()?;
    let device = gpu.name()?;
    let ceilings = ceilings(&gpu, peer.as_ref())?;
    let mut skipped = Vec::new();

    let wanted = |group: GpuRows| rows.contains(&group);
    let mut same_process = Vec::new();
    for name in models.iter().filter(|_| wanted(GpuRows::SameProcess)) {
        match same_process_row(&gpu, name, model_args, &ceilings)? {
            Ok(row) => same_process.push(row),
            Err(reason) => skipped.push(reason),
        }
    }
    let mut ipc = Vec::new();
    for name in models.iter().filter(|_| wanted(GpuRows::Ipc)) {
        for (mode, receiver) in [
            ("colocated", Some(ordinal)),
            ("colocated-vmm", Some(ordinal)),
            ("colocated-pieces", Some(ordinal)),
            ("cross", peer_ordinal),
        ] {
            let Some(receiver) = receiver else {
                skipped.push(format!("{name} {mode}: one GPU only"));
                continue;
            };
            let ceiling = if mode == "cross" { ceilings.peer_copy_gbps.unwrap_or(0.0) } else { ceilings.d2d_copy_gbps };
            match ipc_row(&gpu, receiver, peer.as_ref(), name, mode, ceiling, model_args)? {
                Ok(rows) => ipc.extend(rows),
                Err(reason) => skipped.push(reason),
            }
        }
    }
    let mut staged = Vec::new();
    for (m, name) in models.iter().enumerate().filter(|_| wanted(GpuRows::Staged)) {
        // The socket row of the first model only: over loopback it is the socket's rate, and a
        // MoE model's 61 GB would take minutes an update.
        // Device slots digested where they land (the default), and from the sources on the CPU.
        // Device slots also with the sources not page-locked (staged through pinned scratch).
        let shm = [
            (TransportKind::Shm, true, false, true),
            (TransportKind::Shm, true, true, true),
            (TransportKind::Shm, true, false, false),
            (TransportKind::Shm, false, false, true),
        ];
        let tcp = (m == 0).then_some((TransportKind::Tcp, false, false, true));
        for (transport, device_writes, host_digests, pin_sources) in shm.into_iter().chain(tcp) {
            let path = StagedPath { transport, device_writes, host_digests, pin_sources };
            match staged_row(ordinal, name, path, model_args, &ceilings)? {
                Ok(row) => staged.push(row),
                Err(reason) => skipped.push(reason),
            }
        }
    }
    let (mut disk, mut disk_setup) = (Vec::new(), None);
    if let Some(name) = models.first().filter(|_| wanted(GpuRows::Disk)) {
        match disk_rows(ordinal, name, model_args, &ceilings)? {
            Ok((rows, setup)) => (disk, disk_setup) = (rows, Some(setup)),
            Err(reason) => skipped.push(reason),
        }
    }
    // Last: a kernel that cannot read a peer's memory leaves that GPU's context unusable, and
    // every row above is already measured.
    let mut peer_kernels = Vec::new();
    if let (Some(peer), Some(peer_gbps)) = (&peer, ceilings.peer_copy_gbps) {
        for name in models.iter().filter(|_| wanted(GpuRows::SameProcess)) {
            let (rows, why_not_all) = peer_kernel_rows(&gpu, peer, name, model_args, peer_gbps);
            peer_kernels.extend(rows);
            skipped.extend(why_not_all);
        }
    }
    let out = GpuBench {
        benchmark: "gpu",
        device,
        gpus,
        date: today(),
        ceilings,
        same_process,
        ipc,
        staged,
        disk,
        disk_setup,
        peer_kernels,
        skipped,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
    } else {
        print_tables(&out);
    }
    Ok(())
}

/// Synthetic model `name` as `model_args` would map it (for a receiver to be started with),
/// and its plan inputs for one rank.
fn synthetic_inputs(name: &str, model_args: &ModelArgs) -> Result<(ModelArgs, PlanInputs), CommandError> {
    let args = ModelArgs { synthetic: Some(name.to_string()), model: None, ..model_args.clone() };
    let model = args.source(None)?;
    let inputs = args.mapping().inputs(&model, TpRank::SINGLE)?;
    Ok((args, inputs))
}

/// One model's plan run in this process; Err(reason) when it does not fit the GPU.
fn same_process_row(
    gpu: &Gpu,
    name: &str,
    model_args: &ModelArgs,
    ceilings: &Ceilings,
) -> Result<Result<SameProcessRow, String>, CommandError> {
    let (_, inputs) = synthetic_inputs(name, model_args)?;
    let bytes = inputs.destination.total_bytes();
    let source_bytes = inputs.source.senders()[0].total_bytes();
    let (free, _) = gpu.memory_info()?;
    if source_bytes + bytes + HEADROOM > free as u64 {
        return Ok(Err(format!(
            "{name} same process: needs {} on one GPU, {} free",
            gb(source_bytes + bytes),
            gb(free as u64)
        )));
    }
    let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
        .map_err(|e| CommandError::Io(e.to_string()))?;
    let mut src = GpuTensors::alloc(gpu, &inputs.source.senders()[0])?;
    let mut dst = GpuTensors::alloc(gpu, &inputs.destination)?;
    src.fill(gpu, 0x3c)?;
    dst.fill(gpu, 0)?;
    let mut bound = GpuPlan::new(gpu, &plan, &src.ptrs(), SourceGpu::This, &dst.ptrs())?;
    let (copy, digest, unfused) = {
        let (copies, digests) = (bound.copy_batch(gpu)?, bound.digest_batch(gpu)?);
        let (copy, _) = time(|| {
            gpu.run_copies(&copies)?;
            gpu.synchronize()
        })?;
        let (digest, _) = time(|| gpu.run_digests(&digests).map(|_| ()))?;
        let (unfused, _) = time(|| {
            gpu.run_copies(&copies)?;
            gpu.run_digests(&digests).map(|_| ())
        })?;
        (copy, digest, unfused)
    };
    let (update, _) = time(|| bound.update(gpu).map(|_| ()))?;
    // Every destination now holds 0x3c bytes: check the update's digests against the CPU's.
    dst.fill(gpu, 0)?;
    let digests = bound.update(gpu)?;
    let verified = inputs
        .destination
        .iter()
        .zip(&digests)
        .all(|(spec, &d)| d == weightlift::core::digest::digest(&vec![0x3c; spec.byte_len() as usize]));
    fill_distinct(gpu, &src)?;
    let mut fused_kernels = Vec::new();
    let row = (name, "this GPU", ceilings.d2d_copy_gbps);
    let kernels = gpu.fused_kernels();
    kernel_rows(gpu, &kernels, &mut bound, Some(ceilings.hbm_read_gbps), &mut dst, row, &mut fused_kernels)?;
    let b = bytes as f64;
    Ok(Ok(SameProcessRow {
        model: name.to_string(),
        tensors: inputs.destination.len(),
        copies: bound.copy_count,
        bytes,
        copy_ms: copy * 1e3,
        copy_gbps: b / copy / 1e9,
        digest_ms: digest * 1e3,
        digest_gbps: b / digest / 1e9,
        unfused_update_ms: unfused * 1e3,
        fused_bytes: bound.fused_bytes,
        update_ms: update * 1e3,
        update_gbps: b / update / 1e9,
        update_ratio_to_d2d: b / update / 1e9 / ceilings.d2d_copy_gbps,
        digest_ratio_to_read: b / digest / 1e9 / ceilings.hbm_read_gbps,
        verified_against_cpu: verified,
        launches: bound.launches(),
        device_extra_bytes: bound.device_bytes(),
        fused_kernels,
    }))
}

/// Gives every tensor distinct bytes (a value per tensor, and an odd-sized stripe of another
/// at an odd offset, across chunk boundaries), so that a kernel that mixed up chunks or
/// tensors would not agree with another.
fn fill_distinct(gpu: &Gpu, tensors: &GpuTensors) -> Result<(), CudaError> {
    for (i, (ptr, len)) in tensors.regions().into_iter().enumerate() {
        gpu.fill_region(ptr, len, (i * 7 % 251) as u8)?;
        if len > 64 {
            gpu.fill_region(ptr + len / 3 + 1, len / 5 + 13, (i * 13 % 253 + 1) as u8)?;
        }
    }
    gpu.synchronize()
}

/// `kernels` run on `bound` (whose destinations are `dst`, on `gpu`), each checked against the
/// plan's own kernel, into `rows` as they are measured (a kernel that fails leaves the rows
/// before it). With the read ceiling, the destinations are also digested in place by each.
/// `row` is (model, sources, ceiling of the update).
fn kernel_rows(
    gpu: &Gpu,
    kernels: &[FusedKernel],
    bound: &mut GpuPlan,
    read_gbps: Option<f64>,
    dst: &mut GpuTensors,
    row: (&str, &'static str, f64),
    rows: &mut Vec<KernelRow>,
) -> Result<(), CommandError> {
    let (model, sources, ceiling_gbps) = row;
    let bytes = dst.manifest().total_bytes() as f64;
    let default = bound.fused_kernel();
    // The destinations digested in place: with this GPU's own kernel, what the bytes each
    // kernel wrote are checked by; with each kernel in turn, the digest alone.
    let mut in_place = bound.digest_batch(gpu)?;
    let own = in_place.fused_kernel();
    dst.fill(gpu, 0)?;
    let reference = bound.update(gpu)?;
    for &kernel in kernels {
        bound.set_fused_kernel(gpu, kernel)?;
        let (update, _) = time(|| bound.update(gpu).map(|_| ()))?;
        dst.fill(gpu, 0)?;
        let mut agrees = bound.update(gpu)? == reference && gpu.run_digests(&in_place)? == reference;
        let digest = match read_gbps {
            Some(read_gbps) => {
                in_place.set_fused_kernel(gpu, kernel)?;
                let (digest, _) = time(|| gpu.run_digests(&in_place).map(|_| ()))?;
                agrees &= gpu.run_digests(&in_place)? == reference;
                in_place.set_fused_kernel(gpu, own)?;
                Some((digest * 1e3, bytes / digest / 1e9 / read_gbps))
            }
            None => None,
        };
        rows.push(KernelRow {
            model: model.to_string(),
            sources,
            kernel: kernel.name(),
            default: kernel == default,
            update_ms: update * 1e3,
            update_ratio_to_ceiling: bytes / update / 1e9 / ceiling_gbps,
            digest_ms: digest.map(|d| d.0),
            digest_ratio_to_read: digest.map(|d| d.1),
            agrees_with_default: agrees,
        });
    }
    bound.set_fused_kernel(gpu, default)?;
    Ok(())
}

/// Every fused kernel of GPU `peer` pulling a model from `gpu`'s memory into its own, in one
/// process: the plan's own first, the staged kernel (bulk copies from a peer's memory, not
/// what the plan picks) last. Rows measured, and why the rest were not.
fn peer_kernel_rows(
    gpu: &Gpu,
    peer: &Gpu,
    name: &str,
    model_args: &ModelArgs,
    peer_gbps: f64,
) -> (Vec<KernelRow>, Option<String>) {
    let mut rows = Vec::new();
    let result = (|| {
        let mut bound = match bind_peer_plan(gpu, peer, name, model_args)? {
            Ok(bound) => bound,
            Err(reason) => return Ok(Some(reason)),
        };
        let own = bound.plan.fused_kernel();
        let mut kernels = peer.fused_kernels();
        kernels.sort_by_key(|&k| (k != own, k == FusedKernel::Staged));
        let row = (name, "peer GPU", peer_gbps);
        kernel_rows(peer, &kernels, &mut bound.plan, None, &mut bound.destinations, row, &mut rows)?;
        Ok::<_, CommandError>(None)
    })();
    let why = result.unwrap_or_else(|e| Some(format!("{name} peer kernels: {e}")));
    (rows, why)
}

/// A plan bound on one GPU to sources in another's memory.
struct PeerPlan {
    plan: GpuPlan,
    destinations: GpuTensors,
    /// Kept alive while the plan reads them.
    _sources: GpuTensors,
}

/// A model's plan bound on `peer` to sources (of distinct bytes) in `gpu`'s memory;
/// Err(reason) when it does not fit.
fn bind_peer_plan(
    gpu: &Gpu,
    peer: &Gpu,
    name: &str,
    model_args: &ModelArgs,
) -> Result<Result<PeerPlan, String>, CommandError> {
    let (_, inputs) = synthetic_inputs(name, model_args)?;
    let source = &inputs.source.senders()[0];
    let ((free, _), (peer_free, _)) = (gpu.memory_info()?, peer.memory_info()?);
    if source.total_bytes() + HEADROOM > free as u64 || inputs.destination.total_bytes() + HEADROOM > peer_free as u64 {
        return Ok(Err(format!("{name} peer kernels: does not fit")));
    }
    let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
        .map_err(|e| CommandError::Io(e.to_string()))?;
    peer.enable_peer_access(gpu)?;
    let src = GpuTensors::alloc(gpu, source)?;
    fill_distinct(gpu, &src)?;
    let dst = GpuTensors::alloc(peer, &inputs.destination)?;
    let plan = GpuPlan::new(peer, &plan, &src.ptrs(), SourceGpu::Peer, &dst.ptrs())?;
    Ok(Ok(PeerPlan { plan, destinations: dst, _sources: src }))
}

/// One model pushed from this process (GPU `gpu`) to a `weightlift serve` on GPU `receiver`.
fn ipc_row(
    gpu: &Gpu,
    receiver: usize,
    peer: Option<&Gpu>,
    name: &str,
    mode: &'static str,
    ceiling_gbps: f64,
    model_args: &ModelArgs,
) -> Result<Result<Vec<IpcRow>, String>, CommandError> {
    let (args, inputs) = synthetic_inputs(name, model_args)?;
    let source = inputs.source.senders()[0].clone();
    let bytes = inputs.destination.total_bytes();
    let (free, _) = gpu.memory_info()?;
    let (peer_free, _) = match peer {
        Some(p) if receiver != gpu.ordinal() => p.memory_info()?,
        _ => (free, 0),
    };
    let needed_here = source.total_bytes() + if receiver == gpu.ordinal() { bytes } else { 0 } + HEADROOM;
    if needed_here > free as u64 || bytes + HEADROOM > peer_free as u64 {
        return Ok(Err(format!("{name} {mode}: does not fit ({} free on the trainer's GPU)", gb(free as u64))));
    }
    let exe = std::env::current_exe().map_err(|e| CommandError::Io(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("weightlift-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Io(e.to_string()))?;
    let listen = format!("unix:{}", dir.join(format!("{name}-{mode}.sock")).display());
    let extra = ["--device".to_string(), format!("cuda:{receiver}"), "--timeout-s".into(), "120".into()];
    let (mut child, endpoint) = spawn_receiver(&exe, &args, &listen, &extra)?;
    let result = (|| {
        let mut tensors = match mode {
            "colocated-vmm" => GpuTensors::alloc_shareable(gpu, &source)?,
            "colocated-pieces" => GpuTensors::alloc_pieces(gpu, &source, EXPANDABLE_SEGMENT_BYTES)?,
            _ => GpuTensors::alloc(gpu, &source)?,
        };
        let mut runs = Vec::new();
        let mut version = 0u64;
        for sender_digests in [true, false] {
            let options =
                SenderOptions { transport: TransportKind::CudaIpc, sender_digests, ..SenderOptions::default() };
            let mut sender = Sender::connect(&endpoint, &source, &inputs.rules, options)?;
            let mut reports: Vec<(f64, UpdateReport)> = Vec::new();
            for _ in 0..=RUNS {
                // New bytes every update (what a trainer step does to every weight).
                version += 1;
                tensors.fill(gpu, 0x11 + version as u8)?;
                gpu.synchronize()?;
                let started = Instant::now();
                let report = sender.push_device(Version(version), gpu, &tensors)?;
                reports.push((started.elapsed().as_secs_f64(), report));
            }
            runs.push((sender_digests, reports, sender.device_extra_bytes()));
        }
        Ok::<_, CommandError>(runs)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let rows = result?
        .into_iter()
        .map(|(sender_digests, reports, sender_extra)| {
            let timed = &reports[1..];
            let Timed { median_seconds, best_seconds, gbps } = summarize(timed.iter().map(|(s, _)| *s), bytes);
            IpcRow {
                model: name.to_string(),
                mode,
                sender_digests,
                bytes,
                tensors: inputs.destination.len(),
                updates: timed.len(),
                median_seconds,
                best_seconds,
                gbps,
                ceiling_gbps,
                ratio_to_ceiling: gbps / ceiling_gbps,
                receiver_pull_median_seconds: median(timed.iter().map(|(_, r)| r.unpack_seconds).collect()),
                receiver_update_median_seconds: median(timed.iter().map(|(_, r)| r.seconds).collect()),
                first_update_seconds: reports[0].0,
                ipc_opens_first: reports[0].1.ipc_opens,
                ipc_opens_later: timed.iter().map(|(_, r)| r.ipc_opens).sum(),
                device_extra_bytes: reports.iter().map(|(_, r)| r.device_extra_bytes).max().unwrap_or(0),
                sender_device_extra_bytes: sender_extra,
                launches: reports[0].1.launches,
                verified: reports.iter().all(|(_, r)| r.verified),
                committed: reports.iter().all(|(_, r)| r.is_committed()),
            }
        })
        .collect();
    Ok(Ok(rows))
}

/// One model's host tensors (in this process) pushed to `weightlift serve --device cuda:N`.
/// The same bytes every version: nothing is skipped (no delta), so every update moves them all.
/// How a staged row's bytes travel.
#[derive(Debug, Clone, Copy)]
struct StagedPath {
    transport: TransportKind,
    device_writes: bool,
    /// Device slots: digest the sources on the CPU rather than what landed on the GPU.
    host_digests: bool,
    /// Device slots: page-lock the sources (else they are staged through pinned scratch).
    pin_sources: bool,
}

fn staged_row(
    receiver: usize,
    name: &str,
    how: StagedPath,
    model_args: &ModelArgs,
    ceilings: &Ceilings,
) -> Result<Result<StagedRow, String>, CommandError> {
    let (args, inputs) = synthetic_inputs(name, model_args)?;
    let transport = how.transport;
    let bytes = inputs.destination.total_bytes();
    let exe = std::env::current_exe().map_err(|e| CommandError::Io(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("weightlift-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Io(e.to_string()))?;
    let listen = match transport {
        TransportKind::Tcp => "tcp://127.0.0.1:0".to_string(),
        _ => format!("unix:{}", dir.join(format!("{name}-staged.sock")).display()),
    };
    let extra = ["--device".to_string(), format!("cuda:{receiver}"), "--timeout-s".into(), "120".into()];
    let (mut child, endpoint) = spawn_receiver(&exe, &args, &listen, &extra)?;
    let config =
        weightlift::core::synthetic(name).ok_or_else(|| CommandError::Io(format!("no synthetic model {name}")))?;
    let result = (|| {
        let tensors = weightlift::HostTensors::synthetic(&config, 7);
        let StagedPath { device_writes, host_digests, pin_sources, .. } = how;
        let options = SenderOptions { transport, device_writes, pin_sources, host_digests, ..SenderOptions::default() };
        let mut sender = Sender::connect(&endpoint, tensors.manifest(), &inputs.rules, options)?;
        let path = match (transport, sender.writes_device_slots()) {
            (_, true) if host_digests => "slots, cpu digest",
            (_, true) if !pin_sources => "slots, staged",
            (_, true) => "device slots",
            (TransportKind::Tcp, _) => "socket",
            _ => "ring",
        };
        let mut reports: Vec<(f64, UpdateReport)> = Vec::new();
        for version in 1..=RUNS as u64 + 1 {
            let started = Instant::now();
            let report = sender.push(Version(version), &tensors)?;
            reports.push((started.elapsed().as_secs_f64(), report));
        }
        Ok::<_, CommandError>((path, reports))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let (path, reports) = result?;
    let timed = &reports[1..];
    let Timed { median_seconds, best_seconds, gbps } = summarize(timed.iter().map(|(s, _)| *s), bytes);
    let (ceiling, ceiling_gbps) = match transport {
        TransportKind::Tcp => ("tcp loopback", ceilings.tcp_loopback_gbps),
        _ => ("pinned H2D", ceilings.pinned_h2d_gbps),
    };
    Ok(Ok(StagedRow {
        model: name.to_string(),
        transport,
        path,
        bytes,
        tensors: inputs.destination.len(),
        updates: timed.len(),
        median_seconds,
        best_seconds,
        first_seconds: reports[0].0,
        gbps,
        ratio_to_pinned: gbps / ceilings.pinned_h2d_gbps,
        ceiling,
        ratio_to_ceiling: gbps / ceiling_gbps,
        receiver_update_median_seconds: median(timed.iter().map(|(_, r)| r.seconds).collect()),
        device_extra_bytes: reports.iter().map(|(_, r)| r.device_extra_bytes).max().unwrap_or(0),
        verified: reports.iter().all(|(_, r)| r.verified),
    }))
}

/// Cold updates timed (after one untimed): each reads the whole checkpoint from disk.
const COLD_RUNS: usize = 2;

/// Each update's seconds, report and share of the file in the page cache as it began; and
/// whether the last read the file rather than its map.
type DiskUpdates = (Vec<(f64, UpdateReport, f64)>, bool);

/// One model written as a checkpoint and pushed from it to `weightlift serve --device cuda:N`:
/// warm (as written, then page-locked by the first update), then cold (evicted before each).
fn disk_rows(
    receiver: usize,
    name: &str,
    model_args: &ModelArgs,
    ceilings: &Ceilings,
) -> Result<Result<(Vec<DiskRow>, DiskSetup), String>, CommandError> {
    let (args, inputs) = synthetic_inputs(name, model_args)?;
    let bytes = inputs.destination.total_bytes();
    let config =
        weightlift::core::synthetic(name).ok_or_else(|| CommandError::Io(format!("no synthetic model {name}")))?;
    let root = std::env::var_os("WEIGHTLIFT_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = root.join(format!("weightlift-disk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Io(format!("{}: {e}", dir.display())))?;
    let file = dir.join("model.safetensors");
    let written = {
        let tensors = HostTensors::synthetic(&config, 7);
        let list: Vec<_> = tensors.manifest().iter().zip(tensors.data().iter().map(Vec::as_slice)).collect();
        write_file(&file, &list)
    };
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(Err(format!("{name} disk: could not write the checkpoint: {e}")));
    }
    let exe = std::env::current_exe().map_err(|e| CommandError::Io(e.to_string()))?;
    let listen = format!("unix:{}", dir.join("disk.sock").display());
    let extra = ["--device".to_string(), format!("cuda:{receiver}"), "--timeout-s".into(), "120".into()];
    let (mut child, endpoint) = spawn_receiver(&exe, &args, &listen, &extra)?;
    let options = SenderOptions { transport: TransportKind::Shm, pin_sources: true, ..SenderOptions::default() };
    let open = || CheckpointTensors::open(&dir).map_err(|e| CommandError::Io(e.to_string()));
    let mut version = 0u64;
    let mut push_all = |pin: bool, runs: usize, evict: bool| -> Result<DiskUpdates, CommandError> {
        let checkpoint = open()?;
        let options = SenderOptions { pin_sources: pin, ..options.clone() };
        let mut sender = Sender::connect(&endpoint, checkpoint.manifest(), &inputs.rules, options)?;
        let mut out = Vec::new();
        for _ in 0..=runs {
            if evict {
                drop_cached(&file).map_err(|e| CommandError::Io(e.to_string()))?;
            }
            let resident = checkpoint.resident_fraction().unwrap_or(1.0);
            version += 1;
            let started = Instant::now();
            let report = sender.push(Version(version), &checkpoint)?;
            out.push((started.elapsed().as_secs_f64(), report, resident));
        }
        Ok((out, sender.reads_from_disk()))
    };
    // The engine's own process applying the checkpoint, as the agent does for each request:
    // opened anew (a new map) every update, into the engine's tensors on the GPU.
    let local_all = |pin: bool, runs: usize, evict: bool| -> Result<DiskUpdates, CommandError> {
        let gpu = std::sync::Arc::new(Gpu::open(receiver)?);
        let tensors = GpuTensors::alloc(&gpu, &inputs.destination)?;
        let options = ReceiverOptions { pin_local_sources: pin, ..ReceiverOptions::default() };
        let engine = Receiver::on_gpu(gpu, tensors, options)?;
        let mut out = Vec::new();
        for version in 1..=runs as u64 + 1 {
            if evict {
                drop_cached(&file).map_err(|e| CommandError::Io(e.to_string()))?;
            }
            let started = Instant::now();
            let checkpoint = open()?;
            let resident = checkpoint.resident_fraction().unwrap_or(1.0);
            let report = engine
                .apply_local(Version(version), &checkpoint, &inputs.rules)
                .map_err(|e| CommandError::Io(format!("{name} local disk update: {e}")))?;
            out.push((started.elapsed().as_secs_f64(), report, resident));
        }
        let read_from_disk = out.last().is_some_and(|(_, r, _)| r.read_from_disk);
        Ok((out, read_from_disk))
    };
    let result = (|| {
        // Warm first; the sender and the map go before eviction (pages mapped or page-locked
        // are not evicted).
        let warm = [push_all(true, RUNS, false)?, push_all(false, RUNS, false)?];
        let local_warm = [local_all(false, RUNS, false)?, local_all(true, RUNS, false)?];
        drop_cached(&file).map_err(|e| CommandError::Io(e.to_string()))?;
        let read = sequential_read_rate(&[&file], SEQUENTIAL_CHUNK, ReadMode::Direct)
            .map_err(|e| CommandError::Io(e.to_string()))?;
        let cold = push_all(true, COLD_RUNS, true)?;
        let local_cold = local_all(false, COLD_RUNS, true)?;
        Ok::<_, CommandError>((warm, local_warm, read, cold, local_cold))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let ([warm, warm_staged], [staged, pinned], read, cold, local_cold) = result?;
    let read_gbps = read.bytes as f64 / read.seconds / 1e9;
    let row = |path, cache, (reports, from_disk): DiskUpdates, ceiling, ceiling_gbps: f64| {
        let timed = &reports[1..];
        let Timed { median_seconds, best_seconds, gbps } = summarize(timed.iter().map(|(s, _, _)| *s), bytes);
        DiskRow {
            model: name.to_string(),
            path,
            cache,
            bytes,
            updates: timed.len(),
            median_seconds,
            best_seconds,
            gbps,
            ceiling,
            ceiling_gbps,
            ratio_to_ceiling: gbps / ceiling_gbps,
            resident_before: median(timed.iter().map(|(_, _, r)| *r).collect()),
            read_from_disk: from_disk,
            verified: reports.iter().all(|(_, r, _)| r.verified),
        }
    };
    let pinned_h2d = ceilings.pinned_h2d_gbps;
    let rows = vec![
        row("push", "warm", warm, "pinned H2D", pinned_h2d),
        row("push staged", "warm", warm_staged, "pinned H2D", pinned_h2d),
        row("local staged", "warm", staged, "pinned H2D", pinned_h2d),
        row("local pinned", "warm", pinned, "pinned H2D", pinned_h2d),
        row("push", "cold", cold, "sequential read", read_gbps),
        row("local staged", "cold", local_cold, "sequential read", read_gbps),
    ];
    let setup = DiskSetup {
        dir: root.display().to_string(),
        sequential_read_gbps: read_gbps,
        read_mode: read.mode.to_string(),
        cufile: cufile_available().map_or_else(|e| e.to_string(), |info| info.to_string()),
    };
    Ok(Ok((rows, setup)))
}

fn print_tables(out: &GpuBench) {
    let c = &out.ceilings;
    println!(
        "{} x{} ({}): D2D copy {:.0} GB/s, HBM read {:.0} GB/s, pinned H2D {:.1} GB/s, tcp loopback {:.1} GB/s ({:.1} streamed from 4 GiB), peer copy {}",
        out.device,
        out.gpus,
        out.date,
        c.d2d_copy_gbps,
        c.hbm_read_gbps,
        c.pinned_h2d_gbps,
        c.tcp_loopback_gbps,
        c.tcp_loopback_streamed_gbps,
        c.peer_copy_gbps.map_or("n/a".into(), |p| format!("{p:.0} GB/s"))
    );
    println!(
        "{:<15} {:>7} {:>10} {:>9} {:>10} {:>10} {:>8} {:>9} {:>9}",
        "same process", "tensors", "bytes", "copy ms", "digest ms", "update ms", "x D2D", "x read", "verified"
    );
    for r in &out.same_process {
        println!(
            "{:<15} {:>7} {:>10} {:>9.2} {:>10.2} {:>10.2} {:>8.2} {:>9.2} {:>9}",
            r.model,
            r.tensors,
            gb(r.bytes),
            r.copy_ms,
            r.digest_ms,
            r.update_ms,
            r.update_ratio_to_d2d,
            r.digest_ratio_to_read,
            r.verified_against_cpu
        );
    }
    println!(
        "{:<15} {:>9} {:>12} {:>8} {:>10} {:>8} {:>10} {:>8} {:>7}",
        "fused kernel", "sources", "kernel", "default", "update ms", "x ceil", "digest ms", "x read", "agrees"
    );
    let optional = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in out.same_process.iter().flat_map(|r| &r.fused_kernels).chain(&out.peer_kernels) {
        println!(
            "{:<15} {:>9} {:>12} {:>8} {:>10.2} {:>8.2} {:>10} {:>8} {:>7}",
            r.model,
            r.sources,
            r.kernel,
            if r.default { "yes" } else { "" },
            r.update_ms,
            r.update_ratio_to_ceiling,
            optional(r.digest_ms, 2),
            optional(r.digest_ratio_to_read, 2),
            r.agrees_with_default
        );
    }
    println!(
        "{:<15} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>11} {:>10} {:>9}",
        "cuda-ipc",
        "mode",
        "digests",
        "update ms",
        "recv ms",
        "pull ms",
        "GB/s",
        "x ceil",
        "first s",
        "opens 1st/+",
        "extra MiB",
        "verified"
    );
    for r in &out.ipc {
        println!(
            "{:<15} {:>9} {:>8} {:>10.2} {:>8.2} {:>8.2} {:>8.0} {:>8.2} {:>9.3} {:>11} {:>10.1} {:>9}",
            r.model,
            r.mode,
            if r.sender_digests { "both" } else { "receiver" },
            r.median_seconds * 1e3,
            r.receiver_update_median_seconds * 1e3,
            r.receiver_pull_median_seconds * 1e3,
            r.gbps,
            r.ratio_to_ceiling,
            r.first_update_seconds,
            format!("{}/{}", r.ipc_opens_first, r.ipc_opens_later),
            r.device_extra_bytes as f64 / (1 << 20) as f64,
            match (r.committed, r.verified) {
                (true, true) => "yes",
                (true, false) => "no*",
                (false, _) => "FAILED",
            }
        );
    }
    println!("no*: committed on the receiver's digests alone (nothing compared with the sender's)");
    println!("staged x ceil: of the pinned H2D copy over shm, of the plain socket over tcp");
    println!(
        "{:<15} {:>9} {:>13} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "staged",
        "transport",
        "path",
        "bytes",
        "update ms",
        "recv ms",
        "first s",
        "GB/s",
        "x ceil",
        "extra MiB",
        "verified"
    );
    for r in &out.staged {
        println!(
            "{:<15} {:>9} {:>13} {:>10} {:>10.1} {:>8.1} {:>8.2} {:>8.1} {:>8.2} {:>10.1} {:>9}",
            r.model,
            r.transport.to_string(),
            r.path,
            gb(r.bytes),
            r.median_seconds * 1e3,
            r.receiver_update_median_seconds * 1e3,
            r.first_seconds,
            r.gbps,
            r.ratio_to_ceiling,
            r.device_extra_bytes as f64 / (1 << 20) as f64,
            if r.verified { "yes" } else { "NO" }
        );
    }
    if let Some(setup) = &out.disk_setup {
        println!(
            "disk under {}: sequential read {:.2} GB/s ({}); {}",
            setup.dir, setup.sequential_read_gbps, setup.read_mode, setup.cufile
        );
        println!(
            "{:<15} {:<15} {:>6} {:>10} {:>10} {:>8} {:>8} {:>16} {:>9} {:>10} {:>9}",
            "disk",
            "path",
            "cache",
            "bytes",
            "update ms",
            "GB/s",
            "x ceil",
            "ceiling",
            "resident",
            "from disk",
            "verified"
        );
        for r in &out.disk {
            println!(
                "{:<15} {:<15} {:>6} {:>10} {:>10.1} {:>8.2} {:>8.2} {:>16} {:>9.2} {:>10} {:>9}",
                r.model,
                r.path,
                r.cache,
                gb(r.bytes),
                r.median_seconds * 1e3,
                r.gbps,
                r.ratio_to_ceiling,
                r.ceiling,
                r.resident_before,
                r.read_from_disk,
                if r.verified { "yes" } else { "NO" }
            );
        }
    }
    for s in &out.skipped {
        println!("skipped {s}");
    }
}
