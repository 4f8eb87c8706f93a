//! Where tensor bytes live: the sender's source tensors and the receiver's destinations.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use weightlift_core::region::strided_copies;
use weightlift_core::{digest, Manifest, ModelConfig, Placement, TensorSpec};
use weightlift_cuda::{resident_share, FileReader, MappedFile, ReadMode};

use crate::safetensors_dir::{SafetensorsDir, SourceError};

/// The sender's tensors, indexed like its source manifest.
pub trait SourceTensors: Sync {
    fn manifest(&self) -> &Manifest;
    fn bytes(&self, index: usize) -> &[u8];
    /// For tensors in files: a reader of tensor `index`'s file (`mode` [`ReadMode::Direct`]:
    /// one that goes around the page cache where the file system allows; buffered: through
    /// it) and where the tensor starts in it; None for tensors in memory.
    fn on_disk(&self, _index: usize, _mode: ReadMode) -> Option<(&FileReader, u64)> {
        None
    }
    /// For tensors in files: the share of the files' bytes in the page cache now (0 to 1).
    fn resident_fraction(&self) -> Option<f64> {
        None
    }
    /// A number no other mapping of sources in this process shares, for sources whose memory
    /// is mapped by the object and unmapped with it (a checkpoint): a page-lock of their
    /// addresses holds for these sources only, not for a later map at the same addresses.
    /// None for memory the caller keeps allocated (see [`crate::SenderOptions::pin_sources`]).
    fn mapping_id(&self) -> Option<u64> {
        None
    }
}

/// The receiver's parameters, written in place, indexed like its destination manifest.
pub trait DestinationTensors: Send {
    fn manifest(&self) -> &Manifest;
    fn bytes(&self, index: usize) -> &[u8];
    fn bytes_mut(&mut self, index: usize) -> &mut [u8];
    /// Every tensor at once, so disjoint parts of several can be written in parallel.
    fn all_mut(&mut self) -> Vec<&mut [u8]>;
}

/// Tensors in host memory, one buffer each.
#[derive(Debug, Clone)]
pub struct HostTensors {
    manifest: Manifest,
    data: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
#[error("buffer for `{tensor}` holds {actual} bytes but its spec needs {expected}")]
pub struct BufferSizeError {
    pub tensor: String,
    pub expected: u64,
    pub actual: u64,
}

impl HostTensors {
    /// Wraps buffers, checking each has exactly its spec's size.
    pub fn new(manifest: Manifest, data: Vec<Vec<u8>>) -> Result<HostTensors, BufferSizeError> {
        for (spec, buf) in manifest.iter().zip(&data) {
            if spec.byte_len() != buf.len() as u64 {
                return Err(BufferSizeError {
                    tensor: spec.name.clone(),
                    expected: spec.byte_len(),
                    actual: buf.len() as u64,
                });
            }
        }
        assert_eq!(manifest.len(), data.len(), "one buffer per spec");
        Ok(HostTensors { manifest, data })
    }

    /// Resident buffers filled with `byte` (the engine's weights before the first update).
    /// Every page is written now: zeroed allocations are mapped lazily, and the first update
    /// would otherwise pay a page fault per 4 KiB.
    pub fn filled(manifest: Manifest, byte: u8) -> HostTensors {
        let data = manifest
            .iter()
            .map(|s| {
                let mut buf = vec![byte; s.byte_len() as usize];
                for page in buf.chunks_mut(4096) {
                    page[0] = std::hint::black_box(byte);
                }
                buf
            })
            .collect();
        HostTensors { manifest, data }
    }

    /// A synthetic model's tensors with deterministic pseudo-random small values. For 16-bit
    /// floats the values are finite (no NaN or Inf), like real weights.
    pub fn synthetic(config: &ModelConfig, seed: u64) -> HostTensors {
        let manifest = config.source_manifest();
        let data = manifest
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let mut state = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut buf = vec![0u8; spec.byte_len() as usize];
                for chunk in buf.chunks_exact_mut(8) {
                    // xorshift64*, then clear each 16-bit lane's top exponent bits so every
                    // bf16/f16 lane is a small finite value.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D) & 0xBFFF_BFFF_BFFF_BFFF;
                    chunk.copy_from_slice(&v.to_le_bytes());
                }
                buf
            })
            .collect();
        HostTensors { manifest, data }
    }

    /// One sender's pieces of these (whole) tensors: of tensor `i` the box at `boxes[i].0` of
    /// shape `boxes[i].1` (empty where any dim is 0), with each piece's placement in its whole:
    /// what one rank of a sharded trainer holds.
    pub fn cut(&self, boxes: &[(Vec<u64>, Vec<u64>)]) -> (HostTensors, Vec<Option<Placement>>) {
        assert_eq!(boxes.len(), self.manifest.len(), "one box per tensor");
        let mut specs = Vec::with_capacity(boxes.len());
        let mut data = Vec::with_capacity(boxes.len());
        let mut placements = Vec::with_capacity(boxes.len());
        for ((spec, bytes), (offset, shape)) in self.manifest.iter().zip(&self.data).zip(boxes) {
            let piece = TensorSpec { shape: shape.clone(), ..spec.clone() };
            let elt = spec.dtype.size() as usize;
            let mut out = vec![0u8; piece.byte_len() as usize];
            if !out.is_empty() {
                let zeros = vec![0; shape.len()];
                for c in strided_copies(&spec.shape, offset, shape, &zeros, shape) {
                    for r in 0..c.rows {
                        let (s, d) =
                            ((c.src_offset + r * c.src_stride) as usize, (c.dst_offset + r * c.dst_stride) as usize);
                        let n = c.row_elems as usize * elt;
                        out[d * elt..d * elt + n].copy_from_slice(&bytes[s * elt..s * elt + n]);
                    }
                }
            }
            placements.push(Some(Placement { offset: offset.clone(), whole: spec.shape.clone() }));
            specs.push(piece);
            data.push(out);
        }
        let manifest = Manifest::new(specs).expect("the pieces keep the whole tensors' names");
        (HostTensors { manifest, data }, placements)
    }

    /// What FSDP2 gives rank `rank` of `world`: dim 0 of every tensor cut as `torch.chunk`
    /// cuts it (pieces of ceil(rows / world) rows, the last ranks' shorter or empty).
    pub fn fsdp_shard(&self, rank: u32, world: u32) -> (HostTensors, Vec<Option<Placement>>) {
        self.cut(&fsdp_boxes(&self.manifest, rank, world))
    }

    /// A copy of any source's tensors in host memory (a checkpoint to step in a demo).
    pub fn copy_of(source: &dyn SourceTensors) -> HostTensors {
        let manifest = source.manifest().clone();
        let data = (0..manifest.len()).map(|i| source.bytes(i).to_vec()).collect();
        HostTensors { manifest, data }
    }

    /// One optimizer-like step: every 16-bit lane's low mantissa bits move by one, so every
    /// element of every tensor changes and an update carries all-new bytes.
    pub fn perturb(&mut self) {
        const LOW: u64 = 0x007F_007F_007F_007F;
        const ONE: u64 = 0x0001_0001_0001_0001;
        for buf in &mut self.data {
            for chunk in buf.chunks_exact_mut(8) {
                let v = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                let stepped = (v & !LOW) | (((v & LOW) + ONE) & LOW);
                chunk.copy_from_slice(&stepped.to_le_bytes());
            }
            for b in buf.chunks_exact_mut(8).into_remainder() {
                *b ^= 1;
            }
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Digest of each tensor as it is now.
    pub fn digests(&self) -> Vec<u64> {
        self.data.iter().map(|b| digest::digest(b)).collect()
    }

    /// Every tensor's bytes, in manifest order.
    pub fn data(&self) -> &[Vec<u8>] {
        &self.data
    }

    pub fn into_parts(self) -> (Manifest, Vec<Vec<u8>>) {
        (self.manifest, self.data)
    }
}

impl SourceTensors for HostTensors {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn bytes(&self, index: usize) -> &[u8] {
        &self.data[index]
    }
}

impl DestinationTensors for HostTensors {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    fn bytes(&self, index: usize) -> &[u8] {
        &self.data[index]
    }
    fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        &mut self.data[index]
    }
    fn all_mut(&mut self) -> Vec<&mut [u8]> {
        self.data.iter_mut().map(Vec::as_mut_slice).collect()
    }
}

/// A checkpoint directory's tensors, memory-mapped: bytes come from the page cache.
pub struct CheckpointTensors {
    dir: SafetensorsDir,
    files: Vec<MappedFile>,
    /// The same files, for large reads that bypass the page cache where it is cold.
    readers: Vec<FileReader>,
    /// The same files again, opened anew (the direct flag belongs to an open file, shared by
    /// its duplicates), for reads through the page cache where it is warm.
    buffered: Vec<FileReader>,
    /// See [`SourceTensors::mapping_id`].
    mapping_id: u64,
}

impl CheckpointTensors {
    /// Reads the headers of the checkpoint at `path` and maps its files: the very files whose
    /// headers were read and checked (regular files only).
    pub fn open(path: &Path) -> Result<CheckpointTensors, SourceError> {
        let (dir, opened) = SafetensorsDir::open_files(path)?;
        let files = dir
            .files
            .iter()
            .zip(opened)
            .map(|(path, (file, len))| {
                let io = |source| SourceError::Io { path: path.clone(), source };
                // The very file opened and checked, by its descriptor, not its path.
                let again = File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(io)?;
                let buffered = FileReader::from_file(again, path, ReadMode::Buffered)
                    .map_err(|e| SourceError::Read(Box::new(e)))?;
                let reader = FileReader::from_file(file.try_clone().map_err(io)?, path, ReadMode::Direct)
                    .map_err(|e| SourceError::Read(Box::new(e)))?;
                let mapped = MappedFile::from_file(file, path)?;
                // The header's ranges were checked against `len`; a file that changed since
                // would have tensors past the end of its map.
                if mapped.len() as u64 != len {
                    return Err(SourceError::Malformed {
                        path: path.clone(),
                        reason: format!("it changed while read: {len} bytes at its header, {} mapped", mapped.len()),
                    });
                }
                Ok((mapped, (reader, buffered)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (files, readers): (Vec<_>, Vec<_>) = files.into_iter().unzip();
        let (readers, buffered) = readers.into_iter().unzip();
        static MAPPINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mapping_id = MAPPINGS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(CheckpointTensors { dir, files, readers, buffered, mapping_id })
    }

    pub fn dir(&self) -> &SafetensorsDir {
        &self.dir
    }
}

impl SourceTensors for CheckpointTensors {
    fn manifest(&self) -> &Manifest {
        &self.dir.manifest
    }
    fn bytes(&self, index: usize) -> &[u8] {
        let loc = &self.dir.locations[index];
        &self.files[loc.file].as_slice()[loc.offset as usize..(loc.offset + loc.len) as usize]
    }
    fn on_disk(&self, index: usize, mode: ReadMode) -> Option<(&FileReader, u64)> {
        let loc = &self.dir.locations[index];
        let readers = match mode {
            ReadMode::Direct => &self.readers,
            ReadMode::Buffered => &self.buffered,
        };
        Some((&readers[loc.file], loc.offset))
    }
    fn mapping_id(&self) -> Option<u64> {
        Some(self.mapping_id)
    }
    fn resident_fraction(&self) -> Option<f64> {
        let total: u64 = self.readers.iter().map(FileReader::len).sum();
        // A file whose residency cannot be read counts as resident: the page cache path is
        // right either way, only slower when it is not. Sampled, as every update asks.
        let resident: f64 = self
            .dir
            .files
            .iter()
            .zip(&self.readers)
            .map(|(p, r)| resident_share(p).unwrap_or(1.0) * r.len() as f64)
            .sum();
        Some(if total == 0 { 1.0 } else { resident / total as f64 })
    }
}

/// Rank `rank` of `world`'s FSDP2 box of each tensor of `whole` (see
/// [`HostTensors::fsdp_shard`]): (offset, shape).
pub fn fsdp_boxes(whole: &Manifest, rank: u32, world: u32) -> Vec<(Vec<u64>, Vec<u64>)> {
    whole
        .iter()
        .map(|spec| {
            let mut offset = vec![0; spec.shape.len()];
            let mut shape = spec.shape.clone();
            if let (Some(first), Some(&rows)) = (shape.first_mut(), spec.shape.first()) {
                let (start, end) = weightlift_core::cluster::fsdp_rows(rows, rank, world);
                *first = end - start;
                offset[0] = start;
            }
            (offset, shape)
        })
        .collect()
}

/// The manifest of rank `rank` of `world`'s FSDP2 pieces of `whole`, and their placements:
/// what [`HostTensors::fsdp_shard`] holds, without the bytes.
pub fn fsdp_pieces(whole: &Manifest, rank: u32, world: u32) -> (Manifest, Vec<Option<Placement>>) {
    let boxes = fsdp_boxes(whole, rank, world);
    let specs = whole.iter().zip(&boxes).map(|(spec, (_, shape))| TensorSpec { shape: shape.clone(), ..spec.clone() });
    let placements = whole
        .iter()
        .zip(&boxes)
        .map(|(spec, (offset, _))| Some(Placement { offset: offset.clone(), whole: spec.shape.clone() }))
        .collect();
    (Manifest::new(specs.collect()).expect("the pieces keep the whole tensors' names"), placements)
}
