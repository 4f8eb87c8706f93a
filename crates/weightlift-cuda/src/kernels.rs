//! weightlift's kernels, compiled once per GPU with NVRTC, and batches of work prepared for
//! them. A batch (thousands of copies, or thousands of tensors to digest) is uploaded once
//! and then runs with one or two launches per update, whatever the number of tensors. The
//! kernels' CUDA C is in `kernels/*.cu`, one program for NVRTC (see `SOURCE`).

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use weightlift_core::{prefix, update_order, waves, ScheduleError, WaveFolds, WaveOrder};

use crate::error::{Call, CudaError};
use crate::gpu::{DeviceBuffer, Gpu, OwnedDeviceMemory};
use crate::vmm_pool::PinnedHost;

/// Bytes of one digest chunk (the project's digest definition).
pub const CHUNK_BYTES: u64 = 4096;
/// Bytes one block of the copy kernel moves per tile.
const TILE_BYTES: u64 = 64 << 10;
/// Elements one block of the cast kernel converts per tile.
const CAST_TILE_ELEMS: u64 = 16 << 10;
const THREADS: u32 = 256;
/// Blocks per SM of the direct fused copy+digest kernels' grid: a grid that is all resident at once
/// (three blocks of 256 per SM, 24 warps) rather than 32 blocks per SM queued behind each other.
/// Queued grid-striding blocks start their walks 1 GB apart, so the chunks open at once are
/// spread over gigabytes; a resident grid keeps them side by side. Measured on H200 in four
/// runs (bench/results/gpu-h200x2-2026-11-29c/): updates of Qwen3-8B shapes 11.8-12.2 ->
/// 10.3-10.9 ms, Qwen3-30B-A3B 37.5-37.7 -> 35.4-36.8 ms; 2 blocks per SM about the same, 4
/// and 5 no better.
const FUSED_BLOCKS_PER_SM: u32 = 3;
/// Blocks per SM of the fused kernel reading a peer GPU's memory over NVLink: two, fewer
/// reads in flight than three. With three, Qwen3-8B's pull was bimodal from update to update,
/// 44.3 or 47.6 ms, and four or six blocks were slower still (50.8, 49.2 ms); with two it
/// is 44.05-44.56 ms in every update, within 1% of the plan's copies alone (43.6 ms), and
/// Qwen3-30B-A3B's 165.9 -> 164.6 ms (2 x H200, bench/results/peer-reads-h200-2026-11-30.md).
const PEER_BLOCKS_PER_SM: u32 = 2;
/// The staged kernel's shape (see `copy_digest_staged`): blocks of 96 threads (24 chunks a
/// slab), two per SM (96 KiB of pieces each, the most shared memory allows). On H200
/// (bench/results/staged-kernel-h200-2026-11-29.md), Qwen3-8B shapes: update 10.6 -> 8.6 ms.
const STAGED_THREADS: u32 = 96;
const STAGED_BLOCKS_PER_SM: u32 = 2;
/// These three mirror the kernel source's #defines (a test checks they agree).
const STAGED_PIECE_BYTES: u32 = 2048;
const STAGED_STAGES: u32 = 2;
const STAGED_HEADER: u32 = 128;
/// Shared memory of one staged block: the barriers, the stages of every chunk's piece, then
/// where each stage's chunks are.
const STAGED_SHARED_BYTES: u32 =
    STAGED_HEADER + STAGED_STAGES * (STAGED_THREADS / 4) * (STAGED_PIECE_BYTES + 32 + STAGED_CHUNK_INFO_BYTES);
/// The `Chunk` (four 8-byte fields) the kernel keeps per stage and chunk in shared memory.
const STAGED_CHUNK_INFO_BYTES: u32 = 32;
// Whole pieces in a chunk, whole warps (eight whole four-lane groups each), and no more
// shared memory than a block may ask for (227 KiB).
const _: () = assert!(CHUNK_BYTES % STAGED_PIECE_BYTES as u64 == 0 && STAGED_THREADS % 32 == 0);
const _: () = assert!(STAGED_SHARED_BYTES <= 227 << 10);
// The chunks the kernels digest are the ones weightlift-core schedules and defines digests by.
const _: () = assert!(CHUNK_BYTES == weightlift_core::digest::CHUNK_BYTES as u64);

/// The kernels' CUDA C, one program for NVRTC: the files of `kernels/` in this order, each
/// after a blank line (the layout of the source when it was inline here). Later files use what
/// earlier ones define: `common.cu` the types and searches, `xxh64.cu` the hash, `fused.cu`
/// the runs' chunks and the stripe seeds.
const SOURCE: &str = concat!(
    "\n",
    include_str!("kernels/common.cu"),
    "\n",
    include_str!("kernels/copy.cu"),
    "\n",
    include_str!("kernels/xxh64.cu"),
    "\n",
    include_str!("kernels/fused.cu"),
    "\n",
    include_str!("kernels/fused_staged.cu"),
    "\n",
    include_str!("kernels/read_all.cu"),
    "\n",
    include_str!("kernels/combine.cu"),
    "\n",
    include_str!("kernels/quant.cu"),
);

#[derive(Clone)]
pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    copy: CudaFunction,
    cast: CudaFunction,
    copy_digest: CudaFunction,
    copy_digest_peer: CudaFunction,
    /// On compute capability 9.0 and later (it needs the bulk-copy engine).
    copy_digest_staged: Option<CudaFunction>,
    combine: CudaFunction,
    read_all: CudaFunction,
    quant: CudaFunction,
    /// Streaming multiprocessors of the GPU.
    sms: u32,
}

impl Kernels {
    pub(crate) fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, CudaError> {
        let (major, minor) = ctx.compute_capability().call("cuDeviceGetAttribute")?;
        let arch = format!("--gpu-architecture=sm_{major}{minor}");
        let options = CompileOptions { options: vec![arch], ..Default::default() };
        let ptx = compile_ptx_with_opts(SOURCE, options).map_err(|e| CudaError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx).call("cuModuleLoadData")?;
        let load = |name: &'static str| module.load_function(name).call("cuModuleGetFunction");
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .call("cuDeviceGetAttribute")?;
        let copy_digest_staged = if major >= 9 {
            let f = load("copy_digest_staged")?;
            // More than the default 48 KiB of dynamic shared memory must be asked for.
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                STAGED_SHARED_BYTES as i32,
            )
            .call("cuFuncSetAttribute")?;
            Some(f)
        } else {
            None
        };
        Ok(Kernels {
            copy: load("batched_copy")?,
            cast: load("batched_cast_f32_bf16")?,
            copy_digest: load("copy_digest")?,
            copy_digest_peer: load("copy_digest_peer")?,
            copy_digest_staged,
            combine: load("combine_digests")?,
            read_all: load("read_all")?,
            quant: load("batched_quant_e4m3")?,
            sms: sms.max(1) as u32,
            _module: module,
        })
    }
}

impl Kernels {
    /// Blocks of a grid-striding copy or read kernel: 32 per SM, more than fit at once, so
    /// the GPU stays full while blocks finish unevenly.
    fn grid_stride_blocks(&self) -> u32 {
        self.sms * 32
    }
}

/// A direct fused kernel's launch: `grid` blocks of THREADS, no dynamic shared memory.
fn direct(grid: u64) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One 2-D strided copy between device addresses, in bytes: `rows` rows of `row_bytes` (the
/// kernels' `Rows2D` layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyDesc {
    pub src: u64,
    pub dst: u64,
    pub rows: u64,
    pub row_bytes: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
}

/// One 2-D strided f32 -> bf16 cast: `rows` rows of `row_elems` elements; strides in bytes
/// (the kernels' `Rows2D` layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastDesc {
    pub src: u64,
    pub dst: u64,
    pub rows: u64,
    pub row_elems: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
}

/// One region quantized to FP8 (e4m3) on the way (see `kernels/quant.cu` and
/// `weightlift_core::quant`): `rows` x `cols` elements of the source (`src_dtype`: F32, BF16
/// or F16; rows `src_stride` bytes apart) in blocks of `block_rows` x `block_cols`, written as
/// e4m3 at `dst` (rows `dst_stride` bytes apart) and one f32 scale per block at `scale` (scale
/// rows `scale_stride` bytes apart). The kernels' `QuantDesc` layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantDesc {
    pub src: u64,
    pub dst: u64,
    pub scale: u64,
    pub rows: u64,
    pub cols: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
    pub scale_stride: u64,
    pub block_rows: u64,
    pub block_cols: u64,
    src_dtype: u64,
}

impl QuantDesc {
    /// A region of `rows` x `cols` at `src` (of `src_dtype`) into `dst` and its scales at
    /// `scale`; an error for a source dtype the kernel does not read or an empty block.
    pub fn new(
        src: (u64, u64, weightlift_core::DType),
        dst: (u64, u64),
        scale: (u64, u64),
        rows: u64,
        cols: u64,
        block: [u64; 2],
    ) -> Result<QuantDesc, CudaError> {
        use weightlift_core::DType;
        let src_dtype = match src.2 {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            other => return Err(CudaError::Invalid(format!("FP8 quantization reads F32, BF16 or F16, not {other}"))),
        };
        if block.contains(&0) {
            return Err(CudaError::Invalid(format!("FP8 quantization in blocks of {block:?}: at least 1 x 1")));
        }
        Ok(QuantDesc {
            src: src.0,
            src_stride: src.1,
            dst: dst.0,
            dst_stride: dst.1,
            scale: scale.0,
            scale_stride: scale.1,
            rows,
            cols,
            block_rows: block[0],
            block_cols: block[1],
            src_dtype,
        })
    }

    /// Quantization blocks of the region.
    fn blocks(&self) -> u64 {
        self.rows.div_ceil(self.block_rows) * self.cols.div_ceil(self.block_cols)
    }
}

/// FP8 quantizations uploaded once, run with one launch each time.
pub struct QuantBatch {
    packed: DeviceBuffer,
    descs: u64,
    start: u64,
    count: u32,
    blocks: u64,
}

/// A run of a destination tensor copied and digested in one pass: `bytes` from `src` to
/// `dst`, whose chunk digests go to slots `out`, `out + 1`, ... of the wave's chunk array.
/// `dst` starts on a chunk boundary of its tensor, and the run ends on one or at its end.
/// With `dst` 0 the run is only digested: `src` is then the memory to digest.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedRun {
    pub src: u64,
    pub dst: u64,
    pub bytes: u64,
    pub out: u64,
}

impl SourceGpu {
    /// The order of the waves of an update reading these sources.
    pub fn wave_order(self) -> WaveOrder {
        match self {
            SourceGpu::This => WaveOrder::LargestFirst,
            SourceGpu::Peer => WaveOrder::AsListed,
        }
    }
}

/// The work of one wave: destination tensors (`tensors`: each one's index in the update, which
/// orders the digests [`Gpu::run_update`] returns; `tensor_bytes`: its size), their fused runs,
/// the copies and casts that cannot be fused, copies that gather what those wrote into one
/// place to digest (run after them: bytes of a destination that are digested in another order
/// than they lie), and the chunks to digest after all of them: (address, bytes, first out
/// slot). Out slots count from the wave's first chunk, the wave's tensors' chunks side by side
/// in the order listed.
#[derive(Debug, Clone, Default)]
pub struct Wave {
    pub tensors: Vec<usize>,
    pub fused: Vec<FusedRun>,
    pub copies: Vec<CopyDesc>,
    pub casts: Vec<CastDesc>,
    pub gathers: Vec<CopyDesc>,
    pub after: Vec<(u64, u64, u64)>,
    pub tensor_bytes: Vec<u64>,
}

/// 2-D copies (and f32 -> bf16 casts) uploaded once, run with one launch each time (two with
/// casts).
pub struct CopyBatch {
    packed: DeviceBuffer,
    list: TiledList,
    casts: TiledList,
}

/// The small device arrays of a prepared batch (descriptors, runs, prefix sums, tensor lists)
/// side by side, to upload with one allocation and one copy: a wave has up to 16 of them, and
/// an allocation, a copy and a free each took longer than the GPU work of a digest of small
/// tensors. The lists below hold byte offsets in it.
#[derive(Default)]
struct Packing(Vec<u8>);

impl Packing {
    /// Appends `items`, 16-byte aligned; returns their byte offset.
    fn push<T: Copy>(&mut self, items: &[T]) -> u64 {
        let at = self.0.len().next_multiple_of(16);
        self.0.resize(at, 0);
        self.0.extend_from_slice(as_bytes(items));
        at as u64
    }

    fn runs(&mut self, runs: &[FusedRun]) -> Result<RunList, CudaError> {
        let (start, chunks) = prefix(runs.iter().map(|r| r.bytes), CHUNK_BYTES);
        Ok(RunList { runs: self.push(runs), start: self.push(&start), count: count(runs.len())?, chunks })
    }

    fn indices(&mut self, items: &[u32]) -> Result<IndexList, CudaError> {
        Ok(IndexList { items: self.push(items), count: count(items.len())? })
    }

    fn copies(&mut self, descs: &[CopyDesc]) -> Result<TiledList, CudaError> {
        self.tiled(descs, descs.iter().map(|d| (d.rows, d.row_bytes)), TILE_BYTES)
    }

    fn casts(&mut self, descs: &[CastDesc]) -> Result<TiledList, CudaError> {
        self.tiled(descs, descs.iter().map(|c| (c.rows, c.row_elems)), CAST_TILE_ELEMS)
    }

    /// 2-D work items of `rows` rows of `len` units each, cut into tiles of `tile` units.
    fn tiled<T: Copy>(
        &mut self,
        descs: &[T],
        rows_and_len: impl Iterator<Item = (u64, u64)>,
        tile: u64,
    ) -> Result<TiledList, CudaError> {
        let (tile_start, tiles) = tiles(rows_and_len, tile);
        Ok(TiledList {
            descs: self.push(descs),
            tile_start: self.push(&tile_start),
            count: count(descs.len())?,
            tiles,
            tile,
        })
    }
}

/// 2-D copies (or casts) and the first tile of each, at offsets of a [`Packing`].
struct TiledList {
    descs: u64,
    tile_start: u64,
    count: u32,
    tiles: u64,
    /// Units (bytes, or elements for casts) of one tile.
    tile: u64,
}

/// Runs, with the prefix sum of their chunks (the kernel's work index), at offsets of a
/// [`Packing`].
struct RunList {
    runs: u64,
    start: u64,
    count: u32,
    chunks: u64,
}

struct PreparedWave {
    /// The tensors whose digests are folded early (see
    /// [`EARLY_FOLD_CHUNKS`](weightlift_core::EARLY_FOLD_CHUNKS)), in the order
    /// they are copied.
    early: Vec<EarlyGroup>,
    fused: RunList,
    copies: TiledList,
    casts: TiledList,
    gathers: TiledList,
    after: RunList,
    /// Offset of the prefix sum of the wave's tensors' chunks.
    tensor_start: u64,
    /// The tensors folded once the wave is copied.
    late_tensors: IndexList,
    first_tensor: u32,
}

/// Early tensors copied by one launch and folded on the side stream as soon as it is done.
struct EarlyGroup {
    runs: RunList,
    tensors: IndexList,
}

struct IndexList {
    items: u64,
    count: u32,
}

/// Where an update's sources live, which decides how the fused kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceGpu {
    /// This GPU's memory: read through shared memory by the bulk-copy engine (compute
    /// capability 9.0 and later), else by loads asking L2 for whole 256-byte blocks.
    This,
    /// Another GPU's memory, read over NVLink: plain loads (block fetches were slower there).
    Peer,
}

/// The kernel that copies and digests an update's fused runs. [`Gpu::prepare_update`] picks
/// one from where the sources are; benchmarks may run another ([`UpdateBatch::set_fused_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedKernel {
    /// Sources in this GPU's memory, on compute capability 9.0 and later: pieces of chunks
    /// through shared memory by the bulk-copy engine.
    Staged,
    /// Sources in this GPU's memory before that: loads ask L2 for 256-byte blocks.
    BlockLoads,
    /// Sources on a peer GPU, read over NVLink: plain loads (block fetches were slower there).
    PlainLoads,
}

impl FusedKernel {
    pub fn name(self) -> &'static str {
        match self {
            FusedKernel::Staged => "staged",
            FusedKernel::BlockLoads => "block-loads",
            FusedKernel::PlainLoads => "plain-loads",
        }
    }
}

/// A whole update prepared once (see [`Gpu::prepare_update`]); also what a batch of digests
/// of memory in place is (see [`Gpu::prepare_digests`]).
pub struct UpdateBatch {
    /// The waves' lists, side by side (see [`Packing`]).
    packed: DeviceBuffer,
    waves: Vec<PreparedWave>,
    /// How the fused runs are read, from where their sources are (fallback chunks are always
    /// read on this GPU, after the copies wrote them).
    kernel: FusedKernel,
    /// Chunk digests: wave k uses buffer k % 2, so one wave's digests are folded while the
    /// next wave is copied.
    chunks: [DeviceBuffer; 2],
    out: DeviceBuffer,
    /// Where `out` comes down to (pinned, so the copy is queued, not waited for); held by the
    /// one launch in flight.
    down: Mutex<PinnedHost>,
    /// The folds and the digests' copy down left on the side stream (see
    /// [`UpdateBatch::set_fold_aside`]).
    fold_aside: bool,
    /// The update's index of the tensor of each result slot (the waves' tensors in turn).
    order: Vec<usize>,
    device_bytes: u64,
}

/// An update queued by [`Gpu::launch_update`], its digests coming down into the batch's pinned
/// memory. Dropped without [`LaunchedUpdate::wait`], it still waits for them: the copy writes
/// memory it holds.
pub struct LaunchedUpdate<'a> {
    batch: &'a UpdateBatch,
    down: MutexGuard<'a, PinnedHost>,
    done: Option<cudarc::driver::CudaEvent>,
}

impl LaunchedUpdate<'_> {
    /// Waits for the update; every destination's digest, as [`Gpu::run_update`] returns them.
    pub fn wait(mut self) -> Result<Vec<u64>, CudaError> {
        if let Some(done) = self.done.take() {
            done.synchronize().call("cuEventSynchronize")?;
        }
        let order = &self.batch.order;
        // SAFETY: the event followed the digests' copy on its stream and has completed, so
        // nothing writes this memory while it is read.
        let bytes = unsafe { self.down.bytes(order.len() * 8) }?;
        let mut digests = vec![0u64; order.len()];
        for (&t, slot) in order.iter().zip(bytes.chunks_exact(8)) {
            digests[t] = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
        }
        Ok(digests)
    }
}

impl Drop for LaunchedUpdate<'_> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.synchronize();
        }
    }
}

impl UpdateBatch {
    /// Leaves the folds, the digests' copy down and the event waited for on the side stream,
    /// and does not make the main stream wait for them: the next batch launched (the next
    /// bucket of a streamed update) copies while this one folds. A fold is one dependent chain
    /// per tensor, so a bucket's fold takes about as long as its copy; joined, they add up.
    pub fn set_fold_aside(&mut self, aside: bool) {
        self.fold_aside = aside;
    }

    /// Device memory the batch holds (descriptors, chunk digests, results).
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// The kernel that runs the batch's fused runs.
    pub fn fused_kernel(&self) -> FusedKernel {
        self.kernel
    }

    /// Runs the fused runs with `kernel` instead (to compare kernels on the same batch); one
    /// this GPU cannot run is an error here, not at launch.
    pub fn set_fused_kernel(&mut self, gpu: &Gpu, kernel: FusedKernel) -> Result<(), CudaError> {
        if !gpu.fused_kernels().contains(&kernel) {
            return Err(CudaError::Invalid(format!("this GPU cannot run the {} kernel", kernel.name())));
        }
        self.kernel = kernel;
        Ok(())
    }

    /// Kernel launches one run takes (work lists that are empty launch nothing).
    pub fn launches(&self) -> usize {
        self.waves
            .iter()
            .map(|w| {
                let early = w.early.iter().flat_map(|g| [g.runs.chunks > 0, g.tensors.count > 0]);
                let rest = [
                    w.fused.chunks > 0,
                    w.copies.tiles > 0,
                    w.casts.tiles > 0,
                    w.gathers.tiles > 0,
                    w.after.chunks > 0,
                    w.late_tensors.count > 0,
                ];
                early.chain(rest).filter(|&launched| launched).count()
            })
            .sum()
    }
}

/// Digests of device memory in place: an update with nothing to copy.
pub type DigestBatch = UpdateBatch;

fn as_bytes<T: Copy>(items: &[T]) -> &[u8] {
    // SAFETY: T is a plain #[repr(C)] or integer type with no padding read as bytes for a copy.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

fn upload(gpu: &Gpu, bytes: &[u8]) -> Result<DeviceBuffer, CudaError> {
    let mut buf = gpu.alloc(bytes.len())?;
    buf.upload(bytes)?;
    Ok(buf)
}

fn count(n: usize) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::Invalid(format!("{n} items are too many for one batch")))
}

/// Tile starts of 2-D work items: `rows` rows each cut into tiles of `tile` units.
fn tiles(items: impl Iterator<Item = (u64, u64)>, tile: u64) -> (Vec<u64>, u64) {
    let mut start = Vec::new();
    let mut total = 0u64;
    for (rows, row_len) in items {
        start.push(total);
        total += rows * row_len.div_ceil(tile);
    }
    start.push(total);
    (start, total)
}

impl Gpu {
    /// Prepares `descs` for [`Gpu::run_copies`]. Every address must stay valid while the batch
    /// is used; weightlift builds batches from buffers it holds or has mapped.
    pub fn prepare_copies(&self, descs: &[CopyDesc]) -> Result<CopyBatch, CudaError> {
        self.prepare_copies_and_casts(descs, &[])
    }

    /// As [`Gpu::prepare_copies`], with casts beside the copies (what packing a bucket on the
    /// GPU needs: a block copied as it is, or cast on the way).
    pub fn prepare_copies_and_casts(&self, descs: &[CopyDesc], casts: &[CastDesc]) -> Result<CopyBatch, CudaError> {
        let mut packing = Packing::default();
        let list = packing.copies(descs)?;
        let casts = packing.casts(casts)?;
        Ok(CopyBatch { packed: upload(self, &packing.0)?, list, casts })
    }

    /// Queues every copy and cast of the batch on this GPU's stream: one launch each.
    pub fn run_copies(&self, batch: &CopyBatch) -> Result<(), CudaError> {
        let base = batch.packed.device_ptr();
        let k = self.kernels();
        self.launch_tiled(&k.copy, base, &batch.list, "cuLaunchKernel(batched_copy)")?;
        self.launch_tiled(&k.cast, base, &batch.casts, "cuLaunchKernel(batched_cast_f32_bf16)")
    }

    /// One launch of a tiled kernel (batched_copy or batched_cast_f32_bf16) over `list`,
    /// packed at `base`.
    fn launch_tiled(
        &self,
        kernel: &CudaFunction,
        base: u64,
        list: &TiledList,
        call: &'static str,
    ) -> Result<(), CudaError> {
        if list.tiles == 0 {
            return Ok(());
        }
        let grid = list.tiles.min(u64::from(self.kernels().grid_stride_blocks())) as u32;
        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (descs, starts) = (base + list.descs, base + list.tile_start);
        let mut launch = self.stream().launch_builder(kernel);
        launch.arg(&descs).arg(&starts).arg(&list.count).arg(&list.tile);
        // SAFETY: both tiled kernels take (descriptors, tile starts, count, tile size); every
        // descriptor addresses live device memory (the batch's contract), and the arrays at
        // `base` (the batch's packed arrays, alive while it is) hold `count` (+1) entries.
        unsafe { launch.launch(config) }.call(call)?;
        Ok(())
    }

    /// Prepares `descs` for [`Gpu::run_quant`]; addresses as for [`Gpu::prepare_copies`].
    pub fn prepare_quant(&self, descs: &[QuantDesc]) -> Result<QuantBatch, CudaError> {
        let mut packing = Packing::default();
        let (start, blocks) = prefix(descs.iter().map(QuantDesc::blocks), 1);
        let (descs_at, start_at) = (packing.push(descs), packing.push(&start));
        Ok(QuantBatch {
            packed: upload(self, &packing.0)?,
            descs: descs_at,
            start: start_at,
            count: count(descs.len())?,
            blocks,
        })
    }

    /// Queues the batch's quantizations on this GPU's stream: one launch, one block of
    /// threads per quantization block.
    pub fn run_quant(&self, batch: &QuantBatch) -> Result<(), CudaError> {
        if batch.blocks == 0 {
            return Ok(());
        }
        let k = self.kernels();
        let grid = batch.blocks.min(u64::from(k.grid_stride_blocks())) as u32;
        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let base = batch.packed.device_ptr();
        let (descs, starts) = (base + batch.descs, base + batch.start);
        let mut launch = self.stream().launch_builder(&k.quant);
        launch.arg(&descs).arg(&starts).arg(&batch.count);
        // SAFETY: the kernel takes (descriptors, block starts, count); the arrays at `base` (the
        // batch's, alive while it is) hold `count` descriptors and `count + 1` starts, and every
        // descriptor addresses live device memory (the batch's contract).
        unsafe { launch.launch(config) }.call("cuLaunchKernel(batched_quant_e4m3)")?;
        Ok(())
    }

    /// Reads all of `buffer` `times` times over (16-byte loads, one launch each, back to back),
    /// for measuring the read-bandwidth ceiling: time it and divide by `times`.
    pub fn read_all(&self, buffer: &DeviceBuffer, times: usize) -> Result<(), CudaError> {
        let k = self.kernels();
        let n16 = (buffer.len() / 16) as u64;
        let sink = self.alloc(8)?;
        let grid = k.grid_stride_blocks();
        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (ptr, out) = (buffer.device_ptr(), sink.device_ptr());
        for _ in 0..times {
            let mut launch = self.stream().launch_builder(&k.read_all);
            launch.arg(&ptr).arg(&n16).arg(&out);
            // SAFETY: arguments match the kernel; it reads `n16` 16-byte words inside `buffer`
            // and writes at most 8 bytes to `sink`, which outlives the launches (synchronized
            // below).
            unsafe { launch.launch(config) }.call("cuLaunchKernel(read_all)")?;
        }
        self.synchronize()
    }

    /// Prepares digests of the device regions `(address, bytes)`, as they are when run.
    pub fn prepare_digests(&self, regions: &[(u64, u64)]) -> Result<DigestBatch, CudaError> {
        let lens: Vec<u64> = regions.iter().map(|r| r.1).collect();
        let waves: Vec<Wave> = waves(&lens)
            .into_iter()
            .map(|tensors| {
                let (start, _) = prefix(tensors.iter().map(|&t| lens[t]), CHUNK_BYTES);
                Wave {
                    fused: tensors
                        .iter()
                        .zip(&start)
                        .filter(|(&t, _)| lens[t] > 0)
                        .map(|(&t, &s)| FusedRun { src: regions[t].0, dst: 0, bytes: lens[t], out: s })
                        .collect(),
                    tensor_bytes: tensors.iter().map(|&t| lens[t]).collect(),
                    tensors,
                    ..Wave::default()
                }
            })
            .collect();
        self.prepare_update(&waves, SourceGpu::This)
    }

    /// Digests every region of the batch (as the project defines digests) and returns them.
    pub fn run_digests(&self, batch: &DigestBatch) -> Result<Vec<u64>, CudaError> {
        self.run_update(batch)
    }

    /// Prepares a whole update, wave by wave (see [`Wave`]); [`Gpu::run_update`] returns the
    /// digest of every tensor of every wave, in order.
    pub fn prepare_update(&self, waves: &[Wave], sources: SourceGpu) -> Result<UpdateBatch, CudaError> {
        let order = update_order(waves.iter().map(|w| (w.tensors.as_slice(), w.tensor_bytes.as_slice())))?;
        let mut prepared = Vec::with_capacity(waves.len());
        let mut packing = Packing::default();
        let (mut max_chunks, mut first_tensor) = (0u64, 0u32);
        for wave in waves {
            let folds = WaveFolds::new(&wave.tensor_bytes, wave.after.iter().map(|&(_, _, out)| out))?;
            let chunks = folds.chunks();
            let [first_runs, early_runs, late_runs] = folds.split(wave.fused.iter().copied(), |r| r.out)?;
            let [first, early, late_tensors] = folds.tensors();
            let mut early_groups = Vec::with_capacity(2);
            for (runs, tensors) in [(first_runs, first), (early_runs, early)] {
                early_groups.push(EarlyGroup { runs: packing.runs(&runs)?, tensors: packing.indices(&tensors)? });
            }
            let after: Vec<FusedRun> =
                wave.after.iter().map(|&(src, bytes, out)| FusedRun { src, dst: 0, bytes, out }).collect();
            let (fused, after) = (packing.runs(&late_runs)?, packing.runs(&after)?);
            let early_chunks: u64 = early_groups.iter().map(|g| g.runs.chunks).sum();
            if early_chunks + fused.chunks + after.chunks != chunks {
                let (fused, fallback) = (early_chunks + fused.chunks, after.chunks);
                return Err(ScheduleError::ChunksMismatch { fused, fallback, chunks }.into());
            }
            max_chunks = max_chunks.max(chunks);
            let wave = PreparedWave {
                early: early_groups,
                fused,
                copies: packing.copies(&wave.copies)?,
                casts: packing.casts(&wave.casts)?,
                gathers: packing.copies(&wave.gathers)?,
                after,
                tensor_start: packing.push(folds.tensor_start()),
                late_tensors: packing.indices(&late_tensors)?,
                first_tensor,
            };
            first_tensor += wave.early.iter().map(|g| g.tensors.count).sum::<u32>() + wave.late_tensors.count;
            prepared.push(wave);
        }
        let chunk_bytes = (max_chunks as usize).max(1) * 8;
        // One wave needs one buffer; the second is a token allocation then.
        let second = if prepared.len() > 1 { chunk_bytes } else { 8 };
        let packed = upload(self, &packing.0)?;
        let chunks = [self.alloc(chunk_bytes)?, self.alloc(second)?];
        let out = self.alloc((first_tensor as usize).max(1) * 8)?;
        let device_bytes = [&packed, &chunks[0], &chunks[1], &out].iter().map(|b| b.allocated_bytes() as u64).sum();
        let kernel = match sources {
            SourceGpu::This => self.local_fused_kernel(),
            SourceGpu::Peer => FusedKernel::PlainLoads,
        };
        let down = Mutex::new(PinnedHost::alloc(self.context(), order.len().max(1) * 8)?);
        Ok(UpdateBatch { packed, waves: prepared, kernel, chunks, out, down, fold_aside: false, order, device_bytes })
    }

    /// Runs an update. Per wave: the early tensors' fused runs (the largest, then the others),
    /// each launch followed by the fold of its tensors on a second stream, then the rest (fused
    /// copy+digest, fallback copies and casts, gathers, their chunks' digests); then the other tensors'
    /// folds on that stream too, while the main stream goes on with the next wave (into the
    /// other chunk buffer). Ten launches a wave at most, however many tensors. Returns the
    /// digests.
    pub fn run_update(&self, batch: &UpdateBatch) -> Result<Vec<u64>, CudaError> {
        self.launch_update(batch)?.wait()
    }

    /// Queues the update of [`Gpu::run_update`] and the copy of its digests into pinned host
    /// memory, and returns without waiting: a caller can queue the next update (another batch)
    /// before this one's digests are read, so the GPU never idles while the host compares and
    /// hands over. One launch of a batch at a time: a second before the first is waited for is
    /// refused.
    pub fn launch_update<'a>(&'a self, batch: &'a UpdateBatch) -> Result<LaunchedUpdate<'a>, CudaError> {
        let mut down = batch
            .down
            .try_lock()
            .map_err(|_| CudaError::Invalid("this update is already in flight: wait for it first".into()))?;
        // The digests come down after the last fold: on the side stream when it is left there.
        let last = if batch.fold_aside { self.side_stream() } else { self.stream() };
        self.queue_update(batch)?;
        let len = batch.order.len() * 8;
        let host = down.at_mut(0, len as u64)?;
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `host` lies inside the pinned allocation `down` guards (checked by `at_mut`)
        // and `batch.out` holds `len` bytes; the guard stays held until the copy is known done
        // (`LaunchedUpdate` waits for the event below when it is waited for or dropped).
        unsafe {
            cudarc::driver::sys::cuMemcpyDtoHAsync_v2(host.cast(), batch.out.device_ptr(), len, last.cu_stream())
        }
        .result()
        .call("cuMemcpyDtoHAsync")?;
        // It follows the folds, which followed the copies (the side stream joined the main one
        // before each fold): once it is done, so is every write of the update.
        match last.record_event(None).call("cuEventRecord") {
            Ok(done) => Ok(LaunchedUpdate { batch, down, done: Some(done) }),
            Err(e) => {
                // The copy into `down` is queued: it must land before the guard goes.
                let _ = last.synchronize();
                Err(e)
            }
        }
    }

    /// The launches of an update, wave by wave: the folds on the side stream while the main
    /// stream goes on (see [`Gpu::run_update`]), the main stream then waiting for the last
    /// fold unless the batch leaves its folds aside.
    fn queue_update(&self, batch: &UpdateBatch) -> Result<(), CudaError> {
        let k = self.kernels();
        let (main, side) = (self.stream(), self.side_stream());
        let mut folded: Vec<cudarc::driver::CudaEvent> = Vec::with_capacity(batch.waves.len());
        let base = batch.packed.device_ptr();
        for (w, wave) in batch.waves.iter().enumerate() {
            let chunks = &batch.chunks[w % 2];
            // The fold of wave w - 2 read this buffer: it must be done (in order on one stream).
            if let Some(done) = w.checked_sub(2).and_then(|p| folded.get(p)) {
                main.wait(done).call("cuStreamWaitEvent")?;
            }
            let out = batch.out.device_ptr() + u64::from(wave.first_tensor) * 8;
            for group in wave.early.iter().filter(|g| g.tensors.count > 0) {
                self.launch_runs(main, base, &group.runs, chunks, batch.kernel)?;
                side.join(main).call("cuStreamWaitEvent")?;
                self.combine(side, chunks, base, wave.tensor_start, &group.tensors, out)?;
            }
            self.launch_runs(main, base, &wave.fused, chunks, batch.kernel)?;
            self.launch_tiled(&k.copy, base, &wave.copies, "cuLaunchKernel(batched_copy)")?;
            self.launch_tiled(&k.cast, base, &wave.casts, "cuLaunchKernel(batched_cast_f32_bf16)")?;
            self.launch_tiled(&k.copy, base, &wave.gathers, "cuLaunchKernel(batched_copy)")?;
            self.launch_runs(main, base, &wave.after, chunks, self.local_fused_kernel())?;
            side.join(main).call("cuStreamWaitEvent")?;
            self.combine(side, chunks, base, wave.tensor_start, &wave.late_tensors, out)?;
            folded.push(side.record_event(None).call("cuEventRecord")?);
        }
        if !batch.fold_aside {
            main.join(side).call("cuStreamWaitEvent")?;
        }
        Ok(())
    }

    /// The fused kernels this GPU can run.
    pub fn fused_kernels(&self) -> Vec<FusedKernel> {
        let staged = self.kernels().copy_digest_staged.is_some().then_some(FusedKernel::Staged);
        staged.into_iter().chain([FusedKernel::BlockLoads, FusedKernel::PlainLoads]).collect()
    }

    /// The fused kernel for sources in this GPU's memory.
    pub(crate) fn local_fused_kernel(&self) -> FusedKernel {
        if self.kernels().copy_digest_staged.is_some() {
            FusedKernel::Staged
        } else {
            FusedKernel::BlockLoads
        }
    }

    /// One launch of the fused kernel over `list`, packed at `base`.
    fn launch_runs(
        &self,
        stream: &CudaStream,
        base: u64,
        list: &RunList,
        chunks: &DeviceBuffer,
        kernel: FusedKernel,
    ) -> Result<(), CudaError> {
        if list.chunks == 0 {
            return Ok(());
        }
        let k = self.kernels();
        let direct_grid =
            |blocks_per_sm: u32| (list.chunks * 4).div_ceil(u64::from(THREADS)).min(u64::from(k.sms * blocks_per_sm));
        let (function, call, config) = match (kernel, &k.copy_digest_staged) {
            (FusedKernel::Staged, Some(staged)) => {
                let slabs = list.chunks.div_ceil(u64::from(STAGED_THREADS / 4));
                let grid = slabs.min(u64::from(k.sms * STAGED_BLOCKS_PER_SM)) as u32;
                let config = LaunchConfig {
                    grid_dim: (grid, 1, 1),
                    block_dim: (STAGED_THREADS, 1, 1),
                    shared_mem_bytes: STAGED_SHARED_BYTES,
                };
                (staged, "cuLaunchKernel(copy_digest_staged)", config)
            }
            (FusedKernel::Staged, None) => {
                return Err(CudaError::Invalid("the staged kernel needs compute capability 9.0 or later".into()))
            }
            (FusedKernel::BlockLoads, _) => {
                (&k.copy_digest, "cuLaunchKernel(copy_digest)", direct(direct_grid(FUSED_BLOCKS_PER_SM)))
            }
            (FusedKernel::PlainLoads, _) => {
                (&k.copy_digest_peer, "cuLaunchKernel(copy_digest_peer)", direct(direct_grid(PEER_BLOCKS_PER_SM)))
            }
        };
        let (runs, starts, out) = (base + list.runs, base + list.start, chunks.device_ptr());
        let mut launch = stream.launch_builder(function);
        launch.arg(&runs).arg(&starts).arg(&list.count).arg(&out);
        // SAFETY: the three kernels take (runs, chunk starts, count, out) as passed here; the
        // lists lie in the batch's packed arrays at `base` (alive while the batch is), runs
        // address live memory (the batch's contract) and every out slot lies inside `chunks`
        // (counted when the batch was prepared); the staged kernel's shared memory was allowed
        // when it was loaded.
        unsafe { launch.launch(config) }.call(call)?;
        Ok(())
    }

    /// Folds the listed tensors' chunk digests into their digests at `out` (a slot per tensor
    /// of the wave), one warp per tensor; `chunk_start` and `which` are packed at `base`.
    fn combine(
        &self,
        stream: &CudaStream,
        chunks: &DeviceBuffer,
        base: u64,
        chunk_start: u64,
        which: &IndexList,
        out: u64,
    ) -> Result<(), CudaError> {
        if which.count == 0 {
            return Ok(());
        }
        let k = self.kernels();
        // One one-warp block per tensor (the kernel's shared stages are per block).
        let config = LaunchConfig { grid_dim: (which.count, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let (c, s, w) = (chunks.device_ptr(), base + chunk_start, base + which.items);
        let mut launch = stream.launch_builder(&k.combine);
        launch.arg(&c).arg(&s).arg(&w).arg(&which.count).arg(&out);
        // SAFETY: arguments match the kernel; `which` holds `count` tensor indices of the wave
        // (in the batch's packed arrays, alive while it is), each with a slot at `out` (inside
        // the batch's result buffer).
        unsafe { launch.launch(config) }.call("cuLaunchKernel(combine_digests)")?;
        Ok(())
    }
}

/// Raw chunk digests of device regions, not folded into one digest per region: what a sender
/// hands [`weightlift_core::digest::PieceDigests::from_chunks`] for pieces of tensors that
/// arrive a bucket at a time. Its buffers are kept from call to call (an allocation costs
/// more than digesting a bucket) and grow when a call needs more; its host side is
/// page-locked, so the runs go up and the digests come down queued behind other work.
#[derive(Default)]
pub struct ChunkDigester {
    packed: Option<DeviceBuffer>,
    chunks: Option<DeviceBuffer>,
    /// The page-locking of `host`: declared first, so dropped before it (and dropped before
    /// `host` reallocates).
    pinned: Option<crate::gpu::HostRegistration>,
    /// The runs going up, then (from `down`) the chunk digests coming down.
    host: Vec<u8>,
    down: usize,
}

impl ChunkDigester {
    /// Device memory held now.
    pub fn device_bytes(&self) -> u64 {
        [&self.packed, &self.chunks].iter().filter_map(|b| b.as_ref()).map(|b| b.allocated_bytes() as u64).sum()
    }

    /// The chunk digests the last call brought down.
    fn results(&self, total: usize) -> Vec<u64> {
        let bytes = &self.host[self.down..self.down + total * 8];
        bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    }
}

/// A buffer of at least `bytes`, the one held if it is large enough.
fn at_least<'a>(
    gpu: &Gpu,
    held: &'a mut Option<DeviceBuffer>,
    bytes: usize,
) -> Result<&'a mut DeviceBuffer, CudaError> {
    if held.as_ref().is_none_or(|b| b.len() < bytes) {
        *held = None; // free the small one first
        *held = Some(gpu.alloc(bytes.max(1))?);
    }
    Ok(held.as_mut().expect("just allocated"))
}

impl Gpu {
    /// Digests each region `(device address, bytes)` of this GPU chunk by chunk from its start,
    /// after the work already queued on this GPU's stream, and returns every region's chunk
    /// digests, concatenated in order (a region of `n` bytes has `n.div_ceil(4096)`). The
    /// regions must be live memory of this GPU's context while the call runs.
    pub fn chunk_digests(&self, digester: &mut ChunkDigester, regions: &[(u64, u64)]) -> Result<Vec<u64>, CudaError> {
        let wait = crate::host_copy::WaitOnDrop(self);
        // SAFETY: the stream is synchronized before `digester` is given back, on every path
        // (`wait` on an early return).
        let total = unsafe { self.queue_chunk_digests(digester, regions) }?;
        self.synchronize()?;
        drop(wait);
        Ok(digester.results(total))
    }

    /// Copies `copies` from host memory into `dst` as [`Gpu::copy_ranges_from_host`] does,
    /// then digests `regions` as [`Gpu::chunk_digests`] does, behind the copies on the same
    /// stream, running `meanwhile` on this thread while all of it runs: the digest of a
    /// bucket costs the copy engines no gap beyond the kernel's own few microseconds.
    pub fn copy_from_host_then_digest<M: OwnedDeviceMemory, R>(
        &self,
        dst: &M,
        copies: &[(usize, &[u8])],
        digester: &mut ChunkDigester,
        regions: &[(u64, u64)],
        meanwhile: impl FnOnce() -> R,
    ) -> Result<(Vec<u64>, R), CudaError> {
        let mut total = 0;
        let value = self.copy_ranges_from_host(dst, copies, || {
            // SAFETY: `copy_ranges_from_host` synchronizes the stream before it returns, on
            // every path, and `digester` stays borrowed until then.
            total = unsafe { self.queue_chunk_digests(digester, regions) }?;
            Ok::<R, CudaError>(meanwhile())
        })??;
        Ok((digester.results(total), value))
    }

    /// Queues, on this GPU's stream: the runs of `regions` up into `digester`'s device buffer,
    /// the digest kernel, and the chunk digests down into `digester`'s host buffer. Returns
    /// how many chunk digests will be there.
    ///
    /// # Safety
    ///
    /// The caller synchronizes this GPU's stream before `digester` is used again or dropped:
    /// the copies read and write its host buffer until then.
    unsafe fn queue_chunk_digests(
        &self,
        digester: &mut ChunkDigester,
        regions: &[(u64, u64)],
    ) -> Result<usize, CudaError> {
        let (start, total) = prefix(regions.iter().map(|r| r.1), CHUNK_BYTES);
        if total == 0 {
            return Ok(0);
        }
        let runs: Vec<FusedRun> = regions
            .iter()
            .zip(&start)
            .filter(|(r, _)| r.1 > 0)
            .map(|(&(src, bytes), &out)| FusedRun { src, dst: 0, bytes, out })
            .collect();
        let mut packing = Packing::default();
        let list = packing.runs(&runs)?;
        let up = packing.0.len();
        let down = up.next_multiple_of(16);
        let needed = down + total as usize * 8;
        if digester.host.len() < needed {
            digester.pinned = None; // unregister before the memory moves
            digester.host = vec![0u8; needed.next_power_of_two()];
            // Only a hint: copies to and from pageable memory are slower, not wrong.
            digester.pinned = self.register_host(&digester.host).ok();
        }
        digester.down = down;
        digester.host[..up].copy_from_slice(&packing.0);
        let packed = at_least(self, &mut digester.packed, up)?.device_ptr();
        let chunks = at_least(self, &mut digester.chunks, total as usize * 8)?;
        let stream = self.stream();
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `packed` holds at least `up` bytes; the host bytes stay live and untouched
        // until the caller synchronizes the stream (this function's contract).
        unsafe { cudarc::driver::result::memcpy_htod_async(packed, &digester.host[..up], stream.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        self.launch_runs(stream, packed, &list, chunks, self.local_fused_kernel())?;
        let out = &mut digester.host[down..needed];
        // SAFETY: `chunks` holds the `total` digests the kernel writes; `out` is as long and
        // stays live and untouched until the caller synchronizes the stream.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, chunks.device_ptr(), stream.cu_stream()) }
            .call("cuMemcpyDtoHAsync")?;
        Ok(total as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_lists_sit_at_16_byte_aligned_offsets_with_their_bytes() {
        let mut packing = Packing::default();
        assert_eq!(packing.push(&[1u32, 2, 3]), 0);
        assert_eq!(packing.push(&[7u64]), 16);
        let runs = [FusedRun { src: 1, dst: 2, bytes: CHUNK_BYTES + 1, out: 0 }];
        let list = packing.runs(&runs).unwrap();
        assert_eq!((list.runs, list.start, list.count, list.chunks), (32, 64, 1, 2));
        assert_eq!(packing.0.len(), 64 + 16);
        let u64_at = |at: usize| u64::from_le_bytes(packing.0[at..at + 8].try_into().unwrap());
        assert_eq!(&packing.0[0..12], as_bytes(&[1u32, 2, 3]));
        assert_eq!((u64_at(16), u64_at(32 + 16), u64_at(64), u64_at(72)), (7, CHUNK_BYTES + 1, 0, 2));
        let empty = packing.indices(&[]).unwrap();
        assert_eq!((empty.items, empty.count), (80, 0));
    }

    #[test]
    fn waves_take_the_largest_tensors_first_where_reads_are_local() {
        // The waves themselves are weightlift-core's (schedule.rs); here, which order each source takes.
        assert_eq!(SourceGpu::This.wave_order(), WaveOrder::LargestFirst);
        assert_eq!(SourceGpu::Peer.wave_order(), WaveOrder::AsListed);
    }

    #[test]
    fn the_kernels_compile_for_hopper_where_nvrtc_is_present() {
        // NVRTC without a GPU (the toolkit's or torch's libnvrtc on LD_LIBRARY_PATH): a kernel
        // that does not compile shows here, not on the GPU machine.
        if !crate::gpu::nvrtc_present() {
            eprintln!("skipped: no NVRTC found (libnvrtc.so could not be loaded)");
            return;
        }
        let options = CompileOptions { options: vec!["--gpu-architecture=sm_90".into()], ..Default::default() };
        let ptx = compile_ptx_with_opts(SOURCE, options).unwrap_or_else(|e| panic!("{e}"));
        for kernel in [
            "copy_digest_staged",
            "copy_digest",
            "copy_digest_peer",
            "combine_digests",
            "batched_cast_f32_bf16",
            "batched_quant_e4m3",
        ] {
            assert!(ptx.to_src().contains(&format!(".entry {kernel}(")), "{kernel} is not in the PTX");
        }
    }

    /// A quantization the kernel cannot run is refused when it is described, by name.
    #[test]
    fn a_quantization_the_kernel_cannot_run_is_refused_by_name() {
        let err = QuantDesc::new((0, 0, weightlift_core::DType::I32), (0, 0), (0, 0), 1, 1, [1, 1]).unwrap_err();
        assert!(err.to_string().contains("not I32"), "{err}");
        let err = QuantDesc::new((0, 0, weightlift_core::DType::BF16), (0, 0), (0, 0), 1, 1, [0, 128]).unwrap_err();
        assert!(err.to_string().contains("at least 1 x 1"), "{err}");
        let ok = QuantDesc::new((0, 0, weightlift_core::DType::BF16), (0, 0), (0, 0), 300, 260, [128, 128]).unwrap();
        assert_eq!(ok.blocks(), 3 * 3);
    }

    #[test]
    fn the_staged_kernels_shape_in_rust_matches_its_source() {
        for (name, value) in [
            ("STAGED_PIECE_BYTES", STAGED_PIECE_BYTES),
            ("STAGED_STAGES", STAGED_STAGES),
            ("STAGED_HEADER", STAGED_HEADER),
        ] {
            assert!(
                SOURCE.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in the kernel source"
            );
        }
    }
}
