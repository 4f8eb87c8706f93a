//! The CUDA IPC transport: GPU to GPU on one host, with no staging copy.
//!
//! The sender names the allocations its source tensors live in (legacy IPC handles for
//! cudaMalloc memory such as torch's by default, file descriptors for CUDA VMM memory:
//! weightlift's own allocations, and the mappings of torch's expandable segments) and where
//! each tensor lies in them. The receiver opens each allocation once and
//! keeps the mapping for as long as the sender's allocation is the same one, which it checks
//! every update (the driver's allocation id, the handle), never assumes. It then pulls: one
//! pass reads the sources and writes its tensors in place, digesting what it writes, on the
//! same GPU or over NVLink. The sender digests what it meant to send from its own memory, and
//! the receiver commits only if the two agree.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use weightlift_core::{Manifest, Plan};
use weightlift_cuda::{
    CudaError, Gpu, ImportedAllocation, IpcMapping, MappedPieces, PhysicalMemory, SharedAllocation, Sharing, SourceGpu,
    IPC_HANDLE_BYTES,
};

use crate::gpu::{ExpectedDigests, GpuPlan};
use crate::protocol::{IpcPiece, IpcSegment, Message};

/// Tensors in GPU memory, each at a device address: a sender's sources or a receiver's
/// destinations.
pub trait DeviceTensors: Send + Sync {
    fn manifest(&self) -> &Manifest;
    /// Device address of every tensor, in manifest order.
    fn device_ptrs(&self) -> Vec<u64>;
    /// Allocations made through CUDA VMM that hold some of the tensors, with a process-unique
    /// id each (see [`next_allocation_id`]); the rest is shared through legacy IPC handles.
    fn shareable(&self) -> Vec<(u64, &SharedAllocation)> {
        Vec::new()
    }

    /// Every tensor's digest, computed on `gpu` where the tensors live.
    fn digests(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_digests(&gpu.prepare_digests(&self.regions())?)
    }

    /// Sets every byte of tensor `i` to `value(i)` on `gpu`, and waits for it.
    fn fill_each(&self, gpu: &Gpu, value: &dyn Fn(usize) -> u8) -> Result<(), CudaError> {
        for (i, (ptr, bytes)) in self.regions().into_iter().enumerate() {
            gpu.fill_region(ptr, bytes, value(i))?;
        }
        gpu.synchronize()
    }

    /// (address, bytes) of every tensor.
    fn regions(&self) -> Vec<(u64, u64)> {
        self.device_ptrs().into_iter().zip(self.manifest().iter()).map(|(p, s)| (p, s.byte_len())).collect()
    }
}

/// Shared tensors (a caller may keep a handle to what a receiver writes into).
impl<T: DeviceTensors> DeviceTensors for Arc<T> {
    fn manifest(&self) -> &Manifest {
        (**self).manifest()
    }

    fn device_ptrs(&self) -> Vec<u64> {
        (**self).device_ptrs()
    }

    fn shareable(&self) -> Vec<(u64, &SharedAllocation)> {
        (**self).shareable()
    }
}

/// A fresh id for a shareable allocation of this process.
pub fn next_allocation_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Lower-case hex of `bytes` (GPU UUIDs and IPC handles on the wire).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `N` bytes [`hex`] wrote, or None for anything else.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The sender's side of one connection.
#[derive(Default)]
pub(crate) struct Exporter {
    /// Shareable allocations whose descriptors this connection's receiver already has.
    sent: HashSet<u64>,
    /// Physical allocations of VMM pieces (by driver block id) whose descriptors it has.
    sent_blocks: HashSet<u64>,
    /// Legacy handles already asked of the driver, by allocation id.
    handles: HashMap<u64, String>,
    /// The expected-digest batches, bound to the source addresses and the parts they were
    /// built for (see [`Exporter::expected_parts`]).
    expected: Option<BoundDigests>,
    /// The tensor locations and segments last sent (the receiver keeps them).
    last_located: Option<Vec<(u32, u64)>>,
    last_segments: Option<Vec<IpcSegment>>,
    /// What the last full description the receiver got was made from: while the tensors stay
    /// at these addresses in these allocations, an update needs only the allocations checked.
    last_described: Option<Described>,
    /// The full description made for the message in flight: the receiver's once it is sent
    /// (an update refused before that leaves the receiver with the last one).
    pending: Option<Described>,
}

/// The tensor addresses, weightlift's own allocations (id, base, bytes), and the other
/// segments found by the driver, of a full description.
struct Described {
    ptrs: Vec<u64>,
    own: Vec<(u64, u64, u64)>,
    found: Vec<weightlift_cuda::Segment>,
}

impl Exporter {
    /// Where `tensors` live, as a message, and the descriptors to send after it.
    pub(crate) fn describe(
        &mut self,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
        sender_digests: bool,
    ) -> Result<(Message, Vec<OwnedFd>), CudaError> {
        let ptrs = tensors.device_ptrs();
        let shareable = tensors.shareable();
        let own: Vec<(u64, u64, u64)> =
            shareable.iter().map(|(id, a)| (*id, a.device_ptr(), a.mapped_len() as u64)).collect();
        let device = hex(&gpu.uuid()?);
        self.pending = None;
        // The same tensors in the same memory as the receiver last got: their locations and
        // segments are its already, once every segment is checked (O(segments), not O(tensors)).
        if let Some(found) = self.described_as_sent(&ptrs, &own) {
            if gpu.still_mapped(found)? {
                let pid = std::process::id();
                let message =
                    Message::IpcSources { pid, device, segments: None, tensors: None, fds: 0, sender_digests };
                return Ok((message, Vec::new()));
            }
        }
        let manifest = tensors.manifest();
        let mut segments = Vec::new();
        let mut located = vec![(0u32, 0u64); ptrs.len()];
        let mut fds = Vec::new();
        let mut legacy = Vec::new();
        let mut shareable_index: HashMap<u64, u32> = HashMap::new();
        for (i, (&ptr, spec)) in ptrs.iter().zip(manifest.iter()).enumerate() {
            let end = ptr + spec.byte_len();
            let Some(&(id, alloc)) = shareable.iter().find(|(_, a)| {
                let base = a.device_ptr();
                ptr >= base && end <= base + a.mapped_len() as u64
            }) else {
                legacy.push(i);
                continue;
            };
            let segment = match shareable_index.get(&id) {
                Some(&s) => s,
                None => {
                    let fd = if self.sent.contains(&id) {
                        None
                    } else {
                        fds.push(alloc.export_fd()?);
                        Some(fds.len() as u32 - 1)
                    };
                    let (mapped_bytes, base) = (alloc.mapped_len() as u64, alloc.device_ptr());
                    segments.push(IpcSegment::Shareable { id, mapped_bytes, fd, base });
                    shareable_index.insert(id, segments.len() as u32 - 1);
                    segments.len() as u32 - 1
                }
            };
            located[i] = (segment, ptr - alloc.device_ptr());
        }
        let mut found_here = Vec::new();
        if !legacy.is_empty() {
            let regions: Vec<(u64, u64)> = legacy.iter().map(|&i| (ptrs[i], manifest.specs()[i].byte_len())).collect();
            let (found, at) = gpu.locate(&regions).map_err(|e| match e {
                CudaError::OutsideAllocation { index, .. } => {
                    CudaError::Invalid(format!("`{}`: {e}", manifest.specs()[legacy[index]].name))
                }
                other => other,
            })?;
            let first = segments.len() as u32;
            // Memory that can travel neither way (a weightlift pool's, stream-ordered memory):
            // refused by the name of a tensor in it.
            for (index, segment) in found.iter().enumerate() {
                let Sharing::Vmm { pieces } = &segment.sharing else { continue };
                if let Some(p) = pieces.iter().find(|p| !p.exportable) {
                    let k = at.iter().position(|a| a.segment as usize == index).expect("segments hold tensors");
                    return Err(CudaError::Invalid(format!(
                        "`{}`: the memory at {:#x} can be shared neither through a legacy IPC handle nor as a file \
                         descriptor (VMM memory made without CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, or \
                         stream-ordered memory)",
                        manifest.specs()[legacy[k]].name,
                        segment.base + p.offset
                    )));
                }
            }
            let unsent = found
                .iter()
                .flat_map(|s| match &s.sharing {
                    Sharing::Vmm { pieces } => pieces.as_slice(),
                    Sharing::Legacy { .. } => &[],
                })
                .filter(|p| !self.sent_blocks.contains(&p.block_id))
                .count();
            if unsent > 0 {
                crate::fd_pass::make_room_for_descriptors(unsent).map_err(|e| CudaError::Invalid(e.to_string()))?;
            }
            let (mut live, mut live_blocks) = (HashSet::new(), HashSet::new());
            for s in &found {
                match &s.sharing {
                    Sharing::Legacy { buffer_id } => {
                        let handle = match self.handles.get(buffer_id) {
                            Some(h) => h.clone(),
                            None => {
                                let h = hex(&gpu.ipc_handle(s.base)?);
                                self.handles.insert(*buffer_id, h.clone());
                                h
                            }
                        };
                        live.insert(*buffer_id);
                        segments.push(IpcSegment::Legacy {
                            handle,
                            buffer_id: *buffer_id,
                            bytes: s.bytes,
                            base: s.base,
                        });
                    }
                    Sharing::Vmm { pieces } => {
                        let mut described = Vec::with_capacity(pieces.len());
                        for p in pieces {
                            // A block already sent on this connection needs no descriptor; one
                            // named twice in this message needs one only the first time.
                            let first_here = live_blocks.insert(p.block_id);
                            let fd = if self.sent_blocks.contains(&p.block_id) || !first_here {
                                None
                            } else {
                                fds.push(gpu.export_mapping_fd(s.base + p.offset)?);
                                Some(fds.len() as u32 - 1)
                            };
                            described.push(IpcPiece { offset: p.offset, bytes: p.bytes, block_id: p.block_id, fd });
                        }
                        segments.push(IpcSegment::Pieces { base: s.base, bytes: s.bytes, pieces: described });
                    }
                }
            }
            for (k, &i) in legacy.iter().enumerate() {
                located[i] = (first + at[k].segment, at[k].offset);
            }
            // Handles and blocks no longer used: forget them (their ids never come back).
            self.handles.retain(|id, _| live.contains(id));
            self.sent_blocks.retain(|id| live_blocks.contains(id));
            found_here = found;
        }
        let unchanged = self.last_located.as_ref() == Some(&located);
        // Equal segments name no descriptor (those of the last ones were sent then).
        let same_segments = self.last_segments.as_ref() == Some(&segments);
        self.pending = Some(Described { ptrs, own, found: found_here });
        let message = Message::IpcSources {
            pid: std::process::id(),
            device,
            segments: (!same_segments).then_some(segments),
            tensors: (!unchanged).then_some(located),
            fds: fds.len() as u32,
            sender_digests,
        };
        Ok((message, fds))
    }

    /// The segments to check when the tensors at `ptrs`, with weightlift's allocations `own`,
    /// are where the receiver last got them described; None when they moved or it never did.
    fn described_as_sent(&self, ptrs: &[u64], own: &[(u64, u64, u64)]) -> Option<&[weightlift_cuda::Segment]> {
        self.last_described.as_ref().filter(|d| d.ptrs == ptrs && d.own == own).map(|d| d.found.as_slice())
    }

    /// Call once `message` and its descriptors reached the receiver.
    pub(crate) fn sent(&mut self, message: &Message) {
        if let Some(described) = self.pending.take() {
            self.last_described = Some(described);
        }
        if let Message::IpcSources { segments: Some(segments), .. } = message {
            self.last_segments = Some(segments.clone());
            for s in segments {
                match s {
                    IpcSegment::Shareable { id, .. } => {
                        self.sent.insert(*id);
                    }
                    IpcSegment::Pieces { pieces, .. } => self.sent_blocks.extend(pieces.iter().map(|p| p.block_id)),
                    IpcSegment::Legacy { .. } => {}
                }
            }
        }
        if let Message::IpcSources { tensors: Some(located), .. } = message {
            self.last_located = Some(located.clone());
        }
    }

    /// Call when the connection may have lost track (a failed update): send everything again.
    pub(crate) fn forget_locations(&mut self) {
        self.last_located = None;
        self.last_segments = None;
        self.last_described = None;
        self.pending = None;
    }

    /// GPU memory held for digesting (descriptors, chunk digests, scratch).
    pub(crate) fn device_bytes(&self) -> u64 {
        self.expected.as_ref().map_or(0, |e| e.parts.iter().map(|(_, batch)| batch.device_bytes()).sum())
    }

    /// The digest of every destination as `plan` writes it from the sources at `ptrs`.
    pub(crate) fn expected_digests(&mut self, gpu: &Gpu, plan: &Plan, ptrs: &[u64]) -> Result<Vec<u64>, CudaError> {
        let whole = [(0..plan.destinations.len() as u32).collect()];
        let (_, batch) = &self.expected_parts(gpu, plan, ptrs, &whole)?[0];
        batch.run(gpu)
    }

    /// One batch per part (destinations of `plan`) computing their digests as `plan` writes
    /// them from the sources at `ptrs`, in the order of `parts`; built again only when the
    /// sources moved or the parts changed.
    pub(crate) fn expected_parts(
        &mut self,
        gpu: &Gpu,
        plan: &Plan,
        ptrs: &[u64],
        parts: &[Vec<u32>],
    ) -> Result<&[(Vec<u32>, ExpectedDigests)], CudaError> {
        let bound = |e: &BoundDigests| e.ptrs == ptrs && e.parts.iter().map(|(p, _)| p).eq(parts.iter());
        if !self.expected.as_ref().is_some_and(bound) {
            self.expected = None; // free the old batches before building the new ones
            let whole = |part: &[u32]| part.len() == plan.destinations.len() && part.iter().copied().eq(0..);
            let built = parts
                .iter()
                .map(|part| {
                    let batch = match whole(part) {
                        true => ExpectedDigests::new(gpu, plan, ptrs)?,
                        false => ExpectedDigests::new(gpu, &plan.restricted_to(part), ptrs)?,
                    };
                    Ok((part.clone(), batch))
                })
                .collect::<Result<Vec<_>, CudaError>>()?;
            self.expected = Some(BoundDigests { ptrs: ptrs.to_vec(), parts: built });
        }
        Ok(&self.expected.as_ref().expect("just bound").parts)
    }
}

/// Expected-digest batches and the source addresses they read.
struct BoundDigests {
    ptrs: Vec<u64>,
    parts: Vec<(Vec<u32>, ExpectedDigests)>,
}

/// Legacy IPC mappings open in this process, by (sender pid, handle, allocation id, GPU). The
/// driver maps a handle once per process and device: receivers of one process (several TP
/// ranks, say) that import the same sender allocation share its mapping, and it is closed when
/// the last lets go. The pid is in the key because allocation ids count from 1 in every
/// sender, and a handle alone is not known to tell two senders apart.
type OpenMappings = Mutex<HashMap<(u32, String, u64, usize), Weak<IpcMapping>>>;

fn open_mappings() -> &'static OpenMappings {
    static OPEN: OnceLock<OpenMappings> = OnceLock::new();
    OPEN.get_or_init(Default::default)
}

/// The mapping of `handle` on `gpu`, opened now (true) or shared with another receiver.
fn open_shared(gpu: &Gpu, pid: u32, handle: &str, buffer_id: u64) -> Result<(Arc<IpcMapping>, bool), String> {
    let mut open = open_mappings().lock().unwrap_or_else(|e| e.into_inner());
    open.retain(|_, weak| weak.strong_count() > 0);
    let key = (pid, handle.to_string(), buffer_id, gpu.ordinal());
    if let Some(mapping) = open.get(&key).and_then(Weak::upgrade) {
        return Ok((mapping, false));
    }
    let raw: [u8; IPC_HANDLE_BYTES] = unhex(handle).ok_or_else(|| format!("malformed IPC handle `{handle}`"))?;
    let mapping = Arc::new(gpu.open_ipc(&raw).map_err(|e| format!("opening the sender's memory: {e}"))?);
    open.insert(key, Arc::downgrade(&mapping));
    Ok((mapping, true))
}

/// What resolving an update's sources did.
pub(crate) struct Resolved {
    /// Device address (in this process) of every source tensor: the importer's own list,
    /// shared, the same one from update to update while the sources stay put.
    pub ptrs: Arc<[u64]>,
    /// Allocations opened for this update (0 once the mappings are warm).
    pub opens: u64,
    /// Whether the sources live on the receiver's own GPU.
    pub same_gpu: bool,
}

/// The receiver's side of one connection: the sender's allocations it has mapped, and the
/// update bound to their addresses.
#[derive(Default)]
pub(crate) struct Importer {
    legacy: HashMap<(String, u64), Arc<IpcMapping>>,
    shareable: HashMap<u64, ImportedAllocation>,
    /// The sender's VMM pieces imported, by block id, and the ranges mapped from them.
    blocks: HashMap<u64, PhysicalMemory>,
    runs: HashMap<PiecesKey, MappedPieces>,
    bound: Option<(Arc<[u64]>, GpuPlan)>,
    /// For a streaming receiver: the update bound per bucket (the plan of the destinations
    /// each completes; None for one that completes none).
    parts: Option<(Arc<[u64]>, BoundParts)>,
    /// The tensor locations of the last update, and where its segments are mapped here (a
    /// sender omits both when unchanged).
    located: Option<Vec<(u32, u64)>>,
    bases: Option<Vec<(u64, u64)>>,
    /// Every source tensor's address here, from `located` and `bases` (dropped when either
    /// changes).
    ptrs: Option<Arc<[u64]>>,
}

impl Importer {
    /// Maps what `IpcSources` names (opening only allocations not mapped yet, closing those
    /// no longer named) and returns every source tensor's address here. Segments the sender
    /// omitted are the last ones: their addresses here are reused as they are.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn resolve(
        &mut self,
        gpu: &Gpu,
        source: &Manifest,
        pid: u32,
        device: &str,
        segments: Option<Vec<IpcSegment>>,
        tensors: Option<Vec<(u32, u64)>>,
        fds: Vec<OwnedFd>,
    ) -> Result<Resolved, String> {
        if let Some(located) = tensors {
            if located.len() != source.len() {
                return Err(format!("{} source locations for {} source tensors", located.len(), source.len()));
            }
            self.located = Some(located);
            self.ptrs = None;
        }
        let same_gpu = gpu.uuid().map(|u| hex(&u) == device).unwrap_or(false);
        let mut opens = 0;
        match segments {
            Some(segments) => {
                self.bases = None;
                self.ptrs = None;
                let bases = if pid == std::process::id() {
                    // The sender's addresses are valid here as they are: nothing to open.
                    if !same_gpu {
                        let uuid = unhex::<16>(device).ok_or_else(|| format!("malformed GPU UUID `{device}`"))?;
                        gpu.enable_peer_access_to(&uuid).map_err(|e| format!("reaching the sender's GPU: {e}"))?;
                    }
                    segments.iter().map(segment_extent).collect()
                } else {
                    let (bases, opened) = self.import(gpu, pid, &segments, fds)?;
                    opens = opened;
                    bases
                };
                self.bases = Some(bases);
            }
            None if !fds.is_empty() => return Err(format!("{} descriptors came without segments", fds.len())),
            None => {}
        }
        let ptrs = match &self.ptrs {
            Some(ptrs) => ptrs.clone(),
            None => {
                let tensors = self.located.as_deref().ok_or("the sender sent no tensor locations")?;
                let bases = self.bases.as_deref().ok_or("the sender sent no segments")?;
                self.ptrs.insert(locate_in(source, tensors, bases)?.into()).clone()
            }
        };
        Ok(Resolved { ptrs, opens, same_gpu })
    }

    /// Maps `segments` of another process (what is not mapped yet), unmaps what they no
    /// longer name: each segment's (address here, bytes), and the allocations opened.
    fn import(
        &mut self,
        gpu: &Gpu,
        pid: u32,
        segments: &[IpcSegment],
        fds: Vec<OwnedFd>,
    ) -> Result<(Vec<(u64, u64)>, u64), String> {
        let legacy_keys: HashSet<(String, u64)> = segments
            .iter()
            .filter_map(|s| match s {
                IpcSegment::Legacy { handle, buffer_id, .. } => Some((handle.clone(), *buffer_id)),
                _ => None,
            })
            .collect();
        let shareable_ids: HashSet<u64> = segments
            .iter()
            .filter_map(|s| match s {
                IpcSegment::Shareable { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let keys: Vec<Option<PiecesKey>> = segments.iter().map(pieces_key).collect();
        let run_keys: HashSet<&PiecesKey> = keys.iter().flatten().collect();
        let block_ids: HashSet<u64> = run_keys.iter().flat_map(|k| k.2.iter().map(|p| p.2)).collect();
        // Close what the sender no longer uses before opening anything (an allocation freed and
        // made again may come back under the same handle).
        let before = (self.legacy.len(), self.shareable.len(), self.runs.len());
        self.legacy.retain(|k, _| legacy_keys.contains(k));
        self.shareable.retain(|id, _| shareable_ids.contains(id));
        self.runs.retain(|k, _| run_keys.contains(k));
        self.blocks.retain(|id, _| block_ids.contains(id));
        if (self.legacy.len(), self.shareable.len(), self.runs.len()) != before {
            self.bound = None;
        }
        let mut opens = 0;
        let mut bases = Vec::with_capacity(segments.len());
        for (segment, key) in segments.iter().zip(&keys) {
            let (base, bytes) = match segment {
                IpcSegment::Legacy { handle, buffer_id, bytes, .. } => {
                    let key = (handle.clone(), *buffer_id);
                    if !self.legacy.contains_key(&key) {
                        let (mapping, opened) = open_shared(gpu, pid, handle, *buffer_id)?;
                        self.legacy.insert(key.clone(), mapping);
                        opens += u64::from(opened);
                    }
                    let mapping = &self.legacy[&key];
                    if *bytes > mapping.len() {
                        return Err(format!(
                            "the sender's allocation {buffer_id} is named with {bytes} bytes, and {} are mapped here",
                            mapping.len()
                        ));
                    }
                    (mapping.device_ptr(), *bytes)
                }
                IpcSegment::Shareable { id, mapped_bytes, fd, .. } => {
                    if let Some(k) = fd {
                        let fd = fds.get(*k as usize).ok_or_else(|| format!("descriptor {k} was not sent"))?;
                        let imported = gpu
                            .import_shareable(fd.as_fd(), *mapped_bytes as usize)
                            .map_err(|e| format!("importing the sender's memory: {e}"))?;
                        self.shareable.insert(*id, imported);
                        opens += 1;
                    }
                    let imported = self
                        .shareable
                        .get(id)
                        .ok_or_else(|| format!("shareable allocation {id} was never sent to this connection"))?;
                    (imported.device_ptr(), *mapped_bytes)
                }
                IpcSegment::Pieces { bytes, pieces, .. } => {
                    for piece in pieces {
                        if let Some(k) = piece.fd {
                            let fd = fds.get(k as usize).ok_or_else(|| format!("descriptor {k} was not sent"))?;
                            let handle = gpu
                                .import_handle(fd.as_fd())
                                .map_err(|e| format!("importing the sender's memory: {e}"))?;
                            self.blocks.insert(piece.block_id, handle);
                            opens += 1;
                        }
                    }
                    let key = key.as_ref().expect("a pieces segment has a key");
                    if !self.runs.contains_key(key) {
                        let mut parts = Vec::with_capacity(pieces.len());
                        for p in pieces {
                            let handle = self.blocks.get(&p.block_id).ok_or_else(|| {
                                format!("memory block {} was never sent to this connection", p.block_id)
                            })?;
                            parts.push((p.offset, p.bytes, handle));
                        }
                        let mapped =
                            gpu.map_pieces(*bytes, &parts).map_err(|e| format!("mapping the sender's memory: {e}"))?;
                        self.runs.insert(key.clone(), mapped);
                    }
                    (self.runs[key].device_ptr(), *bytes)
                }
            };
            bases.push((base, bytes));
        }
        Ok((bases, opens))
    }

    /// The update bound to the resolved sources (bound again only when they moved).
    pub(crate) fn plan(
        &mut self,
        gpu: &Gpu,
        plan: &Plan,
        sources: &Resolved,
        destinations: &[u64],
    ) -> Result<&GpuPlan, CudaError> {
        // The same list as last time (the sources did not move) needs no comparison.
        let unmoved = |bound: &Arc<[u64]>| Arc::ptr_eq(bound, &sources.ptrs) || bound == &sources.ptrs;
        if !self.bound.as_ref().is_some_and(|(bound, _)| unmoved(bound)) {
            self.bound = None;
            let source_gpu = if sources.same_gpu { SourceGpu::This } else { SourceGpu::Peer };
            let bound = GpuPlan::new(gpu, plan, &sources.ptrs, source_gpu, destinations)?;
            self.bound = Some((sources.ptrs.clone(), bound));
        }
        Ok(&self.bound.as_ref().expect("just bound").1)
    }
}

/// Per bucket of a streamed update, its bound plan (None for a bucket that completes nothing).
type BoundParts = Vec<Option<GpuPlan>>;

impl Importer {
    /// As [`Importer::plan`], one bound plan per part: `parts[k]` names the destinations
    /// (plan indices) bucket `k` of a streaming update writes, and its plan writes and
    /// digests those alone.
    pub(crate) fn plan_parts(
        &mut self,
        gpu: &Gpu,
        plan: &Plan,
        sources: &Resolved,
        destinations: &[u64],
        parts: &[Vec<u32>],
    ) -> Result<&[Option<GpuPlan>], CudaError> {
        let unmoved = |bound: &Arc<[u64]>| Arc::ptr_eq(bound, &sources.ptrs) || bound == &sources.ptrs;
        if !self.parts.as_ref().is_some_and(|(bound, _)| unmoved(bound)) {
            self.parts = None;
            let source_gpu = if sources.same_gpu { SourceGpu::This } else { SourceGpu::Peer };
            let bound = parts
                .iter()
                .map(|part| {
                    if part.is_empty() {
                        return Ok(None);
                    }
                    let ptrs: Vec<u64> = part.iter().map(|&d| destinations[d as usize]).collect();
                    let mut bound = GpuPlan::new(gpu, &plan.restricted_to(part), &sources.ptrs, source_gpu, &ptrs)?;
                    // Bucket k folds while bucket k + 1 copies.
                    bound.set_fold_aside();
                    Ok(Some(bound))
                })
                .collect::<Result<Vec<_>, CudaError>>()?;
            self.parts = Some((sources.ptrs.clone(), bound));
        }
        Ok(&self.parts.as_ref().expect("just bound").1)
    }
}

/// A segment's start in the sender's process and its length.
fn segment_extent(segment: &IpcSegment) -> (u64, u64) {
    match segment {
        IpcSegment::Legacy { base, bytes, .. } | IpcSegment::Pieces { base, bytes, .. } => (*base, *bytes),
        IpcSegment::Shareable { base, mapped_bytes, .. } => (*base, *mapped_bytes),
    }
}

/// What identifies a mapping of VMM pieces: the sender's range and its (offset, bytes, block
/// id) pieces; any change maps it afresh.
type PiecesKey = (u64, u64, Vec<(u64, u64, u64)>);

fn pieces_key(segment: &IpcSegment) -> Option<PiecesKey> {
    match segment {
        IpcSegment::Pieces { base, bytes, pieces } => {
            Some((*base, *bytes, pieces.iter().map(|p| (p.offset, p.bytes, p.block_id)).collect()))
        }
        _ => None,
    }
}

/// Every source tensor's address, from its (segment, offset) and the segments' (base, bytes);
/// a tensor that does not fit its segment is an error naming it.
fn locate_in(source: &Manifest, tensors: &[(u32, u64)], bases: &[(u64, u64)]) -> Result<Vec<u64>, String> {
    let mut ptrs = Vec::with_capacity(tensors.len());
    for (spec, &(segment, offset)) in source.iter().zip(tensors) {
        let &(base, bytes) = bases
            .get(segment as usize)
            .ok_or_else(|| format!("`{}` is in segment {segment}, which was not described", spec.name))?;
        if offset.checked_add(spec.byte_len()).is_none_or(|end| end > bytes) {
            return Err(format!(
                "`{}` ({} bytes at offset {offset}) does not fit its segment of {bytes} bytes",
                spec.name,
                spec.byte_len()
            ));
        }
        ptrs.push(base + offset);
    }
    Ok(ptrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_description_the_receiver_got_lets_later_updates_skip_it() {
        let described = |ptr: u64| Described { ptrs: vec![ptr], own: Vec::new(), found: Vec::new() };
        let message = Message::IpcSources {
            pid: 1,
            device: "00".into(),
            segments: Some(Vec::new()),
            tensors: Some(vec![(0, 0)]),
            fds: 0,
            sender_digests: false,
        };
        let mut exporter = Exporter { pending: Some(described(0x1000)), ..Exporter::default() };
        assert!(exporter.described_as_sent(&[0x1000], &[]).is_none(), "not sent yet");
        exporter.sent(&message);
        assert!(exporter.described_as_sent(&[0x1000], &[]).is_some());
        assert!(exporter.described_as_sent(&[0x2000], &[]).is_none(), "moved");
        assert!(exporter.described_as_sent(&[0x1000], &[(1, 0x1000, 64)]).is_none(), "other allocations");
        // The tensors moved and that update was refused before its description went out: the
        // receiver still has the first one, so the second must not be taken as sent.
        exporter.pending = Some(described(0x2000));
        assert!(exporter.described_as_sent(&[0x2000], &[]).is_none());
        assert!(exporter.described_as_sent(&[0x1000], &[]).is_some());
        exporter.forget_locations();
        assert!(exporter.described_as_sent(&[0x1000], &[]).is_none(), "forgotten");
    }

    #[test]
    fn handles_round_trip_through_hex() {
        let raw: [u8; IPC_HANDLE_BYTES] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(unhex::<IPC_HANDLE_BYTES>(&hex(&raw)), Some(raw));
        assert_eq!(unhex::<4>("zz00aa11"), None);
        assert_eq!(unhex::<4>("00aa11"), None);
    }
}
