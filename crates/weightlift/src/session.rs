//! Who may talk to whom: the shared token, the challenge-response that opens every
//! connection, the rule that an endpoint other hosts can reach needs a token, and the bound on
//! connections a receiver serves at once.
//!
//! The receiver sends a fresh 32-byte nonce; the sender answers with a nonce of its own and
//! HMAC-SHA256 over both under the token; the receiver checks it (in constant time) and proves
//! it holds the token as well, over the nonces in the other order. Each MAC names its role, so
//! neither side's proof can be replayed as the other's. Nothing else (plan, version, bytes) is
//! read before this completes, and frames before it stay under
//! [`MAX_HANDSHAKE_BYTES`](crate::protocol::MAX_HANDSHAKE_BYTES).

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::net::Endpoint;
use crate::protocol::{Conn, Message, ProtocolError, MAX_HANDSHAKE_BYTES, PROTOCOL_VERSION};

/// The environment variable both the transport and the HTTP API read the token from.
pub const TOKEN_ENV: &str = "WEIGHTLIFT_TOKEN";

const NONCE_BYTES: usize = 32;

/// A shared secret; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<[u8]>);

impl Token {
    /// None for an empty string: an unset and an empty variable mean the same.
    pub fn new(secret: &str) -> Option<Token> {
        (!secret.is_empty()).then(|| Token(secret.as_bytes().into()))
    }

    /// The secret itself, for the HTTP API's bearer check.
    pub fn expose(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// The token in [`TOKEN_ENV`], if set.
    pub fn from_env() -> Option<Token> {
        std::env::var(TOKEN_ENV).ok().as_deref().and_then(Token::new)
    }

    /// Whether `given` is this secret, compared in constant time (as MACs of both under the
    /// secret, so the time taken tells nothing of how much of a guess was right).
    pub fn matches(&self, given: &[u8]) -> bool {
        let keyed = |bytes: &[u8]| {
            let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
            mac.update(bytes);
            mac
        };
        keyed(given).verify(&keyed(&self.0).finalize().into_bytes()).is_ok()
    }

    fn mac(&self, role: &str, first: &str, second: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for part in [format!("weightlift/{PROTOCOL_VERSION} {role}").as_str(), first, second] {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    fn sign(&self, role: &str, first: &str, second: &str) -> String {
        hex(&self.mac(role, first, second).finalize().into_bytes())
    }

    /// Constant-time comparison of `given` (hex) with the MAC it should be.
    fn check(&self, role: &str, first: &str, second: &str, given: &str) -> bool {
        unhex(given).is_some_and(|bytes| self.mac(role, first, second).verify_slice(&bytes).is_ok())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<secret>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The peer ended the handshake and said why.
    #[error("{0}")]
    Rejected(String),
    #[error("the receiver requires a token: give this sender the receiver's (--token or {TOKEN_ENV})")]
    TokenRequired,
    #[error("authentication failed: the sender's token does not match this receiver's")]
    WrongToken,
    #[error("the receiver could not prove it holds this sender's token: refusing to send it anything")]
    ReceiverUnproven,
    #[error("cannot draw a nonce: {0}")]
    Random(std::io::Error),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
}

/// The receiver's half, right after the preamble: nothing but the challenge and the proof is
/// read before it returns, and all of it before `deadline`.
pub fn authenticate_sender(conn: &mut Conn, token: Option<&Token>, deadline: Instant) -> Result<(), SessionError> {
    let ours = nonce()?;
    conn.send(&Message::Challenge { nonce: ours.clone(), token: token.is_some() })?;
    let (theirs, mac) = match conn.recv_before(deadline, MAX_HANDSHAKE_BYTES)? {
        Message::Proof { nonce, mac } => (nonce, mac),
        other => return Err(SessionError::Unexpected { expected: "proof", got: other.name() }),
    };
    let Some(token) = token else {
        if mac.is_some() {
            // A sender with a token wants to know who it talks to, and this side cannot say.
            let reason = "this receiver holds no token, and the sender offered one: give both the same token";
            let _ = conn.send(&Message::Reject { reason: reason.into(), problems: Vec::new() });
            return Err(SessionError::Rejected(reason.into()));
        }
        conn.send(&Message::Authenticated { mac: None })?;
        return Ok(());
    };
    if !mac.is_some_and(|mac| token.check("sender", &ours, &theirs, &mac)) {
        let _ = conn.send(&Message::Reject { reason: SessionError::WrongToken.to_string(), problems: Vec::new() });
        return Err(SessionError::WrongToken);
    }
    conn.send(&Message::Authenticated { mac: Some(token.sign("receiver", &theirs, &ours)) })?;
    Ok(())
}

/// The sender's half: answers the receiver's challenge and, with a token, checks that the
/// receiver holds it too.
pub fn authenticate_receiver(conn: &mut Conn, token: Option<&Token>, deadline: Instant) -> Result<(), SessionError> {
    let (theirs, required) = match conn.recv_before(deadline, MAX_HANDSHAKE_BYTES)? {
        Message::Challenge { nonce, token } => (nonce, token),
        Message::Reject { reason, .. } => return Err(SessionError::Rejected(reason)),
        other => return Err(SessionError::Unexpected { expected: "challenge", got: other.name() }),
    };
    if required && token.is_none() {
        return Err(SessionError::TokenRequired);
    }
    let ours = nonce()?;
    let mac = token.map(|t| t.sign("sender", &theirs, &ours));
    conn.send(&Message::Proof { nonce: ours.clone(), mac })?;
    match conn.recv_before(deadline, MAX_HANDSHAKE_BYTES)? {
        Message::Authenticated { mac } => match token {
            None => Ok(()),
            Some(token) if mac.is_some_and(|mac| token.check("receiver", &ours, &theirs, &mac)) => Ok(()),
            Some(_) => Err(SessionError::ReceiverUnproven),
        },
        Message::Reject { reason, .. } => Err(SessionError::Rejected(reason)),
        other => Err(SessionError::Unexpected { expected: "authenticated", got: other.name() }),
    }
}

/// Why an endpoint may not be served.
#[derive(Debug, thiserror::Error)]
#[error(
    "refusing to listen on {endpoint} without a token: anyone who can reach it could {what} \
     (set --token or {TOKEN_ENV}, or pass --insecure)"
)]
pub struct ExposureError {
    pub endpoint: String,
    pub what: &'static str,
}

/// An endpoint that other hosts can reach (not a Unix socket, not loopback) needs a token,
/// unless the caller says `insecure`. `what` says what a stranger could do there.
pub fn check_exposure(
    endpoint: &Endpoint,
    token: Option<&Token>,
    insecure: bool,
    what: &'static str,
) -> Result<(), ExposureError> {
    if token.is_some() || insecure || endpoint.is_local() {
        return Ok(());
    }
    Err(ExposureError { endpoint: endpoint.to_string(), what })
}

/// Counts the connections served at once; a slot is given back when dropped.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    active: Arc<AtomicUsize>,
    max: usize,
}

/// One connection's place under a [`ConnectionLimit`].
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl ConnectionLimit {
    pub fn new(max: usize) -> ConnectionLimit {
        ConnectionLimit { active: Arc::new(AtomicUsize::new(0)), max }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot, or None when `max` connections are open.
    pub fn try_take(&self) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| Slot(self.active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn nonce() -> Result<String, SessionError> {
    let mut bytes = [0u8; NONCE_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        filled += rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())
            .map_err(|e| SessionError::Random(e.into()))?;
    }
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 || !text.is_ascii() {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Stream;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Runs both halves over a socket pair; the receiver's result and the sender's.
    fn handshake(receiver: Option<&str>, sender: Option<&str>) -> (Result<(), SessionError>, Result<(), SessionError>) {
        let (a, b) = UnixStream::pair().unwrap();
        let receiver_token = receiver.and_then(Token::new);
        let serving = std::thread::spawn(move || {
            let mut conn = Conn::server(Stream::Unix(b), deadline()).unwrap();
            authenticate_sender(&mut conn, receiver_token.as_ref(), deadline())
        });
        let mut conn = Conn::client(Stream::Unix(a)).unwrap();
        let sent = authenticate_receiver(&mut conn, sender.and_then(Token::new).as_ref(), deadline());
        (serving.join().unwrap(), sent)
    }

    #[test]
    fn matching_tokens_and_no_tokens_authenticate() {
        let (r, s) = handshake(Some("s3cret"), Some("s3cret"));
        assert!(r.is_ok() && s.is_ok(), "{r:?} {s:?}");
        let (r, s) = handshake(None, None);
        assert!(r.is_ok() && s.is_ok(), "{r:?} {s:?}");
    }

    #[test]
    fn a_wrong_missing_or_unexpected_token_is_refused_by_name() {
        let (r, s) = handshake(Some("s3cret"), Some("guess"));
        assert!(matches!(r, Err(SessionError::WrongToken)), "{r:?}");
        assert!(s.unwrap_err().to_string().contains("token does not match"));

        let (r, s) = handshake(Some("s3cret"), None);
        assert!(r.is_err());
        assert!(matches!(s, Err(SessionError::TokenRequired)), "{s:?}");

        // A sender with a token does not talk to a receiver that cannot prove it holds it.
        let (r, s) = handshake(None, Some("s3cret"));
        assert!(r.is_err());
        assert!(s.unwrap_err().to_string().contains("holds no token"));
    }

    #[test]
    fn proofs_are_bound_to_role_and_nonces() {
        let token = Token::new("k").unwrap();
        let mac = token.sign("sender", "aa", "bb");
        assert!(token.check("sender", "aa", "bb", &mac));
        assert!(!token.check("receiver", "aa", "bb", &mac), "a sender's proof is not a receiver's");
        assert!(!token.check("sender", "bb", "aa", &mac));
        assert!(!token.check("sender", "aa", "bc", &mac));
        assert!(!Token::new("other").unwrap().check("sender", "aa", "bb", &mac));
        assert!(!token.check("sender", "aa", "bb", "zz"), "not hex");
        assert!(!token.check("sender", "aa", "bb", &mac[..10]), "truncated");
        assert_ne!(nonce().unwrap(), nonce().unwrap());
        assert_eq!(format!("{token:?}"), "Token(<secret>)");
        assert!(Token::new("").is_none());
        assert!(token.matches(b"k") && !token.matches(b"K") && !token.matches(b"k ") && !token.matches(b""));
    }

    #[test]
    fn frames_before_authentication_stay_small() {
        let (a, b) = UnixStream::pair().unwrap();
        let serving = std::thread::spawn(move || {
            let mut conn = Conn::server(Stream::Unix(b), deadline()).unwrap();
            authenticate_sender(&mut conn, Token::new("k").as_ref(), deadline())
        });
        let mut conn = Conn::client(Stream::Unix(a)).unwrap();
        let _challenge = conn.recv(Duration::from_secs(5)).unwrap();
        // A "proof" the size of a manifest.
        conn.send(&Message::Proof { nonce: "0".repeat(64 << 10), mac: None }).unwrap();
        let err = serving.join().unwrap().unwrap_err();
        assert!(matches!(err, SessionError::Protocol(ProtocolError::TooLarge { max: 4096, .. })), "{err:?}");
    }

    #[test]
    fn exposure_needs_a_token_or_insecure() {
        let open: Endpoint = "tcp://0.0.0.0:7000".parse().unwrap();
        let err = check_exposure(&open, None, false, "push weights").unwrap_err().to_string();
        assert!(err.contains("tcp://0.0.0.0:7000") && err.contains("--insecure"), "{err}");
        assert!(check_exposure(&open, Token::new("k").as_ref(), false, "x").is_ok());
        assert!(check_exposure(&open, None, true, "x").is_ok());
        assert!(check_exposure(&"tcp://127.0.0.1:7000".parse().unwrap(), None, false, "x").is_ok());
        assert!(check_exposure(&"unix:/tmp/x.sock".parse().unwrap(), None, false, "x").is_ok());
    }

    #[test]
    fn connection_slots_are_bounded_and_given_back() {
        let limit = ConnectionLimit::new(2);
        let a = limit.try_take().unwrap();
        let _b = limit.try_take().unwrap();
        assert!(limit.try_take().is_none());
        drop(a);
        let _c = limit.try_take().expect("a slot given back is taken again");
        assert!(limit.try_take().is_none(), "and only that one");
    }
}
