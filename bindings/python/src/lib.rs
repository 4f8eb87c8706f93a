//! The native module of the `weightlift` Python package: thin bindings over the Rust crates.
//!
//! One call into Rust per update, whatever the number of tensors: `Sender.push` imports the
//! tensors through DLPack (once; later pushes of the same objects only check their addresses),
//! and the transfer runs with the GIL released.
#![deny(clippy::undocumented_unsafe_blocks)]

mod checker;
mod errors;
mod memory;
mod receiver;
mod sender;
mod stream;
mod tensors;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};
use weightlift_core::{
    digest as host_digest, synthetic, Manifest, Module, Preset, PresetOptions, RuleSet, SYNTHETIC_MODELS,
};
use weightlift_cuda::{CudaError as DriverError, Gpu};

use weightlift::DeviceTensors;

use crate::errors::{cuda_error, plan_error};
use crate::tensors::{Place, TensorSet};

/// GPU `ordinal`, opened once per process (kernels compiled once) and shared.
pub(crate) fn gpu(ordinal: usize) -> Result<Arc<Gpu>, DriverError> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut open = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(gpu) = open.get(&ordinal) {
        return Ok(gpu.clone());
    }
    let gpu = Arc::new(Gpu::open(ordinal)?);
    open.insert(ordinal, gpu.clone());
    Ok(gpu)
}

/// GPU `ordinal` for senders: the receivers' [`gpu`] with streams of its own, so a trainer
/// digesting its tensors does not queue behind an engine pulling them in the same process.
pub(crate) fn sender_gpu(ordinal: usize) -> Result<Arc<Gpu>, DriverError> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let shared = gpu(ordinal)?;
    let mut open = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(gpu) = open.get(&ordinal) {
        return Ok(gpu.clone());
    }
    let gpu = Arc::new(shared.with_own_streams()?);
    open.insert(ordinal, gpu.clone());
    Ok(gpu)
}

/// The digest of every tensor of `set`, computed where it lives. GPU work queued by other
/// libraries (torch's optimizer step) is waited for first.
pub(crate) fn digests_of(py: Python<'_>, set: &TensorSet) -> PyResult<Vec<u64>> {
    match set.place() {
        Place::Host => Ok(py.detach(|| {
            (0..weightlift::SourceTensors::manifest(set).len())
                .map(|i| host_digest::digest(weightlift::SourceTensors::bytes(set, i)))
                .collect()
        })),
        Place::Cuda(ordinal) => py
            .detach(|| {
                let gpu = gpu(ordinal)?;
                gpu.synchronize_device()?;
                DeviceTensors::digests(set, &gpu)
            })
            .map_err(cuda_error),
    }
}

/// The rules of `preset` for tensors like `manifest` (Qwen3's head dim read off its q_norm
/// when not given).
pub(crate) fn preset_rules(
    preset: &str,
    module: Module,
    manifest: &Manifest,
    head_dim: Option<u64>,
    expert_parallel: bool,
) -> PyResult<(Preset, RuleSet)> {
    let preset: Preset = preset.parse().map_err(plan_error)?;
    let head_dim = head_dim.or_else(|| head_dim_of(manifest.iter().map(|s| (s.name.as_str(), s.shape.as_slice()))));
    let rules = preset
        .module_rules(module, PresetOptions { head_dim, expert_parallel }, None)
        .map_err(|e| plan_error(format!("preset {preset}, module {module}: {e}")))?;
    Ok((preset, rules))
}

/// Qwen3's head dim, read off the shape of a q_norm among (name, shape) pairs.
pub(crate) fn head_dim_of<'a>(shapes: impl IntoIterator<Item = (&'a str, &'a [u64])>) -> Option<u64> {
    shapes
        .into_iter()
        .find(|(name, shape)| name.ends_with(".self_attn.q_norm.weight") && shape.len() == 1)
        .map(|(_, s)| s[0])
}

/// The module a receiver holds, by name (whole, main or mtp); None is the whole checkpoint.
pub(crate) fn module(name: Option<&str>) -> PyResult<Module> {
    name.map_or(Ok(Module::Whole), |n| n.parse().map_err(plan_error))
}

/// `value` seconds as a Duration; a negative, NaN or infinite `what` (or 0 unless `zero_ok`)
/// is a PlanError naming it, where Duration::from_secs_f64 would panic.
pub(crate) fn seconds(what: &str, value: f64, zero_ok: bool) -> PyResult<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| zero_ok || !d.is_zero())
        .ok_or_else(|| plan_error(format!("{what} must be a positive number of seconds, got {value}")))
}

/// A JSON value as the Python object it spells.
pub(crate) fn to_python(py: Python<'_>, value: &serde_json::Value) -> PyResult<Py<PyAny>> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_pyobject(py)?.to_owned().into_any().unbind(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any().unbind(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any().unbind(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any().unbind(),
        },
        Value::String(s) => s.into_pyobject(py)?.into_any().unbind(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_python(py, item)?)?;
            }
            list.into_any().unbind()
        }
        Value::Object(fields) => {
            let dict = PyDict::new(py);
            for (k, v) in fields {
                dict.set_item(k, to_python(py, v)?)?;
            }
            dict.into_any().unbind()
        }
    })
}

/// digest(tensor) -> int
///
/// The weightlift digest of a tensor's bytes (xxh64 of its 4 KiB chunks' xxh64, DESIGN.md),
/// computed where the tensor lives: on its GPU for CUDA tensors, with no copy to the host.
#[pyfunction]
fn digest(py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<u64> {
    let pair = pyo3::types::PyTuple::new(py, [pyo3::types::PyString::new(py, "tensor").into_any(), tensor.clone()])?;
    let set = TensorSet::import(&PyList::new(py, [pair])?.into_any(), "digested")?;
    Ok(digests_of(py, &set)?[0])
}

/// synthetic_manifest(name) -> list[tuple[str, list[int], str]]
///
/// The (name, shape, dtype) of every tensor of one of weightlift's synthetic model shapes
/// (qwen3-8b, qwen3-30b-a3b, ...), for benchmarks and tests that build tensors in Python.
#[pyfunction]
fn synthetic_manifest(name: &str) -> PyResult<Vec<(String, Vec<u64>, String)>> {
    let config = synthetic(name).ok_or_else(|| {
        plan_error(format!("unknown synthetic model `{name}` (known: {})", SYNTHETIC_MODELS.join(", ")))
    })?;
    Ok(config.source_manifest().iter().map(|s| (s.name.clone(), s.shape.clone(), s.dtype.name().to_string())).collect())
}

/// _quantize_fp8(data, shape, block) -> (bytes, bytes)
///
/// The host's FP8 (e4m3) block quantizer over `data` (f32, little-endian, row-major `shape`):
/// the e4m3 bytes and the f32 scales (`weight_scale_inv`), one per block of the last two
/// dimensions. What weightlift writes into FP8 engines; `weightlift.quantize_fp8` wraps it.
#[pyfunction]
fn _quantize_fp8<'py>(
    py: Python<'py>,
    data: &[u8],
    shape: Vec<u64>,
    block: (u64, u64),
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let n = shape.len();
    let numel: u64 = shape.iter().product();
    if n < 2 || block.0 == 0 || block.1 == 0 || data.len() as u64 != 4 * numel {
        return Err(plan_error(format!(
            "quantize_fp8: {} bytes of f32 with shape {shape:?} in blocks of {block:?}: needs a shape of two \
             dimensions or more, its bytes, and blocks of at least 1 x 1",
            data.len()
        )));
    }
    let x: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let grid = shape[..n - 2].iter().product::<u64>() * shape[n - 2].div_ceil(block.0) * shape[n - 1].div_ceil(block.1);
    let (mut q, mut scales) = (vec![0u8; x.len()], vec![0f32; grid as usize]);
    weightlift_core::quant::quantize(&x, &shape, [block.0, block.1], &mut q, &mut scales);
    let scale_bytes: Vec<u8> = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
    Ok((PyBytes::new(py, &q), PyBytes::new(py, &scale_bytes)))
}

/// cuda_available() -> bool: whether a CUDA driver and NVRTC can be loaded here.
#[pyfunction]
fn cuda_available() -> bool {
    weightlift_cuda::driver_present() && weightlift_cuda::gpu::nvrtc_present()
}

#[pymodule]
fn _weightlift(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("WeightliftError", py.get_type::<errors::WeightliftError>())?;
    m.add("PlanError", py.get_type::<errors::PlanError>())?;
    m.add("TransferError", py.get_type::<errors::TransferError>())?;
    m.add("VerificationError", py.get_type::<errors::VerificationError>())?;
    m.add("VersionError", py.get_type::<errors::VersionError>())?;
    m.add("CudaError", py.get_type::<errors::CudaError>())?;
    m.add("MemoryPoolError", py.get_type::<errors::MemoryPoolError>())?;
    m.add_class::<sender::Sender>()?;
    m.add_class::<receiver::Receiver>()?;
    m.add_class::<checker::WeightsChecker>()?;
    m.add_class::<memory::MemoryPool>()?;
    m.add_function(wrap_pyfunction!(memory::last_allocator_error, m)?)?;
    m.add_function(wrap_pyfunction!(digest, m)?)?;
    m.add_function(wrap_pyfunction!(synthetic_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(_quantize_fp8, m)?)?;
    m.add_function(wrap_pyfunction!(stream::stream_layout, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
