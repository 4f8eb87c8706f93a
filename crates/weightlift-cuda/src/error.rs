//! Errors from the CUDA driver and NVRTC, carrying the call that failed and its code.

use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    /// libnvrtc could not be loaded: kernels cannot be compiled.
    #[error("no NVRTC found (libnvrtc.so could not be loaded); it ships with the CUDA toolkit and with torch")]
    NoNvrtc,
    #[error("{call} failed: {code:?}")]
    Driver { call: &'static str, code: CUresult },
    #[error("compiling weightlift's kernels failed: {0}")]
    Compile(String),
    #[error("{0}")]
    Invalid(String),
    /// An update's waves or a wave's work contradict its tensors.
    #[error(transparent)]
    Schedule(#[from] weightlift_core::ScheduleError),
    /// Region `index` of a [`Gpu::locate`](crate::Gpu::locate) call does not fit the
    /// allocation it starts in.
    #[error("region {index} at {ptr:#x} ({len} bytes) runs past the end of its allocation ({base:#x}, {bytes} bytes)")]
    OutsideAllocation { index: usize, ptr: u64, len: u64, base: u64, bytes: u64 },
}

/// Attaches the name of the driver call to a cudarc result.
pub(crate) trait Call<T> {
    fn call(self, name: &'static str) -> Result<T, CudaError>;
}

impl<T> Call<T> for Result<T, DriverError> {
    fn call(self, name: &'static str) -> Result<T, CudaError> {
        self.map_err(|e| CudaError::Driver { call: name, code: e.0 })
    }
}
