//! Host memory mappings: shared memory between the processes of one host, and read-only file maps.
//!
//! Both wrap [`memmap2`]. Mapping a file is `unsafe` because the mapped bytes can change, or vanish
//! (truncation makes later accesses raise `SIGBUS`), under the program's feet if another process
//! writes to or truncates the file. The contracts that make the mappings here sound are stated on
//! each type and at each `unsafe` block.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::{Mmap, MmapMut, MmapOptions};

/// Why a mapping could not be made or unlinked.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// A system call on `path` failed; `call` names it (`create`, `set_len`, `write`, `open`, ...).
    #[error("{call} {path}: {source}")]
    Io { call: &'static str, path: PathBuf, source: std::io::Error },
    /// The file at `path` does not have the length the caller expected.
    #[error("{path}: expected {expected} bytes, the file has {actual}")]
    Size { path: PathBuf, expected: u64, actual: u64 },
}

/// Pages are touched at this stride. It is the smallest page size of the platforms weightlift runs
/// on; with larger pages some touches land on a page already touched, which costs nothing.
const TOUCH_STRIDE: usize = 4096;

/// Zeros are written through the file in chunks of this size when a region is created.
const ZERO_CHUNK: usize = 1 << 20;

/// Tells regions created by one process apart (with the pid and a timestamp in the name).
static NEXT_REGION: AtomicU64 = AtomicU64::new(0);

fn io_error<'a>(call: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MapError + 'a {
    move |source| MapError::Io { call, path: path.to_path_buf(), source }
}

/// The directory shared regions are created in: `/dev/shm` (memory-backed on Linux), or the
/// temporary directory where there is no `/dev/shm`.
fn shared_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Shared memory between processes on one host: a file under `/dev/shm` (or the temporary
/// directory where `/dev/shm` does not exist), mapped read-write and shared.
///
/// One process [creates](SharedMemory::create) the region and passes its [path](SharedMemory::path)
/// to the other, which [opens](SharedMemory::open) it; once both have mapped it, either side
/// [unlinks](SharedMemory::unlink) the name, so nothing is left behind if a process dies.
///
/// # Contract
///
/// The two processes hand each byte range over through the control protocol, so only one side
/// writes a range at a time, and neither reads a range while the other writes it. The file is never
/// truncated after creation. Both hold for regions made and used through this type; nothing else
/// may open the file.
pub struct SharedMemory {
    path: PathBuf,
    /// `None` for a zero-length region, which is never mapped.
    map: Option<MmapMut>,
    /// Whether this side created the file (and so removes it on drop if it is still linked).
    created: bool,
    /// Whether the name may still exist (as far as this side knows).
    linked: AtomicBool,
}

impl SharedMemory {
    /// Creates a new uniquely named file (name: `{prefix}-{pid}-{counter}-{nanos}`), sizes it to
    /// `len`, maps it shared, and touches every page once (so the first transfer pays no page
    /// faults).
    ///
    /// The file's pages are allocated by writing zeros through the file before it is mapped, so a
    /// full tmpfs gives an error here rather than a `SIGBUS` at the first access to the mapping.
    /// On any error the file is removed again.
    pub fn create(prefix: &str, len: usize) -> Result<SharedMemory, MapError> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let counter = NEXT_REGION.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{counter}-{nanos}", std::process::id());
        let path = shared_dir().join(name);

        let mut options = OpenOptions::new();
        options.read(true).write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&path).map_err(io_error("create", &path))?;

        match Self::size_and_map(file, &path, len) {
            Ok(map) => {
                let mut region = SharedMemory { path, map, created: true, linked: AtomicBool::new(true) };
                // Write faults map every page of the region into this process now.
                for offset in (0..len).step_by(TOUCH_STRIDE) {
                    region.as_mut_slice()[offset] = 0;
                }
                Ok(region)
            }
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                Err(error)
            }
        }
    }

    /// Sizes a freshly created file to `len`, allocates its pages, and maps it.
    fn size_and_map(mut file: File, path: &Path, len: usize) -> Result<Option<MmapMut>, MapError> {
        file.set_len(len as u64).map_err(io_error("set_len", path))?;
        // `set_len` leaves a sparse file: writing zeros allocates every page, and fails with an
        // error (rather than a later `SIGBUS`) when the tmpfs has no room.
        let zeros = vec![0u8; ZERO_CHUNK.min(len)];
        let mut left = len;
        while left > 0 {
            let chunk = left.min(ZERO_CHUNK);
            file.write_all(&zeros[..chunk]).map_err(io_error("write", path))?;
            left -= chunk;
        }
        if len == 0 {
            return Ok(None);
        }
        // SAFETY: the file was just created by this process under a fresh name with owner-only
        // permissions, and has all `len` bytes allocated. From here on it is used under the contract
        // of `SharedMemory`: the processes sharing it hand each byte range over through the control
        // protocol, so only one side writes a range at a time and no side reads a range being
        // written, and the file is never truncated after creation, so every byte of the mapping
        // stays backed by the file.
        let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(io_error("mmap", path))?;
        Ok(Some(map))
    }

    /// Maps an existing region created by another process; checks its length equals `len`.
    ///
    /// Every page is read once, so the first transfer pays no page faults on this side either.
    pub fn open(path: &Path, len: usize) -> Result<SharedMemory, MapError> {
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(io_error("open", path))?;
        let actual = file.metadata().map_err(io_error("metadata", path))?.len();
        if actual != len as u64 {
            return Err(MapError::Size { path: path.to_path_buf(), expected: len as u64, actual });
        }
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the file is a region made by `SharedMemory::create`, which allocated all of
            // its bytes, and it has the `len` bytes mapped here (checked just above). It is used
            // under the contract of `SharedMemory`: the processes hand each byte range over through
            // the control protocol, so only one side writes a range at a time and no side reads a
            // range being written, and the file is never truncated, so the mapping stays backed.
            let map = unsafe { MmapOptions::new().len(len).map_mut(&file) }.map_err(io_error("mmap", path))?;
            Some(map)
        };
        let region = SharedMemory { path: path.to_path_buf(), map, created: false, linked: AtomicBool::new(true) };
        // Read faults map every page into this process. Reading, not writing: the creator may
        // already have handed bytes over.
        let bytes = region.as_slice();
        for offset in (0..len).step_by(TOUCH_STRIDE) {
            std::hint::black_box(bytes[offset]);
        }
        Ok(region)
    }

    /// The region's file (which may already be unlinked).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The region's length in bytes.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the name; existing mappings stay valid. Idempotent: removing a name that is already
    /// gone (by this side or the other) succeeds.
    ///
    /// Called once both sides have mapped the region, so nothing leaks if a process dies.
    pub fn unlink(&self) -> Result<(), MapError> {
        if !self.linked.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(error) => {
                self.linked.store(true, Ordering::Release);
                Err(MapError::Io { call: "unlink", path: self.path.clone(), source: error })
            }
        }
    }

    /// The region's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The region's bytes, to write. Only the ranges the control protocol has handed to this side
    /// may be written.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for SharedMemory {
    /// Unmaps the region; if this side created it and it is still linked, removes the name
    /// (ignoring errors).
    fn drop(&mut self) {
        self.map = None;
        if self.created && self.linked.swap(false, Ordering::AcqRel) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("path", &self.path)
            .field("len", &self.len())
            .field("created", &self.created)
            .field("linked", &self.linked.load(Ordering::Acquire))
            .finish()
    }
}

/// A read-only map of a whole file (checkpoint tensors are read straight from the page cache).
///
/// # Requirement
///
/// A checkpoint must not be modified, truncated or replaced in place while weightlift reads it
/// (writing a new checkpoint under a new name, or renaming one over the old name, is fine). A file
/// changed under the map would show torn bytes, and a truncated one would kill the process with
/// `SIGBUS`.
pub struct MappedFile {
    path: PathBuf,
    /// `None` for an empty file, which is never mapped.
    map: Option<Mmap>,
}

impl MappedFile {
    /// Maps the whole file at `path` read-only.
    pub fn open(path: &Path) -> Result<MappedFile, MapError> {
        let file = File::open(path).map_err(io_error("open", path))?;
        MappedFile::from_file(file, path)
    }

    /// Maps the whole of `file`, already open (and checked by the caller: a regular file, opened
    /// without waiting on a FIFO), read-only; `path` names it in errors.
    pub fn from_file(file: File, path: &Path) -> Result<MappedFile, MapError> {
        let len = file.metadata().map_err(io_error("metadata", path))?.len();
        let map = if len == 0 {
            None
        } else {
            let len = usize::try_from(len).map_err(|_| MapError::Io {
                call: "mmap",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "the file is larger than the address space"),
            })?;
            // SAFETY: the map is read-only and covers the file's length at open. Checkpoints are
            // not modified or truncated while weightlift reads them, a requirement documented on
            // `MappedFile`, so the mapped bytes neither change under a shared borrow nor stop being
            // backed by the file.
            let map = unsafe { MmapOptions::new().len(len).map(&file) }.map_err(io_error("mmap", path))?;
            Some(map)
        };
        Ok(MappedFile { path: path.to_path_buf(), map })
    }

    /// The file's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The file's length in bytes (when it was opened).
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |map| map.len())
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapped file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Set (to the region's path) when the test binary runs as the child of `second_process_*`.
    const CHILD_ENV: &str = "WEIGHTLIFT_SHM_CHILD";
    /// The helper test the child process runs.
    const CHILD_TEST: &str = "host_map::tests::child_process_helper";
    /// Spans several pages and ends inside one.
    const CHILD_LEN: usize = 3 * 4096 + 123;

    fn parent_byte(i: usize) -> u8 {
        (i * 7 + 3) as u8
    }

    fn child_byte(i: usize) -> u8 {
        (i * 31 + 11) as u8 ^ 0xa5
    }

    /// A file under the temporary directory, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn with_bytes(name: &str, bytes: &[u8]) -> TempFile {
            let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
            let path = std::env::temp_dir().join(format!("weightlift-test-{name}-{}-{nanos}", std::process::id()));
            std::fs::write(&path, bytes).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn created_region_is_zeroed_and_named_with_the_prefix() {
        let region = SharedMemory::create("weightlift-test-zeroed", 5 * 4096 + 1).unwrap();
        assert_eq!(region.len(), 5 * 4096 + 1);
        assert!(!region.is_empty());
        assert!(region.as_slice().iter().all(|&b| b == 0));
        assert!(region.path().exists());
        let name = region.path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(&format!("weightlift-test-zeroed-{}-", std::process::id())), "{name}");
        let other = SharedMemory::create("weightlift-test-zeroed", 16).unwrap();
        assert_ne!(region.path(), other.path());
    }

    #[test]
    fn second_map_sees_the_bytes_both_ways() {
        let len = 2 * 4096 + 10;
        let mut first = SharedMemory::create("weightlift-test-two-maps", len).unwrap();
        for (i, byte) in first.as_mut_slice().iter_mut().enumerate() {
            *byte = parent_byte(i);
        }
        let mut second = SharedMemory::open(first.path(), len).unwrap();
        assert_eq!(second.len(), len);
        assert!(second.as_slice().iter().enumerate().all(|(i, &b)| b == parent_byte(i)));
        second.as_mut_slice()[len - 1] = 0xee;
        second.as_mut_slice()[4096] = 0xdd;
        assert_eq!(first.as_slice()[len - 1], 0xee);
        assert_eq!(first.as_slice()[4096], 0xdd);
    }

    /// Not a test of its own: returns at once unless the test binary runs as the child of
    /// `second_process_reads_and_writes_the_region`, and then checks the parent's half of the
    /// region and writes a pattern into the other half.
    #[test]
    fn child_process_helper() {
        let Some(path) = std::env::var_os(CHILD_ENV) else { return };
        let mut region = SharedMemory::open(Path::new(&path), CHILD_LEN).unwrap();
        let half = CHILD_LEN / 2;
        let bytes = region.as_mut_slice();
        assert!(bytes[..half].iter().enumerate().all(|(i, &b)| b == parent_byte(i)), "parent's half differs");
        for (i, byte) in bytes[half..].iter_mut().enumerate() {
            *byte = child_byte(i);
        }
    }

    #[test]
    fn second_process_reads_and_writes_the_region() {
        let mut region = SharedMemory::create("weightlift-test-child", CHILD_LEN).unwrap();
        let half = CHILD_LEN / 2;
        for (i, byte) in region.as_mut_slice()[..half].iter_mut().enumerate() {
            *byte = parent_byte(i);
        }
        let output = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--nocapture"])
            .env(CHILD_ENV, region.path())
            .output()
            .unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "child failed:\n{log}");
        assert!(log.contains("1 passed"), "child ran no test:\n{log}");
        let bytes = region.as_slice();
        assert!(bytes[..half].iter().enumerate().all(|(i, &b)| b == parent_byte(i)));
        assert!(bytes[half..].iter().enumerate().all(|(i, &b)| b == child_byte(i)), "child's pattern missing");
    }

    #[test]
    fn unlink_removes_the_name_and_keeps_the_mappings() {
        let len = 4096 + 1;
        let mut creator = SharedMemory::create("weightlift-test-unlink", len).unwrap();
        let mut opener = SharedMemory::open(creator.path(), len).unwrap();
        opener.unlink().unwrap();
        assert!(!creator.path().exists());
        // Idempotent, on either side.
        opener.unlink().unwrap();
        creator.unlink().unwrap();
        creator.unlink().unwrap();
        creator.as_mut_slice()[len - 1] = 42;
        assert_eq!(opener.as_slice()[len - 1], 42);
        opener.as_mut_slice()[0] = 7;
        assert_eq!(creator.as_slice()[0], 7);
        // Opening by the removed name now fails.
        match SharedMemory::open(creator.path(), len) {
            Err(MapError::Io { call: "open", source, .. }) => assert_eq!(source.kind(), io::ErrorKind::NotFound),
            other => panic!("expected an open error, got {other:?}"),
        }
    }

    #[test]
    fn open_with_a_wrong_length_names_the_path() {
        let region = SharedMemory::create("weightlift-test-size", 100).unwrap();
        let error = SharedMemory::open(region.path(), 101).unwrap_err();
        match &error {
            MapError::Size { path, expected: 101, actual: 100 } => assert_eq!(path, region.path()),
            other => panic!("expected a size error, got {other:?}"),
        }
        let message = error.to_string();
        assert!(message.contains(&region.path().display().to_string()), "{message}");
        assert!(message.contains("expected 101 bytes, the file has 100"), "{message}");
    }

    #[test]
    fn io_errors_name_the_call_and_path() {
        let missing = std::env::temp_dir().join("weightlift-test-no-such-dir/region");
        let error = SharedMemory::open(&missing, 8).unwrap_err();
        assert!(matches!(&error, MapError::Io { call: "open", path, .. } if *path == missing), "{error:?}");
        assert!(error.to_string().starts_with(&format!("open {}: ", missing.display())), "{error}");
        let error = MappedFile::open(&missing).unwrap_err();
        assert!(matches!(&error, MapError::Io { call: "open", path, .. } if *path == missing), "{error:?}");
        // A prefix naming a directory that does not exist: creating fails cleanly.
        let error = SharedMemory::create("weightlift-test-no-such-dir/region", 8).unwrap_err();
        assert!(matches!(error, MapError::Io { call: "create", .. }), "{error:?}");
    }

    #[test]
    fn zero_length_region_works() {
        let mut region = SharedMemory::create("weightlift-test-empty", 0).unwrap();
        assert_eq!(region.len(), 0);
        assert!(region.is_empty());
        assert!(region.as_slice().is_empty());
        assert!(region.as_mut_slice().is_empty());
        assert_eq!(std::fs::metadata(region.path()).unwrap().len(), 0);
        let opened = SharedMemory::open(region.path(), 0).unwrap();
        assert!(opened.is_empty() && opened.as_slice().is_empty());
        assert!(matches!(SharedMemory::open(region.path(), 1), Err(MapError::Size { expected: 1, actual: 0, .. })));
        let path = region.path().to_path_buf();
        drop(region);
        assert!(!path.exists());
    }

    #[test]
    fn drop_of_the_creator_removes_the_file_and_of_the_opener_does_not() {
        let creator = SharedMemory::create("weightlift-test-drop", 64).unwrap();
        let path = creator.path().to_path_buf();
        let opener = SharedMemory::open(&path, 64).unwrap();
        drop(opener);
        assert!(path.exists());
        drop(creator);
        assert!(!path.exists());
    }

    #[test]
    fn shared_memory_moves_to_another_thread() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SharedMemory>();
        assert_send_sync::<MappedFile>();
        let creator = SharedMemory::create("weightlift-test-thread", 4096).unwrap();
        let mut opener = SharedMemory::open(creator.path(), 4096).unwrap();
        std::thread::spawn(move || opener.as_mut_slice()[4095] = 9).join().unwrap();
        assert_eq!(creator.as_slice()[4095], 9);
    }

    #[test]
    fn mapped_file_reads_the_bytes() {
        let bytes: Vec<u8> = (0..10_000).map(|i: usize| (i % 251) as u8).collect();
        let file = TempFile::with_bytes("mapped", &bytes);
        let mapped = MappedFile::open(&file.0).unwrap();
        assert_eq!(mapped.len(), bytes.len());
        assert!(!mapped.is_empty());
        assert_eq!(mapped.as_slice(), &bytes[..]);
        assert_eq!(mapped.path(), file.0);
    }

    #[test]
    fn mapped_empty_file_is_an_empty_slice() {
        let file = TempFile::with_bytes("mapped-empty", &[]);
        let mapped = MappedFile::open(&file.0).unwrap();
        assert_eq!(mapped.len(), 0);
        assert!(mapped.is_empty());
        assert!(mapped.as_slice().is_empty());
    }
}
