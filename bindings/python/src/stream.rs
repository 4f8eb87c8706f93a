//! The streaming receiver's layout, for Python to allocate the ring and make its views once.

use pyo3::prelude::*;
use pyo3::types::PyDict;
use weightlift::{StreamOptions, StreamPlan};
use weightlift_core::{DType, Manifest, TensorSpec};

use crate::errors::{plan_error, stream_error};

/// (name, shape, dtype name) of a tensor, as `synthetic_manifest` gives them.
pub(crate) type SpecTriple = (String, Vec<u64>, String);

pub(crate) fn manifest_of(specs: Vec<SpecTriple>) -> PyResult<Manifest> {
    let specs = specs
        .into_iter()
        .map(|(name, shape, dtype)| {
            let dtype: DType = dtype.parse().map_err(|e| plan_error(format!("`{name}`: {e}")))?;
            Ok(TensorSpec::new(name, dtype, shape))
        })
        .collect::<PyResult<Vec<_>>>()?;
    Manifest::new(specs).map_err(|e| plan_error(e.to_string()))
}

/// stream_layout(specs, depth, bucket_bytes) -> dict
///
/// Where a streaming receiver keeps each tensor of `specs` ((name, shape, dtype) triples):
/// `buffer_sizes` (bytes of each buffer to allocate, in order: `depth` ring buffers, then one
/// for tensors larger than a bucket, if any), `places` (per tensor, its (buffer, byte offset),
/// or None for a tensor of no bytes), `buckets` (per bucket, the tensors, by index, it hands
/// over) and `bytes` (all buffers together).
#[pyfunction]
pub(crate) fn stream_layout(
    py: Python<'_>,
    specs: Vec<SpecTriple>,
    depth: u32,
    bucket_bytes: u64,
) -> PyResult<Py<PyDict>> {
    let manifest = manifest_of(specs)?;
    let plan = StreamPlan::new(&manifest, StreamOptions { depth, bucket_bytes, ..StreamOptions::default() })
        .map_err(stream_error)?;
    let out = PyDict::new(py);
    out.set_item("buffer_sizes", plan.buffer_sizes())?;
    out.set_item("places", plan.places())?;
    out.set_item("buckets", plan.layout.complete_after.clone())?;
    out.set_item("bytes", plan.layout.bytes())?;
    Ok(out.unbind())
}
