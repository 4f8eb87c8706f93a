//! Named tensors handed over from Python through DLPack: checked (dtype, device, contiguity),
//! kept alive while Rust uses their memory, and seen by weightlift as source or destination
//! tensors (host memory) or device tensors (CUDA).
//!
//! DLPack is the one contract here that Rust cannot check: a producer promises its pointer is
//! valid for the tensor's bytes for as long as the managed tensor lives. Every set keeps the
//! managed tensors (their deleters) until it is dropped.

use std::fmt;

use dlpark::ffi::{DLDataTypeCode, DLDeviceType, DLTensor};
use dlpark::python::consumer::exchange::ExchangeApi;
use dlpark::python::from_dlpack;
use dlpark::AllocationDeleter;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use weightlift::{DestinationTensors, DeviceTensors, SourceTensors};
use weightlift_core::{DType, Manifest, TensorSpec};

use crate::errors::plan_error;

/// Where a set of tensors lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place {
    Host,
    Cuda(usize),
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Host => f.write_str("cpu"),
            Place::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Tensors imported from Python, in the order given, all in one place.
pub(crate) struct TensorSet {
    manifest: Manifest,
    ptrs: Vec<u64>,
    place: Place,
    /// The Python objects the tensors came from (to tell whether a later call passes the same).
    objects: Vec<Py<PyAny>>,
    /// Keep the producers' memory alive; released when the set is dropped.
    _owners: Vec<AllocationDeleter>,
}

/// One tensor imported through DLPack.
struct Imported {
    spec: TensorSpec,
    ptr: u64,
    place: Place,
    owner: AllocationDeleter,
}

fn dtype_of(name: &str, code: DLDataTypeCode, bits: u8, lanes: u16) -> PyResult<DType> {
    let dtype = match (code, bits, lanes) {
        (DLDataTypeCode::FLOAT, 32, 1) => DType::F32,
        (DLDataTypeCode::BFLOAT, 16, 1) => DType::BF16,
        (DLDataTypeCode::FLOAT, 16, 1) => DType::F16,
        (DLDataTypeCode::FLOAT8_E4M3FN, 8, 1) => DType::F8E4M3,
        (DLDataTypeCode::FLOAT8_E5M2, 8, 1) => DType::F8E5M2,
        (DLDataTypeCode::INT, 64, 1) => DType::I64,
        (DLDataTypeCode::INT, 32, 1) => DType::I32,
        (DLDataTypeCode::UINT, 8, 1) => DType::U8,
        (DLDataTypeCode::BOOL, 8, 1) => DType::Bool,
        _ => {
            return Err(plan_error(format!(
                "`{name}` has DLPack dtype (code {}, {bits} bits, {lanes} lanes), which weightlift does not move \
                 (F32, BF16, F16, F8_E4M3, F8_E5M2, I64, I32, U8, BOOL)",
                code.0
            )))
        }
    };
    Ok(dtype)
}

fn place_of(name: &str, device_type: DLDeviceType, device_id: i32) -> PyResult<Place> {
    match device_type {
        DLDeviceType::CPU | DLDeviceType::CUDAHOST => Ok(Place::Host),
        DLDeviceType::CUDA if device_id >= 0 => Ok(Place::Cuda(device_id as usize)),
        other => {
            Err(plan_error(format!("`{name}` lives on DLPack device type {}, not the CPU or a CUDA GPU", other.0)))
        }
    }
}

/// Torch refuses to export tensors that require grad; their bytes are what we want, so take
/// them through `detach()` (same memory).
fn exportable<'py>(tensor: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    match tensor.getattr(pyo3::intern!(tensor.py(), "requires_grad")) {
        Ok(flag) if flag.is_truthy()? => tensor.call_method0(pyo3::intern!(tensor.py(), "detach")),
        _ => Ok(tensor.clone()),
    }
}

fn import_one(name: &str, tensor: &Bound<'_, PyAny>) -> PyResult<Imported> {
    let source = exportable(tensor)?;
    let imported = from_dlpack(source.as_borrowed(), None, Some(false))
        .map_err(|e| plan_error(format!("`{name}` cannot be shared without a copy through DLPack: {e}")))?;
    let (spec, ptr, place) = {
        let view = imported.validate().map_err(|e| plan_error(format!("`{name}`: malformed DLPack tensor: {e}")))?;
        let dtype = view.dtype();
        let dtype = dtype_of(name, dtype.code, dtype.bits, dtype.lanes)?;
        let device = view.device();
        let place = place_of(name, device.device_type, device.device_id)?;
        if !view.is_compact().unwrap_or(false) {
            return Err(plan_error(format!(
                "`{name}` is not contiguous (shape {:?}, strides {:?}): pass `.contiguous()`",
                view.shape(),
                view.strides()
            )));
        }
        let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
        let ptr = view.data_ptr() as u64 + view.byte_offset();
        (TensorSpec::new(name, dtype, shape), ptr, place)
    };
    Ok(Imported { spec, ptr, place, owner: imported.into_deleter() })
}

/// The (name, tensor) pairs of a dict or of any iterable of pairs (`named_parameters()`).
fn pairs<'py>(named: &Bound<'py, PyAny>) -> PyResult<Vec<(Bound<'py, PyString>, Bound<'py, PyAny>)>> {
    let items = match named.cast::<PyDict>() {
        Ok(dict) => dict.items().into_any(),
        Err(_) => named.clone(),
    };
    let mut out = Vec::new();
    for item in items.try_iter()? {
        let item = item?;
        let (name, tensor): (Bound<'py, PyAny>, Bound<'py, PyAny>) = item
            .extract()
            .map_err(|_| plan_error("expected (name, tensor) pairs, like a dict or `model.named_parameters()`"))?;
        let name = name.cast_into::<PyString>().map_err(|_| plan_error("tensor names must be strings"))?;
        out.push((name, tensor));
    }
    Ok(out)
}

/// What DLPack's borrowed view says of a tensor now: (address, dtype, shape).
fn view_of(view: &DLTensor) -> (u64, (u8, u8, u16), Vec<i64>) {
    let ndim = view.ndim.max(0) as usize;
    let shape = if ndim == 0 || view.shape.is_null() {
        Vec::new()
    } else {
        // SAFETY: a producer's view has `ndim` shape entries while the callback runs (DLPack).
        unsafe { std::slice::from_raw_parts(view.shape, ndim) }.to_vec()
    };
    (view.data as u64 + view.byte_offset, (view.dtype.code.0, view.dtype.bits, view.dtype.lanes), shape)
}

impl TensorSet {
    /// Imports every pair of `named`; `what` names the set in errors ("pushed", "engine").
    pub(crate) fn import(named: &Bound<'_, PyAny>, what: &str) -> PyResult<TensorSet> {
        let pairs = pairs(named)?;
        let mut specs = Vec::with_capacity(pairs.len());
        let mut ptrs = Vec::with_capacity(pairs.len());
        let mut owners = Vec::with_capacity(pairs.len());
        let mut objects = Vec::with_capacity(pairs.len());
        let mut place = None;
        for (name, tensor) in &pairs {
            let name = name.to_str()?;
            let one = import_one(name, tensor)?;
            match place {
                None => place = Some((one.place, name.to_string())),
                Some((p, ref first)) if p != one.place => {
                    return Err(plan_error(format!(
                        "the {what} tensors must all be in one place: `{first}` is on {p}, `{name}` on {}",
                        one.place
                    )))
                }
                Some(_) => {}
            }
            specs.push(one.spec);
            ptrs.push(one.ptr);
            owners.push(one.owner);
            objects.push(tensor.clone().unbind());
        }
        let Some((place, _)) = place else {
            return Err(plan_error(format!("no {what} tensors were given")));
        };
        let manifest = Manifest::new(specs).map_err(|e| plan_error(format!("{what} tensors: {e}")))?;
        Ok(TensorSet { manifest, ptrs, place, objects, _owners: owners })
    }

    /// No tensors, in host memory (a rank of a sharded trainer that holds none of the model).
    pub(crate) fn empty() -> TensorSet {
        let manifest = Manifest::new(Vec::new()).expect("an empty manifest is well formed");
        TensorSet { manifest, ptrs: Vec::new(), place: Place::Host, objects: Vec::new(), _owners: Vec::new() }
    }

    /// `self` if `named` holds the same objects under the same names, at the same addresses,
    /// dtypes and shapes (checked through DLPack's borrowed view: no Python call per tensor);
    /// otherwise a fresh import. The bool says whether it was reused.
    pub(crate) fn refresh(self, named: &Bound<'_, PyAny>, what: &str) -> PyResult<(TensorSet, bool)> {
        if self.still_matches(named)? {
            return Ok((self, true));
        }
        drop(self);
        Ok((TensorSet::import(named, what)?, false))
    }

    fn still_matches(&self, named: &Bound<'_, PyAny>) -> PyResult<bool> {
        let pairs = pairs(named)?;
        if pairs.len() != self.objects.len() {
            return Ok(false);
        }
        let Some(api) = ExchangeApi::from_object(pairs[0].1.as_borrowed())? else {
            return Ok(false); // no cheap view (numpy): import again
        };
        for (i, (name, tensor)) in pairs.iter().enumerate() {
            let spec = &self.manifest.specs()[i];
            if !tensor.is(&self.objects[i]) || name.to_str()? != spec.name {
                return Ok(false);
            }
            let Ok((ptr, (code, bits, lanes), shape)) =
                api.with_tensor_view_no_sync(tensor.as_borrowed(), |v, _| view_of(v))
            else {
                return Ok(false);
            };
            let dtype = dtype_of(&spec.name, DLDataTypeCode(code), bits, lanes).ok();
            let same_shape =
                shape.len() == spec.shape.len() && shape.iter().zip(&spec.shape).all(|(&a, &b)| a as u64 == b);
            if ptr != self.ptrs[i] || dtype != Some(spec.dtype) || !same_shape {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(crate) fn place(&self) -> Place {
        self.place
    }

    /// An error naming two tensors whose memory overlaps (a receiver writes each in place, so
    /// two names for one memory would each be written).
    pub(crate) fn check_disjoint(&self) -> PyResult<()> {
        let specs = self.manifest.specs();
        let mut order: Vec<usize> = (0..specs.len()).filter(|&i| specs[i].byte_len() > 0).collect();
        order.sort_by_key(|&i| self.ptrs[i]);
        for pair in order.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if self.ptrs[a] + specs[a].byte_len() > self.ptrs[b] {
                return Err(plan_error(format!(
                    "`{}` and `{}` share memory: pass each engine parameter once",
                    specs[a].name, specs[b].name
                )));
            }
        }
        Ok(())
    }

    fn host_slice(&self, index: usize) -> &[u8] {
        let len = self.manifest.specs()[index].byte_len() as usize;
        if len == 0 {
            return &[];
        }
        debug_assert_eq!(self.place, Place::Host);
        // SAFETY: a host tensor's producer keeps `len` bytes at this address alive while its
        // managed tensor (held in `_owners`) lives, which is as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptrs[index] as *const u8, len) }
    }
}

impl SourceTensors for TensorSet {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn bytes(&self, index: usize) -> &[u8] {
        self.host_slice(index)
    }
}

impl DestinationTensors for TensorSet {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn bytes(&self, index: usize) -> &[u8] {
        self.host_slice(index)
    }

    fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        let len = self.manifest.specs()[index].byte_len() as usize;
        if len == 0 {
            return &mut [];
        }
        // SAFETY: as in `host_slice`; destination sets are checked disjoint when made
        // (`check_disjoint`), so this is the only reference to these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.ptrs[index] as *mut u8, len) }
    }

    fn all_mut(&mut self) -> Vec<&mut [u8]> {
        let specs = self.manifest.specs();
        (0..specs.len())
            .map(|i| {
                let len = specs[i].byte_len() as usize;
                if len == 0 {
                    return &mut [][..];
                }
                // SAFETY: as in `bytes_mut`; the sets' tensors are disjoint, so the slices are too.
                unsafe { std::slice::from_raw_parts_mut(self.ptrs[i] as *mut u8, len) }
            })
            .collect()
    }
}

impl DeviceTensors for TensorSet {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn device_ptrs(&self) -> Vec<u64> {
        self.ptrs.clone()
    }
}
