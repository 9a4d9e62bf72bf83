//! The one protocol that every role speaks on the registrar's Unix socket:
//! serde messages, encoded with postcard, in length-prefixed frames.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of
//! postcard. Frames larger than [`MAX_FRAME`] are refused before any byte of
//! the body is buffered. The first frame in each direction is a `Hello`
//! naming [`PROTOCOL_VERSION`]; a peer that speaks another version gets an
//! `Error` reply and the connection is closed.
//!
//! [`decode_frame`] and [`encode_frame`] are pure; [`Connection`] adds the
//! buffered I/O on any `AsyncRead + AsyncWrite` stream, so the registrar, the
//! proxy, resync, status and the tests all share it.

pub mod client;

use crate::mapping::{EnvoyStatus, Mapping, MappingKey, MappingStatus, Server};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bumped whenever a message changes shape.
pub const PROTOCOL_VERSION: u16 = 2;

/// Hard limit on the body of one frame. A status reply for a few hundred
/// mappings fits easily.
pub const MAX_FRAME: usize = 64 * 1024;

const HEADER: usize = 4;

/// What a client asks of the registrar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must be the first frame of every connection.
    Hello { version: u16 },
    /// Add a mapping (idempotent for the same backend).
    Register(Registration),
    /// Remove a mapping; answered with `Done` whether or not it existed.
    Deregister(MappingKey),
    /// A proxy says who serves its mapping now, after it acted on a
    /// [`Reply::Serve`] or on its own (start-up deadline), and how many
    /// connections it has relayed in all. Not answered.
    Serving {
        key: MappingKey,
        server: Server,
        relayed: u64,
    },
    /// Ask for every mapping; answered with `Mappings`.
    List,
    /// Ask for the Envoy streams; answered with `Envoys`.
    Envoys,
    /// Ask for the fleet's catalog; answered with `Fleet` frames.
    Fleet,
    /// Ask how published ports are reached (claimed in nftables, or left
    /// to Docker's DNAT); answered with `Ports`.
    Ports,
    /// Ask for the mesh's identities and calls; answered with `Mesh`
    /// frames, or an `Error` without `--mesh`.
    Mesh,
}

/// A mapping and who keeps it alive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub mapping: Mapping,
    pub owner: Owner,
    /// Who serves the port as the registrant speaks: a proxy that registers
    /// again after a registrar restart may already have handed over.
    pub server: Server,
}

/// Whose life the mapping follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Owner {
    /// The connecting process itself (a proxy): the mapping dies with the
    /// connection, and with the process (found by SO_PEERCRED).
    Connection,
    /// Another process, named by pid (resync replays on a proxy's behalf):
    /// the mapping dies when that process does.
    Pid(u32),
}

/// What the registrar answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Hello {
        version: u16,
    },
    /// Stored.
    Accepted,
    /// Sent unasked to a proxy whenever who should serve its mapping
    /// changes: `Envoy` means every connected Envoy now listens on the port,
    /// so the proxy closes its own socket (hand over); `Relay` means no
    /// Envoy holds it any more, so the proxy binds and relays (take back).
    Serve(Server),
    /// Deregistered.
    Done,
    /// Part of the answer to `List`; `more` is set on all but the last.
    Mappings {
        items: Vec<MappingStatus>,
        more: bool,
    },
    /// The request was refused; the connection is closed after this frame
    /// when the request itself was bad.
    Error(String),
    /// The Envoy streams that count as Envoys.
    Envoys(Vec<EnvoyStatus>),
    /// Part of the answer to `Fleet`: this host, etcd's state, and
    /// instances of the catalog; `more` is set on all but the last.
    Fleet {
        host_id: String,
        etcd: String,
        items: Vec<crate::catalog::Row>,
        more: bool,
    },
    /// How published ports are reached.
    Ports(crate::nft::PortsState),
    /// Part of the answer to `Mesh`: this host's identities (in the first
    /// frame only) and the mesh ingress's calls; `more` is set on all but
    /// the last.
    Mesh {
        identities: Vec<MeshIdentity>,
        calls: Vec<MeshCall>,
        more: bool,
    },
}

/// One identity of this host and its current leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshIdentity {
    /// Its SPIFFE id.
    pub identity: String,
    /// When its leaf expires, in Unix seconds.
    pub expires: u64,
    /// Leaves issued to it since the registrar started.
    pub issued: u64,
}

/// Calls to one local service from one caller at the mesh port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshCall {
    pub service: String,
    /// The caller's SPIFFE id; `-` without a certificate.
    pub caller: String,
    pub handshakes: u64,
    pub failed: u64,
    pub denied: u64,
}

/// Why bytes did not make a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over [`MAX_FRAME`].
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes one message as a frame. Fails only if the message is too big.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER];
    out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - HEADER;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    out[..HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes the frame at the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some((msg, used)))` gives the message and how many bytes of
/// `buf` it took.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(header.try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        )));
    }
    Ok(Some((msg, HEADER + len)))
}

/// Errors of a [`Connection`].
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Why a request to the registrar got no usable reply, by kind: the
/// connection failed, the registrar said no, or it answered something
/// that does not fit.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the registrar closed the connection")]
    Closed,
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("the registrar refused: {0}")]
    Refused(String),
    #[error("unexpected reply from the registrar: {0}")]
    BadAnswer(String),
}

/// A framed, buffered stream. `read_frame` is cancel-safe: bytes read before
/// a cancelled call stay in the buffer for the next one.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    buf: Vec<u8>,
    /// How long a frame may take to arrive once its first byte has.
    frame_deadline: Option<std::time::Duration>,
    /// When the frame now in the buffer began to arrive.
    partial_since: Option<tokio::time::Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    pub fn new(stream: S) -> Self {
        Connection {
            stream,
            buf: Vec::with_capacity(512),
            frame_deadline: None,
            partial_since: None,
        }
    }

    /// Fails a read with `TimedOut` when a frame, once begun, is not whole
    /// within `d`, so that a peer cannot hold a half-sent frame open.
    pub fn with_frame_deadline(mut self, d: std::time::Duration) -> Self {
        self.frame_deadline = Some(d);
        self
    }

    /// Reads the next message. `Ok(None)` is a clean close between frames.
    pub async fn read_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ConnError> {
        loop {
            if let Some((msg, used)) = decode_frame::<T>(&self.buf)? {
                self.buf.drain(..used);
                self.partial_since = (!self.buf.is_empty()).then(tokio::time::Instant::now);
                return Ok(Some(msg));
            }
            // The header check above bounds the buffer to one frame plus one read.
            self.buf.reserve(4096);
            let read = match (self.frame_deadline, self.buf.is_empty()) {
                (Some(d), false) => {
                    let since = *self
                        .partial_since
                        .get_or_insert_with(tokio::time::Instant::now);
                    match tokio::time::timeout_at(since + d, self.stream.read_buf(&mut self.buf))
                        .await
                    {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(ConnError::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("a frame took over {d:?} to arrive"),
                            )))
                        }
                    }
                }
                _ => self.stream.read_buf(&mut self.buf).await?,
            };
            if read == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnError::Truncated)
                };
            }
        }
    }

    pub async fn write_frame<T: Serialize>(&mut self, msg: &T) -> Result<(), ConnError> {
        let bytes = encode_frame(msg)?;
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Client side of the handshake: send `Hello`, expect `Hello` back.
    pub async fn client_hello(&mut self) -> Result<(), CallError> {
        self.write_frame(&Request::Hello {
            version: PROTOCOL_VERSION,
        })
        .await?;
        match self.read_frame::<Reply>().await? {
            Some(Reply::Hello { .. }) => Ok(()),
            Some(Reply::Error(e)) => Err(CallError::Refused(e)),
            Some(other) => Err(CallError::BadAnswer(format!("{other:?} to hello"))),
            None => Err(CallError::Closed),
        }
    }

    /// Sends one request and reads its reply. `Serve` frames that the
    /// registrar pushed meanwhile are not replies and are skipped.
    /// A `Reply::Error` is a reply, for the caller to read.
    pub async fn call(&mut self, req: &Request) -> Result<Reply, CallError> {
        self.write_frame(req).await?;
        loop {
            match self.read_frame::<Reply>().await? {
                Some(Reply::Serve(_)) => continue,
                Some(reply) => return Ok(reply),
                None => return Err(CallError::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::{Backend, Proto};

    fn mapping() -> Mapping {
        Mapping {
            key: MappingKey {
                proto: Proto::Tcp,
                host_ip: "::".parse().unwrap(),
                host_port: 8080,
            },
            backend: Backend {
                container_ip: "172.17.0.2".parse().unwrap(),
                container_port: 80,
            },
        }
    }

    #[test]
    fn round_trip_and_partial_input() {
        let req = Request::Register(Registration {
            mapping: mapping(),
            owner: Owner::Pid(42),
            server: Server::Envoy,
        });
        let bytes = encode_frame(&req).unwrap();
        for cut in 0..bytes.len() {
            assert_eq!(decode_frame::<Request>(&bytes[..cut]).unwrap(), None);
        }
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        let (msg, used) = decode_frame::<Request>(&two).unwrap().unwrap();
        assert_eq!(msg, req);
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let header = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(
            decode_frame::<Request>(&header),
            Err(FrameError::TooLarge(MAX_FRAME + 1))
        );
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        let mut garbage = vec![0, 0, 0, 3];
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(
            decode_frame::<Request>(&garbage),
            Err(FrameError::Malformed(_))
        ));
        let mut body = postcard::to_allocvec(&Request::List).unwrap();
        body.push(7);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        assert!(matches!(
            decode_frame::<Request>(&framed),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn too_big_message_is_not_encoded() {
        let big = Reply::Error("x".repeat(MAX_FRAME + 10));
        assert!(matches!(encode_frame(&big), Err(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn connection_reads_frames_split_across_writes_and_reports_truncation() {
        let (a, b) = tokio::io::duplex(64);
        let mut client = Connection::new(a);
        let mut server = Connection::new(b);
        client.write_frame(&Request::List).await.unwrap();
        client
            .write_frame(&Request::Deregister(mapping().key))
            .await
            .unwrap();
        assert_eq!(
            server.read_frame::<Request>().await.unwrap(),
            Some(Request::List)
        );
        assert_eq!(
            server.read_frame::<Request>().await.unwrap(),
            Some(Request::Deregister(mapping().key))
        );
        let mut raw = client.stream;
        raw.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        drop(raw);
        assert!(matches!(
            server.read_frame::<Request>().await,
            Err(ConnError::Truncated)
        ));
    }
}
