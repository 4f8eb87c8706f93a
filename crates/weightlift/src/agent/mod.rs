//! The engine agent: the HTTP API that RL frameworks and engines call on a receiver to update
//! its weights (from a checkpoint on disk or from a sender), check them, release and resume
//! its memory by tag, and read its version and metrics.
//!
//! Bound to loopback unless told otherwise, with an optional bearer token and a request body
//! limit; every error is `{"error": {"code", "message"}}` with a fitting status. One update
//! at a time: a second one, a stale version, or an update while the weights' memory is
//! released is refused with 409 and the reason; `/version` names the update in flight from the
//! moment the agent takes it. An update from disk reads regular files only and has a deadline.
//! The API describes itself at `/openapi.json`.

pub mod api;
pub mod memory;
pub mod metrics;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use utoipa::OpenApi;
use weightlift_core::{RuleSet, Version};

use crate::net::Endpoint;
use crate::protocol::TransportKind;
use crate::receiver::{Expect, FetchError, LocalError, Receiver};
use crate::report::{StreamTiming, UpdateReport};
use crate::session::Token;
use crate::tensors::CheckpointTensors;
use api::*;
pub use memory::{MemoryControl, MemoryError, WEIGHTS_TAG};
use metrics::{FailureReason, Metrics};

/// How an agent serves.
#[derive(Clone, Default)]
pub struct AgentOptions {
    /// Requests must carry `Authorization: Bearer <token>` (all but `/health`).
    pub token: Option<String>,
    /// Largest request body accepted, in bytes (default 64 KiB: requests are small).
    pub body_limit: Option<usize>,
    /// Rules that map a checkpoint's tensors onto this engine's (its preset); without them,
    /// updates from disk are refused with 501.
    pub disk_rules: Option<RuleSet>,
    /// The engine's tagged memory; without it, the memory endpoints answer 501.
    pub memory: Option<Arc<dyn MemoryControl>>,
    /// Longest an update from disk may take, from the request to its settling (default 10
    /// minutes). Past it the request is answered 504: an update still reading its checkpoint
    /// is given up (it will write nothing), one already writing settles by itself.
    pub disk_deadline: Option<Duration>,
}

const DEFAULT_BODY_LIMIT: usize = 64 << 10;
const DEFAULT_DISK_DEADLINE: Duration = Duration::from_secs(600);

struct AgentState {
    receiver: Receiver,
    options: AgentOptions,
    /// The version of the HTTP-started update the agent is working on, if any (a second is
    /// refused, not queued); held through a [`Claim`].
    claimed: Arc<Mutex<Option<Version>>>,
    /// Each tensor's digest at the last `snapshot`.
    snapshot: Mutex<Option<Vec<u64>>>,
    metrics: Arc<Metrics>,
}

/// The HTTP API of one receiver.
#[derive(Clone)]
pub struct Agent {
    state: Arc<AgentState>,
}

/// An error response: status, stable code, message, and the report of an update that was
/// attempted and not committed.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Boxed: most errors carry none, and a report is large.
    report: Option<Box<UpdateReport>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), report: None }
    }

    fn with_report(mut self, report: UpdateReport) -> ApiError {
        self.report = Some(Box::new(report));
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let report = self.report.map(|r| *r);
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message, report } };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A JSON body whose rejections are this API's errors (malformed JSON, a body of the wrong
/// shape, a missing content type, a body over the limit).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T> FromRequest<S> for JsonBody<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) => {
                let message = rejection.body_text();
                Err(match rejection {
                    JsonRejection::JsonSyntaxError(_) => {
                        ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", message)
                    }
                    JsonRejection::JsonDataError(_) => {
                        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
                    }
                    JsonRejection::MissingJsonContentType(_) => {
                        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", message)
                    }
                    other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
                    }
                    _ => ApiError::new(StatusCode::BAD_REQUEST, "bad_body", message),
                })
            }
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{what}: {e}"))
}

/// Runs blocking receiver work off the async threads.
async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| internal("a worker thread failed", e))
}

impl AgentState {
    /// The version being updated now: the receiver's (from whatever connection), else the
    /// one the agent has taken and not yet handed to the receiver.
    fn in_flight(&self, receiving: Option<Version>) -> Option<Version> {
        receiving.or(*lock(&self.claimed))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent's hold on the update it took: from the request to the moment the update settles,
/// or to its deadline if by then it has not begun to write. Shared by the request, which may
/// give it up at the deadline, and the worker, which gives it back when it returns.
struct Claim {
    claimed: Arc<Mutex<Option<Version>>>,
    stage: Mutex<Stage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Reading the source; nothing written yet.
    Reading,
    /// Handed to the receiver, which settles it (committed or failed) by itself.
    Writing,
    /// Given up at its deadline before it wrote anything; the slot is free again.
    Abandoned,
}

impl Claim {
    /// Takes the one update slot `claimed` for `version`; the version holding it otherwise.
    fn take(claimed: &Arc<Mutex<Option<Version>>>, version: Version) -> Result<Arc<Claim>, Version> {
        let mut slot = lock(claimed);
        if let Some(busy) = *slot {
            return Err(busy);
        }
        *slot = Some(version);
        Ok(Arc::new(Claim { claimed: claimed.clone(), stage: Mutex::new(Stage::Reading) }))
    }

    /// Whether the update may begin to write: not once given up, nor past `deadline` (it is
    /// given up then, here: the request's own timer may not have fired yet).
    fn begin_writing(&self, deadline: Instant) -> bool {
        let mut stage = lock(&self.stage);
        if *stage == Stage::Reading && Instant::now() >= deadline {
            self.give_up(&mut stage);
        }
        if *stage == Stage::Abandoned {
            return false;
        }
        *stage = Stage::Writing;
        true
    }

    /// Gives the update up unless it has begun to write, freeing the slot at once (the worker
    /// may stay stuck in a read the kernel does not let go of); true if it is given up.
    fn abandon(&self) -> bool {
        let mut stage = lock(&self.stage);
        if *stage == Stage::Reading {
            self.give_up(&mut stage);
        }
        *stage == Stage::Abandoned
    }

    fn give_up(&self, stage: &mut Stage) {
        *stage = Stage::Abandoned;
        *lock(&self.claimed) = None;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if *lock(&self.stage) != Stage::Abandoned {
            *lock(&self.claimed) = None;
        }
    }
}

impl Agent {
    /// The API of `receiver`; its metrics count every update the receiver settles from now
    /// on, also those pushed straight to its transport listener.
    pub fn new(receiver: Receiver, options: AgentOptions) -> Agent {
        let metrics = Arc::new(Metrics::default());
        let observed = metrics.clone();
        receiver.observe(Arc::new(move |report: &UpdateReport| observed.settled(report)));
        let state =
            AgentState { receiver, options, claimed: Arc::new(Mutex::new(None)), snapshot: Mutex::new(None), metrics };
        Agent { state: Arc::new(state) }
    }

    /// The routes, with authentication and the body limit.
    pub fn router(&self) -> Router {
        let limit = self.state.options.body_limit.unwrap_or(DEFAULT_BODY_LIMIT);
        Router::new()
            .route("/health", get(health))
            .route("/version", get(version))
            .route("/metrics", get(metrics_text))
            .route("/openapi.json", get(openapi_json))
            .route("/update_weights", post(update_weights))
            .route("/weights_checker", post(weights_checker))
            .route("/release_memory_occupation", post(release_memory))
            .route("/resume_memory_occupation", post(resume_memory))
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(middleware::from_fn_with_state(self.state.clone(), authenticate))
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn_with_state(limit, refuse_oversized))
            .with_state(self.state.clone())
    }

    /// Serves on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await
    }

    /// Serves on `addr` ("127.0.0.1:8000"; port 0 picks one) from a thread of its own (with its
    /// own runtime, so callers need none and may have one), until the returned handle is
    /// dropped or stopped.
    pub fn spawn(&self, addr: &str) -> std::io::Result<RunningAgent> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("weightlift-http")
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let agent = self.clone();
        let thread = std::thread::Builder::new().name("weightlift-http".into()).spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let (mut signal, mut grace) = (stopped.clone(), stopped);
                let shutdown = async move { drop(signal.wait_for(|&stop| stop).await) };
                // Graceful shutdown waits for open connections; a client that keeps one open
                // (an unread error response) must not hold the stop up for long.
                let deadline = async move {
                    drop(grace.wait_for(|&stop| stop).await);
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                };
                tokio::select! {
                    served = agent.serve(listener, shutdown) => served,
                    () = deadline => Ok(()),
                }
            });
            if let Err(e) = served {
                tracing::error!("the HTTP agent stopped: {e}");
            }
        })?;
        Ok(RunningAgent { addr: local, stop, thread: Some(thread) })
    }
}

/// How long a stopping agent lets open connections finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// An agent serving from its own thread; stops when dropped.
pub struct RunningAgent {
    addr: SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningAgent {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server thread (at most about a second more than the
    /// requests in flight take).
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn authenticate(State(state): State<Arc<AgentState>>, request: Request, next: Next) -> Response {
    let Some(token) = &state.options.token else { return next.run(request).await };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| bearer_token(v.as_bytes()));
    match given {
        Some(given) if Token::new(token).is_some_and(|t| t.matches(given)) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong bearer token").into_response(),
        None => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "this agent needs `Authorization: Bearer <token>`")
                .into_response()
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is matched
/// case-insensitively (RFC 7235: `bearer`, `BEARER` alike).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    scheme.eq_ignore_ascii_case(b"bearer").then(|| rest.trim_ascii_start())
}

/// Refuses a body whose declared length is over `limit` before reading any of it (a body
/// without a length is cut at the limit while read, with the same error).
async fn refuse_oversized(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let declared =
        request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(length) if length > limit as u64 => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("a body of {length} bytes is over this agent's limit of {limit}"),
        )
        .into_response(),
        _ => next.run(request).await,
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no endpoint {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} does not take {}", request.uri().path(), request.method()),
    )
}

/// Liveness.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "The agent is up", body = HealthResponse)))]
async fn health() -> Json<HealthResponse> {
    Json(HealthResponse { status: "ok".into() })
}

/// The committed weight version and whether the receiver is dirty.
#[utoipa::path(get, path = "/version", security((), ("bearer" = [])), responses(
    (status = 200, description = "The version state", body = VersionResponse),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
))]
async fn version(State(state): State<Arc<AgentState>>) -> Json<VersionResponse> {
    let status = state.receiver.status();
    Json(VersionResponse {
        version: status.committed.0,
        dirty: !status.dirty.is_empty(),
        dirty_tensors: status.dirty,
        in_flight: state.in_flight(status.in_flight).map(|v| v.0),
    })
}

/// Prometheus metrics: updates, bytes, durations, failures by reason, paused bytes by tag.
#[utoipa::path(get, path = "/metrics", security((), ("bearer" = [])), responses(
    (status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text", body = String),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
))]
async fn metrics_text(State(state): State<Arc<AgentState>>) -> Response {
    let paused = state.options.memory.as_ref().map(|m| m.paused()).unwrap_or_default();
    let text = state.metrics.render(state.receiver.committed().0, &paused);
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", security((), ("bearer" = [])), responses(
    (status = 200, description = "The OpenAPI document", body = Object),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(openapi())
}

/// Updates the weights to `version` from a checkpoint on disk or from a sender, and returns
/// the update's report once it is committed.
#[utoipa::path(post, path = "/update_weights", security((), ("bearer" = [])), request_body = UpdateWeightsRequest, responses(
    (status = 200, description = "Committed: the update's report", body = UpdateReport),
    (status = 400, description = "Malformed body, bad version, endpoint or transfer mode, a checkpoint that is not regular safetensors files, or a source that cannot be mapped onto this engine", body = ErrorBody),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    (status = 404, description = "The checkpoint directory does not exist", body = ErrorBody),
    (status = 409, description = "Another update is running, the version is not above the committed one, or the weights' memory is released", body = ErrorBody),
    (status = 413, description = "Request body over the limit", body = ErrorBody),
    (status = 415, description = "The body is not application/json", body = ErrorBody),
    (status = 422, description = "The update was attempted and not committed (transfer broke, digests differed, the sender could not be reached or offered another version); the receiver keeps its last version", body = ErrorBody),
    (status = 501, description = "This receiver cannot take updates from that source", body = ErrorBody),
    (status = 504, description = "An update from disk did not settle within the agent's disk deadline: given up if it had not begun to write (nothing written), else it settles by itself", body = ErrorBody),
))]
async fn update_weights(
    State(state): State<Arc<AgentState>>,
    JsonBody(request): JsonBody<UpdateWeightsRequest>,
) -> Result<Json<UpdateReport>, ApiError> {
    let version = request.version.trim().parse::<u64>().map(Version).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("version `{}` is not a whole number", request.version),
        )
    })?;
    let refuse = |reason: FailureReason, code: &'static str, message: String| {
        state.metrics.failed(reason);
        ApiError::new(StatusCode::CONFLICT, code, message)
    };
    if let Some(memory) = &state.options.memory {
        if memory.is_paused(WEIGHTS_TAG) {
            return Err(refuse(
                FailureReason::Paused,
                "paused",
                format!("the `{WEIGHTS_TAG}` memory is released: resume it before updating to version {version}"),
            ));
        }
    }
    let claim = Claim::take(&state.claimed, version).map_err(|busy| {
        refuse(FailureReason::Busy, "busy", format!("version {busy} is being updated; version {version} not started"))
    })?;
    let status = state.receiver.status();
    if let Some(in_flight) = status.in_flight {
        return Err(refuse(
            FailureReason::Busy,
            "busy",
            format!("version {in_flight} is being received; version {version} not started"),
        ));
    }
    if version <= status.committed {
        return Err(refuse(
            FailureReason::StaleVersion,
            "stale_version",
            format!("version {version} is not above the committed version {}", status.committed),
        ));
    }
    // A sender's update is bounded by the transfer's own timeouts; a read from disk is not.
    let deadline = Deadline::after(state.options.disk_deadline.unwrap_or(DEFAULT_DISK_DEADLINE));
    let from_disk = matches!(request.source, UpdateSource::Disk(_));
    let (worker, held) = (state.clone(), claim.clone());
    // The worker holds the claim until it returns, also when this request is gone.
    let task = tokio::task::spawn_blocking(move || match request.source {
        UpdateSource::Disk(path) => {
            update_from_disk(&worker, &held, deadline, Path::new(&path), version, request.transfer_mode)
        }
        UpdateSource::Sender(addr) => update_from_sender(&worker, &addr, version, request.transfer_mode),
    });
    let joined = if from_disk {
        match tokio::time::timeout_at(deadline.due.into(), task).await {
            Ok(joined) => joined,
            Err(_) => return Err(past_deadline(&state, &claim, version, deadline)),
        }
    } else {
        task.await
    };
    match joined.map_err(|e| internal("a worker thread failed", e))? {
        Ok(report) if report.is_committed() => Ok(Json(report)),
        Ok(report) => {
            let reason = report.error.clone().unwrap_or_else(|| "digests differ".into());
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "update_failed",
                format!("version {version} was not committed: {reason}"),
            )
            .with_report(report))
        }
        Err(e) => {
            let reason = match e.code {
                "fetch_failed" => FailureReason::Fetch,
                "busy" => FailureReason::Busy,
                DEADLINE_EXCEEDED => FailureReason::Deadline,
                _ => FailureReason::BadSource,
            };
            state.metrics.failed(reason);
            Err(e)
        }
    }
}

/// When an update from disk is due: `limit` after its request.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    limit: Duration,
    due: Instant,
}

impl Deadline {
    fn after(limit: Duration) -> Deadline {
        Deadline { limit, due: Instant::now() + limit }
    }
}

const DEADLINE_EXCEEDED: &str = "deadline_exceeded";

/// The answer to an update from disk whose deadline passed as its request waited for it.
fn past_deadline(state: &AgentState, claim: &Claim, version: Version, deadline: Deadline) -> ApiError {
    if claim.abandon() {
        state.metrics.failed(FailureReason::Deadline);
        return given_up(version, deadline);
    }
    let message = format!(
        "version {version} did not settle within the disk deadline of {:?}: it is being written and settles by \
         itself (/version shows it in flight until then)",
        deadline.limit
    );
    tracing::warn!("{message}");
    ApiError::new(StatusCode::GATEWAY_TIMEOUT, DEADLINE_EXCEEDED, message)
}

fn given_up(version: Version, deadline: Deadline) -> ApiError {
    let message = format!(
        "version {version} given up: its checkpoint was not read within the disk deadline of {:?}; nothing was \
         written",
        deadline.limit
    );
    tracing::warn!("{message}");
    ApiError::new(StatusCode::GATEWAY_TIMEOUT, DEADLINE_EXCEEDED, message)
}

/// Reads the checkpoint at `dir` and applies it as `version`, in this process, unless its
/// claim is given up (at its deadline) before the checkpoint is read.
fn update_from_disk(
    state: &AgentState,
    claim: &Claim,
    deadline: Deadline,
    dir: &Path,
    version: Version,
    mode: TransferMode,
) -> Result<UpdateReport, ApiError> {
    if mode != TransferMode::Auto {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "a checkpoint on disk is read in place: transfer_mode must be auto",
        ));
    }
    let Some(rules) = &state.options.disk_rules else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "this agent was started without rules for checkpoints (serve it with --synthetic or --model)",
        ));
    };
    if !dir.is_dir() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no checkpoint directory at {}", dir.display()),
        ));
    }
    let checkpoint = CheckpointTensors::open(dir)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_checkpoint", e.to_string()))?;
    if !claim.begin_writing(deadline.due) {
        return Err(given_up(version, deadline));
    }
    state.receiver.apply_local(version, &checkpoint, rules).map_err(|e| match e {
        LocalError::Refused { .. } | LocalError::Version(_) => {
            ApiError::new(StatusCode::CONFLICT, "busy", e.to_string())
        }
        LocalError::Rules(_)
        | LocalError::Plan(_)
        | LocalError::Schedule(_)
        | LocalError::NotStreamed
        | LocalError::Quantized(_) => ApiError::new(StatusCode::BAD_REQUEST, "plan_error", e.to_string()),
    })
}

/// Connects to the sender at `addr` and takes `version` from it.
fn update_from_sender(
    state: &AgentState,
    addr: &str,
    version: Version,
    mode: TransferMode,
) -> Result<UpdateReport, ApiError> {
    let endpoint: Endpoint =
        addr.parse().map_err(|e: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))?;
    let transport = match mode {
        TransferMode::Auto => None,
        TransferMode::Shm => Some(TransportKind::Shm),
        TransferMode::Tcp => Some(TransportKind::Tcp),
        TransferMode::Ipc => Some(TransportKind::CudaIpc),
        TransferMode::Nccl => Some(TransportKind::Nccl),
    };
    state.receiver.fetch(&endpoint, Expect { version, transport }).map_err(|e| match e {
        // Another update began (from a sender of its own) since the checks above.
        FetchError::Version(_) => ApiError::new(StatusCode::CONFLICT, "busy", e.to_string()),
        FetchError::Connect { .. } | FetchError::Sender { .. } | FetchError::NoUpdate { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "fetch_failed", e.to_string())
        }
    })
}

/// Digests of the weights where they live: snapshot, compare, reset, checksum.
#[utoipa::path(post, path = "/weights_checker", security((), ("bearer" = [])), request_body = CheckerRequest, responses(
    (status = 200, description = "The action's result; `success` is false when `compare` finds differences", body = CheckerResponse),
    (status = 400, description = "Malformed body or unknown action", body = ErrorBody),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    (status = 409, description = "`compare` before any `snapshot`", body = ErrorBody),
    (status = 413, description = "Request body over the limit", body = ErrorBody),
    (status = 415, description = "The body is not application/json", body = ErrorBody),
    (status = 500, description = "The GPU failed to digest or overwrite the weights", body = ErrorBody),
))]
async fn weights_checker(
    State(state): State<Arc<AgentState>>,
    JsonBody(request): JsonBody<CheckerRequest>,
) -> Result<Json<CheckerResponse>, ApiError> {
    let action = request.action;
    let worker = state.clone();
    let response = blocking(move || -> Result<CheckerResponse, ApiError> {
        let receiver = &worker.receiver;
        let names = || receiver.manifest().iter().map(|s| s.name.clone());
        let tensors = receiver.manifest().len();
        let digests = || receiver.current_digests().map_err(|e| internal("digesting the weights", e));
        let mut response = CheckerResponse {
            success: true,
            action: format!("{action:?}").to_lowercase(),
            tensors,
            mismatched: None,
            checksums: None,
        };
        match action {
            CheckerAction::Snapshot => {
                let now = digests()?;
                *worker.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
            }
            CheckerAction::Compare => {
                let Some(before) = worker.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "no_snapshot",
                        "no snapshot taken: call snapshot first",
                    ));
                };
                let now = digests()?;
                let mismatched: Vec<String> =
                    names().zip(before.iter().zip(&now)).filter(|(_, (a, b))| a != b).map(|(n, _)| n).collect();
                response.success = mismatched.is_empty();
                response.mismatched = Some(mismatched);
            }
            CheckerAction::Reset => {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0x5eed, |d| d.as_nanos() as u64);
                receiver.scramble(seed).map_err(|e| internal("overwriting the weights", e))?;
            }
            CheckerAction::Checksum => {
                let now = digests()?;
                response.checksums = Some(names().zip(now).map(|(n, d)| (n, format!("{d:016x}"))).collect());
            }
        }
        Ok(response)
    })
    .await??;
    Ok(Json(response))
}

/// Releases the GPU memory of the given tags (the weights' and KV cache's, say).
#[utoipa::path(post, path = "/release_memory_occupation", security((), ("bearer" = [])), request_body = MemoryRequest, responses(
    (status = 200, description = "Released: bytes paused per tag", body = MemoryResponse),
    (status = 400, description = "Malformed body or unknown tag", body = ErrorBody),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    (status = 409, description = "The memory could not be released; nothing changed", body = ErrorBody),
    (status = 413, description = "Request body over the limit", body = ErrorBody),
    (status = 415, description = "The body is not application/json", body = ErrorBody),
    (status = 501, description = "This receiver has no tagged memory pool", body = ErrorBody),
))]
async fn release_memory(
    State(state): State<Arc<AgentState>>,
    JsonBody(request): JsonBody<MemoryRequest>,
) -> Result<Json<MemoryResponse>, ApiError> {
    // Memory an update is writing must not go: refuse while one is in flight (started here, or
    // by a sender of its own).
    if state.options.memory.is_some() {
        if let Some(version) = state.in_flight(state.receiver.status().in_flight) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "busy",
                format!("version {version} is being updated: release the memory once it settles"),
            ));
        }
    }
    memory_call(&state, request, |memory, tags| memory.release(tags)).await
}

/// Maps the GPU memory of the given tags again, at the same addresses.
#[utoipa::path(post, path = "/resume_memory_occupation", security((), ("bearer" = [])), request_body = MemoryRequest, responses(
    (status = 200, description = "Resumed: bytes still paused per tag", body = MemoryResponse),
    (status = 400, description = "Malformed body or unknown tag", body = ErrorBody),
    (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
    (status = 409, description = "The memory could not be resumed (not enough free); it stays released", body = ErrorBody),
    (status = 413, description = "Request body over the limit", body = ErrorBody),
    (status = 415, description = "The body is not application/json", body = ErrorBody),
    (status = 501, description = "This receiver has no tagged memory pool", body = ErrorBody),
))]
async fn resume_memory(
    State(state): State<Arc<AgentState>>,
    JsonBody(request): JsonBody<MemoryRequest>,
) -> Result<Json<MemoryResponse>, ApiError> {
    memory_call(&state, request, |memory, tags| memory.resume(tags)).await
}

async fn memory_call(
    state: &Arc<AgentState>,
    request: MemoryRequest,
    call: impl FnOnce(&dyn MemoryControl, &[String]) -> Result<Vec<(String, u64)>, MemoryError> + Send + 'static,
) -> Result<Json<MemoryResponse>, ApiError> {
    let Some(memory) = state.options.memory.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_IMPLEMENTED,
            "not_implemented",
            "this receiver has no tagged memory pool: its memory cannot be released or resumed by tag",
        ));
    };
    let result = blocking(move || call(memory.as_ref(), &request.tags)).await?;
    match result {
        Ok(paused) => Ok(Json(MemoryResponse { success: true, paused_bytes: paused.into_iter().collect() })),
        Err(e @ MemoryError::UnknownTag(_)) => {
            Err(ApiError::new(StatusCode::BAD_REQUEST, "unknown_tag", e.to_string()))
        }
        Err(e @ MemoryError::Refused(_)) => Err(ApiError::new(StatusCode::CONFLICT, "memory_refused", e.to_string())),
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "weightlift engine agent",
        description = "Update an inference engine's weights to a version (from disk or from a sender), check them where they live, release and resume its memory by tag, and read its version and metrics."
    ),
    paths(health, version, metrics_text, openapi_json, update_weights, weights_checker, release_memory, resume_memory),
    components(schemas(
        ErrorBody, ErrorDetail, UpdateWeightsRequest, UpdateSource, TransferMode, CheckerRequest, CheckerAction,
        CheckerResponse, MemoryRequest, MemoryResponse, HealthResponse, VersionResponse, UpdateReport,
        StreamTiming
    )),
    modifiers(&BearerScheme)
)]
struct ApiDoc;

struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The API's OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_holds_its_version_until_it_settles_or_is_given_up_unwritten() {
        let slot = Arc::new(Mutex::new(None));
        // Settled: the slot is free once the request and the worker both let go.
        let claim = Claim::take(&slot, Version(1)).unwrap();
        assert_eq!(Claim::take(&slot, Version(2)).err(), Some(Version(1)));
        let worker = claim.clone();
        drop(claim);
        assert_eq!(*lock(&slot), Some(Version(1)), "the worker still holds it");
        drop(worker);
        assert_eq!(*lock(&slot), None);
        // Given up while reading: free at once, and the worker may not write.
        let claim = Claim::take(&slot, Version(3)).unwrap();
        let worker = claim.clone();
        assert!(claim.abandon());
        assert_eq!(*lock(&slot), None);
        let next = Claim::take(&slot, Version(4)).unwrap();
        let later = Instant::now() + Duration::from_secs(600);
        assert!(!worker.begin_writing(later));
        drop(worker);
        assert_eq!(*lock(&slot), Some(Version(4)), "the abandoned worker leaves the next claim alone");
        // Past its deadline while writing: held until the worker returns.
        assert!(next.begin_writing(later));
        assert!(!next.abandon());
        assert_eq!(*lock(&slot), Some(Version(4)));
        drop(next);
        assert_eq!(*lock(&slot), None);
        // A worker that finds its deadline passed gives the update up itself, and the
        // request's timer then finds it given up.
        let claim = Claim::take(&slot, Version(5)).unwrap();
        assert!(!claim.begin_writing(Instant::now()));
        assert_eq!(*lock(&slot), None);
        assert!(claim.abandon());
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_the_token_exactly() {
        for value in ["Bearer t0ken", "bearer t0ken", "BEARER t0ken", "bEaReR   t0ken"] {
            assert_eq!(bearer_token(value.as_bytes()), Some(&b"t0ken"[..]), "{value}");
        }
        for value in ["Basic t0ken", "Bearert0ken", "t0ken", "Bearer"] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value}");
        }
        let token = Token::new("t0ken").unwrap();
        assert!(token.matches(b"t0ken"));
        for wrong in [&b"t0kem"[..], b"t0ke", b"t0ken!", b""] {
            assert!(!token.matches(wrong), "{wrong:?}");
        }
    }
}
