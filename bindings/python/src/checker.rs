//! `WeightsChecker`: digests of a set of tensors, computed where they live, to snapshot and
//! compare (an engine's weights_checker endpoint), with O(number of tensors) extra memory.

use std::sync::Mutex;

use pyo3::prelude::*;

use crate::errors::{cuda_error, VerificationError, WeightliftError};
use crate::tensors::{Place, TensorSet};
use crate::{digests_of, gpu};

/// WeightsChecker(params)
///
/// Digests of `params` (a dict or iterable of (name, tensor) pairs, all on the CPU or all on
/// one GPU), computed where they live: `checksum()` now, `snapshot()` to remember them,
/// `compare()` to check nothing changed since, `reset(value)` to overwrite every tensor (so a
/// later update can be shown to rewrite all of them).
#[pyclass(module = "weightlift._weightlift")]
pub(crate) struct WeightsChecker {
    tensors: Mutex<TensorSet>,
    snapshot: Mutex<Option<Vec<u64>>>,
}

impl WeightsChecker {
    fn current(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        digests_of(py, &self.tensors.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn names(&self) -> Vec<String> {
        let tensors = self.tensors.lock().unwrap_or_else(|e| e.into_inner());
        weightlift::SourceTensors::manifest(&*tensors).iter().map(|s| s.name.clone()).collect()
    }
}

#[pymethods]
impl WeightsChecker {
    #[new]
    fn new(params: &Bound<'_, PyAny>) -> PyResult<Self> {
        let tensors = TensorSet::import(params, "checked")?;
        tensors.check_disjoint()?;
        Ok(WeightsChecker { tensors: Mutex::new(tensors), snapshot: Mutex::new(None) })
    }

    /// checksum() -> dict[str, int]: every tensor's digest now.
    fn checksum(&self, py: Python<'_>) -> PyResult<Vec<(String, u64)>> {
        Ok(self.names().into_iter().zip(self.current(py)?).collect())
    }

    /// snapshot(): remembers every tensor's digest now.
    fn snapshot(&self, py: Python<'_>) -> PyResult<()> {
        let now = self.current(py)?;
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
        Ok(())
    }

    /// changed() -> list[str]: names whose digest differs from the snapshot.
    fn changed(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let Some(before) = self.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return Err(WeightliftError::new_err("no snapshot taken: call snapshot() first"));
        };
        let now = self.current(py)?;
        Ok(self.names().into_iter().zip(before.iter().zip(&now)).filter(|(_, (a, b))| a != b).map(|(n, _)| n).collect())
    }

    /// compare(): raises VerificationError naming the tensors that changed since the snapshot.
    fn compare(&self, py: Python<'_>) -> PyResult<()> {
        let changed = self.changed(py)?;
        if changed.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = changed.iter().take(8).map(|n| format!("`{n}`")).collect();
        let more = if changed.len() > shown.len() {
            format!(" and {} more", changed.len() - shown.len())
        } else {
            String::new()
        };
        Err(VerificationError::new_err(format!(
            "{} tensor(s) differ from the snapshot: {}{more}",
            changed.len(),
            shown.join(", ")
        )))
    }

    /// reset(value=255): overwrites every byte of every tensor with `value`.
    #[pyo3(signature = (value = 255))]
    fn reset(&self, py: Python<'_>, value: u8) -> PyResult<()> {
        let mut tensors = self.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let tensors = &mut *tensors;
        match tensors.place() {
            Place::Host => {
                py.detach(|| weightlift::DestinationTensors::all_mut(tensors).into_iter().for_each(|t| t.fill(value)));
                Ok(())
            }
            Place::Cuda(ordinal) => py
                .detach(|| {
                    let gpu = gpu(ordinal)?;
                    gpu.synchronize_device()?;
                    weightlift::DeviceTensors::fill_each(tensors, &gpu, &|_| value)
                })
                .map_err(cuda_error),
        }
    }
}
