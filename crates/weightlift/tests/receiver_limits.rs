//! What a `weightlift serve` lets a stranger do, through the real binary: nothing without the
//! token, little memory and time before the session is established, a bounded number of
//! connections; and what a pusher the receiver gave up on is told.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{stderr, temp_dir, weightlift, Serve};

fn tiny(listen: &str, extra: &[&str]) -> Serve {
    Serve::start(&[&["--synthetic", "qwen3-tiny", "--listen", listen], extra].concat())
}

fn push(serve: &Serve, args: &[&str]) -> Output {
    let base = ["push", "--synthetic", "qwen3-tiny", "--bucket-bytes", "4096", "--to", &serve.endpoint];
    weightlift(&[&base[..], args].concat()).output().unwrap()
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    [&(body.len() as u32).to_le_bytes()[..], &[kind], body].concat()
}

fn read_message(stream: &mut UnixStream) -> Value {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).unwrap();
    let mut body = vec![0u8; u32::from_le_bytes(header[..4].try_into().unwrap()) as usize];
    stream.read_exact(&mut body).unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// A raw connection that sent the preamble and (without a token) passed the challenge.
fn authenticated(serve: &Serve) -> UnixStream {
    let mut stream = UnixStream::connect(serve.path()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(&[b"WLFT".as_slice(), &weightlift::PROTOCOL_VERSION.to_le_bytes()].concat()).unwrap();
    assert_eq!(read_message(&mut stream)["type"], "challenge");
    stream.write_all(&frame(1, br#"{"type": "proof", "nonce": "00", "mac": null}"#)).unwrap();
    assert_eq!(read_message(&mut stream)["type"], "authenticated");
    stream
}

#[test]
fn a_receiver_with_a_token_takes_pushes_only_from_senders_that_prove_it() {
    let dir = temp_dir("token");
    let listen = format!("unix:{}", dir.join("r.sock").display());
    let serve = tiny(&listen, &["--token", "s3cret"]);
    let mode = std::fs::metadata(serve.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is its owner's alone");

    let none = push(&serve, &["--version", "1"]);
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("the receiver requires a token"), "{}", stderr(&none));
    let wrong = push(&serve, &["--version", "1", "--token", "guess"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("token does not match"), "{}", stderr(&wrong));
    let right = push(&serve, &["--version", "1", "--token", "s3cret", "--json"]);
    assert!(right.status.success(), "{}", stderr(&right));
    // The refused pushes changed nothing: version 1 was the first to land.
    let v: Value = serde_json::from_slice(&right.stdout).unwrap();
    assert_eq!(v["receivers"][0]["committed"], 0);
    assert_eq!(v["steps"][0]["committed"], true);

    // A sender holding a token does not send to a receiver that cannot prove it holds it.
    let open = tiny(&format!("unix:{}", dir.join("open.sock").display()), &[]);
    let out = push(&open, &["--version", "1", "--token", "s3cret"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("holds no token"), "{}", stderr(&out));
}

#[test]
fn an_address_other_hosts_reach_needs_a_token_or_insecure() {
    let out = weightlift(&["serve", "--synthetic", "qwen3-tiny", "--listen", "tcp://0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("refusing to listen on tcp://0.0.0.0:0 without a token") && err.contains("--insecure"),
        "{err}"
    );
    let http =
        weightlift(&["serve", "--synthetic", "qwen3-tiny", "--listen", "tcp://127.0.0.1:0", "--http", "0.0.0.0:0"])
            .output()
            .unwrap();
    assert_eq!(http.status.code(), Some(2), "{}", stderr(&http));
    // With a token, or told --insecure, it serves.
    drop(tiny("tcp://0.0.0.0:0", &["--token", "s3cret"]));
    drop(tiny("tcp://0.0.0.0:0", &["--insecure"]));
    let listen = weightlift(&["push", "--synthetic", "qwen3-tiny", "--listen", "tcp://0.0.0.0:0"]).output().unwrap();
    assert_eq!(listen.status.code(), Some(2));
    assert!(stderr(&listen).contains("could fetch the weights"), "{}", stderr(&listen));
}

#[test]
fn unauthenticated_frames_stay_small_and_announced_bytes_are_not_held() {
    let dir = temp_dir("memory");
    let token = tiny(&format!("unix:{}", dir.join("t.sock").display()), &["--token", "s3cret"]);
    // Before the proof, a frame announcing 64 MiB is refused at once, unread.
    let mut stream = UnixStream::connect(token.path()).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(&[b"WLFT".as_slice(), &weightlift::PROTOCOL_VERSION.to_le_bytes()].concat()).unwrap();
    assert_eq!(read_message(&mut stream)["type"], "challenge");
    stream.write_all(&[(64u32 << 20).to_le_bytes().as_slice(), &[1]].concat()).unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "closed without an answer");

    // Without a token: eight connections announcing a 64 MiB hello and sending 1 MiB of it
    // hold what they sent, not what they announced (before: 512 MiB).
    let open = tiny(&format!("unix:{}", dir.join("o.sock").display()), &["--handshake-timeout-s", "20"]);
    let before = open.vm_bytes();
    let streams: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = authenticated(&open);
            s.write_all(&[(64u32 << 20).to_le_bytes().as_slice(), &[1]].concat()).unwrap();
            s.write_all(&vec![b' '; 1 << 20]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // Each connection's thread reserves a stack; the announced bodies would add 512 MiB.
    let grown = open.vm_bytes().saturating_sub(before);
    assert!(grown < 128 << 20, "8 announced hellos made the receiver hold {grown} bytes");
    drop(streams);
}

#[test]
fn connections_are_bounded_and_every_handshake_has_a_deadline() {
    let dir = temp_dir("bounded");
    let listen = format!("unix:{}", dir.join("r.sock").display());
    let serve = tiny(&listen, &["--max-connections", "2", "--handshake-timeout-s", "1"]);
    let held: Vec<UnixStream> = (0..2).map(|_| authenticated(&serve)).collect();
    // A third is told why and closed.
    let mut third = UnixStream::connect(serve.path()).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let refused = read_message(&mut third);
    assert_eq!(refused["type"], "reject");
    assert!(refused["reason"].as_str().unwrap().contains("at most 2 connections"), "{refused}");
    let out = push(&serve, &["--version", "1"]);
    assert!(stderr(&out).contains("at most 2 connections"), "{}", stderr(&out));

    // A connection that trickles its hello is closed at the deadline, not kept by each byte.
    let started = Instant::now();
    let mut trickle = held.into_iter().next().unwrap();
    trickle.write_all(&[100, 0, 0, 0, 1]).unwrap();
    let mut closed = false;
    for _ in 0..40 {
        if trickle.write_all(b" ").is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(closed && started.elapsed() < Duration::from_secs(3), "open after {:?}", started.elapsed());
    // Slots are given back: a real push gets through once the others are gone.
    std::thread::sleep(Duration::from_millis(1500));
    let ok = push(&serve, &["--version", "1"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}

#[test]
fn a_pusher_the_receiver_gave_up_on_prints_the_receivers_reason() {
    let dir = temp_dir("stall");
    let serve = tiny(&format!("unix:{}", dir.join("r.sock").display()), &["--timeout-s", "1"]);
    for transport in ["shm", "tcp"] {
        let out = push(&serve, &["--version", "1", "--transport", transport, "--fault", "stall:2"]);
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert!(err.contains("no message from the peer within"), "{transport}: {err}");
        assert!(!err.trim_end().ends_with("Broken pipe (os error 32)"), "{transport}: {err}");
    }
    let ok = push(&serve, &["--version", "1"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
}
