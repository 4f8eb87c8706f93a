//! Passing file descriptors between the processes of one host over a Unix socket (SCM_RIGHTS).
//!
//! A trainer hands an inference engine the POSIX file descriptors of its shareable GPU memory this
//! way; unlike `pidfd_getfd` it needs no ptrace rights. The same socket carries the framed
//! protocol right before and after the descriptors, so both sides move exactly the bytes described
//! here and nothing more.
//!
//! Wire format: the descriptors travel in batches of at most [`MAX_FDS_PER_MESSAGE`], each batch
//! attached to one `sendmsg` carrying a single data byte, [`FD_MARKER`]. `n` descriptors therefore
//! take `ceil(n / MAX_FDS_PER_MESSAGE)` bytes of the stream; zero descriptors take none (both
//! sides do nothing). The receiver reads those bytes one `recvmsg` at a time with a one-byte
//! buffer, so it never consumes a byte of the frame that follows. The receiving side must not
//! read the socket through a buffer that reads ahead (such as a `BufReader`), or the marker bytes
//! (and, worse, the descriptors attached to them) may be swallowed by that buffer.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The most descriptors attached to one message. Linux caps a single SCM_RIGHTS message at 253
/// (`SCM_MAX_FD`); 64 keeps each control buffer small (a few hundred bytes on the stack).
pub const MAX_FDS_PER_MESSAGE: usize = 64;

/// The data byte that carries each batch of descriptors.
pub const FD_MARKER: u8 = b'F';

/// Control-buffer space for one full batch.
const CONTROL_SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE));

/// Sends `fds` over `socket`: one message of one byte ([`FD_MARKER`]) per batch of at most
/// [`MAX_FDS_PER_MESSAGE`] descriptors. The receiver must call [`recv_fds`] with
/// `fds.len()`. Sending no descriptors writes nothing.
pub fn send_fds(socket: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for batch in fds.chunks(MAX_FDS_PER_MESSAGE) {
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !control.push(SendAncillaryMessage::ScmRights(batch)) {
            return Err(io::Error::other(format!("{} descriptors do not fit one control message", batch.len())));
        }
        let data = [FD_MARKER];
        loop {
            // NOSIGNAL: a closed peer is an EPIPE error, not a SIGPIPE that kills the process.
            match sendmsg(socket, &[IoSlice::new(&data)], &mut control, SendFlags::NOSIGNAL) {
                Ok(1) => break,
                Ok(n) => return Err(io::Error::other(format!("sendmsg sent {n} bytes of a 1-byte fd message"))),
                // A blocking sendmsg interrupted before sending anything: nothing went out, retry.
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Makes sure this process may open `extra` more descriptors, raising its soft limit (up to
/// the hard one) if not: a sender whose tensors lie in torch's expandable segments passes one
/// per 20 MiB mapping, ~3,000 for a 60 GB model, and soft limits of 1,024 are common.
pub fn make_room_for_descriptors(extra: usize) -> io::Result<()> {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count());
    let wanted = (open + extra + 64) as u64;
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|current| current >= wanted) {
        return Ok(());
    }
    if limit.maximum.is_some_and(|maximum| maximum < wanted) {
        return Err(io::Error::other(format!(
            "{extra} more file descriptors are needed ({open} open), beyond this process's hard limit of {}",
            limit.maximum.unwrap_or(0)
        )));
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum: limit.maximum })
        .map_err(|e| io::Error::other(format!("raising the file descriptor limit to {wanted}: {e}")))
}

/// Receives exactly `count` descriptors sent by [`send_fds`] (`count` must equal the number sent),
/// marked close-on-exec. Reads exactly the bytes `send_fds` wrote and no more. Errors, rather than
/// waits or guesses, when the peer closes first, when a message carries no descriptors or more
/// than were expected, or when the kernel truncated the control data (a batch larger than
/// [`MAX_FDS_PER_MESSAGE`], or the process ran out of descriptors). With a read timeout set on
/// `socket`, a peer that sends nothing gives a `WouldBlock`/`TimedOut` error after it.
pub fn recv_fds(socket: &UnixStream, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut received: Vec<OwnedFd> = Vec::with_capacity(count);
    while received.len() < count {
        let mut space = [MaybeUninit::<u8>::uninit(); CONTROL_SPACE];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut data = [0u8; 1];
        let msg = loop {
            match recvmsg(socket, &mut [IoSliceMut::new(&mut data)], &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(msg) => break msg,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        // Take ownership of whatever arrived first, so every descriptor is closed on any error
        // below (the ones in `received` when it drops, the rest when `control` drops).
        let mut batch: Vec<OwnedFd> = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = message {
                batch.extend(fds);
            }
        }
        if msg.bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("peer closed the socket after {} of {count} file descriptors", received.len()),
            ));
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "file descriptor control data truncated after {} of {count} descriptors (more than {MAX_FDS_PER_MESSAGE} in one message, or out of descriptors)",
                    received.len() + batch.len()
                ),
            ));
        }
        if data[0] != FD_MARKER || batch.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "expected a file-descriptor message ({} of {count} received), got byte {:#04x} with {} descriptors",
                    received.len(),
                    data[0],
                    batch.len()
                ),
            ));
        }
        if received.len() + batch.len() > count {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("peer sent more file descriptors than the {count} expected ({})", received.len() + batch.len()),
            ));
        }
        received.append(&mut batch);
    }
    Ok(received)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Temporary files removed on drop.
    struct TempFiles {
        paths: Vec<PathBuf>,
        files: Vec<File>,
    }

    impl Drop for TempFiles {
        fn drop(&mut self) {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn temp_files(n: usize) -> TempFiles {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let mut t = TempFiles { paths: Vec::new(), files: Vec::new() };
        for _ in 0..n {
            let id = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("weightlift-fd-pass-{}-{id}", std::process::id()));
            let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
            t.paths.push(path);
            t.files.push(f);
        }
        t
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (a, b)
    }

    fn write_frame(mut s: &UnixStream, payload: &[u8]) {
        s.write_all(&(payload.len() as u32).to_le_bytes()).unwrap();
        s.write_all(payload).unwrap();
    }

    fn read_frame(mut s: &UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
        s.read_exact(&mut payload).unwrap();
        payload
    }

    /// Sends `n` descriptors between two frames (from another thread, so large batches cannot
    /// fill the socket buffer while nobody reads) and checks every one refers to the same file.
    fn round_trip(n: usize) {
        let files = temp_files(n);
        let (a, b) = pair();
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                write_frame(&a, b"before");
                let fds: Vec<BorrowedFd<'_>> = files.files.iter().map(|f| f.as_fd()).collect();
                send_fds(&a, &fds).unwrap();
                write_frame(&a, b"after the descriptors");
            });
            assert_eq!(read_frame(&b), b"before");
            let got = recv_fds(&b, n).unwrap();
            assert_eq!(read_frame(&b), b"after the descriptors");
            sender.join().unwrap();
            assert_eq!(got.len(), n);
            for (i, (fd, original)) in got.into_iter().zip(&files.files).enumerate() {
                let mut received = File::from(fd);
                let (m1, m2) = (received.metadata().unwrap(), original.metadata().unwrap());
                assert_eq!((m1.dev(), m1.ino()), (m2.dev(), m2.ino()), "descriptor {i} refers to another file");
                // Write through the received descriptor, read back through the original one.
                let text = format!("file {i}");
                received.write_all(text.as_bytes()).unwrap();
                let mut original = original;
                original.seek(SeekFrom::Start(0)).unwrap();
                let mut back = String::new();
                original.read_to_string(&mut back).unwrap();
                assert_eq!(back, text);
                let flags = rustix::io::fcntl_getfd(&received).unwrap();
                assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "descriptor {i} is not close-on-exec");
            }
        });
    }

    #[test]
    fn fd_pass_one() {
        round_trip(1);
    }

    #[test]
    fn fd_pass_three() {
        round_trip(3);
    }

    #[test]
    fn room_for_more_descriptors_raises_the_soft_limit_and_says_when_it_cannot() {
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        make_room_for_descriptors(8).unwrap();
        if let Some(hard) = getrlimit(Resource::Nofile).maximum.filter(|&h| h > soft + 256) {
            make_room_for_descriptors(soft as usize + 100).unwrap();
            let raised = getrlimit(Resource::Nofile).current.unwrap();
            assert!(raised > soft + 100 && raised <= hard, "{soft} -> {raised} (hard {hard})");
        }
        let err = make_room_for_descriptors(usize::MAX / 4).unwrap_err().to_string();
        assert!(err.contains("descriptors"), "{err}");
    }

    #[test]
    fn fd_pass_two_hundred_in_batches() {
        round_trip(200);
    }

    #[test]
    fn fd_pass_zero_moves_no_bytes() {
        let (a, b) = pair();
        send_fds(&a, &[]).unwrap();
        write_frame(&a, b"next");
        assert!(recv_fds(&b, 0).unwrap().is_empty());
        assert_eq!(read_frame(&b), b"next");
    }

    #[test]
    fn fd_pass_peer_closing_early_is_an_error() {
        let files = temp_files(MAX_FDS_PER_MESSAGE + 1);
        let (a, b) = pair();
        let fds: Vec<BorrowedFd<'_>> = files.files.iter().take(MAX_FDS_PER_MESSAGE).map(|f| f.as_fd()).collect();
        send_fds(&a, &fds).unwrap();
        drop(a);
        let err = recv_fds(&b, MAX_FDS_PER_MESSAGE + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn fd_pass_more_than_expected_is_an_error() {
        let files = temp_files(3);
        let (a, b) = pair();
        let fds: Vec<BorrowedFd<'_>> = files.files.iter().map(|f| f.as_fd()).collect();
        send_fds(&a, &fds).unwrap();
        let err = recv_fds(&b, 2).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn fd_pass_oversized_batch_is_truncated_and_an_error() {
        // A peer that ignores the batch bound: 100 descriptors in one message overflow the
        // receiver's control buffer, and the kernel reports MSG_CTRUNC.
        let files = temp_files(100);
        let (a, b) = pair();
        let fds: Vec<BorrowedFd<'_>> = files.files.iter().map(|f| f.as_fd()).collect();
        let mut space = vec![MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(100))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        assert_eq!(sendmsg(&a, &[IoSlice::new(&[FD_MARKER])], &mut control, SendFlags::NOSIGNAL).unwrap(), 1);
        let err = recv_fds(&b, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn fd_pass_plain_data_instead_of_descriptors_is_an_error() {
        let (a, b) = pair();
        write_frame(&a, b"no fds here");
        let err = recv_fds(&b, 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    #[test]
    fn fd_pass_silent_peer_times_out() {
        let (a, b) = pair();
        b.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let err = recv_fds(&b, 1).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err}");
        drop(a);
    }
}
