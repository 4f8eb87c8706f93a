//! Endpoints and byte streams: TCP across hosts, Unix sockets on one host.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Where a receiver listens: `tcp://HOST:PORT` (or `HOST:PORT`), or `unix:/path` (or a path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') || s.starts_with("./") {
            return Ok(Endpoint::Unix(PathBuf::from(s)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        if addr.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()) {
            Ok(Endpoint::Tcp(addr.to_string()))
        } else {
            Err(format!("`{s}` is not an endpoint (expected tcp://HOST:PORT, HOST:PORT or unix:/path)"))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Endpoint {
    pub fn connect(&self, timeout: Duration) -> io::Result<Stream> {
        match self {
            Endpoint::Tcp(addr) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to no address"));
                for sock in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sock, timeout) {
                        Ok(s) => {
                            // Control messages are small and latency-bound.
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Endpoint::Unix(path) => Ok(Stream::Unix(UnixStream::connect(path)?)),
        }
    }

    /// Binds a listener. A Unix socket is its owner's alone (mode 0600); a stale socket file
    /// left by a dead process is replaced, a live one is an error.
    pub fn bind(&self) -> io::Result<Listener> {
        match self {
            Endpoint::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr.as_str())?)),
            Endpoint::Unix(path) => {
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        let message = format!("another process is listening on {}", path.display());
                        return Err(io::Error::new(io::ErrorKind::AddrInUse, message));
                    }
                    std::fs::remove_file(path)?;
                }
                // Bound under a private name, made the owner's, then moved into place: the
                // socket is never reachable at `path` with the umask's permissions.
                let name = path.file_name().map_or_else(|| "socket".into(), |n| n.to_string_lossy().into_owned());
                let staging = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
                let _ = std::fs::remove_file(&staging);
                let listener = UnixListener::bind(&staging)?;
                let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
                    .and_then(|()| std::fs::rename(&staging, path));
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&staging);
                    return Err(e);
                }
                Ok(Listener::Unix(listener, path.clone()))
            }
        }
    }

    pub fn is_local(&self) -> bool {
        match self {
            Endpoint::Unix(_) => true,
            Endpoint::Tcp(addr) => {
                addr.to_socket_addrs().map(|mut a| a.all(|s: SocketAddr| s.ip().is_loopback())).unwrap_or(false)
            }
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    /// Removes its socket file when dropped.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// The endpoint a client should connect to (the real port when bound to port 0).
    pub fn endpoint(&self) -> io::Result<Endpoint> {
        match self {
            Listener::Tcp(l) => Ok(Endpoint::Tcp(l.local_addr()?.to_string())),
            Listener::Unix(_, path) => Ok(Endpoint::Unix(path.clone())),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A connected byte stream of either kind.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Closes the reading side only: a thread blocked reading this socket (through another
    /// handle) wakes at once, seeing the end of the stream; writes still go through.
    pub fn stop_reading(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
        };
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or_else(|_| "tcp peer".into(), |a| a.to_string()),
            Stream::Unix(_) => "unix peer".into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("tcp://127.0.0.1:7000".parse(), Ok(Endpoint::Tcp("127.0.0.1:7000".into())));
        assert_eq!("localhost:9".parse(), Ok(Endpoint::Tcp("localhost:9".into())));
        assert_eq!("unix:/tmp/a.sock".parse(), Ok(Endpoint::Unix("/tmp/a.sock".into())));
        assert_eq!("/tmp/b.sock".parse(), Ok(Endpoint::Unix("/tmp/b.sock".into())));
        assert!("nonsense".parse::<Endpoint>().unwrap_err().contains("nonsense"));
        assert!("host:99999".parse::<Endpoint>().is_err());
        assert!("127.0.0.1:1".parse::<Endpoint>().unwrap().is_local());
    }

    #[test]
    fn unix_sockets_are_the_owners_alone_and_a_live_one_is_not_taken_over() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("wl-net-{}.sock", std::process::id()));
        let endpoint = Endpoint::Unix(path.clone());
        let listener = endpoint.bind().unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(endpoint.connect(Duration::from_secs(1)).is_ok(), "reachable at its name once moved");
        let err = endpoint.bind().err().expect("a live socket is not replaced");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        assert!(!path.exists());
    }
}
