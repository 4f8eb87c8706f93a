//! The HTTP API of a receiver (`weightlift::Agent`) on loopback: every endpoint and every
//! error status, updates from disk and from a waiting sender, the checker, the memory
//! endpoints (with a stand-in memory pool), and a bounded load test.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use weightlift::core::{
    destination_manifest, synthetic, Manifest, PresetOptions, Rule, RuleSet, SourceSet, Split, TpRank, Version,
};
use weightlift::{
    write_file, Agent, AgentOptions, Endpoint, HostTensors, MemoryControl, MemoryError, Receiver, ReceiverOptions,
    RunningAgent, Sender, SenderOptions, TransportKind,
};

static NEXT: AtomicU64 = AtomicU64::new(0);

fn temp_path(label: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("wl-http-{}-{n}-{label}", std::process::id()))
}

/// A receiver of qwen3-tiny in its engine layout (qwen3 preset), the trainer's tensors, and
/// an agent serving it on loopback.
struct Engine {
    receiver: Receiver,
    rules: RuleSet,
    trainer: HostTensors,
    /// Serves until the test ends.
    _agent: RunningAgent,
    url: String,
}

fn qwen3_tiny() -> (RuleSet, Manifest, HostTensors) {
    let config = synthetic("qwen3-tiny").unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let source = SourceSet::single(config.source_manifest());
    let dest = destination_manifest(&source, &rules, TpRank::SINGLE, None, false).unwrap();
    (rules, dest, HostTensors::synthetic(&config, 7))
}

fn engine_with(options: AgentOptions) -> Engine {
    let (rules, dest, trainer) = qwen3_tiny();
    let receiver = Receiver::new(HostTensors::filled(dest, 0), ReceiverOptions::default());
    let options = AgentOptions { disk_rules: Some(rules.clone()), ..options };
    let agent = Agent::new(receiver.clone(), options).spawn("127.0.0.1:0").unwrap();
    let url = format!("http://{}", agent.addr());
    Engine { receiver, rules, trainer, _agent: agent, url }
}

fn engine() -> Engine {
    engine_with(AgentOptions::default())
}

async fn post(client: &Client, url: &str, body: Value) -> (StatusCode, Value) {
    let response = client.post(url).json(&body).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get(client: &Client, url: &str) -> (StatusCode, Value) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// A trainer waiting at a fresh unix socket that pushes `version` of `tensors` to each of the
/// next `receivers` receivers to connect (after `delay`).
fn publisher(e: &Engine, tensors: HostTensors, version: u64, receivers: usize, delay: Duration) -> String {
    let endpoint = Endpoint::Unix(temp_path("pub.sock"));
    let listener = endpoint.bind().unwrap();
    let rules = e.rules.clone();
    std::thread::spawn(move || {
        for _ in 0..receivers {
            let stream = listener.accept().unwrap();
            std::thread::sleep(delay);
            let options = SenderOptions { transport: TransportKind::Shm, ..SenderOptions::default() };
            if let Ok(mut sender) = Sender::accept(stream, &tensors.manifest().clone(), &rules, options) {
                let _ = sender.push(Version(version), &tensors);
            }
        }
    });
    endpoint.to_string()
}

/// A fresh directory, removed with what it holds when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let dir = temp_path(label);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `tensors` as a checkpoint directory of two files, as Hugging Face shards are.
fn write_checkpoint(tensors: &HostTensors) -> TempDir {
    let checkpoint = TempDir::new("ckpt");
    let dir = &checkpoint.0;
    let specs = tensors.manifest().specs().to_vec();
    let data: Vec<_> =
        specs.iter().enumerate().map(|(i, s)| (s, weightlift::SourceTensors::bytes(tensors, i))).collect();
    let (a, b) = data.split_at(data.len() / 2);
    write_file(&dir.join("model-00001-of-00002.safetensors"), a).unwrap();
    write_file(&dir.join("model-00002-of-00002.safetensors"), b).unwrap();
    checkpoint
}

/// Holds every update at the receiver's write gate (before the receiver begins it) until the
/// returned sender is dropped; the channel hears each update that waits there.
fn hold_updates(receiver: &Receiver) -> (tokio::sync::mpsc::UnboundedReceiver<()>, std::sync::mpsc::Sender<()>) {
    let (waiting, heard) = tokio::sync::mpsc::unbounded_channel();
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    receiver.set_write_gate(Arc::new(move || {
        let _ = waiting.send(());
        // Returns at once when `go` is dropped; a bound, so a failing test does not hang.
        let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(30));
        Ok(())
    }));
    (heard, go)
}

/// Polls `/version` until `done` holds of it (at most 10 s).
async fn version_when(client: &Client, url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let (_, version) = get(client, &format!("{url}/version")).await;
        if done(&version) || started.elapsed() > Duration::from_secs(10) {
            return version;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Pushes `tensors` as `version` from this process (straight to the receiver).
fn push_in_process(e: &Engine, tensors: &HostTensors, version: u64) {
    let mut sender = e.receiver.connect_in_process(tensors.manifest(), &e.rules, SenderOptions::default()).unwrap();
    let report = sender.push(Version(version), tensors).unwrap();
    assert!(report.verified, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_health_version_metrics_and_the_openapi_document() {
    let e = engine();
    let client = Client::new();
    assert_eq!(get(&client, &format!("{}/health", e.url)).await, (StatusCode::OK, json!({"status": "ok"})));
    let (status, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, json!({"version": 0, "dirty": false, "dirty_tensors": [], "in_flight": null}));
    let (status, doc) = get(&client, &format!("{}/openapi.json", e.url)).await;
    assert_eq!(status, StatusCode::OK);
    let paths: BTreeSet<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
    let want = [
        "/health",
        "/metrics",
        "/openapi.json",
        "/release_memory_occupation",
        "/resume_memory_occupation",
        "/update_weights",
        "/version",
        "/weights_checker",
    ];
    assert_eq!(paths, want.into_iter().collect());
    push_in_process(&e, &e.trainer, 1);
    let response = client.get(format!("{}/metrics", e.url)).send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let text = response.text().await.unwrap();
    for line in ["weightlift_updates_total{outcome=\"committed\"} 1", "weightlift_committed_version 1"] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
    let (_, unknown) = get(&client, &format!("{}/nothing", e.url)).await;
    assert_eq!(code(&unknown), "not_found");
    let response = client.get(format!("{}/update_weights", e.url)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_everything_but_health() {
    let e = engine_with(AgentOptions { token: Some("s3cret".into()), ..AgentOptions::default() });
    let client = Client::new();
    assert_eq!(get(&client, &format!("{}/health", e.url)).await.0, StatusCode::OK);
    let response = client.get(format!("{}/version", e.url)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let wrong = client.get(format!("{}/version", e.url)).bearer_auth("guess").send().await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(code(&wrong.json().await.unwrap()), "unauthorized");
    let body = json!({"action": "checksum"});
    let denied = client.post(format!("{}/weights_checker", e.url)).json(&body).send().await.unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let right = client.get(format!("{}/version", e.url)).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(right.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_matched_in_any_case_and_the_token_exactly() {
    let e = engine_with(AgentOptions { token: Some("s3cret".into()), ..AgentOptions::default() });
    let client = Client::new();
    let with = |value: &'static str| client.get(format!("{}/version", e.url)).header("authorization", value).send();
    for value in ["Bearer s3cret", "bearer s3cret", "BEARER s3cret", "bEaReR  s3cret"] {
        assert_eq!(with(value).await.unwrap().status(), StatusCode::OK, "{value}");
    }
    for value in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret", "bearer"] {
        assert_eq!(with(value).await.unwrap().status(), StatusCode::UNAUTHORIZED, "{value}");
    }
}

/// Opens a FIFO for writing and closes it when dropped, so a reader stuck opening it (the
/// agent, if it regresses) returns and the test ends instead of hanging.
struct Unwedge(PathBuf);

impl Drop for Unwedge {
    fn drop(&mut self) {
        use rustix::fs::{Mode, OFlags};
        let _ = rustix::fs::open(&self.0, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_other_than_regular_files_is_refused_at_once_and_the_agent_stays_free() {
    let e = engine();
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    let made: Vec<TempDir> = (0..3).map(|i| TempDir::new(&format!("bad{i}"))).collect();
    let dirs: Vec<&PathBuf> = made.iter().map(|d| &d.0).collect();
    let fifo = dirs[0].join("model.safetensors");
    rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR).unwrap();
    let _unwedge = Unwedge(fifo.clone());
    std::fs::create_dir(dirs[1].join("model.safetensors")).unwrap();
    let repeated = dirs[2].join("model.safetensors");
    let h = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
    )
    .as_bytes();
    std::fs::write(&repeated, [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 8]].concat()).unwrap();
    let expected = [
        format!("{} is a FIFO, not a regular file", fifo.display()),
        format!("{} is a directory, not a regular file", dirs[1].join("model.safetensors").display()),
        format!("duplicate tensor name `w` in the header of {}", repeated.display()),
    ];
    for (dir, message) in dirs.iter().zip(expected) {
        let body = json!({"version": "1", "source": {"disk": dir.display().to_string()}});
        let answer = tokio::time::timeout(Duration::from_secs(10), post(&client, &update, body)).await;
        let (status, body) = answer.unwrap_or_else(|_| panic!("no answer within 10 s for {}", dir.display()));
        assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "bad_checkpoint"), "{body}");
        assert_eq!(body["error"]["message"], message.as_str());
        let (_, version) = get(&client, &format!("{}/version", e.url)).await;
        assert_eq!(version, json!({"version": 0, "dirty": false, "dirty_tensors": [], "in_flight": null}));
    }
    let good = write_checkpoint(&e.trainer);
    let (status, report) = post(&client, &update, json!({"version": "1", "source": {"disk": good.0}})).await;
    assert_eq!((status, report["committed"].as_u64()), (StatusCode::OK, Some(1)), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_update_is_in_flight_from_the_moment_the_agent_takes_it() {
    let e = engine();
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    let checkpoint = write_checkpoint(&e.trainer);
    let disk = |version: &str| json!({"version": version, "source": {"disk": checkpoint.0}});
    let (mut waiting, go) = hold_updates(&e.receiver);
    let first = tokio::spawn({
        let (client, update, body) = (client.clone(), update.clone(), disk("1"));
        async move { post(&client, &update, body).await }
    });
    // Read, planned and connected, and held before the receiver begins it.
    tokio::time::timeout(Duration::from_secs(10), waiting.recv()).await.expect("the update reached the receiver");
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!((version["version"].as_u64(), version["in_flight"].as_u64()), (Some(0), Some(1)), "{version}");
    let (status, body) = post(&client, &update, disk("2")).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "busy"));
    assert_eq!(body["error"]["message"], "version 1 is being updated; version 2 not started");
    drop(go);
    let (status, report) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!(version, json!({"version": 1, "dirty": false, "dirty_tensors": [], "in_flight": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_update_not_read_by_its_deadline_is_given_up_and_writes_nothing() {
    // A deadline of zero passes before any worker has read a byte.
    let e = engine_with(AgentOptions { disk_deadline: Some(Duration::ZERO), ..AgentOptions::default() });
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    let checkpoint = write_checkpoint(&e.trainer);
    let body = json!({"version": "1", "source": {"disk": checkpoint.0}});
    let (status, body) = post(&client, &update, body).await;
    assert_eq!((status, code(&body)), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("version 1 given up") && message.ends_with("nothing was written"), "{message}");
    // The agent is free at once; the given-up worker, done by now, wrote nothing.
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!(version["in_flight"], Value::Null);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(e.receiver.status().committed, Version(0));
    assert!(e.receiver.last_report().is_none(), "no update reached the receiver");
    let at = publisher(&e, e.trainer.clone(), 2, 1, Duration::ZERO);
    let (status, report) = post(&client, &update, json!({"version": "2", "source": {"sender": at}})).await;
    assert_eq!((status, report["committed"].as_u64()), (StatusCode::OK, Some(2)), "{report}");
    let text = client.get(format!("{}/metrics", e.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("weightlift_update_failures_total{reason=\"deadline\"} 1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_update_writing_at_its_deadline_stays_in_flight_until_it_settles() {
    let e = engine_with(AgentOptions { disk_deadline: Some(Duration::from_secs(2)), ..AgentOptions::default() });
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    let checkpoint = write_checkpoint(&e.trainer);
    let disk = |version: &str| json!({"version": version, "source": {"disk": checkpoint.0}});
    let (mut waiting, go) = hold_updates(&e.receiver);
    let (status, body) = post(&client, &update, disk("1")).await;
    assert_eq!((status, code(&body)), (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("it is being written and settles by itself"));
    assert!(waiting.try_recv().is_ok(), "the update was held at the receiver");
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!((version["version"].as_u64(), version["in_flight"].as_u64()), (Some(0), Some(1)), "{version}");
    let (status, body) = post(&client, &update, disk("2")).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "busy"));
    assert!(body["error"]["message"].as_str().unwrap().starts_with("version 1 is being updated"), "{body}");
    drop(go);
    let version = version_when(&client, &e.url, |v| v["in_flight"].is_null()).await;
    assert_eq!(version, json!({"version": 1, "dirty": false, "dirty_tensors": [], "in_flight": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_json_errors_with_fitting_statuses() {
    let e = engine();
    let client = Client::new();
    let checker = format!("{}/weights_checker", e.url);
    let raw = |body: &'static str| client.post(&checker).header("content-type", "application/json").body(body).send();
    let malformed = raw("{\"action\": ").await.unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    assert_eq!(code(&malformed.json().await.unwrap()), "malformed_json");
    let (status, body) = post(&client, &checker, json!({"action": "nope"})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = post(&client, &checker, json!({"action": "checksum", "extra": 1})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    // A huge body is refused from its length, before it is read (the client is still
    // writing it: a raw socket sends the head and the first 64 KiB, then reads the answer).
    let head = e.url.trim_start_matches("http://").to_string();
    let answer = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(&head).unwrap();
        let request = "POST /weights_checker HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
        write!(socket, "{request}Content-Length: {}\r\n\r\n", 100 << 20).unwrap();
        socket.write_all(&[b' '; 64 << 10]).unwrap();
        let mut answer = vec![0u8; 4096];
        let n = socket.read(&mut answer).unwrap();
        String::from_utf8_lossy(&answer[..n]).to_string()
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"payload_too_large\""), "{answer}");
    let untyped = client.post(&checker).body("{\"action\": \"checksum\"}").send().await.unwrap();
    assert_eq!(untyped.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let update = format!("{}/update_weights", e.url);
    let (status, body) = post(&client, &update, json!({"version": "seven", "source": {"disk": "/x"}})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = post(&client, &update, json!({"version": "1", "source": {"ftp": "/x"}})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = post(&client, &update, json!({"version": "1", "source": {"sender": "not an endpoint"}})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let (status, body) = post(&client, &update, json!({"version": "1", "source": {"disk": "/no/such/dir"}})).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) =
        post(&client, &update, json!({"version": "1", "source": {"disk": "/tmp"}, "transfer_mode": "tcp"})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "invalid_request"));
    let nobody = format!("unix:{}", temp_path("nobody.sock").display());
    let (status, body) = post(&client, &update, json!({"version": "1", "source": {"sender": nobody}})).await;
    assert_eq!((status, code(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "fetch_failed"));
    assert_eq!(e.receiver.committed(), Version(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_from_disk_and_from_a_waiting_sender_refuse_stale_versions() {
    let e = engine();
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    // From a checkpoint directory.
    let dir = write_checkpoint(&e.trainer);
    let disk = json!({"version": "4", "source": {"disk": dir.0}});
    let (status, report) = post(&client, &update, disk.clone()).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["version"].as_u64(), report["verified"].as_bool()), (Some(4), Some(true)));
    let (status, body) = post(&client, &update, disk).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "stale_version"));
    // From a trainer waiting for receivers, over shared memory as asked.
    let mut stepped = e.trainer.clone();
    stepped.perturb();
    let at = publisher(&e, stepped, 5, 2, Duration::ZERO);
    let body = json!({"version": "5", "source": {"sender": at}, "transfer_mode": "shm"});
    let (status, report) = post(&client, &update, body).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["committed"], 5);
    // A sender that offers another version than the one asked for changes nothing.
    let (status, body) = post(&client, &update, json!({"version": "6", "source": {"sender": at}})).await;
    assert_eq!((status, code(&body)), (StatusCode::UNPROCESSABLE_ENTITY, "fetch_failed"));
    assert!(body["error"]["message"].as_str().unwrap().contains("version 6"), "{body}");
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!((version["version"].as_u64(), version["dirty"].as_bool()), (Some(5), Some(false)));
    let text = client.get(format!("{}/metrics", e.url)).send().await.unwrap().text().await.unwrap();
    for line in [
        "weightlift_updates_total{outcome=\"committed\"} 2",
        "weightlift_update_failures_total{reason=\"stale_version\"} 1",
        "weightlift_update_failures_total{reason=\"fetch\"} 1",
    ] {
        assert!(text.contains(line), "no `{line}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_update_racing_another_is_refused_and_the_first_completes() {
    let e = engine();
    let client = Client::new();
    let update = format!("{}/update_weights", e.url);
    // This sender waits a second after the receiver connects: the first update is in flight.
    let at = publisher(&e, e.trainer.clone(), 1, 1, Duration::from_secs(1));
    let first = tokio::spawn({
        let (client, update) = (client.clone(), update.clone());
        async move { post(&client, &update, json!({"version": "1", "source": {"sender": at}})).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = post(&client, &update, json!({"version": "2", "source": {"disk": "/tmp"}})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "busy"));
    let (status, report) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(e.receiver.committed(), Version(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_after_a_reset_names_every_tensor() {
    let e = engine();
    let client = Client::new();
    let checker = format!("{}/weights_checker", e.url);
    let (status, body) = post(&client, &checker, json!({"action": "compare"})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "no_snapshot"));
    push_in_process(&e, &e.trainer, 1);
    let (status, body) = post(&client, &checker, json!({"action": "snapshot"})).await;
    assert_eq!((status, body["success"].as_bool()), (StatusCode::OK, Some(true)));
    let (_, body) = post(&client, &checker, json!({"action": "compare"})).await;
    assert_eq!((body["success"].as_bool(), body["mismatched"].clone()), (Some(true), json!([])));
    let (_, body) = post(&client, &checker, json!({"action": "reset"})).await;
    assert_eq!(body["tensors"].as_u64(), Some(e.receiver.manifest().len() as u64));
    let (status, body) = post(&client, &checker, json!({"action": "compare"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["success"], false);
    let names: Vec<String> = e.receiver.manifest().iter().map(|s| s.name.clone()).collect();
    let mismatched: Vec<String> = serde_json::from_value(body["mismatched"].clone()).unwrap();
    assert_eq!(mismatched, names, "a reset changes every tensor");
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!((version["version"].as_u64(), version["dirty"].as_bool()), (Some(1), Some(true)));
    // The checksums are the receiver's digests now, in hex.
    let (_, body) = post(&client, &checker, json!({"action": "checksum"})).await;
    let now = e.receiver.current_digests().unwrap();
    for (spec, digest) in e.receiver.manifest().iter().zip(now) {
        assert_eq!(body["checksums"][&spec.name], format!("{digest:016x}"), "{}", spec.name);
    }
    // The next update rewrites everything and cleans the receiver.
    push_in_process(&e, &e.trainer, 2);
    let (_, version) = get(&client, &format!("{}/version", e.url)).await;
    assert_eq!(version["dirty"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_update_compare_lists_exactly_the_updated_tensors() {
    // Names unchanged (identity rules), so the tensors the trainer changed are the engine's.
    let manifest = synthetic("qwen3-tiny").unwrap().source_manifest();
    let trainer = HostTensors::synthetic(&synthetic("qwen3-tiny").unwrap(), 3);
    let receiver = Receiver::new(HostTensors::filled(manifest.clone(), 0), ReceiverOptions::default());
    let rules = RuleSet::new(vec![Rule::rename("{name*}", "{name*}", Split::Replicated).unwrap()]).unwrap();
    let agent = Agent::new(receiver.clone(), AgentOptions::default()).spawn("127.0.0.1:0").unwrap();
    let (client, checker) = (Client::new(), format!("http://{}/weights_checker", agent.addr()));
    let push = |tensors: &HostTensors, version: u64| {
        let mut sender = receiver.connect_in_process(&manifest, &rules, SenderOptions::default()).unwrap();
        assert!(sender.push(Version(version), tensors).unwrap().verified);
    };
    push(&trainer, 1);
    assert_eq!(post(&client, &checker, json!({"action": "snapshot"})).await.0, StatusCode::OK);
    let changed = ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"];
    let (specs, mut data) = trainer.clone().into_parts();
    for name in changed {
        data[specs.position(name).unwrap()][0] ^= 0xff;
    }
    push(&HostTensors::new(specs, data).unwrap(), 2);
    let (_, body) = post(&client, &checker, json!({"action": "compare"})).await;
    assert_eq!(body["mismatched"], json!(changed));
    assert_eq!(body["success"], false);
}

/// A memory pool stand-in: tags that can be paused, and a resume that fails on demand.
struct FakeMemory {
    tags: Mutex<Vec<(String, u64, bool)>>,
    refuse_resume: Mutex<bool>,
}

impl FakeMemory {
    fn paused_now(tags: &[(String, u64, bool)]) -> Vec<(String, u64)> {
        tags.iter().map(|(t, bytes, paused)| (t.clone(), if *paused { *bytes } else { 0 })).collect()
    }

    fn set(&self, wanted: &[String], paused: bool) -> Result<Vec<(String, u64)>, MemoryError> {
        let mut tags = self.tags.lock().unwrap();
        if let Some(unknown) = wanted.iter().find(|w| !tags.iter().any(|(t, _, _)| t == *w)) {
            return Err(MemoryError::UnknownTag(unknown.clone()));
        }
        for (tag, _, state) in tags.iter_mut() {
            if wanted.is_empty() || wanted.contains(tag) {
                *state = paused;
            }
        }
        Ok(FakeMemory::paused_now(&tags))
    }
}

impl MemoryControl for FakeMemory {
    fn release(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError> {
        self.set(tags, true)
    }

    fn resume(&self, tags: &[String]) -> Result<Vec<(String, u64)>, MemoryError> {
        if *self.refuse_resume.lock().unwrap() {
            return Err(MemoryError::Refused("needs 4096 bytes, 0 free".into()));
        }
        self.set(tags, false)
    }

    fn paused(&self) -> Vec<(String, u64)> {
        FakeMemory::paused_now(&self.tags.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_endpoints_release_and_resume_and_updates_wait_for_the_weights() {
    let client = Client::new();
    let plain = engine();
    for path in ["release_memory_occupation", "resume_memory_occupation"] {
        let (status, body) = post(&client, &format!("{}/{path}", plain.url), json!({"tags": ["weights"]})).await;
        assert_eq!((status, code(&body)), (StatusCode::NOT_IMPLEMENTED, "not_implemented"), "{path}");
    }
    let memory = Arc::new(FakeMemory {
        tags: Mutex::new(vec![("weights".into(), 4096, false), ("kv_cache".into(), 8192, false)]),
        refuse_resume: Mutex::new(false),
    });
    let e = engine_with(AgentOptions { memory: Some(memory.clone()), ..AgentOptions::default() });
    let (release, resume) =
        (format!("{}/release_memory_occupation", e.url), format!("{}/resume_memory_occupation", e.url));
    let (status, body) = post(&client, &release, json!({"tags": ["weights", "kv_cache"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["paused_bytes"], json!({"kv_cache": 8192, "weights": 4096}));
    let text = client.get(format!("{}/metrics", e.url)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("weightlift_paused_bytes{tag=\"weights\"} 4096"), "{text}");
    let at = publisher(&e, e.trainer.clone(), 1, 1, Duration::ZERO);
    let update = json!({"version": "1", "source": {"sender": at}});
    let (status, body) = post(&client, &format!("{}/update_weights", e.url), update.clone()).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "paused"));
    assert!(body["error"]["message"].as_str().unwrap().contains("weights"), "{body}");
    *memory.refuse_resume.lock().unwrap() = true;
    let (status, body) = post(&client, &resume, json!({"tags": ["weights"]})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "memory_refused"));
    *memory.refuse_resume.lock().unwrap() = false;
    let (status, body) = post(&client, &resume, json!({"tags": ["weights"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["paused_bytes"], json!({"kv_cache": 8192, "weights": 0}));
    let (status, body) = post(&client, &resume, json!({"tags": ["gpu_fairy"]})).await;
    assert_eq!((status, code(&body)), (StatusCode::BAD_REQUEST, "unknown_tag"));
    let (status, report) = post(&client, &format!("{}/update_weights", e.url), update).await;
    assert_eq!(status, StatusCode::OK, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_is_not_released_under_an_update_in_flight() {
    let client = Client::new();
    let memory = Arc::new(FakeMemory {
        tags: Mutex::new(vec![("weights".into(), 4096, false)]),
        refuse_resume: Mutex::new(false),
    });
    let e = engine_with(AgentOptions { memory: Some(memory.clone()), ..AgentOptions::default() });
    let release = format!("{}/release_memory_occupation", e.url);
    // This sender waits a second after the receiver connects: the update is in flight.
    let at = publisher(&e, e.trainer.clone(), 1, 1, Duration::from_secs(1));
    let first = tokio::spawn({
        let (client, update) = (client.clone(), format!("{}/update_weights", e.url));
        async move { post(&client, &update, json!({"version": "1", "source": {"sender": at}})).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = post(&client, &release, json!({"tags": ["weights"]})).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "busy"), "{body}");
    assert_eq!(memory.paused(), [("weights".to_string(), 0)], "nothing was released");
    let (status, report) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    let (status, body) = post(&client, &release, json!({"tags": ["weights"]})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// 1,000 concurrent checksum and version requests while updates run (a bounded load test: it
/// stops by itself). Every request answers 200, every update is committed in order, and the
/// weights end as the last version's. Latencies of /version are printed (not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_requests_while_updates_run() {
    let e = Arc::new(engine());
    let client = Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let updates = 20u64;
    let pusher = {
        let e = e.clone();
        tokio::task::spawn_blocking(move || {
            let mut tensors = e.trainer.clone();
            for version in 1..=updates {
                tensors.perturb();
                push_in_process(&e, &tensors, version);
            }
            tensors
        })
    };
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (client, url) = (client.clone(), e.url.clone());
        requests.spawn(async move {
            let started = Instant::now();
            let (path, response) = if i % 2 == 0 {
                ("version", client.get(format!("{url}/version")).send().await)
            } else {
                let body = json!({"action": "checksum"});
                ("checksum", client.post(format!("{url}/weights_checker")).json(&body).send().await)
            };
            let status = response.map(|r| r.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            (path, status, started.elapsed())
        });
    }
    let mut version_latencies = Vec::new();
    while let Some(done) = requests.join_next().await {
        let (path, status, elapsed) = done.unwrap();
        assert_eq!(status, StatusCode::OK, "{path}");
        if path == "version" {
            version_latencies.push(elapsed);
        }
    }
    let last = pusher.await.unwrap();
    // No update lost or half-applied: the last version, clean, with its digests.
    let status = e.receiver.status();
    assert_eq!((status.committed, status.in_flight, status.dirty.len()), (Version(updates), None, 0));
    let (_, body) = post(&client, &format!("{}/weights_checker", e.url), json!({"action": "checksum"})).await;
    let mut expected = e.receiver.connect_in_process(last.manifest(), &e.rules, SenderOptions::default()).unwrap();
    let report = expected.push(Version(updates + 1), &last).unwrap();
    assert!(report.verified && report.mismatched.is_empty(), "re-sending the last weights changes nothing");
    let (_, after) = post(&client, &format!("{}/weights_checker", e.url), json!({"action": "checksum"})).await;
    assert_eq!(body["checksums"], after["checksums"], "the weights were the last version's");
    version_latencies.sort();
    let pick = |q: f64| version_latencies[((version_latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "load test: 1000 requests ({} /version) while {updates} updates ran; /version p50 {:?}, p99 {:?}, max {:?}",
        version_latencies.len(),
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
    // For the benchmark record (bench/results/http-load-*.json), when asked.
    if let Ok(path) = std::env::var("WEIGHTLIFT_LOAD_JSON") {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let record = json!({
            "benchmark": "http-load",
            "host": weightlift::cpu_name(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "date": weightlift::today(),
            "requests": 1000,
            "version_requests": version_latencies.len(),
            "checksum_requests": 1000 - version_latencies.len(),
            "updates_during": updates,
            "version_p50_ms": ms(pick(0.5)),
            "version_p99_ms": ms(pick(0.99)),
            "version_max_ms": ms(pick(1.0)),
        });
        std::fs::write(path, serde_json::to_string_pretty(&record).unwrap() + "\n").unwrap();
    }
}

/// The CLI end to end: `weightlift serve --http` as the engine, `weightlift push --listen` as
/// the trainer, and the engine told over HTTP to fetch the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_http_fetches_a_version_from_push_listen() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let exe = env!("CARGO_BIN_EXE_weightlift");
    let (engine_sock, trainer_sock) = (temp_path("engine.sock"), temp_path("trainer.sock"));
    let mut serve = Command::new(exe)
        .args(["serve", "--synthetic", "qwen3-tiny", "--http", "127.0.0.1:0", "--token", "t0ken"])
        .args(["--listen", &format!("unix:{}", engine_sock.display())])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(serve.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening on unix:"));
    let url = lines.next().unwrap().unwrap().strip_prefix("http on ").unwrap().to_string();
    let mut push = Command::new(exe)
        // The same token guards the agent's API and the transport it fetches over.
        .args(["push", "--synthetic", "qwen3-tiny", "--version", "9", "--receivers", "1", "--token", "t0ken"])
        .args(["--listen", &format!("unix:{}", trainer_sock.display())])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pushed = BufReader::new(push.stdout.take().unwrap()).lines();
    assert!(pushed.next().unwrap().unwrap().starts_with("listening on unix:"));
    let body = json!({"version": "9", "source": {"sender": format!("unix:{}", trainer_sock.display())}});
    let client = Client::new();
    let response = client.post(format!("{url}/update_weights")).bearer_auth("t0ken").json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report: Value = response.json().await.unwrap();
    assert_eq!((report["committed"].as_u64(), report["verified"].as_bool()), (Some(9), Some(true)));
    // The trainer printed the same report and stopped after its one receiver.
    let printed: Value = serde_json::from_str(&pushed.next().unwrap().unwrap()).unwrap();
    assert_eq!(printed["version"], 9);
    assert!(push.wait().unwrap().success());
    let response = client.get(format!("{url}/version")).bearer_auth("t0ken").send().await.unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["version"], 9);
    serve.kill().unwrap();
    serve.wait().unwrap();
}

/// A client that keeps a connection open (an error answer it never reads to the end) does not
/// keep a stopping agent from stopping.
#[test]
fn stopping_does_not_wait_on_a_client_that_keeps_its_connection() {
    use std::io::{Read, Write};
    let (_, dest, _) = qwen3_tiny();
    let receiver = Receiver::new(HostTensors::filled(dest, 0), ReceiverOptions::default());
    let mut agent = Agent::new(receiver, AgentOptions::default()).spawn("127.0.0.1:0").unwrap();
    let mut socket = std::net::TcpStream::connect(agent.addr()).unwrap();
    socket.write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    socket.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 404");
    let (done, stopped) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        agent.stop();
        done.send(()).unwrap();
    });
    stopped.recv_timeout(Duration::from_secs(30)).expect("the agent stopped while a client held a connection");
    drop(socket);
}
