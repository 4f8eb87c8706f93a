//! weightlift's Python exceptions, and how Rust errors map onto them.
//!
//! `WeightliftError` is the base; every message names the tensors, versions or endpoints
//! involved, as the Rust error did.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::{create_exception, PyErr};
use weightlift::{ProblemNote, SendError, StreamFailure, StreamSetupError};
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

/// A streaming receiver that cannot be set up.
pub(crate) fn stream_error(error: StreamSetupError) -> PyErr {
    plan_error(error.to_string())
}

/// The engine's side of a streamed update stopped: a digest mismatch is a VerificationError,
/// the rest TransferErrors; `handed` (on the exception) names what the engine was handed.
pub(crate) fn failure_error(failure: StreamFailure) -> PyErr {
    let message = failure.to_string();
    match failure {
        StreamFailure::Failed { reason, handed, .. } => {
            let shown: Vec<String> = handed.iter().take(8).map(|n| format!("`{n}`")).collect();
            let message = match handed.len() {
                0 => message,
                n => format!(
                    "{message}; {n} tensor(s) handed to the engine may hold either version: {}",
                    shown.join(", ")
                ),
            };
            let error = match reason.contains("digest mismatch") {
                true => VerificationError::new_err(message),
                false => TransferError::new_err(message),
            };
            Python::attach(|py| {
                let _ = error.value(py).setattr("handed", handed);
            });
            error
        }
        StreamFailure::NoUpdate => VersionError::new_err(message),
        StreamFailure::Timeout { .. } | StreamFailure::Undecided { .. } => TransferError::new_err(message),
    }
}

pub(crate) fn cuda_error(error: DriverError) -> PyErr {
    CudaError::new_err(error.to_string())
}

/// A PlanError carrying `problems`: one dict per problem found (`kind`, `tensors`, `message`).
fn plan_problems_error(message: String, problems: &[ProblemNote]) -> PyErr {
    let error = PlanError::new_err(message);
    let problems: Vec<serde_json::Value> = problems
        .iter()
        .map(|p| serde_json::json!({"kind": p.kind, "tensors": p.tensors, "message": p.message}))
        .collect();
    Python::attach(|py| {
        // The message names every problem already: an attribute that cannot be set loses nothing.
        if let Ok(problems) = crate::to_python(py, &serde_json::Value::Array(problems)) {
            let _ = error.value(py).setattr("problems", problems);
        }
    });
    error
}

pub(crate) fn send_error(error: SendError) -> PyErr {
    let message = error.to_string();
    send_error_as(&error, message)
}

/// `error` as the Python exception of its kind (that of the failure it stands for, for one
/// shared by a fan-out class), with `message`.
fn send_error_as(error: &SendError, message: String) -> PyErr {
    match error {
        SendError::Plan(plan) => plan_problems_error(message, &ProblemNote::all(plan)),
        SendError::Unplannable { problems, .. } => plan_problems_error(message, problems),
        SendError::Class(shared) => send_error_as(shared, message),
        SendError::Connect { .. }
        | SendError::Protocol(_)
        | SendError::Session(_)
        | SendError::Transfer(_)
        | SendError::Injected(_)
        | SendError::Nccl { .. } => TransferError::new_err(message),
        SendError::Rejected(_)
        | SendError::Schedule(_)
        | SendError::PlanMismatch { .. }
        | SendError::WrongTensors(_)
        | SendError::BadShard(_)
        | SendError::Quantized { .. } => PlanError::new_err(message),
        SendError::Refused { .. } => VersionError::new_err(message),
        SendError::Cuda { .. } => CudaError::new_err(message),
    }
}
