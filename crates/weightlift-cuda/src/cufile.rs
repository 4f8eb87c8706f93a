//! GPUDirect Storage through cuFile, loaded at run time: [`cufile_available`] probes for it, and
//! [`CuFileReader`] reads a file range straight into device memory.
//!
//! `libcufile.so.0` comes with the CUDA toolkit and with the `nvidia-cufile` wheels torch depends
//! on; it is looked up the way `dlopen` looks (`LD_LIBRARY_PATH`, the cache, or a copy the
//! process loaded already, as a torch process may have). Where it is missing, or its driver does
//! not open (no GPU, no CUDA driver), every entry point returns a [`CuFileError`], never a panic,
//! and callers read with [`FileReader`] and copy instead.
//!
//! cudarc's own `cufile` module is not used: its loader looks for `libcufile.so` and
//! `libcufile.so.<CUDA major>` but not `libcufile.so.0` (the name the library ships under), and
//! panics where the library or a symbol is missing. The few calls needed are bound here, with
//! the structures of `cufile.h` declared as the library lays them out.
//!
//! Whether reads really bypass host memory depends on the machine, not on this code: with the
//! `nvidia-fs` kernel driver (or, from CUDA 12.8, NVMe P2P DMA) and a supported filesystem they
//! go from the device to GPU memory; otherwise cuFile runs in compatibility mode, reading into
//! host bounce buffers and copying. [`CuFileInfo`] says which the library reports, for the
//! benchmark's note.

use std::ffi::{c_int, c_uint, c_void};
use std::fmt;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use libloading::Library;

use crate::dynlib::{bind, load_first};
use crate::error::Call;
use crate::file_read::{FileReader, ReadError, ReadMode};
use crate::{CudaError, OwnedDeviceMemory};

/// The names tried, in order.
const LIBRARY_NAMES: [&str; 2] = ["libcufile.so.0", "libcufile.so"];

/// `CU_FILE_SUCCESS`.
const SUCCESS: c_int = 0;
/// `CU_FILE_CUDA_DRIVER_ERROR`: the CUDA driver call in `cu_err` failed.
const CUDA_DRIVER_ERROR: c_int = 5011;
/// `CU_FILE_DRIVER_ALREADY_OPEN`: someone in the process opened it first, which is fine.
const DRIVER_ALREADY_OPEN: c_int = 5026;
/// `CU_FILE_HANDLE_TYPE_OPAQUE_FD`.
const HANDLE_TYPE_OPAQUE_FD: c_int = 1;
/// Bit of `dcontrolflags`: `CU_FILE_ALLOW_COMPAT_MODE`.
const ALLOW_COMPAT_MODE_BIT: u32 = 1;
/// Bit of `dstatusflags`: `CU_FILE_NVME_SUPPORTED` (through nvidia-fs).
const NVME_SUPPORTED_BIT: u32 = 4;
/// Bit of `dstatusflags`: `CU_FILE_NVME_P2P_SUPPORTED` (kernel P2P DMA, no nvidia-fs needed).
const NVME_P2P_SUPPORTED_BIT: u32 = 11;

/// `CUfileError_t`: the cuFile status and, for `CU_FILE_CUDA_DRIVER_ERROR`, the CUDA result.
/// Both are C enums, so `int`s; kept as integers, as the library may return values newer than
/// any list here.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Status {
    err: c_int,
    cu_err: c_int,
}

/// The handle union of `CUfileDescr_t`.
#[repr(C)]
#[derive(Clone, Copy)]
union DescrHandle {
    fd: c_int,
    _handle: *mut c_void,
}

/// `CUfileDescr_t`.
#[repr(C)]
struct Descr {
    kind: c_int,
    handle: DescrHandle,
    fs_ops: *const c_void,
}

/// The `nvfs` part of `CUfileDrvProps_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct NvfsProps {
    major_version: c_uint,
    minor_version: c_uint,
    poll_thresh_size: usize,
    max_direct_io_size: usize,
    dstatusflags: c_uint,
    dcontrolflags: c_uint,
}

/// `CUfileDrvProps_t` (CUDA 11.6 and later), with room to spare after it: the library fills
/// the structure of the header it was built with, which may have grown.
#[repr(C)]
#[derive(Clone, Copy)]
struct DriverProps {
    nvfs: NvfsProps,
    fflags: c_uint,
    max_device_cache_size: c_uint,
    per_buffer_cache_size: c_uint,
    max_device_pinned_mem_size: c_uint,
    max_batch_io_size: c_uint,
    max_batch_io_timeout_msecs: c_uint,
    _reserve: [u8; 512],
}

type DriverOpen = unsafe extern "C" fn() -> Status;
type DriverGetProperties = unsafe extern "C" fn(*mut DriverProps) -> Status;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> Status;
type HandleRegister = unsafe extern "C" fn(*mut *mut c_void, *mut Descr) -> Status;
type HandleDeregister = unsafe extern "C" fn(*mut c_void);
type Read = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, libc::off_t, libc::off_t) -> isize;

/// The loaded library and the calls bound from it. Made once and never dropped: libcufile
/// starts threads of its own, and unloading it under them would crash the process.
struct Api {
    library: &'static str,
    driver_open: DriverOpen,
    get_properties: DriverGetProperties,
    get_version: Option<GetVersion>,
    handle_register: HandleRegister,
    handle_deregister: HandleDeregister,
    read: Read,
}

/// The library, once loaded, and whether its driver is open. A failed load or open is tried
/// again at the next call (cheaply: a missing library fails at once).
static STATE: Mutex<Option<(&'static Api, bool)>> = Mutex::new(None);

/// Why cuFile cannot be used, or a cuFile call failed.
#[derive(Debug, thiserror::Error)]
pub enum CuFileError {
    /// No libcufile could be loaded.
    #[error("cuFile is not available: {reasons}")]
    NoLibrary { reasons: String },
    /// The library lacks a call weightlift needs (too old, or not libcufile).
    #[error("cuFile is not available: {library} has no {symbol}: {reason}")]
    MissingSymbol { library: &'static str, symbol: &'static str, reason: String },
    /// A cuFile call returned an error status (`cuda` is the CUDA driver's result, for
    /// `CU_FILE_CUDA_DRIVER_ERROR`).
    #[error("{call} failed: {} ({code}){}", op_error_name(*code), cuda_part(*code, *cuda))]
    Call { call: &'static str, code: i32, cuda: i32 },
    /// Registering the file with cuFile failed.
    #[error("{}: cuFileHandleRegister failed: {} ({code}){}", path.display(), op_error_name(*code), cuda_part(*code, *cuda))]
    Register { path: PathBuf, code: i32, cuda: i32 },
    /// `cuFileRead` of the range failed; `reason` is the system error or the cuFile status.
    #[error("{}: cuFileRead of {len} bytes at offset {offset}: {reason}", path.display())]
    Read { path: PathBuf, offset: u64, len: u64, reason: String },
    /// Opening the file, or a range outside it.
    #[error(transparent)]
    File(#[from] ReadError),
    /// Binding the destination's CUDA context, or a destination range outside its memory.
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// What the loaded cuFile library reports about itself and the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CuFileInfo {
    /// The name the library was loaded by.
    pub library: &'static str,
    /// `cuFileGetVersion`, where the library has it (newer ones do).
    pub version: Option<i32>,
    /// The `nvidia-fs` kernel driver's version, when it is loaded.
    pub nvfs_version: Option<(u32, u32)>,
    /// `dstatusflags`: one bit per storage kind supported (`CUfileDriverStatusFlags`).
    pub status_flags: u32,
    /// `dcontrolflags`: poll mode, compatibility mode allowed (`CUfileDriverControlFlags`).
    pub control_flags: u32,
    /// `fflags`: batch, stream and parallel IO (`CUfileFeatureFlags`).
    pub feature_flags: u32,
    /// The largest single direct IO, in bytes.
    pub max_direct_io_bytes: u64,
}

impl CuFileInfo {
    /// Whether reads can bypass host memory on this machine: the nvidia-fs driver is loaded
    /// and supports NVMe, or the kernel's NVMe P2P DMA is usable. Otherwise cuFile runs in
    /// compatibility mode (if [allowed](CuFileInfo::compat_mode_allowed)).
    pub fn direct_to_gpu(&self) -> bool {
        let nvfs_nvme = self.nvfs_version.is_some() && self.status_flags & (1 << NVME_SUPPORTED_BIT) != 0;
        nvfs_nvme || self.status_flags & (1 << NVME_P2P_SUPPORTED_BIT) != 0
    }

    /// Whether cuFile falls back to POSIX reads through host bounce buffers where the direct
    /// path is not there (`allow_compat_mode` of cufile.json).
    pub fn compat_mode_allowed(&self) -> bool {
        self.control_flags & (1 << ALLOW_COMPAT_MODE_BIT) != 0
    }
}

impl fmt::Display for CuFileInfo {
    /// One line for a benchmark's note, e.g. `cuFile (libcufile.so.0, version 1150): nvidia-fs
    /// 2.20, NVMe direct to GPU`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cuFile ({}", self.library)?;
        if let Some(version) = self.version {
            write!(f, ", version {version}")?;
        }
        f.write_str("): ")?;
        match self.nvfs_version {
            Some((major, minor)) => write!(f, "nvidia-fs {major}.{minor}")?,
            None => f.write_str("no nvidia-fs driver")?,
        }
        if self.status_flags & (1 << NVME_P2P_SUPPORTED_BIT) != 0 {
            f.write_str(", NVMe P2P")?;
        }
        if self.direct_to_gpu() {
            f.write_str(", NVMe direct to GPU")
        } else if self.compat_mode_allowed() {
            f.write_str(", compatibility mode (reads staged through host memory)")
        } else {
            f.write_str(", no direct path and compatibility mode off")
        }
    }
}

/// Loads libcufile and opens its driver (once per process), and says what it reports; an
/// error, never a panic, where it (or the CUDA driver) is missing or does not open.
///
/// libcufile logs its errors to `cufile.log` in the working directory unless told otherwise
/// (`CUFILE_LOGFILE_PATH`, or `logging.dir` of the `cufile.json` that `CUFILE_ENV_PATH_JSON`
/// names).
pub fn cufile_available() -> Result<CuFileInfo, CuFileError> {
    let api = api()?;
    // SAFETY: all zeros is a valid value of this plain-old-data structure.
    let mut props: DriverProps = unsafe { std::mem::zeroed() };
    // SAFETY: `props` is writable and at least as large as the library's `CUfileDrvProps_t`;
    // the driver is open (`api` opened it).
    check("cuFileDriverGetProperties", unsafe { (api.get_properties)(&mut props) })?;
    let version = api.get_version.and_then(|get_version| {
        let mut version: c_int = 0;
        // SAFETY: `version` is a writable int for the call to fill.
        let status = unsafe { get_version(&mut version) };
        (status.err == SUCCESS).then_some(version)
    });
    let nvfs = props.nvfs;
    Ok(CuFileInfo {
        library: api.library,
        version,
        nvfs_version: (nvfs.major_version != 0 || nvfs.minor_version != 0)
            .then_some((nvfs.major_version, nvfs.minor_version)),
        status_flags: nvfs.dstatusflags,
        control_flags: nvfs.dcontrolflags,
        feature_flags: props.fflags,
        max_direct_io_bytes: nvfs.max_direct_io_size as u64,
    })
}

/// The library with its driver open, loading and opening it at the first call that can.
fn api() -> Result<&'static Api, CuFileError> {
    // libcufile needs libcuda; without it, it only fails noisily (on stderr and in ./cufile.log).
    if !crate::driver_present() {
        return Err(CudaError::NoDriver.into());
    }
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
    let (api, open) = match *state {
        Some(loaded) => loaded,
        None => {
            let api = load()?;
            *state = Some((api, false));
            (api, false)
        }
    };
    if !open {
        // SAFETY: takes no arguments; the library is loaded for good.
        let status = unsafe { (api.driver_open)() };
        if status.err != DRIVER_ALREADY_OPEN {
            check("cuFileDriverOpen", status)?;
        }
        *state = Some((api, true));
    }
    Ok(api)
}

/// Loads the first library of [`LIBRARY_NAMES`] that loads and binds its calls.
fn load() -> Result<&'static Api, CuFileError> {
    let (name, library) = load_first(LIBRARY_NAMES.iter().map(|n| n.to_string()))
        .map_err(|reasons| CuFileError::NoLibrary { reasons })?;
    let name: &'static str = LIBRARY_NAMES.iter().find(|n| **n == name).copied().unwrap_or("libcufile");
    fn bound<T: Copy>(library: &'static Library, name: &'static str, symbol: &'static str) -> Result<T, CuFileError> {
        // SAFETY: each `T` below is the symbol's C signature as cufile.h declares it.
        unsafe { bind(library, symbol) }.map_err(|reason| CuFileError::MissingSymbol { library: name, symbol, reason })
    }
    let api = Api {
        library: name,
        driver_open: bound(library, name, "cuFileDriverOpen")?,
        get_properties: bound(library, name, "cuFileDriverGetProperties")?,
        get_version: bound(library, name, "cuFileGetVersion").ok(),
        handle_register: bound(library, name, "cuFileHandleRegister")?,
        handle_deregister: bound(library, name, "cuFileHandleDeregister")?,
        read: bound(library, name, "cuFileRead")?,
    };
    Ok(Box::leak(Box::new(api)))
}

fn check(call: &'static str, status: Status) -> Result<(), CuFileError> {
    if status.err == SUCCESS {
        return Ok(());
    }
    Err(CuFileError::Call { call, code: status.err, cuda: status.cu_err })
}

/// The name of a `CUfileOpError` value, from cufile.h.
fn op_error_name(code: i32) -> &'static str {
    match code {
        0 => "CU_FILE_SUCCESS",
        5001 => "CU_FILE_DRIVER_NOT_INITIALIZED",
        5002 => "CU_FILE_DRIVER_INVALID_PROPS",
        5003 => "CU_FILE_DRIVER_UNSUPPORTED_LIMIT",
        5004 => "CU_FILE_DRIVER_VERSION_MISMATCH",
        5005 => "CU_FILE_DRIVER_VERSION_READ_ERROR",
        5006 => "CU_FILE_DRIVER_CLOSING",
        5007 => "CU_FILE_PLATFORM_NOT_SUPPORTED",
        5008 => "CU_FILE_IO_NOT_SUPPORTED",
        5009 => "CU_FILE_DEVICE_NOT_SUPPORTED",
        5010 => "CU_FILE_NVFS_DRIVER_ERROR",
        5011 => "CU_FILE_CUDA_DRIVER_ERROR",
        5012 => "CU_FILE_CUDA_POINTER_INVALID",
        5013 => "CU_FILE_CUDA_MEMORY_TYPE_INVALID",
        5014 => "CU_FILE_CUDA_POINTER_RANGE_ERROR",
        5015 => "CU_FILE_CUDA_CONTEXT_MISMATCH",
        5016 => "CU_FILE_INVALID_MAPPING_SIZE",
        5017 => "CU_FILE_INVALID_MAPPING_RANGE",
        5018 => "CU_FILE_INVALID_FILE_TYPE",
        5019 => "CU_FILE_INVALID_FILE_OPEN_FLAG",
        5020 => "CU_FILE_DIO_NOT_SET",
        5022 => "CU_FILE_INVALID_VALUE",
        5023 => "CU_FILE_MEMORY_ALREADY_REGISTERED",
        5024 => "CU_FILE_MEMORY_NOT_REGISTERED",
        5025 => "CU_FILE_PERMISSION_DENIED",
        5026 => "CU_FILE_DRIVER_ALREADY_OPEN",
        5027 => "CU_FILE_HANDLE_NOT_REGISTERED",
        5028 => "CU_FILE_HANDLE_ALREADY_REGISTERED",
        5029 => "CU_FILE_DEVICE_NOT_FOUND",
        5030 => "CU_FILE_INTERNAL_ERROR",
        5031 => "CU_FILE_GETNEWFD_FAILED",
        5033 => "CU_FILE_NVFS_SETUP_ERROR",
        5034 => "CU_FILE_IO_DISABLED",
        5035 => "CU_FILE_BATCH_SUBMIT_FAILED",
        5036 => "CU_FILE_GPU_MEMORY_PINNING_FAILED",
        5037 => "CU_FILE_BATCH_FULL",
        5038 => "CU_FILE_ASYNC_NOT_SUPPORTED",
        _ => "an unknown cuFile status",
    }
}

fn cuda_part(code: i32, cuda: i32) -> String {
    if code == CUDA_DRIVER_ERROR {
        format!(", CUDA error {cuda}")
    } else {
        String::new()
    }
}

/// One file registered with cuFile, read straight into device memory.
///
/// The file is opened `O_DIRECT` where the filesystem takes it (cuFile's direct path needs it;
/// a buffered descriptor is read in compatibility mode): [`mode`](CuFileReader::mode) says which.
/// Destination memory is not registered with cuFile (`cuFileBufRegister`), so cuFile stages
/// through its own GPU bounce buffers; registering large destinations is the next step if a
/// benchmark shows that staging costs.
pub struct CuFileReader {
    api: &'static Api,
    reader: FileReader,
    handle: *mut c_void,
}

// SAFETY: the handle is owned by this value alone and deregistered once, on drop; cuFile's calls
// are thread safe (its API reference), so the handle may be used from any thread, and from
// several at once.
unsafe impl Send for CuFileReader {}
// SAFETY: as for `Send`: concurrent `cuFileRead`s on one handle are allowed.
unsafe impl Sync for CuFileReader {}

impl CuFileReader {
    /// Loads cuFile (see [`cufile_available`]), opens `path` and registers it.
    pub fn open(path: &Path) -> Result<CuFileReader, CuFileError> {
        let api = api()?;
        let file =
            File::open(path).map_err(|source| ReadError::Io { call: "open", path: path.to_path_buf(), source })?;
        CuFileReader::register(api, file, path)
    }

    /// As [`open`](CuFileReader::open), for a file already open for reading (the descriptor a
    /// caller checked); `path` names it in errors.
    pub fn from_file(file: File, path: &Path) -> Result<CuFileReader, CuFileError> {
        CuFileReader::register(api()?, file, path)
    }

    fn register(api: &'static Api, file: File, path: &Path) -> Result<CuFileReader, CuFileError> {
        let reader = FileReader::from_file(file, path, ReadMode::Direct)?;
        let mut descr = Descr {
            kind: HANDLE_TYPE_OPAQUE_FD,
            handle: DescrHandle { fd: reader.file().as_raw_fd() },
            fs_ops: std::ptr::null(),
        };
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: both pointers are valid for the call; the descriptor stays open (owned by
        // `reader`) for as long as the handle is registered, as cuFile requires.
        let status = unsafe { (api.handle_register)(&mut handle, &mut descr) };
        if status.err != SUCCESS {
            return Err(CuFileError::Register { path: path.to_path_buf(), code: status.err, cuda: status.cu_err });
        }
        Ok(CuFileReader { api, reader, handle })
    }

    /// Whether the descriptor is `O_DIRECT` ([`ReadMode::Direct`]) or cuFile reads it buffered.
    pub fn mode(&self) -> ReadMode {
        self.reader.mode()
    }

    /// The file's length in bytes when it was opened.
    pub fn len(&self) -> u64 {
        self.reader.len()
    }

    pub fn is_empty(&self) -> bool {
        self.reader.is_empty()
    }

    pub fn path(&self) -> &Path {
        self.reader.path()
    }

    /// Reads `len` bytes at file `offset` into `dst` at byte `at`, synchronously (the bytes are
    /// in device memory on return). Binds `dst`'s context to the calling thread. Any offsets and
    /// lengths: cuFile handles alignment itself.
    pub fn read(
        &self,
        offset: u64,
        len: usize,
        dst: &mut impl OwnedDeviceMemory,
        at: usize,
    ) -> Result<(), CuFileError> {
        if offset.checked_add(len as u64).is_none_or(|end| end > self.len()) {
            return Err(ReadError::PastEnd {
                path: self.path().to_path_buf(),
                offset,
                len: len as u64,
                file_len: self.len(),
            }
            .into());
        }
        let (base, dst_len) = dst.range();
        if at.checked_add(len).is_none_or(|end| end > dst_len) {
            let message = format!("{len} bytes at offset {at} exceed a {dst_len}-byte device buffer");
            return Err(CudaError::Invalid(message).into());
        }
        if len == 0 {
            return Ok(());
        }
        dst.owner().bind_to_thread().call("cuCtxSetCurrent")?;
        let fail =
            |reason: String| CuFileError::Read { path: self.path().to_path_buf(), offset, len: len as u64, reason };
        let mut done = 0;
        while done < len {
            let file_offset =
                libc::off_t::try_from(offset + done as u64).map_err(|_| fail("offset too large".into()))?;
            // The destination is not registered with cuFile, so its address goes in whole as
            // the base and the buffer offset is 0 (offsets are meant for registered buffers).
            let to = (base + (at + done) as u64) as *mut c_void;
            // SAFETY: `to` lies inside live device memory `dst` owns, mutably borrowed for the
            // call, with `len - done` bytes after it inside too (checked above); its context
            // is current on this thread; the handle is registered.
            let n = unsafe { (self.api.read)(self.handle, to, len - done, file_offset, 0) };
            match n {
                0 => return Err(fail("the file ended early".into())),
                -1 => return Err(fail(std::io::Error::last_os_error().to_string())),
                n if n < 0 => {
                    let code = n.unsigned_abs().min(i32::MAX as usize) as i32;
                    return Err(fail(format!("{} ({code})", op_error_name(code))));
                }
                n => done += n as usize,
            }
        }
        Ok(())
    }
}

impl Drop for CuFileReader {
    fn drop(&mut self) {
        // SAFETY: the handle was registered by `register` and is deregistered once, here,
        // before `reader` closes the descriptor (fields drop after this body).
        unsafe { (self.api.handle_deregister)(self.handle) };
    }
}

impl fmt::Debug for CuFileReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CuFileReader").field("path", &self.path()).field("mode", &self.mode()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_answers_without_panicking() {
        match cufile_available() {
            Ok(info) => {
                eprintln!("{info}");
                assert!(!info.to_string().is_empty());
            }
            Err(error) => {
                eprintln!("{error}");
                assert!(matches!(
                    error,
                    CuFileError::NoLibrary { .. }
                        | CuFileError::MissingSymbol { .. }
                        | CuFileError::Call { .. }
                        | CuFileError::Cuda(CudaError::NoDriver)
                ));
            }
        }
        // A second probe answers the same way (a failed load is retried, a loaded one kept).
        assert_eq!(cufile_available().is_ok(), cufile_available().is_ok());
    }

    #[test]
    fn opening_a_file_without_cufile_says_why() {
        let path = std::env::temp_dir().join(format!("weightlift-test-cufile-{}", std::process::id()));
        std::fs::write(&path, [1u8; 100]).unwrap();
        let opened = CuFileReader::open(&path);
        if cufile_available().is_err() {
            assert!(matches!(
                opened,
                Err(CuFileError::NoLibrary { .. }
                    | CuFileError::MissingSymbol { .. }
                    | CuFileError::Call { .. }
                    | CuFileError::Cuda(CudaError::NoDriver))
            ));
        }
        drop(opened);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn errors_name_the_status() {
        let error = CuFileError::Call { call: "cuFileDriverOpen", code: 5011, cuda: 100 };
        assert_eq!(error.to_string(), "cuFileDriverOpen failed: CU_FILE_CUDA_DRIVER_ERROR (5011), CUDA error 100");
        let error = CuFileError::Register { path: "/x".into(), code: 5018, cuda: 0 };
        assert_eq!(error.to_string(), "/x: cuFileHandleRegister failed: CU_FILE_INVALID_FILE_TYPE (5018)");
        assert_eq!(op_error_name(4), "an unknown cuFile status");
    }

    #[test]
    fn the_note_says_which_path_runs() {
        let mut info = CuFileInfo {
            library: "libcufile.so.0",
            version: Some(1150),
            nvfs_version: None,
            status_flags: 0,
            control_flags: 1 << ALLOW_COMPAT_MODE_BIT,
            feature_flags: 0,
            max_direct_io_bytes: 16 << 20,
        };
        assert!(!info.direct_to_gpu() && info.compat_mode_allowed());
        assert_eq!(
            info.to_string(),
            "cuFile (libcufile.so.0, version 1150): no nvidia-fs driver, compatibility mode (reads staged through host memory)"
        );
        info.nvfs_version = Some((2, 20));
        info.status_flags = 1 << NVME_SUPPORTED_BIT;
        assert!(info.direct_to_gpu());
        assert_eq!(info.to_string(), "cuFile (libcufile.so.0, version 1150): nvidia-fs 2.20, NVMe direct to GPU");
        info.nvfs_version = None;
        info.status_flags = 1 << NVME_P2P_SUPPORTED_BIT;
        info.control_flags = 0;
        info.version = None;
        assert_eq!(info.to_string(), "cuFile (libcufile.so.0): no nvidia-fs driver, NVMe P2P, NVMe direct to GPU");
    }

    #[test]
    fn the_bound_structures_have_the_header_layout() {
        // x86-64 and aarch64 Linux: the offsets of cufile.h's structures.
        assert_eq!(std::mem::size_of::<Status>(), 8);
        assert_eq!(std::mem::size_of::<Descr>(), 24);
        assert_eq!(std::mem::offset_of!(Descr, handle), 8);
        assert_eq!(std::mem::size_of::<NvfsProps>(), 32);
        assert_eq!(std::mem::offset_of!(DriverProps, fflags), 32);
        assert_eq!(std::mem::offset_of!(DriverProps, max_batch_io_timeout_msecs), 52);
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn cufile_reads_ranges_into_device_memory() {
        let info = match cufile_available() {
            Ok(info) => info,
            Err(error) => {
                // Not every GPU machine has libcufile: the plain path is the fallback then.
                eprintln!("skipped: {error}");
                return;
            }
        };
        eprintln!("{info}");
        let gpu = crate::tests_gpu::gpu();
        let bytes = crate::tests_gpu::bytes(3 << 20, 7);
        let path = std::env::temp_dir().join(format!("weightlift-test-cufile-gpu-{}", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let reader = match CuFileReader::open(&path) {
            Ok(reader) => reader,
            // Compatibility mode may still refuse a file system (tmpfs, overlay): the plain
            // path is the fallback then, and the error names the file and the code.
            Err(error @ CuFileError::Register { .. }) => {
                assert!(error.to_string().contains(&path.display().to_string()), "{error}");
                eprintln!("skipped: cuFile does not take files here: {error}");
                let _ = std::fs::remove_file(&path);
                return;
            }
            Err(error) => panic!("{error}"),
        };
        eprintln!("{}: {}", path.display(), reader.mode());
        let mut dst = gpu.alloc(bytes.len()).unwrap();
        for (offset, len, at) in [(0, bytes.len(), 0), (4097, 1 << 20, 13), (5, 4091, 8192), (bytes.len() - 1, 1, 0)] {
            reader.read(offset as u64, len, &mut dst, at).unwrap();
            let mut back = vec![0u8; len];
            dst.download_at(at, &mut back).unwrap();
            assert!(back == bytes[offset..offset + len], "{len} bytes at {offset} into {at} differ");
        }
        assert!(matches!(
            reader.read(bytes.len() as u64, 1, &mut dst, 0),
            Err(CuFileError::File(ReadError::PastEnd { .. }))
        ));
        assert!(matches!(reader.read(0, 2, &mut dst, bytes.len() - 1), Err(CuFileError::Cuda(CudaError::Invalid(_)))));
        drop(reader);
        let _ = std::fs::remove_file(&path);
    }
}
