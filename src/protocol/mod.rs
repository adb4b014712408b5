//! The pure protocol codec: bytes in, typed frames out, and back. No I/O, no clocks.

pub mod frames;
pub mod json;

pub use frames::{Data, DataType, Downstream, ErrorDetail, Protocol, ProtocolError, Upstream};
