//! The engine side: `Receiver(params, ...)` holding the engine's own tensors, written in place.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::prelude::*;
use weightlift::{
    check_exposure, Agent, AgentOptions, DeviceTensors, Endpoint, Listener, MemoryControl, ReceiverOptions,
    RunningAgent, StreamOptions, Token,
};
use weightlift_core::{Module, RuleSet, TpRank, Version};

use crate::errors::{cuda_error, failure_error, plan_error, stream_error, TransferError};
use crate::memory::{pools_holding, MemoryPool};
use crate::stream::{manifest_of, SpecTriple};
use crate::tensors::{Place, TensorSet};
use crate::{gpu, preset_rules, seconds, to_python};

/// Receiver(params, *, preset=None, tp_rank=0, tp_size=1, listen=None, initial_version=0,
///          head_dim=None, expert_parallel=False, timeout=30.0, token=None, insecure=False,
///          module=None)
///
/// Takes updates into `params` (the engine's named parameters: a dict or iterable of
/// (name, tensor) pairs, all on the CPU or all on one GPU), in place. With `listen`
/// ("unix:/path", "tcp://host:port") it serves senders of other processes in the background;
/// `Sender(to=receiver)` pushes from this process. `preset`, when given, is the layout these
/// parameters follow: a sender offering other rules is refused. Every update is verified by
/// digest; one that fails leaves the committed version and marks the tensors it touched dirty.
/// `token` (default: the WEIGHTLIFT_TOKEN environment variable): senders must prove they hold
/// it before anything else is read; listening on an address other hosts can reach needs one,
/// unless `insecure`. `module` ("main" or "mtp"): the part of a checkpoint with an MTP module
/// these parameters hold (the main model, or the draft: one receiver each, pushed to together
/// by one `Sender([main, draft], modules=["main", "mtp"])`); default the whole checkpoint.
///
/// With `stream=(specs, depth, bucket_bytes)` it is a streaming receiver: `params` are the
/// ring's buffers (uint8 tensors sized as `stream_layout` says, in its order), `specs` the
/// (name, shape, dtype) of the tensors it streams, and the engine takes each update through
/// `next_stream_update` and `next_bucket` (see `weightlift.StagingReceiver`).
#[pyclass(module = "weightlift._weightlift", subclass)]
pub(crate) struct Receiver {
    inner: weightlift::Receiver,
    endpoint: Option<String>,
    /// The layout's rules when a preset was given (checkpoints on disk are mapped with them).
    rules: Option<RuleSet>,
    /// The HTTP API, once started (stopped with the receiver).
    http: Mutex<Option<RunningAgent>>,
    /// The tagged memory pools holding the tensors (none unless made in `Pool.region`).
    pools: Vec<Arc<weightlift::MemoryPool>>,
    /// What senders must prove; also the HTTP API's bearer token unless given another.
    token: Option<Token>,
    insecure: bool,
    /// The part of a checkpoint these tensors are (a sender in this process takes it).
    module: Module,
}

impl Receiver {
    pub(crate) fn inner(&self) -> &weightlift::Receiver {
        &self.inner
    }

    pub(crate) fn module(&self) -> Module {
        self.module
    }

    fn handoff(&self) -> PyResult<Arc<weightlift::Handoff>> {
        self.inner.handoff().ok_or_else(|| plan_error("this receiver takes updates in place: it does not stream"))
    }
}

/// Serves senders of other processes at `text` on a thread of its own; where it listens.
fn serve_on(inner: &weightlift::Receiver, text: &str, token: Option<&Token>, insecure: bool) -> PyResult<String> {
    let endpoint: Endpoint = text.parse().map_err(|e| plan_error(format!("`{text}`: {e}")))?;
    check_exposure(&endpoint, token, insecure, "push weights into this engine")
        .map_err(|e| TransferError::new_err(e.to_string()))?;
    let listener: Listener =
        endpoint.bind().map_err(|e| TransferError::new_err(format!("cannot listen on {endpoint}: {e}")))?;
    let bound = listener.endpoint().map(|e| e.to_string()).unwrap_or_else(|_| text.to_string());
    let serving = inner.clone();
    std::thread::spawn(move || {
        if let Err(e) = serving.serve(&listener) {
            eprintln!("weightlift: the receiver stopped listening: {e}");
        }
    });
    Ok(bound)
}

fn forever_or(timeout: Option<f64>) -> PyResult<Duration> {
    match timeout {
        None => Ok(Duration::from_secs(365 * 24 * 3600)),
        Some(t) => seconds("timeout", t, true),
    }
}

impl Drop for Receiver {
    /// Stops the HTTP API without the GIL: the server thread may drop the tensors' DLPack
    /// owners, whose deleters take the GIL, so joining it while holding the GIL could deadlock.
    fn drop(&mut self) {
        let running = self.http.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(running) = running {
            Python::attach(|py| py.detach(move || drop(running)));
        }
    }
}

#[pymethods]
impl Receiver {
    #[new]
    #[pyo3(signature = (params, *, preset = None, tp_rank = 0, tp_size = 1, listen = None, initial_version = 0,
                        head_dim = None, expert_parallel = false, timeout = 30.0, token = None, insecure = false,
                        stream = None, module = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        params: &Bound<'_, PyAny>,
        preset: Option<&str>,
        tp_rank: u32,
        tp_size: u32,
        listen: Option<&str>,
        initial_version: u64,
        head_dim: Option<u64>,
        expert_parallel: bool,
        timeout: f64,
        token: Option<&str>,
        insecure: bool,
        stream: Option<(Vec<SpecTriple>, u32, u64)>,
        module: Option<&str>,
    ) -> PyResult<Self> {
        let module = crate::module(module)?;
        let token = token.map_or_else(Token::from_env, Token::new);
        let tensors = TensorSet::import(params, "engine")?;
        tensors.check_disjoint()?;
        if let Some((specs, depth, bucket_bytes)) = stream {
            let specs = manifest_of(specs)?;
            let options = ReceiverOptions {
                initial_version: Version(initial_version),
                timeout: seconds("timeout", timeout, false)?,
                token: token.clone(),
                ..ReceiverOptions::default()
            };
            let stream = StreamOptions { depth, bucket_bytes, module };
            let inner = match tensors.place() {
                Place::Host => {
                    weightlift::Receiver::streaming(&specs, tensors, stream, options).map_err(stream_error)?
                }
                Place::Cuda(ordinal) => {
                    let gpu = py.detach(|| gpu(ordinal)).map_err(cuda_error)?;
                    weightlift::Receiver::streaming_on_gpu(gpu, &specs, tensors, stream, options)
                        .map_err(stream_error)?
                }
            };
            let endpoint = listen.map(|text| serve_on(&inner, text, token.as_ref(), insecure)).transpose()?;
            // Checkpoints on disk stream as the trainer names them (this receiver's module).
            let rules = inner.stream_plan().map(|p| p.rules.clone());
            return Ok(Receiver {
                inner,
                endpoint,
                rules,
                http: Mutex::new(None),
                pools: Vec::new(),
                token,
                insecure,
                module,
            });
        }
        let manifest = weightlift::SourceTensors::manifest(&tensors).clone();
        let tp = TpRank::new(tp_rank, tp_size).map_err(|e| plan_error(e.to_string()))?;
        let expected_rules = match preset {
            Some(name) => {
                let (preset, rules) = preset_rules(name, module, &manifest, head_dim, expert_parallel)?;
                Some((format!("preset {preset} ({module})"), rules))
            }
            None => None,
        };
        let options_rules = expected_rules.as_ref().map(|(_, rules)| rules.clone());
        let options = ReceiverOptions {
            tp,
            initial_version: Version(initial_version),
            timeout: seconds("timeout", timeout, false)?,
            expected_rules,
            token: token.clone(),
            ..ReceiverOptions::default()
        };
        let holders = match tensors.place() {
            Place::Host => Vec::new(),
            Place::Cuda(_) => {
                let addresses = tensors.regions();
                pools_holding(manifest.iter().map(|s| s.name.as_str()).zip(addresses.into_iter().map(|(a, _)| a)))
            }
        };
        let inner = match tensors.place() {
            Place::Host => weightlift::Receiver::new(tensors, options),
            Place::Cuda(ordinal) => py
                .detach(|| {
                    let gpu = gpu(ordinal)?;
                    gpu.synchronize_device()?;
                    weightlift::Receiver::on_gpu(gpu, tensors, options)
                })
                .map_err(cuda_error)?,
        };
        let pools: Vec<_> = holders.iter().map(|h| h.pool.clone()).collect();
        weightlift::guard_receiver(&inner, holders);
        let endpoint = listen.map(|text| serve_on(&inner, text, token.as_ref(), insecure)).transpose()?;
        let rules = options_rules;
        Ok(Receiver { inner, endpoint, rules, http: Mutex::new(None), pools, token, insecure, module })
    }

    /// next_stream_update(after, timeout=None) -> int | None
    ///
    /// A streaming receiver's engine: waits (without the GIL) for an update newer than
    /// `after` to start streaming (or to have settled), up to `timeout` seconds; its version,
    /// or None once the wait timed out.
    #[pyo3(signature = (after, timeout = None))]
    fn next_stream_update(&self, py: Python<'_>, after: u64, timeout: Option<f64>) -> PyResult<Option<u64>> {
        let handoff = self.handoff()?;
        let timeout = forever_or(timeout)?;
        Ok(py.detach(|| handoff.next_update(Version(after), timeout)).map(|v| v.0))
    }

    /// next_bucket(version, timeout=None) -> int | None
    ///
    /// Gives back the bucket taken last (its tensors may be written again) and waits for the
    /// next bucket of `version`, verified; its index, or None once every bucket was taken
    /// (then `stream_settled` says whether it committed). Raises VerificationError (a digest
    /// mismatch) or TransferError (the sender went away, the engine gave up, a timeout) naming
    /// the tensors handed over so far (`handed` on the exception), which may hold either
    /// version.
    #[pyo3(signature = (version, timeout = None))]
    fn next_bucket(&self, py: Python<'_>, version: u64, timeout: Option<f64>) -> PyResult<Option<usize>> {
        let handoff = self.handoff()?;
        let timeout = forever_or(timeout)?;
        py.detach(|| handoff.next_bucket(Version(version), timeout)).map_err(failure_error)
    }

    /// stream_settled(version, timeout=None)
    ///
    /// After the last bucket: waits for `version` to commit (in a group, for the sender's
    /// decision over every receiver), or raises as `next_bucket` does if it failed.
    #[pyo3(signature = (version, timeout = None))]
    fn stream_settled(&self, py: Python<'_>, version: u64, timeout: Option<f64>) -> PyResult<()> {
        let handoff = self.handoff()?;
        let timeout = forever_or(timeout)?;
        py.detach(|| handoff.settled(Version(version), timeout)).map_err(failure_error)
    }

    /// abandon_stream(version, reason): the engine gives up on `version` (its loader
    /// raised): the update fails with `reason`, and the receiver stays on its version.
    fn abandon_stream(&self, version: u64, reason: String) -> PyResult<()> {
        self.handoff()?.abandon(Version(version), reason);
        Ok(())
    }

    /// The committed version.
    #[getter]
    fn version(&self) -> u64 {
        self.inner.committed().0
    }

    /// Names of tensors that may not hold the committed version's bytes (empty when clean).
    #[getter]
    fn dirty(&self) -> Vec<String> {
        self.inner.dirty()
    }

    /// The report of the last update taken (committed or not), as a dict, or None.
    #[getter]
    fn last_report(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        self.inner
            .last_report()
            .map(|r| {
                let value = serde_json::to_value(&r).map_err(|e| TransferError::new_err(e.to_string()))?;
                to_python(py, &value)
            })
            .transpose()
    }

    /// Where this receiver listens ("unix:/path", "tcp://host:port"), or None.
    #[getter]
    fn endpoint(&self) -> Option<String> {
        self.endpoint.clone()
    }

    /// wait_for_version(after, timeout=None) -> int
    ///
    /// Blocks (without the GIL) until a version newer than `after` is committed, or `timeout`
    /// seconds pass; returns the committed version either way.
    #[pyo3(signature = (after, timeout = None))]
    fn wait_for_version(&self, py: Python<'_>, after: u64, timeout: Option<f64>) -> PyResult<u64> {
        let timeout = match timeout {
            None => Duration::from_secs(365 * 24 * 3600),
            Some(t) => seconds("timeout", t, true)?,
        };
        Ok(py.detach(|| self.inner.wait_for_version_after(Version(after), timeout)).0)
    }

    /// digests() -> dict[str, int]: every tensor's digest as its bytes are now, computed
    /// where they live (waits while an update is writing).
    fn digests(&self, py: Python<'_>) -> PyResult<Vec<(String, u64)>> {
        let values = py.detach(|| self.inner.current_digests()).map_err(cuda_error)?;
        Ok(self.inner.manifest().iter().map(|s| s.name.clone()).zip(values).collect())
    }

    /// serve_http(host="127.0.0.1", port=0, *, token=None, memory=None) -> str
    ///
    /// Starts this receiver's HTTP API (update_weights, weights_checker, version, metrics,
    /// release/resume_memory_occupation, openapi.json) on a background thread of this process
    /// and returns its URL. `token` (default: the receiver's): requests must carry
    /// `Authorization: Bearer <token>`; an address other hosts can reach needs one. Updates
    /// from a checkpoint on disk need the receiver to have been made with a `preset`.
    /// `memory`: the `weightlift.memory.Pool` the memory endpoints release and resume (by
    /// default the pool holding this receiver's tensors, if they were made in one). Runs until
    /// `stop_http()` or until the receiver is dropped.
    #[pyo3(signature = (host = "127.0.0.1", port = 0, *, token = None, memory = None))]
    fn serve_http(
        &self,
        host: &str,
        port: u16,
        token: Option<String>,
        memory: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<String> {
        let mut http = self.http.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(running) = http.as_ref() {
            return Err(TransferError::new_err(format!("already serving HTTP on http://{}", running.addr())));
        }
        let memory: Option<Arc<dyn MemoryControl>> = match memory {
            // weightlift.memory.Pool wraps the native pool as `_native`.
            Some(pool) => {
                let native = if pool.is_instance_of::<MemoryPool>() { pool.clone() } else { pool.getattr("_native")? };
                let native = native
                    .cast_into::<MemoryPool>()
                    .map_err(|_| plan_error("memory= takes a weightlift.memory.Pool".to_string()))?;
                Some(native.get().shared().clone())
            }
            None => self.pools.first().filter(|_| self.pools.len() == 1).map(|p| p.clone() as Arc<dyn MemoryControl>),
        };
        let token = token.or_else(|| self.token.as_ref().map(Token::expose));
        check_exposure(
            &Endpoint::Tcp(format!("{host}:{port}")),
            token.as_deref().and_then(Token::new).as_ref(),
            self.insecure,
            "drive this engine's HTTP API",
        )
        .map_err(|e| TransferError::new_err(e.to_string()))?;
        let options = AgentOptions { token, disk_rules: self.rules.clone(), memory, ..AgentOptions::default() };
        let running = Agent::new(self.inner.clone(), options)
            .spawn(&format!("{host}:{port}"))
            .map_err(|e| TransferError::new_err(format!("cannot serve HTTP on {host}:{port}: {e}")))?;
        let url = format!("http://{}", running.addr());
        *http = Some(running);
        Ok(url)
    }

    /// stop_http(): stops the HTTP API (a no-op when it is not running).
    fn stop_http(&self, py: Python<'_>) {
        let running = self.http.lock().unwrap_or_else(|e| e.into_inner()).take();
        py.detach(move || drop(running));
    }

    /// poison(value=255): fills every tensor with `value` bytes and marks them all dirty, so
    /// the next update must rewrite everything (a checker's reset).
    #[pyo3(signature = (value = 255))]
    fn poison(&self, py: Python<'_>, value: u8) -> PyResult<()> {
        py.detach(|| self.inner.poison(value)).map_err(cuda_error)
    }
}
