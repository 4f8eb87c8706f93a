//! The trainer side of a tensor-parallel engine: one sender per engine rank, pushed together.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use weightlift_core::{Manifest, RuleSet, Version};

use weightlift_cuda::Gpu;

use crate::cuda_ipc::DeviceTensors;
use crate::net::Endpoint;
use crate::report::UpdateReport;
use crate::sender::{ReceiverState, SendError, Sender, SenderOptions};
use crate::tensors::SourceTensors;

/// One version pushed to every rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub version: Version,
    /// Payload bytes over all ranks.
    pub bytes: u64,
    /// Wall time of the push as the trainer sees it, all ranks in parallel.
    pub seconds: f64,
    pub gbps: f64,
    /// Every rank verified and committed the version.
    pub verified: bool,
    pub ranks: Vec<UpdateReport>,
}

/// Senders to every rank of one engine.
pub struct Trainer {
    senders: Vec<Sender>,
}

impl Trainer {
    /// Connects to each rank's receiver (in rank order or not: each receiver knows its rank).
    pub fn connect(
        endpoints: &[Endpoint],
        source: &Manifest,
        rules: &RuleSet,
        options: &SenderOptions,
    ) -> Result<Trainer, SendError> {
        let senders = endpoints
            .iter()
            .map(|e| Sender::connect(e, source, rules, options.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Trainer { senders })
    }

    /// Senders already connected (e.g. to in-process receivers).
    pub fn from_senders(senders: Vec<Sender>) -> Trainer {
        Trainer { senders }
    }

    pub fn senders(&self) -> &[Sender] {
        &self.senders
    }

    /// Each rank's receiver as it was when this trainer connected.
    pub fn receivers_at_connect(&self) -> Vec<ReceiverState> {
        self.senders.iter().map(|s| s.receiver_at_connect().clone()).collect()
    }

    /// Pushes `version` to every rank at once.
    pub fn push(&mut self, version: Version, tensors: &dyn SourceTensors) -> Result<StepReport, SendError> {
        self.push_each(version, |s| s.push(version, tensors))
    }

    /// Pushes GPU tensors (on `gpu`) as `version` to every rank at once, over CUDA IPC.
    pub fn push_device(
        &mut self,
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
    ) -> Result<StepReport, SendError> {
        self.push_each(version, |s| s.push_device(version, gpu, tensors))
    }

    fn push_each(
        &mut self,
        version: Version,
        push: impl Fn(&mut Sender) -> Result<UpdateReport, SendError> + Sync,
    ) -> Result<StepReport, SendError> {
        let started = Instant::now();
        let push = &push;
        let results: Vec<Result<UpdateReport, SendError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self.senders.iter_mut().map(|s| scope.spawn(move || push(s))).collect();
            handles.into_iter().map(|h| h.join().expect("a push thread panicked")).collect()
        });
        let seconds = started.elapsed().as_secs_f64();
        let ranks = results.into_iter().collect::<Result<Vec<_>, _>>()?;
        let bytes = ranks.iter().map(|r| r.bytes).sum();
        Ok(StepReport {
            version,
            bytes,
            seconds,
            gbps: bytes as f64 / seconds.max(1e-9) / 1e9,
            verified: ranks.iter().all(|r| r.verified),
            ranks,
        })
    }
}
