//! weightlift's Python exceptions, and how Rust errors map onto them.
//!
//! `WeightliftError` is the base; every message names the tensors, versions or endpoints
//! involved, as the Rust error did.

use pyo3::exceptions::PyException;
use pyo3::{create_exception, PyErr};
use weightlift::SendError;
use weightlift_cuda::CudaError as DriverError;

create_exception!(_weightlift, WeightliftError, PyException, "Base of every error weightlift raises.");
create_exception!(
    _weightlift,
    PlanError,
    WeightliftError,
    "The tensors cannot be mapped: unknown or missing names, shapes, dtypes, rules, layouts."
);
create_exception!(
    _weightlift,
    TransferError,
    WeightliftError,
    "An update broke off: connection, transport, a receiver that went away or stalled."
);
create_exception!(
    _weightlift,
    VerificationError,
    WeightliftError,
    "Bytes arrived but their digests differ from the sender's (or from a checker's snapshot)."
);
create_exception!(
    _weightlift,
    VersionError,
    WeightliftError,
    "The receiver refused the version (not newer than its committed one, or one in flight)."
);
create_exception!(_weightlift, CudaError, WeightliftError, "The CUDA driver failed or is absent; names the call.");
create_exception!(
    _weightlift,
    MemoryPoolError,
    WeightliftError,
    "Tagged memory refused: a tag that does not fit on resume (`needed` and `free` bytes), a paused or unknown tag."
);

pub(crate) fn plan_error(message: impl Into<String>) -> PyErr {
    PlanError::new_err(message.into())
}

pub(crate) fn cuda_error(error: DriverError) -> PyErr {
    CudaError::new_err(error.to_string())
}

pub(crate) fn send_error(error: SendError) -> PyErr {
    let message = error.to_string();
    match error {
        SendError::Connect { .. }
        | SendError::Protocol(_)
        | SendError::Session(_)
        | SendError::Transfer(_)
        | SendError::Injected(_) => TransferError::new_err(message),
        SendError::Rejected(_)
        | SendError::Plan(_)
        | SendError::Schedule(_)
        | SendError::PlanMismatch { .. }
        | SendError::WrongTensors(_) => PlanError::new_err(message),
        SendError::Refused { .. } => VersionError::new_err(message),
        SendError::Device(_) | SendError::Cuda { .. } => CudaError::new_err(message),
    }
}
