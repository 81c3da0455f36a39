//! Transport: everything that moves bytes, whatever the protocol around
//! them.
//!
//! - [`SocketOptions`]: the one place upstream sockets are made (mark for
//!   the loop guard, TCP keepalive, `TCP_USER_TIMEOUT`).
//! - [`Duplex`], [`ChunkRead`], [`ChunkWrite`]: a connection as two halves
//!   that move `Bytes` chunks. A TCP socket and an HBONE `CONNECT` stream
//!   both implement them, so one [`relay`] serves plain and tunnelled
//!   connections, with no copy between the socket and h2 (chunks read from
//!   one side are handed to the other as they are).
//! - [`ReadBuffer`]: read buffers start small, grow while reads fill them,
//!   and are released whenever the connection goes quiet, so an idle
//!   connection holds no buffer at all.
//! - [`H2Stream`]: an HBONE stream, also as `AsyncRead + AsyncWrite` for
//!   protocol code (hyper) that wants that.
//! - [`Peekable`]: a connection whose first bytes can be looked at before
//!   deciding what it is (protocol detection), then relayed in full.
//! - [`Workers`]: the threads that accept and serve connections, each with
//!   its own event loop (and its own accept loop on every pod listener).
#![forbid(unsafe_code)]

mod accept;
mod h2;
mod hyper_io;
mod io;
mod peek;
mod relay;
mod socket;
mod workers;

pub use self::h2::{h2_io, H2Recv, H2Send, H2Stream};
use accept::accept_until;
pub use hyper_io::HyperIo;
pub use io::{ChunkRead, ChunkWrite, Duplex, Either, ReadBuffer, Stream};
pub use peek::Peekable;
pub use relay::{relay, End, RelayOptions, Relayed};
pub use socket::{Keepalive, SocketOptions};
pub use workers::{allowed_cpus, reset, worker_index, Pinning, Workers, WorkersError};
