//! Reading files from disk in large sequential reads, with `O_DIRECT` where the filesystem takes
//! it: the cold path for checkpoints that are not in the page cache.
//!
//! - [`FileReader`] reads any byte range of one file, in [`ReadMode::Direct`] (`O_DIRECT`: the
//!   device writes straight into the caller's buffer, nothing goes through or stays in the page
//!   cache) where the filesystem accepts it, and [`ReadMode::Buffered`] otherwise; it says which.
//! - [`AlignedBuffer`]: page-aligned host memory to read into (direct reads need aligned buffers).
//!   Page-lock it with [`Gpu::register_host`](crate::Gpu::register_host) to copy from it to a GPU.
//! - [`drop_cached`] evicts a file's clean pages from the page cache, so a benchmark can read it
//!   cold without root; [`resident_bytes`] says how much of it is cached.
//! - [`sequential_read_rate`] reads whole files front to back: the ceiling a disk-to-GPU transfer
//!   is measured against.
//!
//! Direct reads are faster for cold files (no copy through the cache, no readahead limits, no
//! cache to evict) and slower for warm ones (they go to the device even when the bytes are in
//! memory): a caller that finds a file mostly cached ([`resident_bytes`]) should read it buffered.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Direct reads are done in whole blocks of this size: file offsets, lengths and buffer
/// addresses are multiples of it. 4096 covers the logical block size of the devices in use
/// (512 or 4096 bytes); a filesystem that wants more fails the probe read at open, and the file
/// is read buffered.
pub const DIRECT_ALIGN: usize = 4096;

/// The chunk [`sequential_read_rate`] reads in when asked for 0: large enough that the device
/// gets many requests in flight from one direct read, small enough to stay in cache-friendly
/// host memory.
pub const SEQUENTIAL_CHUNK: usize = 64 << 20;

/// [`FileReader::read_at`] bounces direct reads through a buffer of at most this many bytes.
const BOUNCE_BYTES: usize = 8 << 20;

/// `statfs` magic numbers of memory-backed filesystems: nothing to bypass under them, so their
/// files are read buffered even where they accept `O_DIRECT` (tmpfs does since Linux 6.6).
const TMPFS_MAGIC: u32 = 0x0102_1994;
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// How a [`FileReader`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// `O_DIRECT`: from the device into the buffer, bypassing the page cache.
    Direct,
    /// Plain reads through the page cache (with sequential readahead advised).
    Buffered,
}

impl ReadMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::Direct => "direct",
            ReadMode::Buffered => "buffered",
        }
    }
}

impl fmt::Display for ReadMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a file could not be opened, read or advised on; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A system call on `path` other than a read failed; `call` names it (`open`, `fstat`,
    /// `fcntl`, `posix_fadvise`, `mmap`, `mincore`).
    #[error("{call} {}: {source}", path.display())]
    Io { call: &'static str, path: PathBuf, source: io::Error },
    /// Reading `len` bytes at `offset` failed (an end of file before them reads as
    /// [`io::ErrorKind::UnexpectedEof`]: the file shrank since it was opened).
    #[error("{}: reading {len} bytes at offset {offset}: {source}", path.display())]
    Read { path: PathBuf, offset: u64, len: u64, source: io::Error },
    /// The range does not lie inside the file (as long as it was when opened).
    #[error("{}: {len} bytes at offset {offset} run past the end of the file ({file_len} bytes)", path.display())]
    PastEnd { path: PathBuf, offset: u64, len: u64, file_len: u64 },
    /// A direct read into memory at `address`, of `len` bytes at `offset`, where one of the three
    /// is not a multiple of [`DIRECT_ALIGN`] ([`FileReader::read_into`]).
    #[error("{}: a direct read of {len} bytes at offset {offset} into address {address:#x} is not aligned to {DIRECT_ALIGN} bytes", path.display())]
    Misaligned { path: PathBuf, offset: u64, len: u64, address: usize },
    /// The buffer given to [`FileReader::read_range`] is smaller than [`FileReader::span`].
    #[error("{}: reading {len} bytes at offset {offset} needs a {needed}-byte buffer, this one has {capacity}", path.display())]
    BufferTooSmall { path: PathBuf, offset: u64, len: u64, needed: usize, capacity: usize },
}

/// Host memory whose start and length are multiples of [`DIRECT_ALIGN`], zeroed, with every page
/// touched at creation (so the first read into it pays no page faults, which would otherwise
/// land in a timed read).
pub struct AlignedBuffer {
    memory: Vec<u8>,
    /// Where the aligned part starts in `memory`.
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    /// At least `len` bytes: `len` rounded up to a multiple of [`DIRECT_ALIGN`], and at least one
    /// block.
    pub fn new(len: usize) -> AlignedBuffer {
        let len = len.max(1).next_multiple_of(DIRECT_ALIGN);
        let mut memory = vec![0u8; len + DIRECT_ALIGN];
        let start = (memory.as_ptr() as usize).next_multiple_of(DIRECT_ALIGN) - memory.as_ptr() as usize;
        // `vec!` of zeros maps pages lazily; one write a page faults them all in now. The value
        // is hidden from the optimiser, which could otherwise drop stores of zero to memory it
        // knows is zeroed.
        for byte in memory[start..start + len].iter_mut().step_by(DIRECT_ALIGN) {
            *byte = std::hint::black_box(0);
        }
        AlignedBuffer { memory, start, len }
    }

    /// Its length in bytes (a multiple of [`DIRECT_ALIGN`]).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a buffer holds at least one block.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.memory[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.memory[self.start..self.start + self.len]
    }
}

impl fmt::Debug for AlignedBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuffer").field("len", &self.len).finish()
    }
}

/// One open file, read in large positional reads (`pread`), direct where the filesystem takes it.
///
/// # Alignment
///
/// Direct reads need the file offset, the length and the buffer address aligned to the device's
/// block. [`read_range`](FileReader::read_range) reads the aligned superset of the range (the
/// range widened to whole [`DIRECT_ALIGN`] blocks at both ends) into an [`AlignedBuffer`] and
/// returns the sub-slice holding the range, rather than bouncing the unaligned head and tail
/// through a second buffer: that is one system call per range and no copy at all, and the cost,
/// at most two extra blocks read per range, is nothing next to tensors of megabytes. The
/// sub-slice starts at `offset % DIRECT_ALIGN` in the buffer in both modes, so a caller can lay
/// out its buffer once. [`read_at`](FileReader::read_at) is the convenience for an arbitrary
/// destination: it reads direct through a bounce buffer and copies.
///
/// # Requirement
///
/// As for [`MappedFile`](crate::MappedFile), the file must not be truncated or modified in place
/// while it is read; here that gives an error or torn bytes, never undefined behaviour.
pub struct FileReader {
    file: File,
    path: PathBuf,
    /// The file's length when opened; ranges are checked against it.
    len: u64,
    mode: ReadMode,
    /// [`read_at`](FileReader::read_at)'s bounce buffer for direct reads, made at first use.
    bounce: Mutex<Option<AlignedBuffer>>,
}

impl FileReader {
    /// Opens `path` to read, direct if `prefer` is [`ReadMode::Direct`] and the filesystem takes
    /// it (see [`from_file`](FileReader::from_file)).
    pub fn open(path: &Path, prefer: ReadMode) -> Result<FileReader, ReadError> {
        let file = File::open(path).map_err(io_error("open", path))?;
        FileReader::from_file(file, path, prefer)
    }

    /// Reads `file`, already open for reading (a caller that checked what it opened passes the
    /// very descriptor it checked); `path` names it in errors.
    ///
    /// With `prefer` [`ReadMode::Direct`], `O_DIRECT` is set on the descriptor unless the file
    /// is on a memory-backed filesystem (tmpfs, ramfs: nothing to bypass). When the filesystem
    /// refuses the flag, or a probe read of the first block fails with `EINVAL` (a filesystem
    /// that takes the flag but wants other alignment), the flag is cleared again and the file is
    /// read buffered; [`mode`](FileReader::mode) says which. The flag is toggled on the
    /// descriptor rather than the file reopened, so what is read is the file the caller opened
    /// (the flag is shared with any duplicate of the descriptor). Buffered descriptors are
    /// advised `POSIX_FADV_SEQUENTIAL` (larger readahead).
    pub fn from_file(file: File, path: &Path, prefer: ReadMode) -> Result<FileReader, ReadError> {
        let len = file.metadata().map_err(io_error("fstat", path))?.len();
        let mode = match prefer {
            ReadMode::Direct if !memory_backed(&file, path)? && set_direct(&file, path, true)? => {
                if probe_direct(&file, path, len)? {
                    ReadMode::Direct
                } else {
                    set_direct(&file, path, false)?;
                    ReadMode::Buffered
                }
            }
            _ => ReadMode::Buffered,
        };
        if mode == ReadMode::Buffered {
            // SAFETY: a plain system call on a descriptor `file` owns; no memory is passed.
            // Its result is ignored: the advice is a hint and reads are correct without it.
            let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        }
        Ok(FileReader { file, path: path.to_path_buf(), len, mode, bounce: Mutex::new(None) })
    }

    /// How this file is read.
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    /// The file's length in bytes when it was opened.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open descriptor (for registering it with cuFile).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The bytes of buffer [`read_range`](FileReader::read_range) needs for `len` bytes at
    /// `offset`: the range widened to whole blocks. `len + 2 * DIRECT_ALIGN` always suffices.
    pub fn span(offset: u64, len: usize) -> usize {
        (head(offset) + len).next_multiple_of(DIRECT_ALIGN)
    }

    /// Reads `len` bytes at `offset` into `buffer` and returns them: the sub-slice
    /// `buffer[offset % DIRECT_ALIGN..][..len]` (see the type's notes on alignment). `buffer`
    /// must hold [`span`](FileReader::span)`(offset, len)` bytes; bytes of it outside the
    /// returned slice may be overwritten. Many threads may read one file at once, each into its
    /// own buffer.
    pub fn read_range<'b>(
        &self,
        offset: u64,
        len: usize,
        buffer: &'b mut AlignedBuffer,
    ) -> Result<&'b [u8], ReadError> {
        self.check_range(offset, len)?;
        let needed = FileReader::span(offset, len);
        if buffer.len() < needed {
            return Err(ReadError::BufferTooSmall {
                path: self.path.clone(),
                offset,
                len: len as u64,
                needed,
                capacity: buffer.len(),
            });
        }
        let head = head(offset);
        if len == 0 {
            return Ok(&buffer.as_slice()[head..head]);
        }
        let bytes = buffer.as_mut_slice();
        match self.mode {
            // Whole blocks from the block the range starts in; the read may stop short at the end
            // of the file, which lies past the range (checked above).
            ReadMode::Direct => {
                self.read_full(&mut bytes[..needed], offset - head as u64, head + len, offset, len as u64)?
            }
            ReadMode::Buffered => self.read_full(&mut bytes[head..head + len], offset, len, offset, len as u64)?,
        }
        Ok(&buffer.as_slice()[head..head + len])
    }

    /// Reads `dst.len()` bytes at `offset` into `dst`, which may lie anywhere. Buffered files are
    /// read straight into it; direct ones through a bounce buffer of up to 8 MiB that is kept for
    /// the next call (one at a time: concurrent readers of one direct file should use
    /// [`read_range`](FileReader::read_range) with buffers of their own).
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<(), ReadError> {
        self.check_range(offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        if self.mode == ReadMode::Buffered {
            return self.read_full(dst, offset, dst.len(), offset, dst.len() as u64);
        }
        let mut bounce = self.bounce.lock().unwrap_or_else(|e| e.into_inner());
        // Every piece after the first starts `BOUNCE_BYTES` (whole blocks) further on, so at the
        // same place in its block: none needs more than the first.
        let needed = FileReader::span(offset, dst.len().min(BOUNCE_BYTES));
        if bounce.as_ref().is_none_or(|b| b.len() < needed) {
            *bounce = Some(AlignedBuffer::new(needed));
        }
        let bounce = bounce.as_mut().expect("made just above");
        for (i, piece) in dst.chunks_mut(BOUNCE_BYTES).enumerate() {
            let at = offset + (i * BOUNCE_BYTES) as u64;
            piece.copy_from_slice(self.read_range(at, piece.len(), bounce)?);
        }
        Ok(())
    }

    /// Reads the file from `offset` into `dst`, straight into it in both modes: the bytes of
    /// `offset..offset + dst.len()` that lie in the file, and returns how many that is. For
    /// [`ReadMode::Direct`], `offset`, `dst`'s address and its length must be multiples of
    /// [`DIRECT_ALIGN`] ([`ReadError::Misaligned`] otherwise); `offset` must lie in the file.
    pub fn read_into(&self, offset: u64, dst: &mut [u8]) -> Result<usize, ReadError> {
        if offset > self.len {
            return Err(ReadError::PastEnd {
                path: self.path.clone(),
                offset,
                len: dst.len() as u64,
                file_len: self.len,
            });
        }
        let need = (dst.len() as u64).min(self.len - offset) as usize;
        if self.mode == ReadMode::Direct {
            let address = dst.as_ptr() as usize;
            let aligned = |n: usize| n % DIRECT_ALIGN == 0;
            if !(aligned(offset as usize) && aligned(address) && aligned(dst.len())) {
                return Err(ReadError::Misaligned { path: self.path.clone(), offset, len: dst.len() as u64, address });
            }
            // Whole blocks: the read stops short only at the end of the file, past `need`.
            self.read_full(dst, offset, need, offset, need as u64)?;
        } else {
            self.read_full(&mut dst[..need], offset, need, offset, need as u64)?;
        }
        Ok(need)
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), ReadError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(ReadError::PastEnd { path: self.path.clone(), offset, len: len as u64, file_len: self.len });
        }
        Ok(())
    }

    /// Reads into `buf` from file offset `at` until at least `need` bytes are in, retrying short
    /// and interrupted reads. `offset` and `len` name the caller's range in errors.
    fn read_full(&self, buf: &mut [u8], at: u64, need: usize, offset: u64, len: u64) -> Result<(), ReadError> {
        let mut done = 0;
        while done < need {
            match self.file.read_at(&mut buf[done..], at + done as u64) {
                Ok(0) => {
                    let source = io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early");
                    return Err(ReadError::Read { path: self.path.clone(), offset, len, source });
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(ReadError::Read { path: self.path.clone(), offset, len, source }),
            }
        }
        Ok(())
    }
}

impl fmt::Debug for FileReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileReader")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("mode", &self.mode)
            .finish()
    }
}

/// Where `offset` lies in its block.
fn head(offset: u64) -> usize {
    (offset % DIRECT_ALIGN as u64) as usize
}

fn io_error<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ReadError + 'a {
    move |source| ReadError::Io { call, path: path.to_path_buf(), source }
}

/// Whether `file` lies on tmpfs or ramfs.
fn memory_backed(file: &File, path: &Path) -> Result<bool, ReadError> {
    // SAFETY: `statfs` is plain old data, for which all zeros is a valid value.
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `stats` is a valid, writable `statfs` for the call to fill; the descriptor is
    // owned by `file`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stats) } != 0 {
        return Err(io_error("fstatfs", path)(io::Error::last_os_error()));
    }
    // `f_type` is signed or unsigned, 32 or 64 bits wide, by platform; the magics are 32-bit.
    let kind = stats.f_type as u32;
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
}

/// Sets (or clears) `O_DIRECT` on `file`; `Ok(false)` when the filesystem refuses it (`EINVAL`).
fn set_direct(file: &File, path: &Path, on: bool) -> Result<bool, ReadError> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io_error("fcntl", path)(io::Error::last_os_error()));
    }
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: F_SETFL takes an int of flags; only the descriptor's status flags change.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        let error = io::Error::last_os_error();
        if on && error.raw_os_error() == Some(libc::EINVAL) {
            return Ok(false);
        }
        return Err(io_error("fcntl", path)(error));
    }
    Ok(true)
}

/// Reads the first block of a file just set `O_DIRECT`, aligned as every later read will be:
/// `Ok(false)` when that fails with `EINVAL` (the filesystem wants other alignment, or does not
/// read direct after all).
fn probe_direct(file: &File, path: &Path, len: u64) -> Result<bool, ReadError> {
    if len == 0 {
        return Ok(true);
    }
    let mut block = AlignedBuffer::new(DIRECT_ALIGN);
    loop {
        match file.read_at(block.as_mut_slice(), 0) {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(false),
            Err(source) => {
                return Err(ReadError::Read { path: path.to_path_buf(), offset: 0, len: DIRECT_ALIGN as u64, source })
            }
        }
    }
}

/// Asks the kernel to drop the file's pages from the page cache (`POSIX_FADV_DONTNEED` over the
/// whole file), so the next read of it is cold; no root needed.
///
/// Only a hint, and only clean pages go: the file's dirty pages are written back first
/// (`fdatasync`, whose failure is ignored: those pages then stay), but pages mapped or locked by
/// any process, or written by another process after the call, stay cached. A benchmark that
/// must know checks with [`resident_bytes`].
pub fn drop_cached(path: &Path) -> Result<(), ReadError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let _ = file.sync_data();
    // SAFETY: a plain system call on a descriptor `file` owns; no memory is passed.
    let code = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if code != 0 {
        // posix_fadvise returns the error number rather than setting errno.
        return Err(io_error("posix_fadvise", path)(io::Error::from_raw_os_error(code)));
    }
    Ok(())
}

/// How many bytes of the file are in the page cache now (`mincore` over a map of it), whole
/// pages counted, at most the file's length.
pub fn resident_bytes(path: &Path) -> Result<u64, ReadError> {
    let Some(pages) = PageMap::open(path)? else { return Ok(0) };
    let resident = pages.resident_in(0, pages.count())?;
    Ok((resident as u64 * pages.page as u64).min(pages.len as u64))
}

/// Windows of pages [`resident_share`] looks at, and pages in each.
const SAMPLED_WINDOWS: usize = 1024;
const WINDOW_PAGES: usize = 16;

/// The share of the file's pages in the page cache now, from evenly spaced windows of its pages
/// (every page of a file of up to 16,384 pages): asking about every page costs a page-cache
/// lookup each, which a reader deciding how to read each update would pay each update. A file
/// of no bytes counts as resident.
pub fn resident_share(path: &Path) -> Result<f64, ReadError> {
    let Some(pages) = PageMap::open(path)? else { return Ok(1.0) };
    let count = pages.count();
    if count <= SAMPLED_WINDOWS * WINDOW_PAGES {
        return Ok(pages.resident_in(0, count)? as f64 / count as f64);
    }
    let stride = count / SAMPLED_WINDOWS;
    let mut resident = 0;
    for w in 0..SAMPLED_WINDOWS {
        resident += pages.resident_in(w * stride, WINDOW_PAGES)?;
    }
    Ok(resident as f64 / (SAMPLED_WINDOWS * WINDOW_PAGES) as f64)
}

/// A map of a file that is never read or written through, only asked about with `mincore`.
struct PageMap<'a> {
    path: &'a Path,
    map: memmap2::Mmap,
    len: usize,
    page: usize,
}

impl PageMap<'_> {
    /// None for a file of no bytes (nothing to map).
    fn open(path: &Path) -> Result<Option<PageMap<'_>>, ReadError> {
        let file = File::open(path).map_err(io_error("open", path))?;
        let len = file.metadata().map_err(io_error("fstat", path))?.len();
        if len == 0 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| {
            io_error("mmap", path)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file is larger than the address space",
            ))
        })?;
        // SAFETY: the map is never read or written through: only `mincore` looks at its pages'
        // residency, which is sound whatever happens to the file meanwhile (a truncated file's
        // pages read as not resident).
        let map = unsafe { memmap2::MmapOptions::new().len(len).map(&file) }.map_err(io_error("mmap", path))?;
        // SAFETY: sysconf only reads a system constant.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        Ok(Some(PageMap { path, map, len, page }))
    }

    fn count(&self) -> usize {
        self.len.div_ceil(self.page)
    }

    /// How many of the `n` pages from page `first` (clamped to the map) are resident.
    fn resident_in(&self, first: usize, n: usize) -> Result<usize, ReadError> {
        let n = n.min(self.count().saturating_sub(first));
        if n == 0 {
            return Ok(0);
        }
        let mut resident = vec![0u8; n];
        let bytes = (n * self.page).min(self.len - first * self.page);
        let start = self.map[first * self.page..].as_ptr();
        // SAFETY: `start` is page `first` of a live mapping (page-aligned, as maps are) with
        // `bytes` of it mapped from there, and `resident` has one byte for each of those
        // pages, for the kernel to fill.
        if unsafe { libc::mincore(start.cast_mut().cast(), bytes, resident.as_mut_ptr().cast()) } != 0 {
            return Err(io_error("mincore", self.path)(io::Error::last_os_error()));
        }
        Ok(resident.iter().filter(|&&page| page & 1 != 0).count())
    }
}

/// What [`sequential_read_rate`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequentialRead {
    /// Bytes read: the files' lengths, added up.
    pub bytes: u64,
    /// Wall time of the reads (files already open, buffer already made).
    pub seconds: f64,
    /// [`ReadMode::Direct`] if every file was read direct, else [`ReadMode::Buffered`].
    pub mode: ReadMode,
}

impl SequentialRead {
    pub fn bytes_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Reads the files whole, one after another, front to back, in chunks of `chunk_bytes` (0:
/// [`SEQUENTIAL_CHUNK`]; rounded up to whole blocks) with [`FileReader`]s opened with `prefer`,
/// into one reused [`AlignedBuffer`]: the sequential read rate of the files, the ceiling a
/// transfer from them is measured against. For a cold rate of buffered reads, call
/// [`drop_cached`] on each file first (direct reads bypass the cache either way).
pub fn sequential_read_rate<P: AsRef<Path>>(
    paths: &[P],
    chunk_bytes: usize,
    prefer: ReadMode,
) -> Result<SequentialRead, ReadError> {
    let chunk = if chunk_bytes == 0 { SEQUENTIAL_CHUNK } else { chunk_bytes.next_multiple_of(DIRECT_ALIGN) };
    let readers = paths.iter().map(|path| FileReader::open(path.as_ref(), prefer)).collect::<Result<Vec<_>, _>>()?;
    let mut buffer = AlignedBuffer::new(chunk);
    let mut bytes = 0;
    let started = Instant::now();
    for reader in &readers {
        let mut offset = 0;
        while offset < reader.len() {
            let len = (reader.len() - offset).min(chunk as u64) as usize;
            reader.read_range(offset, len, &mut buffer)?;
            offset += len as u64;
        }
        bytes += reader.len();
    }
    let seconds = started.elapsed().as_secs_f64();
    let mode = if readers.iter().all(|r| r.mode() == ReadMode::Direct) { ReadMode::Direct } else { ReadMode::Buffered };
    Ok(SequentialRead { bytes, seconds, mode })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    /// A file removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn in_dir(dir: &Path, name: &str, bytes: &[u8]) -> TempFile {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("weightlift-test-read-{name}-{}-{n}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(131) ^ (i >> 8)) as u8).collect()
    }

    /// Three blocks and a bit, so ranges cross block boundaries and end in a partial block.
    const FILE_LEN: usize = 3 * DIRECT_ALIGN + 1234;

    /// One file under the temporary directory (on disk here) shared by the property tests.
    fn disk_file() -> &'static (TempFile, Vec<u8>) {
        static FILE: OnceLock<(TempFile, Vec<u8>)> = OnceLock::new();
        FILE.get_or_init(|| {
            let bytes = pattern(FILE_LEN);
            (TempFile::in_dir(&std::env::temp_dir(), "disk", &bytes), bytes)
        })
    }

    fn range() -> impl Strategy<Value = (u64, usize)> {
        (0..=FILE_LEN).prop_flat_map(|offset| (Just(offset as u64), 0..=FILE_LEN - offset))
    }

    proptest! {
        #[test]
        fn read_range_matches_the_file((offset, len) in range(), prefer in prop_oneof![Just(ReadMode::Direct), Just(ReadMode::Buffered)]) {
            let (file, bytes) = disk_file();
            let reader = FileReader::open(&file.0, prefer).unwrap();
            let mut buffer = AlignedBuffer::new(FileReader::span(offset, len));
            let got = reader.read_range(offset, len, &mut buffer).unwrap();
            prop_assert_eq!(got, &bytes[offset as usize..offset as usize + len]);
            // The range sits at the same place in the buffer in both modes.
            let start = got.as_ptr() as usize - buffer.as_slice().as_ptr() as usize;
            prop_assert_eq!(start, offset as usize % DIRECT_ALIGN);
        }

        #[test]
        fn read_at_matches_the_file((offset, len) in range(), prefer in prop_oneof![Just(ReadMode::Direct), Just(ReadMode::Buffered)], shift in 0usize..64) {
            let (file, bytes) = disk_file();
            let reader = FileReader::open(&file.0, prefer).unwrap();
            // A destination at any address, not only an aligned one.
            let mut dst = vec![0xa5u8; len + shift];
            reader.read_at(offset, &mut dst[shift..]).unwrap();
            prop_assert_eq!(&dst[shift..], &bytes[offset as usize..offset as usize + len]);
            prop_assert!(dst[..shift].iter().all(|&b| b == 0xa5));
        }
    }

    proptest! {
        #[test]
        fn read_into_matches_the_file(blocks in 0usize..=3, len_blocks in 0usize..=5, prefer in prop_oneof![Just(ReadMode::Direct), Just(ReadMode::Buffered)]) {
            let (file, bytes) = disk_file();
            let reader = FileReader::open(&file.0, prefer).unwrap();
            let offset = blocks * DIRECT_ALIGN;
            let mut buffer = AlignedBuffer::new((len_blocks * DIRECT_ALIGN).max(DIRECT_ALIGN));
            let dst = &mut buffer.as_mut_slice()[..len_blocks * DIRECT_ALIGN];
            let got = reader.read_into(offset as u64, dst).unwrap();
            prop_assert_eq!(got, dst.len().min(FILE_LEN - offset));
            prop_assert_eq!(&dst[..got], &bytes[offset..offset + got]);
        }
    }

    #[test]
    fn direct_reads_into_misaligned_memory_are_refused_by_name() {
        let (file, bytes) = disk_file();
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        let mut buffer = AlignedBuffer::new(2 * DIRECT_ALIGN);
        if reader.mode() == ReadMode::Direct {
            let err = reader.read_into(1, &mut buffer.as_mut_slice()[..DIRECT_ALIGN]).unwrap_err();
            assert!(matches!(err, ReadError::Misaligned { offset: 1, .. }), "{err}");
            let err = reader.read_into(0, &mut buffer.as_mut_slice()[8..8 + DIRECT_ALIGN]).unwrap_err();
            assert!(err.to_string().contains("not aligned to 4096 bytes"), "{err}");
        }
        let err = reader.read_into(FILE_LEN as u64 + 1, &mut buffer.as_mut_slice()[..DIRECT_ALIGN]).unwrap_err();
        assert!(matches!(err, ReadError::PastEnd { .. }), "{err}");
        // Buffered, any place will do.
        let buffered = FileReader::open(&file.0, ReadMode::Buffered).unwrap();
        assert_eq!(buffered.read_into(3, &mut buffer.as_mut_slice()[5..105]).unwrap(), 100);
        assert_eq!(&buffer.as_slice()[5..105], &bytes[3..103]);
    }

    #[test]
    fn the_mode_follows_the_preference() {
        let (file, _) = disk_file();
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        // /tmp lies on a disk filesystem that reads direct on the machines that run the tests;
        // anywhere else the reads above still matched, buffered.
        if !memory_backed(&File::open(&file.0).unwrap(), &file.0).unwrap() {
            eprintln!("{}: {}", file.0.display(), reader.mode());
        }
        assert_eq!(FileReader::open(&file.0, ReadMode::Buffered).unwrap().mode(), ReadMode::Buffered);
        assert_eq!(reader.len(), FILE_LEN as u64);
        assert!(!reader.is_empty());
        assert_eq!(reader.path(), file.0);
    }

    #[test]
    fn reads_crossing_many_bounce_pieces_match() {
        let bytes = pattern(2 * BOUNCE_BYTES + 3 * DIRECT_ALIGN + 77);
        let file = TempFile::in_dir(&std::env::temp_dir(), "bounce", &bytes);
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        let (offset, len) = (DIRECT_ALIGN + 5, BOUNCE_BYTES * 2 + 11);
        let mut dst = vec![0u8; len];
        reader.read_at(offset as u64, &mut dst).unwrap();
        assert_eq!(dst, &bytes[offset..offset + len]);
        // The bounce buffer is reused: a second, smaller read matches too.
        reader.read_at(3, &mut dst[..100]).unwrap();
        assert_eq!(&dst[..100], &bytes[3..103]);
    }

    #[test]
    fn tmpfs_is_read_buffered() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            return;
        }
        let bytes = pattern(FILE_LEN);
        let file = TempFile::in_dir(shm, "shm", &bytes);
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        assert_eq!(reader.mode(), ReadMode::Buffered);
        let mut buffer = AlignedBuffer::new(FILE_LEN + DIRECT_ALIGN);
        assert_eq!(reader.read_range(7, FILE_LEN - 9, &mut buffer).unwrap(), &bytes[7..FILE_LEN - 2]);
        let mut dst = vec![0u8; 5000];
        reader.read_at(4000, &mut dst).unwrap();
        assert_eq!(dst, &bytes[4000..9000]);
    }

    #[test]
    fn a_filesystem_refusing_o_direct_falls_back_to_buffered() {
        // procfs refuses O_DIRECT with EINVAL, as FUSE and some network filesystems do. Its
        // files have no length, so only empty ranges lie inside them.
        let path = Path::new("/proc/self/status");
        if !path.exists() {
            return;
        }
        let reader = FileReader::open(path, ReadMode::Direct).unwrap();
        assert_eq!(reader.mode(), ReadMode::Buffered);
        reader.read_at(0, &mut []).unwrap();
    }

    #[test]
    fn ranges_past_the_end_are_refused_by_name() {
        let (file, _) = disk_file();
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        let mut buffer = AlignedBuffer::new(2 * DIRECT_ALIGN);
        let end = FILE_LEN as u64;
        assert!(reader.read_range(end, 0, &mut buffer).unwrap().is_empty());
        for (offset, len) in [(end, 1), (end - 1, 2), (end + 1, 0), (u64::MAX, 2)] {
            let error = reader.read_range(offset, len, &mut buffer).unwrap_err();
            assert!(
                matches!(error, ReadError::PastEnd { offset: o, len: l, file_len, .. } if o == offset && l == len as u64 && file_len == end),
                "{error:?}"
            );
            assert!(error.to_string().starts_with(&format!("{}: {len} bytes at offset {offset}", file.0.display())));
            assert!(matches!(reader.read_at(offset, &mut vec![0; len]), Err(ReadError::PastEnd { .. })));
        }
    }

    #[test]
    fn a_small_buffer_is_refused() {
        let (file, _) = disk_file();
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        let mut buffer = AlignedBuffer::new(DIRECT_ALIGN);
        let error = reader.read_range(DIRECT_ALIGN as u64 - 1, 2, &mut buffer).unwrap_err();
        assert!(
            matches!(error, ReadError::BufferTooSmall { needed, capacity, .. } if needed == 2 * DIRECT_ALIGN && capacity == DIRECT_ALIGN),
            "{error:?}"
        );
        assert_eq!(FileReader::span(0, 0), 0);
        assert_eq!(FileReader::span(0, 1), DIRECT_ALIGN);
        assert_eq!(FileReader::span(4095, 2), 2 * DIRECT_ALIGN);
        assert_eq!(FileReader::span(4096, 4096), DIRECT_ALIGN);
    }

    #[test]
    fn empty_files_read_as_empty() {
        let file = TempFile::in_dir(&std::env::temp_dir(), "empty", &[]);
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        assert!(reader.is_empty());
        let mut buffer = AlignedBuffer::new(0);
        assert_eq!(buffer.len(), DIRECT_ALIGN);
        assert!(reader.read_range(0, 0, &mut buffer).unwrap().is_empty());
        assert!(matches!(reader.read_range(0, 1, &mut buffer), Err(ReadError::PastEnd { .. })));
        let rate = sequential_read_rate(&[&file.0], 0, ReadMode::Direct).unwrap();
        assert_eq!(rate.bytes, 0);
    }

    #[test]
    fn a_missing_file_is_named() {
        let missing = std::env::temp_dir().join("weightlift-test-no-such-file");
        let error = FileReader::open(&missing, ReadMode::Direct).unwrap_err();
        assert!(matches!(&error, ReadError::Io { call: "open", path, .. } if *path == missing), "{error:?}");
        assert!(error.to_string().starts_with(&format!("open {}: ", missing.display())), "{error}");
        assert!(matches!(drop_cached(&missing), Err(ReadError::Io { call: "open", .. })));
        assert!(matches!(resident_bytes(&missing), Err(ReadError::Io { call: "open", .. })));
    }

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 4095, 4096, 4097, 1 << 20] {
            let mut buffer = AlignedBuffer::new(len);
            assert_eq!(buffer.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
            assert_eq!(buffer.len() % DIRECT_ALIGN, 0);
            assert!(buffer.len() >= len.max(1) && buffer.len() < len.max(1) + DIRECT_ALIGN);
            assert!(!buffer.is_empty());
            assert!(buffer.as_slice().iter().all(|&b| b == 0));
            let last = buffer.len() - 1;
            buffer.as_mut_slice()[last] = 1;
        }
    }

    #[test]
    fn drop_cached_and_resident_bytes_run() {
        let bytes = pattern(64 * DIRECT_ALIGN + 5);
        let file = TempFile::in_dir(&std::env::temp_dir(), "cached", &bytes);
        // Freshly written: its pages are cached (dirty or clean).
        let before = resident_bytes(&file.0).unwrap();
        assert!(before <= bytes.len() as u64);
        drop_cached(&file.0).unwrap();
        let after = resident_bytes(&file.0).unwrap();
        // A hint: on a disk filesystem the clean pages go (on tmpfs they cannot).
        assert!(after <= before, "{after} > {before}");
        eprintln!("resident before drop_cached: {before}, after: {after}");
        // The file reads the same afterwards.
        let reader = FileReader::open(&file.0, ReadMode::Buffered).unwrap();
        let mut dst = vec![0u8; bytes.len()];
        reader.read_at(0, &mut dst).unwrap();
        assert_eq!(dst, bytes);
        assert_eq!(resident_bytes(&TempFile::in_dir(&std::env::temp_dir(), "cached-empty", &[]).0).unwrap(), 0);
    }

    #[test]
    fn the_sampled_resident_share_agrees_with_the_pages_counted() {
        // Larger than the sampled windows cover, so the share is sampled; then a small file,
        // counted page by page.
        for len in [(SAMPLED_WINDOWS * WINDOW_PAGES * 3 + 7) * 4096, 5 * 4096 + 1] {
            let file = TempFile::in_dir(&std::env::temp_dir(), "share", &pattern(len));
            let exact = resident_bytes(&file.0).unwrap() as f64 / len as f64;
            let share = resident_share(&file.0).unwrap();
            assert!((0.0..=1.0).contains(&share), "{share}");
            // Evenly spaced windows over a third of the pages find what counting finds.
            assert!((share - exact).abs() < 0.05, "{len}: sampled {share}, counted {exact}");
            drop_cached(&file.0).unwrap();
            let exact = resident_bytes(&file.0).unwrap() as f64 / len as f64;
            let share = resident_share(&file.0).unwrap();
            assert!((share - exact).abs() < 0.05, "{len} after drop_cached: sampled {share}, counted {exact}");
        }
        assert_eq!(resident_share(&TempFile::in_dir(&std::env::temp_dir(), "share-empty", &[]).0).unwrap(), 1.0);
    }

    #[test]
    fn sequential_read_rate_reads_every_byte() {
        let one = TempFile::in_dir(&std::env::temp_dir(), "seq-1", &pattern(5 * DIRECT_ALIGN + 3));
        let two = TempFile::in_dir(&std::env::temp_dir(), "seq-2", &pattern(100));
        for prefer in [ReadMode::Direct, ReadMode::Buffered] {
            // A chunk that is not a multiple of the block, and the default.
            for chunk in [5000, 0] {
                let rate = sequential_read_rate(&[&one.0, &two.0], chunk, prefer).unwrap();
                assert_eq!(rate.bytes, 5 * DIRECT_ALIGN as u64 + 103);
                assert!(rate.seconds >= 0.0 && rate.bytes_per_second() >= 0.0);
                if prefer == ReadMode::Buffered {
                    assert_eq!(rate.mode, ReadMode::Buffered);
                }
            }
        }
        let missing = std::env::temp_dir().join("weightlift-test-no-such-file");
        assert!(matches!(sequential_read_rate(&[&missing], 0, ReadMode::Direct), Err(ReadError::Io { .. })));
    }

    #[test]
    fn readers_move_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<FileReader>();
        assert_send_sync::<AlignedBuffer>();
        let (file, bytes) = disk_file();
        let reader = FileReader::open(&file.0, ReadMode::Direct).unwrap();
        std::thread::scope(|scope| {
            for i in 0..4u64 {
                let reader = &reader;
                scope.spawn(move || {
                    let mut buffer = AlignedBuffer::new(2 * DIRECT_ALIGN);
                    let offset = i * 1000 + 1;
                    let got = reader.read_range(offset, 3000, &mut buffer).unwrap();
                    assert_eq!(got, &bytes[offset as usize..offset as usize + 3000]);
                });
            }
        });
    }
}
