//! The trainer side: `Sender(to, preset=...)` and `push(named_tensors, version)`.

use std::sync::Mutex;
use std::time::Instant;

use pyo3::prelude::*;
use pyo3::types::PyList;
use weightlift::{
    Endpoint, Fault, SendError, SenderOptions, Shard, StepReport, Token, Trainer, TransportKind, UpdateOutcome,
};
use weightlift_core::{Manifest, Module, Placement, RuleSet, Version};

use crate::errors::{cuda_error, plan_error, send_error, TransferError, VerificationError, VersionError};
use crate::receiver::Receiver;
use crate::tensors::{Place, TensorSet};
use crate::{head_dim_of, preset_rules, seconds, sender_gpu, to_python};

/// One receiver to push to.
struct Target {
    to: To,
    /// The module of the checkpoint it holds, as it was made (whole for an endpoint).
    module: Module,
}

enum To {
    Endpoint(Endpoint),
    /// A receiver in this process.
    Local(weightlift::Receiver),
}

/// The connections, made for one set of tensors (their manifest and, for a rank of a sharded
/// trainer, their placements) and remade when it changes.
struct Connected {
    manifest: Manifest,
    placements: Vec<Option<Placement>>,
    trainer: Trainer,
    /// The bytes of this rank's share of every receiver's plan (all for a single sender).
    share_bytes: u64,
}

/// What a rank of a sharded trainer pushes, as `weightlift._sharded.local_pieces` read it.
struct Pieces<'py> {
    /// The (name, tensor) pairs this rank sends.
    pairs: Bound<'py, PyAny>,
    /// One per pair: None for a whole tensor, else where the piece lies in its whole.
    placements: Vec<Option<Placement>>,
    /// The head dim read off the whole tensors (a rank's own q_norm may be a piece of it).
    head_dim: Option<u64>,
}

#[derive(Default)]
struct State {
    connected: Option<Connected>,
    tensors: Option<TensorSet>,
    last_report: Option<Py<PyAny>>,
}

/// Sender(to, *, preset="identity", head_dim=None, expert_parallel=False, transport=None,
///        sender_digests=True, timeout=60.0, token=None, modules=None, rank=None, world=None,
///        group=None, _fault=None)
///
/// Pushes a trainer's tensors to one receiver per engine rank (`to`: endpoints such as
/// "unix:/tmp/wl.sock" or "tcp://host:port", or `Receiver` objects of this process). `preset`
/// names the rules mapping trainer names and layouts onto the engine's (identity, llama,
/// qwen3, qwen3-moe). It connects on the first push and again when the set of tensors
/// changes. CPU tensors travel through shared memory (or TCP), CUDA tensors over CUDA IPC.
/// With several receivers a version commits on all of them or on none (two-phase). `token`
/// (default: the WEIGHTLIFT_TOKEN environment variable) is the receivers'. `sender_digests=False`
/// (CUDA IPC) skips digesting on this side: the update commits on the receivers' digests alone
/// and is reported `verified: False`. `modules` (one per receiver, or one for all: "whole",
/// "main", "mtp"): for a checkpoint with an MTP module, which part each receiver holds, so one
/// version reaches a main model and its draft together, committed on both or neither
/// (default: what each `Receiver` of this process was made with, the whole checkpoint for an
/// endpoint).
/// `rank` and `world` (or `group`, a torch.distributed process group whose rank() and size()
/// give them): this process is rank `rank` of a sharded trainer of `world` processes, each
/// with a Sender to the same endpoints, each pushing every version with its own pieces
/// (`weightlift._sharded`: a DTensor's local shard, placed by its metadata with no
/// collective; other tensors whole, from rank 0). Every engine rank plans over all the
/// trainer ranks' pieces and commits a version only when every rank's share verified.
/// `_fault` ("flip:N", "hangup:N", "abort:N": bucket N) misbehaves on purpose, for tests that
/// show a receiver survives a bad sender.
#[pyclass(module = "weightlift._weightlift")]
pub(crate) struct Sender {
    targets: Vec<Target>,
    /// The module of the checkpoint each target holds.
    modules: Vec<Module>,
    preset: String,
    head_dim: Option<u64>,
    expert_parallel: bool,
    transport: Option<TransportKind>,
    options: SenderOptions,
    /// (rank, world) of a sharded trainer this process is one rank of.
    shard: Option<(u32, u32)>,
    state: Mutex<State>,
}

/// (rank, world) from `rank`/`world` and `group` (a torch.distributed process group, read
/// through its rank() and size()), checked; None for a trainer of one process.
fn sharding(rank: Option<i64>, world: Option<i64>, group: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(u32, u32)>> {
    let (rank, world) = match group {
        None => (rank, world),
        Some(group) => {
            let read = |method: &str| -> PyResult<i64> {
                group.call_method0(method).and_then(|v| v.extract()).map_err(|_| {
                    plan_error(format!(
                        "`group` must be a torch.distributed process group (its {method}() an int), got {}",
                        group.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
                    ))
                })
            };
            let (group_rank, group_size) = (read("rank")?, read("size")?);
            if group_rank < 0 {
                return Err(plan_error(format!(
                    "this process is not in `group` (its rank() is {group_rank}): pass the group of the trainer's ranks"
                )));
            }
            for (what, given, read) in [("rank", rank, group_rank), ("world", world, group_size)] {
                if given.is_some_and(|g| g != read) {
                    return Err(plan_error(format!(
                        "`{what}={}` but `group` says {read}: give the group or rank and world",
                        given.unwrap_or_default()
                    )));
                }
            }
            (Some(group_rank), Some(group_size))
        }
    };
    match (rank, world) {
        (None, None) => Ok(None),
        (Some(rank), Some(world)) => {
            let world32 = u32::try_from(world).ok().filter(|&w| w > 0);
            let rank32 = u32::try_from(rank).ok();
            match (rank32, world32) {
                (Some(r), Some(w)) if r < w => Ok(Some((r, w))),
                _ => Err(plan_error(format!(
                    "rank {rank} of world {world}: a sharded trainer has a world of at least 1 and ranks 0 to world - 1"
                ))),
            }
        }
        (Some(rank), None) => Err(plan_error(format!("`rank={rank}` needs `world` (the number of trainer ranks)"))),
        (None, Some(world)) => Err(plan_error(format!("`world={world}` needs `rank` (this process's rank)"))),
    }
}

/// This rank's pieces of `named`, read by `weightlift._sharded.local_pieces` (one Python call,
/// no collective).
fn pieces<'py>(named: &Bound<'py, PyAny>, rank: u32) -> PyResult<Pieces<'py>> {
    let py = named.py();
    let read = py.import(pyo3::intern!(py, "weightlift._sharded"))?.getattr(pyo3::intern!(py, "local_pieces"))?;
    type Read = (Vec<Option<(Vec<u64>, Vec<u64>)>>, Vec<(String, Vec<u64>)>);
    let out = read.call1((named, rank))?;
    let pairs = out.get_item(0)?;
    let (placements, shapes): Read = (out.get_item(1)?.extract()?, out.get_item(2)?.extract()?);
    let placements = placements.into_iter().map(|p| p.map(|(offset, whole)| Placement { offset, whole })).collect();
    let head_dim = head_dim_of(shapes.iter().map(|(name, shape)| (name.as_str(), shape.as_slice())));
    Ok(Pieces { pairs, placements, head_dim })
}

fn targets(to: &Bound<'_, PyAny>) -> PyResult<Vec<Target>> {
    let one = |item: &Bound<'_, PyAny>| -> PyResult<Target> {
        if let Ok(receiver) = item.cast::<Receiver>() {
            let receiver = receiver.borrow();
            return Ok(Target { to: To::Local(receiver.inner().clone()), module: receiver.module() });
        }
        let text: String = item.extract().map_err(|_| {
            crate::errors::plan_error("`to` takes endpoints (\"unix:/path\", \"tcp://host:port\") or Receiver objects")
        })?;
        let endpoint = text.parse::<Endpoint>().map_err(|e| crate::errors::plan_error(format!("`{text}`: {e}")))?;
        Ok(Target { to: To::Endpoint(endpoint), module: Module::Whole })
    };
    if to.is_instance_of::<PyList>() || to.is_instance_of::<pyo3::types::PyTuple>() {
        to.try_iter()?.map(|item| one(&item?)).collect()
    } else {
        Ok(vec![one(to)?])
    }
}

impl Sender {
    /// Each target's rules: the preset, for the module it holds (`head_dim`, when not given,
    /// read off `whole_head_dim` or else the manifest).
    fn rules(&self, manifest: &Manifest, whole_head_dim: Option<u64>) -> PyResult<Vec<RuleSet>> {
        let (head_dim, ep) = (self.head_dim.or(whole_head_dim), self.expert_parallel);
        self.modules.iter().map(|&m| preset_rules(&self.preset, m, manifest, head_dim, ep).map(|(_, r)| r)).collect()
    }

    /// Connects to every target (as this rank of a sharded trainer, with `placements`).
    fn connect(
        &self,
        manifest: &Manifest,
        placements: &[Option<Placement>],
        place: Place,
        rules: &[RuleSet],
    ) -> Result<Trainer, SendError> {
        let transport = self.transport.unwrap_or(match place {
            Place::Cuda(_) => TransportKind::CudaIpc,
            Place::Host => TransportKind::Shm,
        });
        let mut senders = Vec::with_capacity(self.targets.len());
        for (target, rules) in self.targets.iter().zip(rules) {
            let options = SenderOptions { transport, ..self.options.clone() };
            let sender = match &target.to {
                To::Endpoint(endpoint) => {
                    let transport = match (transport, endpoint.is_local()) {
                        (TransportKind::Shm, false) => TransportKind::Tcp,
                        (t, _) => t,
                    };
                    let options = SenderOptions { transport, ..options };
                    match self.shard {
                        None => weightlift::Sender::connect(endpoint, manifest, rules, options)?,
                        Some((rank, world)) => {
                            let shard = Shard { rank, world, placements: placements.to_vec() };
                            weightlift::Sender::connect_shard(endpoint, manifest, rules, options, shard)?
                        }
                    }
                }
                To::Local(receiver) => receiver.connect_in_process(manifest, rules, options)?,
            };
            senders.push(sender);
        }
        Ok(Trainer::from_senders(senders))
    }
}

#[pymethods]
impl Sender {
    #[new]
    #[pyo3(signature = (to, *, preset = "identity", head_dim = None, expert_parallel = false, transport = None,
                        sender_digests = true, timeout = 60.0, token = None, device_writes = true,
                        pin_sources = false, host_digests = false, modules = None, rank = None, world = None,
                        group = None, _fault = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        to: &Bound<'_, PyAny>,
        preset: &str,
        head_dim: Option<u64>,
        expert_parallel: bool,
        transport: Option<&str>,
        sender_digests: bool,
        timeout: f64,
        token: Option<&str>,
        device_writes: bool,
        pin_sources: bool,
        host_digests: bool,
        modules: Option<&Bound<'_, PyAny>>,
        rank: Option<i64>,
        world: Option<i64>,
        group: Option<&Bound<'_, PyAny>>,
        _fault: Option<&str>,
    ) -> PyResult<Self> {
        let targets = targets(to)?;
        if targets.is_empty() {
            return Err(crate::errors::plan_error("`to` names no receiver"));
        }
        let shard = sharding(rank, world, group)?;
        if shard.is_some() && targets.iter().any(|t| matches!(t.to, To::Local(_))) {
            return Err(plan_error(
                "a rank of a sharded trainer pushes to endpoints (\"unix:/path\", \"tcp://host:port\"), \
                 not to a Receiver of this process: every rank connects to the same receivers",
            ));
        }
        // By default each receiver of this process holds the module it was made for; one at an
        // endpoint the whole checkpoint.
        let modules: Vec<Module> = match modules {
            None => targets.iter().map(|t| t.module).collect(),
            Some(m) if m.is_instance_of::<pyo3::types::PyString>() => {
                vec![crate::module(Some(&m.extract::<String>()?))?; targets.len()]
            }
            Some(m) => {
                m.try_iter()?.map(|item| crate::module(Some(&item?.extract::<String>()?))).collect::<PyResult<_>>()?
            }
        };
        if modules.len() != targets.len() {
            return Err(crate::errors::plan_error(format!(
                "`modules` names {} module(s) for {} receiver(s): one per receiver",
                modules.len(),
                targets.len()
            )));
        }
        preset.parse::<weightlift_core::Preset>().map_err(crate::errors::plan_error)?;
        let transport = transport
            .map(|t| t.parse::<TransportKind>().map_err(|e| crate::errors::plan_error(e.to_string())))
            .transpose()?;
        let fault = _fault.map(|f| f.parse::<Fault>().map_err(crate::errors::plan_error)).transpose()?;
        let options = SenderOptions {
            sender_digests,
            timeout: seconds("timeout", timeout, false)?,
            token: token.map_or_else(Token::from_env, Token::new),
            device_writes,
            pin_sources,
            host_digests,
            fault,
            ..SenderOptions::default()
        };
        Ok(Sender {
            targets,
            modules,
            preset: preset.to_string(),
            head_dim,
            expert_parallel,
            transport,
            options,
            shard,
            state: Mutex::new(State::default()),
        })
    }

    /// push(named_tensors, version) -> dict
    ///
    /// Pushes every (name, tensor) of `named_tensors` (a dict, or any iterable of pairs such
    /// as `model.named_parameters()`) as `version` to every receiver, and returns the report:
    /// version, bytes, seconds, gbps, verified, `stages` (seconds importing tensors,
    /// connecting, transferring) and one report per receiver (`ranks`). f32 tensors are cast
    /// on the way to an engine that holds bf16/f16. Raises VersionError if a receiver refuses
    /// the version, VerificationError if digests differ (the receiver keeps its last version),
    /// TransferError if the update broke off, PlanError for tensors that do not fit the plan.
    /// As a rank of a sharded trainer, every rank pushes each version (the same versions, to
    /// the same Senders in the same order), each with its own pieces.
    fn push(&self, py: Python<'_>, named_tensors: &Bound<'_, PyAny>, version: u64) -> PyResult<Py<PyAny>> {
        let started = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let pieces = self.shard.map(|(rank, _)| pieces(named_tensors, rank)).transpose()?;
        let named = pieces.as_ref().map_or(named_tensors, |p| &p.pairs);
        let (tensors, reused) = match (state.tensors.take(), &pieces) {
            // A rank may hold nothing of the model (every tensor whole, sent by rank 0).
            (_, Some(p)) if p.placements.is_empty() => (TensorSet::empty(), false),
            (Some(previous), _) => previous.refresh(named, "pushed")?,
            (None, _) => (TensorSet::import(named, "pushed")?, false),
        };
        let imported = started.elapsed().as_secs_f64();
        let place = tensors.place();
        let (placements, whole_head_dim) = match pieces {
            Some(p) => (p.placements, p.head_dim),
            None => (Vec::new(), None),
        };
        // Tensors reused from the last push have that push's manifest: nothing to compare.
        let manifest = weightlift::SourceTensors::manifest(&tensors);
        let stale = |c: &Connected| (!reused && &c.manifest != manifest) || c.placements != placements;
        if state.connected.as_ref().is_none_or(stale) {
            let manifest = manifest.clone();
            state.connected = None;
            let rules = self.rules(&manifest, whole_head_dim)?;
            let trainer = py.detach(|| self.connect(&manifest, &placements, place, &rules)).map_err(send_error)?;
            let share_bytes = trainer.senders().iter().map(|s| s.plan().share_bytes().iter().sum::<u64>()).sum();
            state.connected = Some(Connected { manifest, placements, trainer, share_bytes });
        }
        let connected_at = started.elapsed().as_secs_f64();
        let trainer = &mut state.connected.as_mut().expect("connected above").trainer;
        let version = Version(version);
        let outcome: Result<StepReport, PyErr> = py.detach(|| match place {
            Place::Host => trainer.push(version, &tensors).map_err(send_error),
            Place::Cuda(ordinal) => {
                let gpu = sender_gpu(ordinal).map_err(cuda_error)?;
                // The optimizer's writes (on torch's streams) must land before anyone reads.
                gpu.synchronize_device().map_err(cuda_error)?;
                trainer.push_device(version, &gpu, &tensors).map_err(send_error)
            }
        });
        state.tensors = Some(tensors);
        let step = match outcome {
            Ok(step) => step,
            Err(e) => {
                // The connections may be mid-update: start afresh next time.
                state.connected = None;
                return Err(e);
            }
        };
        let mut value = serde_json::to_value(&step).map_err(|e| TransferError::new_err(e.to_string()))?;
        value["stages"] = serde_json::json!({
            "import_seconds": imported,
            "connect_seconds": connected_at - imported,
            "transfer_seconds": step.seconds,
        });
        value["tensors_reused"] = serde_json::json!(reused);
        let connected = state.connected.as_ref().expect("connected above");
        if let Some((rank, world)) = self.shard {
            // `bytes` is every rank's (the receivers' reports); this rank moved its share.
            value["shard"] = serde_json::json!({"rank": rank, "world": world, "bytes": connected.share_bytes});
        }
        value["device_writes"] = serde_json::json!(connected
            .trainer
            .senders()
            .iter()
            .map(weightlift::Sender::writes_device_slots)
            .collect::<Vec<_>>());
        let report = to_python(py, &value)?;
        state.last_report = Some(report.clone_ref(py));
        if let Some(message) = step.failure() {
            // A receiver that broke off may have closed its connection: reconnect next time.
            state.connected = None;
            let outcomes = || step.ranks.iter().map(|r| r.outcome);
            let error = if step.ranks.iter().any(|r| !r.mismatched.is_empty()) {
                VerificationError::new_err(message)
            } else if outcomes().any(|o| o == UpdateOutcome::Refused)
                && outcomes().all(|o| matches!(o, UpdateOutcome::Refused | UpdateOutcome::Aborted))
            {
                VersionError::new_err(message)
            } else {
                TransferError::new_err(message)
            };
            error.value(py).setattr("report", report.clone_ref(py))?;
            return Err(error);
        }
        Ok(report)
    }

    /// The report of the last push (also set when it failed verification), or None.
    #[getter]
    fn last_report(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.last_report.as_ref().map(|r| r.clone_ref(py))
    }

    /// Drops the connections and the tensors this sender holds (the next push reconnects).
    fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.connected = None;
        state.tensors = None;
    }
}
