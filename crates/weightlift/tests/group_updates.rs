//! Updates of an engine's several ranks through the real binary: a version commits on every
//! rank or on none (two-phase), and what each rank did is named.

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{stderr, temp_dir, weightlift, Serve};

fn push(to: &[&Serve], args: &[&str]) -> Output {
    let mut cmd = weightlift(&["push", "--synthetic", "qwen3-tiny", "--bucket-bytes", "4096"]);
    for s in to {
        cmd.args(["--to", &s.endpoint]);
    }
    cmd.args(args).output().unwrap()
}

/// Each rank's committed version and dirty count, as a new trainer sees them.
fn states(to: &[&Serve], version: u64) -> Vec<(u64, usize)> {
    let out = push(to, &["--version", &version.to_string(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["receivers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["committed"].as_u64().unwrap(), r["dirty"].as_array().unwrap().len()))
        .collect()
}

fn ranks(dir: &std::path::Path, extra: &[&str]) -> (Serve, Serve) {
    let listen = |rank: u32| format!("unix:{}", dir.join(format!("r{rank}.sock")).display());
    (Serve::rank("qwen3-tiny", &listen(0), 2, 0, extra), Serve::rank("qwen3-tiny", &listen(1), 2, 1, extra))
}

#[test]
fn a_rank_that_refuses_the_version_leaves_every_rank_unwritten() {
    let dir = temp_dir("refuse");
    let (r0, r1) = ranks(&dir, &[]);
    let ahead = push(&[&r0], &["--version", "5"]);
    assert!(ahead.status.success(), "{}", stderr(&ahead));

    let out = push(&[&r0, &r1], &["--version", "3", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    // Every rank named, with what it did.
    assert!(err.contains(&format!("rank 0 at {}: refused it", r0.endpoint)), "{err}");
    assert!(err.contains("version 3 is stale"), "{err}");
    assert!(err.contains(&format!("rank 1 at {}: called off, still on version 0", r1.endpoint)), "{err}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = &v["steps"][0];
    assert_eq!(step["committed"], false);
    assert_eq!(step["ranks"][0]["outcome"], "refused");
    assert_eq!(step["ranks"][1]["outcome"], "aborted");

    // Rank 1 was never written: still on version 0, clean; rank 0 on 5.
    assert_eq!(states(&[&r0, &r1], 6), vec![(5, 0), (0, 0)]);
}

#[test]
fn a_rank_that_fails_verification_leaves_the_others_on_their_version_dirty() {
    let dir = temp_dir("flip");
    let (r0, r1) = ranks(&dir, &[]);
    assert!(push(&[&r0, &r1], &["--version", "1"]).status.success());
    // Both senders flip a byte of bucket 1; each rank names its tensor, neither commits.
    let out = push(&[&r0, &r1], &["--version", "2", "--fault", "flip:1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("digest mismatch"), "{}", stderr(&out));
    let after = states(&[&r0, &r1], 3);
    assert!(after.iter().all(|&(v, dirty)| v == 1 && dirty > 0), "{after:?}");
}

#[test]
fn a_rank_that_never_hears_the_commit_settles_on_its_old_version_dirty() {
    let dir = temp_dir("withhold");
    let (r0, r1) = ranks(&dir, &["--timeout-s", "1"]);
    assert!(push(&[&r0, &r1], &["--version", "1"]).status.success());
    let out = push(&[&r0, &r1], &["--version", "2", "--fault", "withhold-commit"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("no commit of version 2 from the sender within"), "{err}");
    assert!(err.contains("rank 0 at") && err.contains("rank 1 at"), "{err}");
    let after = states(&[&r0, &r1], 3);
    assert!(after.iter().all(|&(v, dirty)| v == 1 && dirty > 0), "{after:?}");
    // The next group update commits on both and cleans them.
    assert_eq!(states(&[&r0, &r1], 4), vec![(3, 0), (3, 0)]);
}

async fn post(client: reqwest::Client, url: String, body: String) -> (u16, Value) {
    let response = client
        .post(format!("{url}/update_weights"))
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

#[test]
fn agents_fetching_one_version_from_a_sender_commit_all_or_none() {
    let dir = temp_dir("fetch");
    let (r0, r1) = ranks(&dir, &["--http", "127.0.0.1:0", "--timeout-s", "5"]);
    assert!(push(&[&r0], &["--version", "5"]).status.success());
    let trainer = dir.join("trainer.sock");
    let mut sender = weightlift(&["push", "--synthetic", "qwen3-tiny", "--version", "3", "--receivers", "2"])
        .args(["--listen", &format!("unix:{}", trainer.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(sender.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("listening on"), "{line}");
    let source = format!(r#"{{"sender": "unix:{}"}}"#, trainer.display());
    // Rank 0 asks for version 6 and is offered 3: it refuses at begin, and rank 1, which asked
    // for 3, is called off before anything is written.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::new();
    let (url0, url1) = (r0.http.clone().unwrap(), r1.http.clone().unwrap());
    let ((code0, body0), (code1, body1)) = runtime.block_on(async move {
        let a = tokio::spawn(post(client.clone(), url0, format!(r#"{{"version": "6", "source": {source}}}"#)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let b = tokio::spawn(post(client, url1, format!(r#"{{"version": "3", "source": {source}}}"#)));
        (a.await.unwrap(), b.await.unwrap())
    });
    assert_ne!(code0, 200, "{body0}");
    assert_eq!(code1, 422, "{body1}");
    let report = &body1["error"]["report"];
    assert_eq!(report["outcome"], "aborted", "{body1}");
    assert_eq!(report["committed"], 0);
    assert_eq!(report["dirty"].as_array().unwrap().len(), 0, "nothing was written");
    let status = sender.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    let mut err = String::new();
    std::io::Read::read_to_string(sender.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("refused it") && err.contains("called off"), "{err}");
    assert_eq!(states(&[&r0, &r1], 7), vec![(5, 0), (0, 0)]);
}

/// A main model and its MTP draft served by two processes (`--module main`, `--module mtp`)
/// take one version from one `push --module main --module mtp`: both commit, or, when the
/// draft's bytes are corrupted, neither; `plan --module mtp` lists the draft's layout.
#[test]
fn a_main_model_and_its_mtp_draft_take_one_version_through_the_cli() {
    let model = "qwen3-moe-tiny-mtp";
    let plan = weightlift(&["plan", "--synthetic", model, "--module", "mtp", "--json"]).output().unwrap();
    assert!(plan.status.success(), "{}", stderr(&plan));
    let v: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(v["covered"], true);
    assert_eq!(v["rules"], "qwen3-moe (mtp)");
    // The draft: embedding, head, fc, three norms and one fused decoder layer (9 tensors);
    // the main model's tensors are ignored, not planned.
    assert_eq!(v["destination_tensors"], 15);
    // Read: 2 shared, 4 of the module, 33 of its layer (8 experts of 3); the rest ignored.
    assert_eq!(v["ignored"].as_u64().unwrap() + 2 + 4 + 33, v["source_tensors"].as_u64().unwrap());

    let dir = temp_dir("mtp-cli");
    let listen = |name: &str| format!("unix:{}", dir.join(format!("{name}.sock")).display());
    let main = Serve::start(&["--synthetic", model, "--module", "main", "--listen", &listen("main")]);
    let draft = Serve::start(&["--synthetic", model, "--module", "mtp", "--listen", &listen("draft")]);
    let push = |version: &str, extra: &[&str]| {
        let mut cmd = weightlift(&["push", "--synthetic", model, "--bucket-bytes", "4096", "--version", version]);
        cmd.args(["--module", "main", "--module", "mtp", "--to", &main.endpoint, "--to", &draft.endpoint, "--json"]);
        cmd.args(extra).output().unwrap()
    };
    let out = push("1", &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["steps"][0]["committed"], true);
    assert_eq!(v["steps"][0]["ranks"].as_array().unwrap().len(), 2);

    let out = push("2", &["--fault", "flip:0"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    for rank in v["steps"][0]["ranks"].as_array().unwrap() {
        assert_eq!(rank["committed"], 1, "{rank}");
    }
    // One module for two receivers of different layouts: the draft refuses the main rules.
    let mut cmd = weightlift(&["push", "--synthetic", model, "--module", "main", "--version", "3"]);
    let out = cmd.args(["--to", &main.endpoint, "--to", &draft.endpoint]).output().unwrap();
    assert!(!out.status.success());
    let mut cmd = weightlift(&["push", "--synthetic", model, "--module", "main", "--module", "mtp", "--module", "mtp"]);
    let out = cmd.args(["--to", &main.endpoint]).output().unwrap();
    assert!(stderr(&out).contains("3 --module for 1 receivers"), "{}", stderr(&out));
}
